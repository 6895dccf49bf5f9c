"""Requests generated from the API's own OpenAPI schema (schemathesis, fixed seed, bounded
examples) against the app on a real Redis: no answer is a server error.

Valid and invalid requests alike are generated (the schema states the UID grammar, the
store/stores rule and the date formats, so both sides of each are tried). The calls that
need a worker (echo, study C-FIND) get none here and a short timeout: their documented 504
("no worker answered") is expected, every other 5xx is a failure.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, seed, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from test_api import EXTRA_SOURCE

from pacsfetch.api.app import create_app
from pacsfetch.config import Config

EXAMPLES = 30
"""Per operation and mode (valid, invalid): about 600 requests in 30-50 s."""
WORKER_CALLS = ("/sources/{name}/echo", "/sources/{name}/studies")


@pytest.fixture
def api_schema(config_factory: Callable[..., Config],
               monkeypatch: pytest.MonkeyPatch) -> schemathesis.BaseSchema:
    monkeypatch.delenv("PACSFETCH_API_TOKEN", raising=False)
    config = config_factory(extra_sources=EXTRA_SOURCE)
    config = config.model_copy(update={"api": config.api.model_copy(
        update={"echo_timeout": 0.05, "query_timeout": 0.05})})
    app: FastAPI = create_app(config)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def no_server_error(response: schemathesis.Response, case: schemathesis.Case) -> None:
    """Any 5xx fails, but a worker call's 504 without a worker."""
    if response.status_code == 504 and case.operation.path in WORKER_CALLS:
        return
    assert response.status_code < 500, (
        f"{case.method} {case.formatted_path} answered {response.status_code}: "
        f"{response.text[:300]}")


def test_no_generated_request_is_a_server_error(api_schema: schemathesis.BaseSchema) -> None:
    """Each operation in turn (schemathesis's own pytest plugin does not run on this pytest)."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 9
    calls = 0
    for operation, mode in itertools.product(operations, GenerationMode):
        @seed(20261128)
        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(mode))
        def run(case: schemathesis.Case) -> None:
            nonlocal calls
            calls += 1
            no_server_error(case.call(), case)

        try:
            run()
        except Unsatisfiable:
            # Every input is valid (GET /sources; a path parameter of any string): nothing
            # invalid to send, which is fine; the valid mode ran.
            assert mode is GenerationMode.NEGATIVE, operation.path
    assert calls > len(operations) * EXAMPLES  # both modes ran


def test_the_schema_states_the_rules(api_schema: schemathesis.BaseSchema) -> None:
    spec = api_schema.raw_schema
    request = spec["components"]["schemas"]["JobRequest"]
    assert request["properties"]["study_uid"]["pattern"].startswith("^(0|[1-9][0-9]*)")
    assert request["properties"]["study_uid"]["maxLength"] == 64
    assert {"required": ["store"], "not": {"required": ["stores"]}} in request["oneOf"]
    studies = spec["paths"]["/sources/{name}/studies"]["get"]
    date = next(p for p in studies["parameters"] if p["name"] == "StudyDate")
    assert "[0-9]{8}-[0-9]{8}" in str(date["schema"])
    for path, method, code in [("/jobs", "post", "401"), ("/jobs", "post", "413"),
                               ("/jobs", "get", "503"), ("/jobs/{job_id}", "get", "404"),
                               ("/jobs/{job_id}", "delete", "404"), ("/jobs", "post", "403")]:
        assert code in spec["paths"][path][method]["responses"], (path, method, code)
