"""The table of event sources: URI scheme (or ARN service) -> the module that serves it.

Adding a source is one module (or package) that declares ``SOURCE`` (see ``base.SourceKind``),
one line here, and its tests. Modules are imported when a URI needs them, so a command that
touches only local queues never loads an AWS or Kafka client.
"""

SCHEMES: dict[str, str] = {
    "local": "poller.sources.local",
    "sqs": "poller.sources.sqs",
    "http": "poller.sources.sqs",  # an SQS queue URL
    "https": "poller.sources.sqs",
    "redis-queue": "poller.sources.redis_queue",
    "redis-stream": "poller.sources.redis_stream",
    "kinesis": "poller.sources.kinesis",
    "dynamodb": "poller.sources.dynamodb",
    "kafka": "poller.sources.kafka",
}

ARN_SERVICES: dict[str, str] = {
    "sqs": "poller.sources.sqs",
    "kinesis": "poller.sources.kinesis",
    "dynamodb": "poller.sources.dynamodb",
    "kafka": "poller.sources.kafka",  # MSK cluster ARNs: refused with a message
}
