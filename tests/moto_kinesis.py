"""moto's Kinesis, made to behave as AWS does where the Kinesis source's tests depend on it.

The tests' moto server (moto_server_atomic.py) installs this. Where moto differs from AWS:

* Resharding. moto's SplitShard moves the parent's records into the shards and keeps routing
  new records to the closed parent (it looks a key up among closed shards too), and its
  MergeShards copies both parents' records into the child. AWS keeps a closed shard's records
  in it, routes new records to open shards only, and ends a closed shard's reads with no next
  iterator once they pass its last record. Here: the same as AWS.
* ListShards with a NextToken. moto needs the stream named on every page; AWS refuses a page
  request that names it ("NextToken and StreamARN cannot be provided together"). Here: as AWS.
* Iterator expiry. moto's iterators never expire; AWS's expire after 5 minutes. Here they do,
  after the stream's ``poller-test:iterator-ttl-s`` tag (seconds) or 300 s.
* Concurrency. moto's Kinesis is not thread-safe: a GetRecords walking a shard while a put adds
  to it, or a put while a reshard adds shards, fails with a 500. Here calls are serialized.
* Throttling. moto never refuses a GetRecords; AWS does beyond 5 calls or 2 MB per second per
  shard. Here a stream tagged ``poller-test:throttle-get-records`` = N answers its next N
  GetRecords with ProvisionedThroughputExceededException, as AWS does.
"""

from __future__ import annotations

import base64
import functools
import threading
import time
from collections.abc import Callable
from operator import attrgetter
from typing import Any

from moto.core.exceptions import JsonRESTError
from moto.kinesis import models, responses, utils
from moto.kinesis.exceptions import InvalidArgumentError
from moto.kinesis.models import KinesisBackend, Shard, Stream

ITERATOR_TTL_TAG = "poller-test:iterator-ttl-s"
THROTTLE_TAG = "poller-test:throttle-get-records"
AWS_ITERATOR_TTL_S = 300.0


def _shard_for_key(self: Stream, partition_key: str, explicit_hash_key: str) -> Shard | None:
    if explicit_hash_key:
        key = int(explicit_hash_key)
    else:
        key = int(models.md5_hash(partition_key.encode("utf-8")).hexdigest(), 16)
    for shard in self.shards.values():
        if shard.is_open and shard.starting_hash <= key <= shard.ending_hash:
            return shard
    return None


def _new_shard(self: Stream, start: int, end: int, parent: str, adjacent: str | None) -> Shard:
    last = max(self.shards.values(), key=attrgetter("_shard_id"))._shard_id
    shard = Shard(last + 1, start, end, parent=parent, adjacent_parent=adjacent)
    self.shards[shard.shard_id] = shard
    return shard


def _split_shard(self: Stream, shard_to_split: str, new_starting_hash_key: str) -> None:
    shard = self.shards[shard_to_split]
    new_start = int(new_starting_hash_key)
    if not shard.is_open:
        raise InvalidArgumentError(f"Shard {shard_to_split} has already been merged or split.")
    if not shard.starting_hash < new_start <= shard.ending_hash:
        raise InvalidArgumentError(f"NewStartingHashKey {new_start} is outside the shard.")
    shard.is_open = False
    _new_shard(self, shard.starting_hash, new_start - 1, shard.shard_id, None)
    _new_shard(self, new_start, shard.ending_hash, shard.shard_id, None)


def _merge_shards(self: Stream, shard_to_merge: str, adjacent_shard_to_merge: str) -> None:
    first, second = self.shards[shard_to_merge], self.shards[adjacent_shard_to_merge]
    if not (first.is_open and second.is_open):
        raise InvalidArgumentError("Both shards must be open to be merged.")
    low, high = sorted((first, second), key=attrgetter("starting_hash"))
    if low.ending_hash + 1 != high.starting_hash:
        raise InvalidArgumentError(
            f"Shards {shard_to_merge} and {adjacent_shard_to_merge} are not adjacent."
        )
    first.is_open = second.is_open = False
    _new_shard(self, low.starting_hash, high.ending_hash, first.shard_id, second.shard_id)


# Iterators carry the time they were issued, so they can expire.
def _compose_shard_iterator(stream_name: str | None, shard: Any, last_sequence_id: int) -> str:
    text = f"{stream_name}:{shard.shard_id}:{last_sequence_id}:{time.time()}"
    return base64.encodebytes(text.encode()).decode()


