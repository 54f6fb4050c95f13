"""A real ``python -m server`` process on the tiny model, for the tests that talk to it over loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from subprocess import Popen

import pytest

from tests.support.apps import PATIENCE_S
from tests.support.servers import free_port, start, wait_served


@pytest.fixture
def served(tiny_model_dir: Path, tmp_path: Path) -> Iterator[tuple[str, Popen[str]]]:
    port = free_port()
    proc = start(["--model", f"local-dir:{tiny_model_dir}", "--port", str(port), "--max-batch-delay-ms", "1"], tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_served(url, proc)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(PATIENCE_S)
