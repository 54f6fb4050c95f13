"""A real ``python -m server`` process on the tiny model, for the tests that talk to it over loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from subprocess import Popen

import pytest

from tests.support.servers import running


@pytest.fixture
def served(tiny_model_dir: Path, tmp_path: Path) -> Iterator[tuple[str, Popen[str]]]:
    with running(tiny_model_dir, tmp_path, "--max-batch-delay-ms", "1") as served:
        yield served
