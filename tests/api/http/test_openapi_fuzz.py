"""A bounded schemathesis run against a real ``ivvae serve``'s ``/openapi.json``: every
operation, generated requests (valid and not), no 5xx and no contract violations (status
codes, content types and bodies as the schema declares them)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from bench._common import ServeProcess
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

# Each example is a real request; this bounds the run (CI time), not the coverage of
# operations (all are exercised).
MAX_EXAMPLES = 25


@pytest.fixture(scope="module")
def served(tiny_weights: Path) -> Iterator[ServeProcess]:
    with ServeProcess(tiny_weights, IVVAE_ENABLE_GRPC="false", IVVAE_TORCH_THREADS="1",
                      IVVAE_MAX_UPLOAD_BYTES="200000") as srv:
        yield srv


def test_no_5xx_and_no_contract_violation(served: ServeProcess) -> None:
    # (schemathesis's own pytest plugin does not run under this pytest: each operation is
    # driven through hypothesis here instead.)
    schema = schemathesis.openapi.from_url(served.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/encode", "/decode", "/models", "/readyz"}
    failures: list[str] = []
    calls: dict[str, int] = {}
    for operation in operations:
        name = f"{operation.method.upper()} {operation.path}"
        calls[name] = 0

        @given(case=operation.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case: Any) -> None:
            calls[case.operation.method.upper() + " " + case.operation.path] += 1
            # not_a_server_error is always on; positive/negative-data acceptance is not a
            # contract here (a well-formed byte string is rarely a readable video).
            case.call_and_validate(checks=[status_code_conformance, content_type_conformance,
                                           response_schema_conformance], timeout=120)

        try:
            run()
        except Exception as exc:
            failures.append(f"{name}: {exc}")
    assert not failures, "\n\n".join(failures)
    assert min(calls.values()) >= 1, calls
    assert calls["POST /encode"] >= MAX_EXAMPLES // 2, calls
