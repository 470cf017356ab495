"""The HTTP API against its own OpenAPI document, by schemathesis: every operation is fed requests generated from
/openapi.json (valid and invalid), and each answer must be a documented status with a body of the documented
shape — never a 5xx — while the server keeps serving.

python -m pytest tests/test_serve_schema.py -q
"""

from __future__ import annotations

import httpx
import pytest
from serve_util import served

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

from schemathesis.checks import positive_data_acceptance  # noqa: E402

EXAMPLES = 10  # per operation: bounded in count


@pytest.fixture(scope="module")
def server(build_model):
    with served(build_model("D"), max_body_bytes=200_000) as (url, engine):
        yield url, engine


def _operations(url: str) -> list:
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def test_every_operation_answers_generated_requests_as_documented(server):
    url, _ = server
    ops = _operations(url)
    assert {op.path for op in ops} >= {"/v1/chat/completions", "/v1/completions", "/v1/models"}
    failures: list[str] = []
    for op in ops:

        @hypothesis.settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(hypothesis.HealthCheck),
        )
        @hypothesis.given(case=op.as_strategy())
        def check(case):
            # a request can match the schema and still be refused with a 400, as OpenAI refuses it: the last
            # message from the assistant, a data: URL that is no image. Everything else is checked.
            case.call_and_validate(base_url=url, timeout=30, excluded_checks=[positive_data_acceptance])

        try:
            check()
        except Exception as e:  # every operation is tried; the report lists them all
            failures.append(f"{op.method.upper()} {op.path}: {type(e).__name__}: {str(e)[:1500]}")
    assert not failures, "\n\n".join(failures)
    assert httpx.get(url + "/health", timeout=10).status_code == 200
