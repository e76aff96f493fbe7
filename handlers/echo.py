"""Returns what it was given: the smallest useful handler, and a way to see the event shape."""

import json


def handler(event, context):
    records = event.get("Records", []) if isinstance(event, dict) else []
    for record in records:
        print(json.dumps({"messageId": record.get("messageId"), "body": record.get("body")}))
    return {"received": len(records), "event": event if not records else None}
