"""Shared test setup: each real server has its own fixture module."""

from pathlib import Path

import pytest

from tests.fixtures import FULL_SUITE

LAST = "test_rbac_audit.py"  # reads the audit log of everything before it

pytest_plugins = [
    "tests.fixtures.moto_server",
    "tests.fixtures.monitoring",
    "tests.fixtures.datastores",
    "tests.fixtures.kube",
    "tests.fixtures.pgbackrest",
    "tests.fixtures.tls",
    "tests.fixtures.kube_server",
]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    last = [item for item in items if item.path.name == LAST]
    items[:] = [item for item in items if item.path.name != LAST] + last
    every_file = {path.name for path in Path(__file__).parent.glob("test_*.py")}
    config.stash[FULL_SUITE] = (
        {item.path.name for item in items} == every_file
        and not config.option.keyword and not config.option.markexpr
        and not config.getoption("deselect") and not config.getoption("lf", False)
    )
