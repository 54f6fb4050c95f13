"""Schemathesis drives every operation of the live server with requests drawn from its own OpenAPI document,
valid and invalid: no answer is a 5xx, and each answer's status, content type, headers and body are the ones
documented."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from schemathesis import Case, CheckContext, Response
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from server.api import create_app
from server.settings import Settings
from tests.conftest import RELAXED_TIMEOUT_S
from tests.support.servers import serve_in_thread


def not_a_server_fault(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """No 5xx, but for the documented 504 of a request that asked for its own deadline (the fuzzer sends
    X-Request-Timeout: 5e-324)."""
    if response.status_code == 504 and "X-Request-Timeout" in (case.headers or {}):
        return None
    return not_a_server_error(ctx, response, case)


CHECKS = [
    not_a_server_fault,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    unsupported_method,
    allow_header_conformance,
]
# Few cases per operation, from a fixed seed: the same cases on every run, well under a minute on two cores.
# The examples phase sends the documented examples; coverage the schema's boundaries (top_k at its maximum,
# empty lists) and undocumented methods (OPTIONS: Allow must list the path's methods); fuzzing draws valid
# and invalid requests. Stateful chains (create, then read and delete) are left out to keep the run bounded.
CONFIG = {
    "seed": 14,
    "generation": {"max-examples": 25, "deterministic": True},
    "phases": {"stateful": {"enabled": False}},
}


def served_settings(model_dir: Path | None, data_dir: Path) -> Settings:
    """The live server's settings; the schema the cases are drawn from is built with the same limits."""
    return Settings(
        model=f"local-dir:{model_dir}" if model_dir else None,
        data_dir=data_dir,
        device="cpu",
        max_batch_delay_ms=2.0,
        request_timeout_s=RELAXED_TIMEOUT_S,
        _env_file=None,
    )


# Built when the module is collected (the cases are test items), from an app that is never started.
# Schemathesis' lazy from_fixture() would load it from the live server but breaks on pytest 9.
SPEC = create_app(served_settings(None, Path("unused"))).openapi()
schema = schemathesis.openapi.from_dict(SPEC, config=SchemathesisConfig.from_dict(CONFIG))


@pytest.fixture(scope="module")
def url(tiny_model_dir, tmp_path_factory) -> Iterator[str]:
    settings = served_settings(tiny_model_dir, tmp_path_factory.mktemp("schemathesis") / "data")
    with serve_in_thread(create_app(settings)) as served:
        assert httpx.get(f"{served}/openapi.json").json() == SPEC, "the cases would come from another schema"
        yield served


@schema.parametrize()
def test_every_operation_answers_as_documented(case, url):
    case.call_and_validate(base_url=url, checks=CHECKS)
