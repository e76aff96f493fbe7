"""Two checkouts' daemons drain one Redis stream at the same time: an A/B noise hits alike.

    python bench/paired_ab.py --a /path/to/new --b /path/to/old [--entries 60000]
                              [--batch-size 1] [--maximum-concurrency 8] [--rounds 3]

On a shared 2-core machine, runs of bench/redis_queue.py minutes apart differ by more than most
changes to the daemon (the raw loop alone swung 3.3k-7.3k records/s within one sitting). Here
both daemons (``poller run`` with each checkout on PYTHONPATH, each its own consumer group of
one pre-loaded stream, the same mapping settings as bench/redis_queue.py) start together and
drain concurrently, so whatever else the machine does hits both in the same moment. They also
compete with each other, so the absolute rates are lower than alone; compare the two lines of
a round: records/s and the CPU per record of each daemon and its workers. Which side starts
first alternates by round (the first one had lower CPU per record in every round of a trial
that did not alternate, whichever checkout it was); medians per side close the run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis_queue as rq


def child(args: argparse.Namespace) -> None:
    """One side: drain its group with a daemon of the checkout on PYTHONPATH; print JSON."""
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    client = redis.Redis.from_url(args.url)
    seconds, stats = rq.poller_drain(
        client,
        args.url,
        args.batch_size,
        workdir,
        args.entries,
        args.redis_pid,
        args.group,
        args.maximum_concurrency or None,
    )
    print(json.dumps({"seconds": seconds, **stats}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", required=True, help="checkout A (its poller/ is used)")
    parser.add_argument("--b", required=True, help="checkout B")
    parser.add_argument("--entries", type=int, default=60000)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--maximum-concurrency", type=int, default=8, help="0: unbounded")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--redis-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--group", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    sides = {"A": str(Path(args.a).resolve()), "B": str(Path(args.b).resolve())}
    with tempfile.TemporaryDirectory(prefix="poller-ab-") as tmp:
        workdir = Path(tmp)
        server = rq.RedisServer(workdir / "redis")
        server.start()
        try:
            client = redis.Redis.from_url(server.url)
            print(
                f"{args.entries} entries, batch {args.batch_size}, MaximumConcurrency "
                f"{args.maximum_concurrency or 'unbounded'}; A = {sides['A']}, B = {sides['B']}"
            )
            results: dict[str, list[tuple[float, float]]] = {"A": [], "B": []}
            for round_ in range(1, args.rounds + 1):
                rq.load(client, args.entries)
                running = {}
                order = list(sides.items())
                for side, path in order if round_ % 2 else order[::-1]:
                    command = [
                        sys.executable,
                        __file__,
                        "--child",
                        "--a=-",
                        "--b=-",
                        f"--url={server.url}",
                        f"--redis-pid={server.proc.pid}",
                        f"--group={side}-{round_}",
                        f"--workdir={workdir / side}",
                        f"--entries={args.entries}",
                        f"--batch-size={args.batch_size}",
                        f"--maximum-concurrency={args.maximum_concurrency}",
                    ]
                    env = dict(os.environ, PYTHONPATH=path)
                    running[side] = subprocess.Popen(command, env=env, stdout=subprocess.PIPE)
                for side, proc in running.items():
                    out, _ = proc.communicate()
                    if proc.returncode:
                        raise SystemExit(f"side {side} failed")
                    stats = json.loads(out.decode().splitlines()[-1])
                    n = args.entries
                    results[side].append((n / stats["seconds"], stats["cpu_daemon"] * 1e6 / n))
                    print(
                        f"round {round_} {side}: {n / stats['seconds']:8,.0f} rec/s   "
                        f"daemon {stats['cpu_daemon'] * 1e6 / n:6.1f} us/rec   "
                        f"workers {stats['cpu_workers'] * 1e6 / n:6.1f} us/rec   "
                        f"target mean {stats.get('target_mean', 0):.1f}",
                        flush=True,
                    )
            for side, rows in results.items():
                print(
                    f"median {side}: {statistics.median(r for r, _ in rows):8,.0f} rec/s   "
                    f"daemon {statistics.median(c for _, c in rows):6.1f} us/rec"
                )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
