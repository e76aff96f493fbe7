"""Mapping errors shaped like the AWS errors they reproduce (ESM_SEMANTICS.md §1.7).

``MappingError.message`` is AWS's exact text (compare this one in tests and clients);
``str(error)`` adds a ``detail`` that names the parameter and the offending value where AWS's
own text does not, because a person has to be able to act on the error.
"""

from __future__ import annotations

from typing import Any, Final

INVALID_PARAMETER: Final = "InvalidParameterValueException"
CONFLICT: Final = "ResourceConflictException"
NOT_FOUND: Final = "ResourceNotFoundException"
IN_USE: Final = "ResourceInUseException"
_HTTP_STATUS: Final = {INVALID_PARAMETER: 400, CONFLICT: 409, NOT_FOUND: 404, IN_USE: 400}

MSG_UNRECOGNIZED_SOURCE: Final = "Unrecognized event source."
MSG_UNSUPPORTED_DESTINATION: Final = (
    "Unsupported DestinationConfig parameter for given event source mapping type."
)
MSG_QUEUE_WINDOW: Final = (
    "Maximum batch window in seconds must be greater than 0 "
    "if maximum batch size is greater than 10"
)
MSG_FIFO_WINDOW: Final = "Batching window is not supported for FIFO queues."
MSG_INVALID_FILTER: Final = "Invalid filter pattern definition."


class MappingError(ValueError):
    """A rejected mapping request, shaped like the AWS error it reproduces.

    ``code`` is the AWS error type, ``message`` the exact AWS text (compare this
    one in tests and clients), ``detail`` our addition naming the parameter and
    value, ``parameter`` the AWS parameter name when one is at fault.
    """

    def __init__(
        self,
        message: str,
        *,
        code: str = INVALID_PARAMETER,
        detail: str | None = None,
        parameter: str | None = None,
    ) -> None:
        self.code = code
        self.message = message
        self.detail = detail
        self.parameter = parameter
        super().__init__(f"{message} {detail}" if detail else message)

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS.get(self.code, 400)

    def to_aws(self) -> dict[str, str]:
        """The error body AWS's REST API returns (``Type`` is always ``User`` here)."""
        return {"__type": self.code, "Type": "User", "message": str(self)}


def validation_error(member: str, value: Any, constraint: str, parameter: str) -> MappingError:
    # AWS's own format for type-level constraint violations; it names both the
    # member and the value, so no detail is needed.
    shown = "null" if value is None else f"'{render(value)}'"
    return MappingError(
        f"1 validation error detected: Value {shown} at '{member}' failed to satisfy constraint: "
        f"{constraint}",
        parameter=parameter,
    )


def render(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(render(v) for v in value) + "]"
    return str(value)


def check_bounds(member: str, aws_name: str, value: int, lo: int | None, hi: int | None) -> None:
    if lo is not None and value < lo:
        raise validation_error(
            member, value, f"Member must have value greater than or equal to {lo}", aws_name
        )
    if hi is not None and value > hi:
        raise validation_error(
            member, value, f"Member must have value less than or equal to {hi}", aws_name
        )


def type_error(aws_name: str, expected: str, value: Any) -> MappingError:
    return MappingError(
        f"{aws_name} must be {expected}; got {value!r} ({type(value).__name__}).",
        parameter=aws_name,
    )
