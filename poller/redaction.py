"""The one credential redactor: every URI a person sees (messages, logs, status) goes through it."""

from __future__ import annotations

__all__ = ["redact"]


def redact(uri: str) -> str:
    """``uri`` with the password of its user info replaced by ``***`` (the user name stays).

    The user info runs up to the *last* ``@`` before any query or fragment: a password with an
    unencoded ``@`` or ``/`` must not leak a piece of itself. That may hide more than the
    password when a path holds an ``@`` too, which is the safe way to be wrong.
    """
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    cut = len(rest)
    for mark in ("?", "#"):
        index = rest.find(mark)
        if index != -1:
            cut = min(cut, index)
    at = rest.rfind("@", 0, cut)
    if at == -1:
        return uri
    user, colon, _password = rest[:at].partition(":")
    shown = f"{user}:***" if colon else "***"
    return f"{scheme}://{shown}@{rest[at + 1 :]}"
