"""Property-based tests of the service against its own OpenAPI document (schemathesis): for requests that fit the
document and requests that break it, no answer is a 5xx, every answer fits the document (status, content type,
headers, body), and requests that break the document are refused with a 4xx.

Bounded: a fixed number of examples per operation, derandomized, so the run is short and repeatable.
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.generation import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                               response_headers_conformance, response_schema_conformance,
                                               status_code_conformance)

import golden
from serving import running_server

# Per operation, bundle and mode: the default run takes ~15 s; SAVPACK_SCHEMA_EXAMPLES=1000 searches harder.
EXAMPLES = int(os.environ.get("SAVPACK_SCHEMA_EXAMPLES", "40"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]


@pytest.fixture(scope="module", params=["qwen2", "qwen2_vl"])
def api_schema(request):
    """The document of a live server for a text bundle and for an image bundle (their schemas differ)."""
    with running_server(golden.bundle_dir(request.param), max_body_bytes=1024 * 1024) as url:
        config = schemathesis.Config.from_dict({
            "seed": 16,
            # 413 is how this service refuses too many items or images (text-embeddings-inference does the same).
            "checks": {"negative_data_rejection": {"expected-statuses": ["400", "404", "405", "413", "415", "422"]}},
        })
        yield schemathesis.openapi.from_url(f"{url}/openapi.json", config=config)


# schemathesis' own pytest integration (schema.parametrize) does not run under pytest 9: the operations' strategies
# are driven by hypothesis directly, one per operation and request media type.
@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda mode: mode.value)
def test_no_5xx_and_answers_fit_the_document(api_schema, mode):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {f"{operation.method.upper()} {operation.path}" for operation in operations} >= {"POST /v1/classify", "GET /info"}
    statuses: dict[str, list[int]] = {}
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and not operation.body:
            continue  # a GET without parameters has no invalid form

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                  derandomize=True)
        def check(case):
            checks = CHECKS
            if case.media_type == "multipart/form-data":
                # Every form field is text: a "negative" object or number arrives as a valid string.
                checks = [check for check in CHECKS if check is not negative_data_rejection]
            response = case.call_and_validate(checks=checks, timeout=30)
            statuses.setdefault(f"{operation.method.upper()} {operation.path} {case.media_type}", []).append(response.status_code)

        check()
    for media_type in ("application/json", "multipart/form-data"):
        classify = statuses[f"POST /v1/classify {media_type}"]
        assert classify and max(classify) < 500
        if mode is GenerationMode.POSITIVE:
            assert 200 in classify or 422 in classify  # requests reached the classifier's own checks, not only the parser
