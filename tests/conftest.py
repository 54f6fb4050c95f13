"""Shared fixtures: a tiny open_clip model built offline, and apps running it.

Tests under tests/unit, tests/integration and tests/e2e get the marker of their folder. Helpers live
in tests/support.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.api import create_app
from server.settings import Settings
from tests.support.apps import wait_ready
from tests.support.model import write_tiny_model
from tests.support.postgres import postgres_server  # noqa: F401  (a session fixture: one PostgreSQL for all tests)

# The deadline of requests in tests that are not about deadlines: long enough that no busy machine meets
# it, since admission also weighs work against it (tests of deadlines and admission set their own).
RELAXED_TIMEOUT_S = 600.0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for folder in ("unit", "integration", "e2e"):
            if folder in parts:
                item.add_marker(getattr(pytest.mark, folder))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def settings(tiny_model_dir: Path, tmp_path: Path) -> Settings:
    return Settings(
        model=f"local-dir:{tiny_model_dir}",
        data_dir=tmp_path / "data",
        device="cpu",
        max_batch_delay_ms=2.0,
        request_timeout_s=RELAXED_TIMEOUT_S,
        _env_file=None,
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        wait_ready(c)
        yield c
