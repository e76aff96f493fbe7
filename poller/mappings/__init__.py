"""The event source mapping (ESM) model: parameters, per-family defaults, ranges, validation.

The one place that knows which ESM parameter exists, what it defaults to for each family of
source, which values it accepts and which sources it applies to (ESM_SEMANTICS.md §1). The
config file, the CLI, the registry and the engine all ask it. Pure logic, no I/O.

* ``parameters``: the table of every parameter (``PARAMETERS``); ``checks``: the checks of
  nested values; ``errors``: AWS-shaped errors with AWS's exact messages (§1.7).
* ``model``: ``Mapping``, ``create_mapping`` / ``update_mapping`` (validate and build),
  ``duplicate_error`` (the 409 for a second mapping of one source and function).

What a source URI means is each source module's business (``poller.sources``).
"""

from poller.mappings.errors import (
    CONFLICT,
    IN_USE,
    INVALID_PARAMETER,
    NOT_FOUND,
    MappingError,
)
from poller.mappings.model import (
    DEFAULT_ACCOUNT,
    DEFAULT_REGION,
    NO_RECORDS_PROCESSED,
    STATES,
    Mapping,
    create_mapping,
    parse_event_source,
    update_mapping,
)
from poller.mappings.parameters import (
    KAFKA_DEFAULT_BATCHING_WINDOW_S,
    PARAMETERS,
    PARAMETERS_BY_AWS_NAME,
    PARAMETERS_BY_NAME,
    Parameter,
)
from poller.mappings.rules import check_runnable, duplicate_error

__all__ = [
    "CONFLICT",
    "DEFAULT_ACCOUNT",
    "DEFAULT_REGION",
    "INVALID_PARAMETER",
    "IN_USE",
    "KAFKA_DEFAULT_BATCHING_WINDOW_S",
    "NOT_FOUND",
    "NO_RECORDS_PROCESSED",
    "PARAMETERS",
    "PARAMETERS_BY_AWS_NAME",
    "PARAMETERS_BY_NAME",
    "STATES",
    "Mapping",
    "MappingError",
    "Parameter",
    "check_runnable",
    "create_mapping",
    "duplicate_error",
    "parse_event_source",
    "update_mapping",
]
