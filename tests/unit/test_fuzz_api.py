"""Property-based fuzzing of the gateway's HTTP API from its own OpenAPI schema
(schemathesis), against the fake verifier and memory services: valid and invalid
requests alike never get a 5xx, invalid ones get a 4xx, every status is one the schema
documents, and every error body is OpenAI's envelope. Bounded and deterministic, to run
in CI in well under a minute."""

from __future__ import annotations

from collections import defaultdict

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.python.asgi import shutdown_lifespans

from tests.unit.test_gateway import MODEL, gateway_redis_url  # noqa: F401  (fixture)
from tests.unit.test_gateway_memory import app, fakes  # noqa: F401  (fixtures)

EXAMPLES_PER_OPERATION = 30  # valid and invalid requests together, after the coverage cases
CHECKS = [
    not_a_server_error,
    negative_data_rejection,  # an invalid request gets a 4xx
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,  # error bodies are the envelope the schema documents
]


def test_fuzz_the_http_api_from_its_openapi_schema(app):  # noqa: F811
    schema = schemathesis.openapi.from_asgi("/openapi.json", app())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {operation.label for operation in operations} >= {
        "POST /v1/chat/completions",
        "POST /v1/completions",
        "POST /memory/ingest",
        "POST /memory/query",
        "DELETE /memory/documents/{document_id}",
    }
    statuses: dict[str, set[int]] = defaultdict(set)
    try:
        for operation in operations:
            # Schemathesis' coverage phase: the schema's boundaries and just past them,
            # wrong types, missing fields, unexpected methods; deterministic.
            boundaries = schema.iter_coverage_cases(
                operation, generation_modes=list(GenerationMode), generation_config=schema.config.generation
            )
            for case in boundaries:
                statuses[operation.label].add(call_and_check(case))
            fuzz(operation, statuses[operation.label])
    finally:
        shutdown_lifespans()  # schemathesis ran the app's lifespan; end it with the fakes still up
    # The fuzzing reached past validation to the (fake) backends, and was refused too.
    for label in (
        "POST /v1/chat/completions",
        "POST /v1/completions",
        "POST /memory/ingest",
        "POST /memory/query",
    ):
        assert {status // 100 for status in statuses[label]} >= {2, 4}, (label, statuses[label])


def call_and_check(case) -> int:
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        # Otherwise no chat would get past the unknown-model check to the (fake) model.
        case.body["model"] = MODEL
    response = case.call()
    case.validate_response(response, checks=CHECKS)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return response.status_code


def fuzz(operation, statuses: set[int]) -> None:
    """Hypothesis-generated requests, valid and invalid."""
    cases = st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE)
    )

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        derandomize=True,  # the same requests every run
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases)
    def fuzz_operation(case):
        statuses.add(call_and_check(case))

    fuzz_operation()
