"""moto_server with each SQS receive made atomic; the tests' MotoServer runs this script.

moto's threaded server checks a message's visibility and marks it received without a lock,
so two ReceiveMessage calls at the same moment can both get the same message (both with the
receive count of the second; getmoto/moto#519). Real SQS hides a message from the moment one
receive takes it, and the end-to-end tests count deliveries, so here the take is serialized.
Long polling waits outside the lock so that one waiting receive never holds up another.

It also makes moto's Kinesis behave as AWS does in resharding, iterator expiry, throttling and
ListShards paging (moto_kinesis.py says where and why).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import moto_kinesis
from moto.server import main
from moto.sqs.models import SQSBackend

_take_lock = threading.Lock()
_receive = SQSBackend.receive_message


def _atomic_receive(
    self: SQSBackend,
    queue_name: str,
    count: int,
    wait_seconds_timeout: int,
    visibility_timeout: int,
    message_attribute_names: list[str] | None = None,
) -> Any:
    deadline = time.monotonic() + wait_seconds_timeout
    while True:
        with _take_lock:
            # A wait of 0 makes moto look once and return, taking what is visible.
            got = _receive(self, queue_name, count, 0, visibility_timeout, message_attribute_names)
        left = deadline - time.monotonic()
        if got or left <= 0:
            return got
        # Sleeps until something is visible (or a second passes); the short sleep keeps a
        # queue whose visible messages are all held back (FIFO groups in flight) from spinning.
        self.get_queue(queue_name).wait_for_messages(min(left, 1.0))  # type: ignore[arg-type]
        time.sleep(0.01)


SQSBackend.receive_message = _atomic_receive  # type: ignore[method-assign]
moto_kinesis.install()

if __name__ == "__main__":
    main()