def _decompose_shard_iterator(shard_iterator: str) -> list[str]:
    return base64.decodebytes(shard_iterator.encode()).decode().split(":")[:3]


def _issued_at(shard_iterator: str) -> float:
    parts = base64.decodebytes(shard_iterator.encode()).decode().split(":")
    return float(parts[3]) if len(parts) > 3 else time.time()


_get_records = KinesisBackend.get_records


def _get_records_like_aws(
    self: KinesisBackend, stream_arn: str | None, shard_iterator: str, limit: int | None
) -> tuple[str | None, list[Any], int]:
    stream_name, shard_id, _ = _decompose_shard_iterator(shard_iterator)
    stream = self.describe_stream(stream_arn=stream_arn, stream_name=stream_name)
    issued = _issued_at(shard_iterator)
    ttl = float(stream.tags.get(ITERATOR_TTL_TAG, AWS_ITERATOR_TTL_S))
    if time.time() - issued > ttl:
        raise JsonRESTError(
            "ExpiredIteratorException",
            f"Iterator expired. The iterator was created at time {issued * 1000:.0f} while "
            f"right now it is {time.time() * 1000:.0f} which is further in the future than the "
            f"tolerated delay of {ttl * 1000:.0f} milliseconds.",
        )
    throttles = int(stream.tags.get(THROTTLE_TAG, "0"))
    if throttles > 0:
        stream.tags[THROTTLE_TAG] = str(throttles - 1)
        raise JsonRESTError(
            "ProvisionedThroughputExceededException",
            f"Rate exceeded for shard {shard_id} in stream {stream.stream_name} under account "
            f"{self.account_id}.",
        )
    next_iterator, records, behind = _get_records(self, stream_arn, shard_iterator, limit)
    shard = stream.get_shard(shard_id)
    _, _, position = _decompose_shard_iterator(next_iterator)
    if not shard.is_open and int(position) >= shard.get_max_sequence_number():
        return None, records, behind  # type: ignore[return-value]
    return next_iterator, records, behind


# ListShards pages: the stream and the offset of the next page behind each NextToken handed
# out. Paged here rather than by moto, whose list_shards changed shape between 5.x releases.
_page_tokens: dict[str, tuple[str | None, str | None, int]] = {}


def _list_shards_like_aws(self: responses.KinesisResponse) -> Any:
    stream_arn = self._get_param("StreamARN")
    stream_name = self._get_param("StreamName")
    next_token = self._get_param("NextToken")
    start = 0
    if next_token is not None:
        if stream_arn or stream_name:
            named = "StreamARN" if stream_arn else "StreamName"
            raise InvalidArgumentError(f"NextToken and {named} cannot be provided together.")
        if next_token not in _page_tokens:
            raise InvalidArgumentError(f"Invalid NextToken: {next_token}")
        stream_arn, stream_name, start = _page_tokens[next_token]
    limit = int(self._get_param("MaxResults", 10000))
    stream = self.kinesis_backend.describe_stream(stream_arn=stream_arn, stream_name=stream_name)
    shards = sorted(stream.shards.values(), key=attrgetter("shard_id"))
    page = shards[start : start + limit]
    result: dict[str, Any] = {"Shards": [s.to_json() for s in page]}
    if start + limit < len(shards):
        token = base64.b64encode(f"{stream.arn}:{start + limit}".encode()).decode()
        _page_tokens[token] = (stream_arn, stream_name, start + limit)
        result["NextToken"] = token
    return responses.ActionResult(result)


_lock = threading.RLock()


def _serialized(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        with _lock:
            return method(*args, **kwargs)

    return call


def install() -> None:
    Stream.get_shard_for_key = _shard_for_key  # type: ignore[method-assign]
    Stream.split_shard = _split_shard  # type: ignore[method-assign]
    Stream.merge_shards = _merge_shards  # type: ignore[method-assign]
    utils.compose_shard_iterator = _compose_shard_iterator
    models.compose_shard_iterator = _compose_shard_iterator
    models.decompose_shard_iterator = _decompose_shard_iterator
    KinesisBackend.get_records = _get_records_like_aws  # type: ignore[method-assign]
    for name in (
        "get_records",
        "get_shard_iterator",
        "put_record",
        "put_records",
        "split_shard",
        "merge_shards",
        "update_shard_count",
        "list_shards",
    ):
        setattr(KinesisBackend, name, _serialized(getattr(KinesisBackend, name)))
    responses.KinesisResponse.list_shards = _list_shards_like_aws  # type: ignore[method-assign]
