"""Shared test setup: each real server has its own fixture module."""

pytest_plugins = [
    "tests.fixtures.moto_server",
    "tests.fixtures.monitoring",
    "tests.fixtures.datastores",
    "tests.fixtures.kube",
    "tests.fixtures.pgbackrest",
    "tests.fixtures.tls",
    "tests.fixtures.kube_server",
]
