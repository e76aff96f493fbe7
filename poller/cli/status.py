"""`poller status`: the running daemon at a glance, from its /status endpoint."""

from __future__ import annotations

import contextlib
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Annotated, Any

import typer

from poller.cli.common import ConfigOption, app, fail, load, print_json
from poller.config import Config

# ANSI: cursor home, clear to the end of the screen. Drawing over the previous frame (instead
# of clearing first) keeps a refresh from flickering.
CLEAR_SCREEN: str = "\x1b[2J"
HOME: str = "\x1b[H"
CLEAR_BELOW: str = "\x1b[J"
CLEAR_LINE_END: str = "\x1b[K"


def daemon_url(cfg: Config) -> str:
    """Where the config's daemon answers; a wildcard listen address is reached on loopback."""
    host, port = cfg.daemon.http_host_port
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def fetch_status(url: str, timeout: float = 5) -> dict[str, Any]:
    """The daemon's /status document; raises OSError (not reachable) or ValueError."""
    with urllib.request.urlopen(f"{url}/status", timeout=timeout) as response:
        document: dict[str, Any] = json.loads(response.read())
    return document


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"


def _value(value: Any) -> str:
    return "-" if value is None else str(value)


def table_lines(columns: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]

    def line(cells: list[str] | tuple[str, ...]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(cells, widths, strict=True)).rstrip()

    return [line(columns), *(line(row) for row in rows)]


def _backlog(entry: dict[str, Any]) -> str:
    """Messages waiting (queues) or how far behind the tip the shards are (streams)."""
    if entry.get("backlog") is not None:
        return str(entry["backlog"])
    if entry.get("lag") is not None:  # sources that count what is behind in records
        return str(entry["lag"])
    behind = [
        s["millisBehindLatest"]
        for s in entry.get("shards") or []
        if s.get("millisBehindLatest") is not None
    ]
    return _duration(max(behind) / 1000) + " behind" if behind else "-"


def _concurrency(entry: dict[str, Any]) -> str:
    now, target = entry.get("concurrency"), entry.get("concurrencyTarget")
    if now is None and target is None:
        return "-"
    return f"{_value(now)}/{_value(target)}"


def _result(entry: dict[str, Any]) -> str:
    result = entry.get("lastProcessingResult") or "-"
    why = entry.get("lastError")
    return f"{result} ({why})" if why and why not in result else result


def render(document: dict[str, Any], url: str) -> list[str]:
    """The /status document as lines for a person."""
    daemon = document.get("daemon", {})
    memory = (
        f"; memory {daemon.get('memoryReservedMb')}/{daemon.get('memoryBudgetMb')} MB reserved"
        if daemon.get("memoryBudgetMb") is not None
        else ""
    )
    lines = [
        f"poller {daemon.get('version', '?')} at {url} (pid {daemon.get('pid', '?')}): "
        f"{daemon.get('state', '?')}, {'ready' if daemon.get('ready') else 'NOT READY'}, "
        f"up {_duration(daemon.get('uptimeSeconds'))}{memory}",
        "",
    ]
    mappings = document.get("mappings") or []
    if mappings:
        rows = [
            [
                m.get("name") or "-",
                m.get("uuid", "?"),
                m.get("state", "?"),
                m.get("functionName", "?"),
                m.get("eventSource", "?"),
                _backlog(m),
                _duration(m.get("iteratorAgeSeconds")),
                _concurrency(m),
                _result(m),
            ]
            for m in mappings
        ]
        columns = (
            "NAME",
            "UUID",
            "STATE",
            "FUNCTION",
            "SOURCE",
            "BACKLOG",
            "AGE",
            "CONCURRENCY",
            "LAST RESULT",
        )
        lines += table_lines(columns, rows)
    else:
        lines.append("no mappings (create one with `poller mappings create`)")
    lines.append("")
    rows = []
    for function in document.get("functions") or []:
        envs = function.get("environments") or []
        if not envs:
            rows.append([function.get("name", "?"), "-", "-", "no environments", "-", "-", "-"])
        for env in envs:
            rows.append(
                [
                    function.get("name", "?"),
                    env.get("id", "?"),
                    _value(env.get("pid")),
                    env.get("state", "?") + (" (provisioned)" if env.get("provisioned") else ""),
                    _value(env.get("invokes")),
                    _duration(env.get("idleSeconds")),
                    "-" if env.get("initMs") is None else f"{env['initMs']:.0f} ms",
                ]
            )
    if rows:
        lines += table_lines(
            ("FUNCTION", "ENVIRONMENT", "PID", "STATE", "INVOKES", "IDLE", "INIT"), rows
        )
    return lines


@app.command()
def status(
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Refresh in place until Ctrl-C.")
    ] = False,
    interval: Annotated[
        float, typer.Option(min=0.2, help="Seconds between refreshes with --watch.")
    ] = 2.0,
    output: Annotated[
        str,
        typer.Option(
            "--output",
            "-o",
            help="table (for people) or json (the /status document; with --watch one "
            "document per line).",
        ),
    ] = "table",
    url: Annotated[
        str | None,
        typer.Option(
            help="The daemon's HTTP address (default: from [daemon] http_listen).",
            show_default=False,
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Every mapping with its state, source, backlog, iterator age, concurrency and last
    result, and each function's environments, from the running daemon."""
    if output not in ("table", "json"):
        raise fail(f"--output must be table or json, not {output!r}")
    if url is None:
        cfg = load(config)
        where = daemon_url(cfg)
        origin = f" ([daemon] http_listen in {cfg.path})"
    else:
        where, origin = url.rstrip("/"), ""

    def get() -> dict[str, Any]:
        try:
            return fetch_status(where)
        except urllib.error.HTTPError as exc:
            raise Unreachable(
                f"{where}/status answered HTTP {exc.code}: is this a poller daemon of this "
                "version (older ones have no /status)?"
            ) from None
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Unreachable(
                f"no poller daemon answers at {where}{origin}: {reason}; start one with "
                "`poller run`, or point --url at it"
            ) from None

    if watch:
        with contextlib.suppress(KeyboardInterrupt):
            _watch(get, where, output, interval)
        return
    try:
        document = get()
    except Unreachable as exc:
        raise fail(str(exc), 1) from None
    if output == "json":
        print_json(document)
    else:
        typer.echo("\n".join(render(document, where)))


class Unreachable(Exception):
    """The daemon did not answer /status; the message says where and what to do."""


def _watch(get: Callable[[], dict[str, Any]], where: str, output: str, interval: float) -> None:
    """Redraw every ``interval`` seconds until Ctrl-C. A daemon that goes away is reported on
    screen and asked again, so a restart can be watched through."""
    if output == "table":
        sys.stdout.write(CLEAR_SCREEN)
    while True:
        try:
            document: dict[str, Any] | None = get()
            problem = ""
        except Unreachable as exc:
            document, problem = None, f"{exc} (retrying)"
        if output == "json":
            # One document per line, for jq and friends; an outage is an empty line's worth
            # of nothing on stdout and the reason on stderr.
            if document is not None:
                sys.stdout.write(json.dumps(document, separators=(",", ":")) + "\n")
            else:
                sys.stderr.write(problem + "\n")
        else:
            lines = render(document, where) if document is not None else [problem]
            stamp = time.strftime("%H:%M:%S")
            lines[0] += f"  [{stamp}, every {interval:g}s, Ctrl-C to stop]"
            sys.stdout.write(HOME + "".join(f"{line}{CLEAR_LINE_END}\n" for line in lines))
            sys.stdout.write(CLEAR_BELOW)
        sys.stdout.flush()
        time.sleep(interval)
