"""Sleeps before returning: for watching timeouts, heartbeats, draining and scaling.

SLOW_SECONDS (environment, default 1) or a "sleep" key in a record body sets the delay.
"""

import contextlib
import json
import os
import time


def handler(event, context):
    delay = float(os.environ.get("SLOW_SECONDS", "1"))
    for record in event.get("Records", []) if isinstance(event, dict) else []:
        with contextlib.suppress(ValueError, AttributeError, KeyError, TypeError):
            delay = float(json.loads(record["body"]).get("sleep", delay))
    time.sleep(delay)
    return {"slept": delay, "remaining_ms": context.get_remaining_time_in_millis()}
