"""The seed of the fault rounds, printed so that a run can be replayed (the options,
``--fault-rounds`` and the others, are in tests/conftest.py: pytest reads options only from
conftest files it loads at start)."""

from __future__ import annotations

import random

import pytest


@pytest.fixture(scope="session")
def fault_seed(request: pytest.FixtureRequest) -> int:
    seed = request.config.getoption("--fault-seed")
    if seed is None:
        seed = random.randrange(1, 1_000_000)
    print(f"\nfault rounds: seed {seed} (give it back with --fault-seed {seed})")
    return int(seed)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give each source's rounds time in proportion to how many there are: the suite's
    300 s per test would cut a long run short (a round takes 10-25 s on 2 busy cores)."""
    rounds = config.getoption("--fault-rounds")
    for item in items:
        if item.path.parent.name == "fault":
            item.add_marker(pytest.mark.timeout(120 + 60 * rounds))
