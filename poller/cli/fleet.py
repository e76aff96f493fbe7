"""`poller fleet`: the daemons sharing a Redis state store, the shard leases each holds and how
far behind each shard is."""

from __future__ import annotations

import datetime
from typing import Annotated, Any

import typer

from poller.cli.common import ConfigOption, app, fail, load, print_json, run_async
from poller.cli.mappings import _table
from poller.config import Config


async def _gather(cfg: Config) -> dict[str, Any]:
    from poller.registry import Registry
    from poller.state.base import StateError, open_store

    store = open_store(cfg.state_url, key_prefix=cfg.state.key_prefix)
    await store.open()
    try:
        leases = store.leases
        if leases is None:
            raise StateError(
                f"{cfg.path}: [state] url is SQLite, where one daemon processes every shard; "
                "a fleet shares a Redis store ([state] url = redis://HOST:PORT/DB)"
            )
        now, members = await leases.members()
        held: dict[str, list[dict[str, Any]]] = {m.owner: [] for m in members}
        unowned: list[dict[str, Any]] = []
        for mapping in await Registry(store).list():
            table = await leases.leases(mapping.uuid)
            if not table:
                continue
            reports = await leases.reports(mapping.uuid)
            for shard in sorted(table):
                lease = table[shard]
                report = next(
                    (r for r in reports.get(lease.owner or "", []) if r.get("shardId") == shard),
                    {},
                )
                entry = {
                    "UUID": mapping.uuid,
                    "FunctionName": mapping.function_name,
                    "ShardId": shard,
                    "State": report.get("state"),
                    "IteratorAgeSeconds": report.get("iteratorAgeSeconds"),
                    "LeaseCounter": lease.counter,
                }
                if lease.held_at(now) and lease.owner in held:
                    held[lease.owner].append(entry)
                elif report.get("state") != "finished":
                    unowned.append({**entry, "LastHolder": lease.owner})
    finally:
        await store.close()
    duration_ms = cfg.fleet.lease_duration_s * 1000
    return {
        "Members": [
            {
                "Daemon": m.owner,
                "Host": m.info.get("host"),
                "Pid": m.info.get("pid"),
                "Http": m.info.get("http"),
                "StartedAt": _iso(m.info.get("startedAt")),
                "HeartbeatAgeSeconds": round(max(now - (m.expires_ms - duration_ms), 0) / 1000, 1),
                "LeasesHeld": len(held[m.owner]),
                "Shards": held[m.owner],
            }
            for m in sorted(members, key=lambda m: m.owner)
        ],
        "UnownedShards": unowned,
    }


def _iso(epoch: Any) -> str | None:
    if not isinstance(epoch, int | float):
        return None
    moment = datetime.datetime.fromtimestamp(epoch, tz=datetime.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


OutputOption = Annotated[str, typer.Option("--output", "-o", help="json or table.")]


@app.command()
def fleet(output: OutputOption = "json", config: ConfigOption = None) -> None:
    """The daemons sharing the Redis state store: each one's shard leases (mapping, shard,
    state, iterator age), and shards no live daemon holds."""
    from poller.state.base import StateError

    cfg = load(config)
    if output not in ("json", "table"):
        raise fail(f"--output must be json or table, not {output!r}")
    try:
        view = run_async(_gather(cfg))
    except StateError as exc:
        raise fail(f"cannot read the fleet: {exc}", 1) from None
    if output == "json":
        print_json(view)
        return
    columns = ("Daemon", "Host", "Pid", "Heartbeat", "UUID", "ShardId", "State", "IteratorAge")
    rows = []
    for member in view["Members"]:
        head = [
            member["Daemon"],
            str(member["Host"]),
            str(member["Pid"]),
            f"{member['HeartbeatAgeSeconds']}s",
        ]
        for shard in member["Shards"] or [{}]:
            rows.append([*head, *_shard_cells(shard)])
    for shard in view["UnownedShards"]:
        rows.append(["(none)", "", "", "", *_shard_cells(shard)])
    _table(columns, rows)


def _shard_cells(shard: dict[str, Any]) -> list[str]:
    age = shard.get("IteratorAgeSeconds")
    return [
        shard.get("UUID", ""),
        shard.get("ShardId", ""),
        str(shard.get("State") or ""),
        "" if age is None else f"{age}s",
    ]
