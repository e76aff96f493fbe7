"""Reports the records whose body is not a JSON object with an "id" as batch item failures.

Use with FunctionResponseTypes = ["ReportBatchItemFailures"]: the good records are deleted,
the bad ones come back after the visibility timeout and end in the dead-letter queue.
"""

import json


def handler(event, context):
    failures = []
    for record in event["Records"]:
        try:
            body = json.loads(record["body"])
            if not isinstance(body, dict) or "id" not in body:
                raise ValueError("no id")
        except ValueError:
            failures.append({"itemIdentifier": record["messageId"]})
    return {"batchItemFailures": failures}
