"""Finding the source kind for a URI, through the table in ``poller/sources/__init__.py``."""

from __future__ import annotations

import importlib
import re
from functools import cache
from typing import Final

from poller.redaction import redact
from poller.sources import ARN_SERVICES, SCHEMES
from poller.sources.base import AwsDefaults, SourceKind, SourceSpec, SourceUriError

_ARN_SERVICE: Final = re.compile(r"^arn:[^:]*:(?P<service>[^:]*):")


class UnknownSourceError(SourceUriError):
    """No module serves this URI; ``forms`` lists what would be accepted."""

    def __init__(self, shown: str) -> None:
        super().__init__(f"Got {shown}; accepted forms: {'; '.join(accepted_forms())}.")


@cache
def _module_kind(module: str) -> SourceKind:
    kind: SourceKind = importlib.import_module(module).SOURCE
    return kind


def all_kinds() -> tuple[SourceKind, ...]:
    """Every kind in the table, in table order, each once."""
    modules = dict.fromkeys([*SCHEMES.values(), *ARN_SERVICES.values()])
    return tuple(_module_kind(m) for m in modules)


def runnable_kinds() -> tuple[SourceKind, ...]:
    return tuple(k for k in all_kinds() if k.runnable)


def accepted_forms() -> list[str]:
    """The URI forms this version can run, for errors and --help."""
    return [form for kind in runnable_kinds() for form in kind.forms]


def kind_of(uri: str) -> SourceKind:
    """The kind that serves ``uri``; raises UnknownSourceError."""
    if not isinstance(uri, str) or not uri:
        raise UnknownSourceError(repr(uri))
    if "://" in uri:
        module = SCHEMES.get(uri.split("://", 1)[0].lower())
    else:
        service = _ARN_SERVICE.match(uri)
        module = ARN_SERVICES.get(service["service"]) if service else None
    if module is None:
        raise UnknownSourceError(redact(uri))
    return _module_kind(module)


def parse_source(uri: str, defaults: AwsDefaults | None = None) -> SourceSpec:
    """Parse an event source URI or ARN; raises SourceUriError (UnknownSourceError when no
    module serves it)."""
    return kind_of(uri).parse(uri, defaults or AwsDefaults())
