"""Options of the fault rounds: how many per source (a few in the default run; many with
``pytest -m fault --fault-rounds N``) and the seed that reproduces a run."""

from __future__ import annotations

import random

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fault", "fault-injection rounds (tests/fault)")
    group.addoption(
        "--fault-rounds",
        type=int,
        default=2,
        help="rounds per source (default 2; a long run: 50 or more)",
    )
    group.addoption(
        "--fault-seed",
        type=int,
        default=None,
        help="first seed; each round uses seed + its index (default: random)",
    )
    group.addoption("--fault-faults", type=int, default=3, help="faults injected per round")


@pytest.fixture(scope="session")
def fault_seed(request: pytest.FixtureRequest) -> int:
    seed = request.config.getoption("--fault-seed")
    if seed is None:
        seed = random.randrange(1, 1_000_000)
    print(f"\nfault rounds: seed {seed} (give it back with --fault-seed {seed})")
    return int(seed)
