"""An SQS dead-letter queue for `poller dlq`: peek with receives that hide nothing.

Peeking receives with ``VisibilityTimeout=0``: every message stays visible to everyone, but SQS
counts the receive (ApproximateReceiveCount grows by one per peek, and a DLQ with a redrive
policy of its own would move a message on after enough peeks).

Redrive is left to SQS itself (StartMessageMoveTask, the console's "Start DLQ redrive"): it
moves messages inside the service, while a receive-send-delete loop here would duplicate a
message whenever it stopped between its send and its delete. The SQS server the tests run
against (moto) does not implement StartMessageMoveTask, so poller cannot test a call to it;
``redrive`` says what to run instead of calling something untested.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from poller.sources.base import SourceError, SourceSpec
from poller.sources.dead_letters import DeadLetter, as_int, on_failure_details
from poller.sources.sqs.wire import MAX_BATCH_ENTRIES

if TYPE_CHECKING:
    from poller.sources.sqs.queue import SqsQueue

# Receives in a row that bring no message not seen yet before a peek stops short of what the
# queue says it holds (the count is approximate, and peeked messages come back at once).
EMPTY_ROUNDS: Final = 2
PEEK_WAIT_S: Final = 1  # long polling asks every server, not a sample


class SqsDeadLetters:
    def __init__(self, queue: SqsQueue) -> None:
        self.queue = queue

    async def start(self) -> None:
        await self.queue.start()

    async def close(self) -> None:
        await self.queue.close()

    async def peek(self, limit: int) -> list[DeadLetter]:
        queue = self.queue
        # Every receive counts against each message it returns: stop as soon as all the
        # queue holds (or ``limit``) was seen, not after a receive that brings nothing new.
        attributes = await queue._read_attributes(["ApproximateNumberOfMessages"])
        wanted = min(limit, int(attributes.get("ApproximateNumberOfMessages", limit)))
        seen: dict[str, DeadLetter] = {}
        empty = 0
        # Bounded: a message can come back on every receive, so rounds are counted too.
        for _ in range(limit // MAX_BATCH_ENTRIES + 10):
            if len(seen) >= wanted or empty >= EMPTY_ROUNDS:
                break
            response = await queue._call(
                "ReceiveMessage",
                queue._require().receive_message,
                QueueUrl=queue._require_url(),
                MaxNumberOfMessages=min(MAX_BATCH_ENTRIES, limit - len(seen)),
                VisibilityTimeout=0,
                WaitTimeSeconds=PEEK_WAIT_S,
                MessageAttributeNames=["All"],
                **{queue._system_attr_param: ["All"]},
            )
            fresh = [m for m in response.get("Messages", []) if m["MessageId"] not in seen]
            empty = 0 if fresh else empty + 1
            for raw in fresh[: limit - len(seen)]:
                seen[raw["MessageId"]] = self._letter(raw)
        return sorted(seen.values(), key=lambda letter: (letter.sent_ms or 0, letter.id))

    @staticmethod
    def _letter(raw: dict[str, Any]) -> DeadLetter:
        attributes: dict[str, str] = raw.get("Attributes", {})
        body = str(raw.get("Body", ""))
        reason, invokes = on_failure_details(body)
        source = attributes.get("DeadLetterQueueSourceArn")
        if reason is None and source is not None:
            reason = "maxReceiveCount exceeded (the source queue's redrive policy)"
        if invokes is None:
            invokes = as_int(attributes.get("ApproximateReceiveCount"))
        return DeadLetter(
            id=raw["MessageId"],
            body=body,
            reason=reason,
            receive_count=(
                invokes
                if invokes is not None
                else as_int(attributes.get("ApproximateReceiveCount"))
            ),
            source=source,
            sent_ms=as_int(attributes.get("SentTimestamp")),
            attributes={
                name: str(value.get("StringValue", value.get("BinaryValue", "")))
                for name, value in (raw.get("MessageAttributes") or {}).items()
            },
        )

    async def redrive(self, to: SourceSpec, limit: int | None) -> int:
        destination = to.display_uri if to.kind.name == "sqs" else "SOURCE_QUEUE_ARN"
        raise SourceError(
            f"poller does not redrive SQS queues: SQS moves dead letters back itself, each "
            f"once, with a message move task. Run `aws sqs start-message-move-task "
            f"--source-arn {self.queue.arn} --destination-arn {destination}` (or the "
            "console's 'Start DLQ redrive'), then `aws sqs list-message-move-tasks "
            f"--source-arn {self.queue.arn}` to follow it",
            retryable=False,
        )
