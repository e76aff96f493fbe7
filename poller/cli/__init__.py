"""The `poller` command: thin wrappers that parse, call a service, print.

One module per group of commands; importing them registers their commands on ``app``.
"""

from poller.cli import dlq, fleet, mappings, run, send, status  # noqa: F401 - registers the commands
from poller.cli.common import app


def main() -> None:
    app()
