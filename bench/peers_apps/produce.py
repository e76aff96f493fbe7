"""Put no-op jobs on a contender's queue, with the contender's own client and Python.

    python produce.py MODULE --count N
    python produce.py MODULE --rate R --seconds S --probe-until FILE

MODULE's ``open_producer()`` returns ``(send, close)``; ``send(sent)`` enqueues one job that
carries ``sent``, the wall-clock time taken just before the call. With ``--probe-until`` it
first sends a probe job (sent = 0, which the harness leaves out) every 0.2 s until FILE (which
the harness created empty) is not empty, i.e. until the worker has run a job, and only then
starts the paced run, so a worker's start-up never counts as latency. Prints
``{"sent": n, "first": t, "last": t}``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("module")
    parser.add_argument("--count", type=int)
    parser.add_argument("--rate", type=float)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--probe-until")
    parser.add_argument("--probe-timeout", type=float, default=120.0)
    args = parser.parse_args()
    send, close = importlib.import_module(args.module).open_producer()
    try:
        if args.probe_until:
            deadline = time.monotonic() + args.probe_timeout
            while os.path.getsize(args.probe_until) == 0:
                if time.monotonic() > deadline:
                    raise SystemExit("the worker ran no probe job in time")
                send(0.0)
                time.sleep(0.2)
        first = last = time.time()
        if args.count is not None:
            for _ in range(args.count):
                send(time.time())
            total = args.count
        else:
            interval = 1.0 / args.rate
            total = round(args.rate * args.seconds)
            next_at = time.perf_counter()
            for i in range(total):
                delay = next_at - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                next_at += interval
                last = time.time()
                if i == 0:
                    first = last
                send(last)
    finally:
        close()
    print(json.dumps({"sent": total, "first": first, "last": last}))


if __name__ == "__main__":
    main()
