"""Property-based fuzzing of the HTTP API from its own OpenAPI document (schemathesis), on loopback, against the
fake pipeline: no request, however odd, gets a 5xx or an answer outside the documented shapes."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

from fake_pipeline import FakePipeline  # noqa: E402
from serving import live  # noqa: E402

from kleinbild.serve.openapi import openapi_document  # noqa: E402

schema = schemathesis.openapi.from_dict(openapi_document())
CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.specs.openapi.checks.status_code_conformance,
    schemathesis.specs.openapi.checks.content_type_conformance,
    schemathesis.specs.openapi.checks.response_schema_conformance,
]


@pytest.fixture(scope="module")
def server():
    with live(FakePipeline(), max_queue=256) as srv:
        yield srv


def test_the_document_is_served_and_names_every_route(server):
    served = server.client.get("/openapi.json").json()
    assert served == openapi_document()
    assert {"/v1/images/generations", "/v1/images/edits", "/v1/jobs", "/v1/jobs/{job_id}", "/health"} <= set(
        served["paths"])


@schema.parametrize()
@hypothesis.settings(max_examples=30, deadline=None, derandomize=True, database=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
def test_no_server_error_and_no_undocumented_answer(case, server):
    case.call_and_validate(base_url=server.url, checks=CHECKS, timeout=30)
