"""The API's OpenAPI schema (`/openapi.json`) and Swagger page (`/docs`), and a bounded schemathesis run
against it: an in-process app on the tiny model whose caps keep every generation tiny (64x64, 2 steps).

The routes are read from the app, so a route added anywhere is held to the same rules.
"""

from __future__ import annotations

import base64
import io
import itertools

import pytest
import schemathesis
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from nbkit.webui.security import Credentials, Limits

API_PREFIXES = ("/sdapi/", "/controlnet/", "/internal/")  # A1111's API, the ControlNet extension, /internal
# Every generation schemathesis asks for is refused above these, so the run stays short on a CPU.
TINY = Limits(max_pixels=64 * 64, max_steps=2, max_images=2, max_image_bytes=2**20, max_body_bytes=4 * 2**20)
LOGIN = Credentials("tester", "pw-for-the-schema-test")
EXAMPLES = 4  # generated requests per operation and mode (valid, invalid)
CALL_SECONDS = 120


def _app(tmp_path_factory, tiny_model_dir, credentials=None):
    from nbkit.webui.models import ModelCatalog
    from nbkit.webui.outputs import OutputStore
    from nbkit.webui.queue import GpuQueue
    from nbkit.webui.server import create_app
    from nbkit.webui.service import GenerationService

    root = tmp_path_factory.mktemp("schema-root")
    service = GenerationService(
        ModelCatalog(None, root, include_base_models=False),
        OutputStore(root / "outputs"),
        model=str(tiny_model_dir("sd1")),
        device="cpu",
    )
    return create_app(service, GpuQueue(4), credentials=credentials, limits=TINY, with_ui=False)


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    return _app(tmp_path_factory, tiny_model_dir)


def _api_operations(app) -> set[tuple[str, str]]:
    """(path, method) of every API route the app offers (A1111's training routes, answered 501, are left
    out of the schema), whoever added it."""
    # FastAPI keeps an included router as one entry; its routes, with their full paths, come from here.
    return {
        (route.path, method)
        for route in iter_route_contexts(app.routes)
        if isinstance(route.original_route, APIRoute)
        and route.original_route.include_in_schema
        and route.path.startswith(API_PREFIXES)
        for method in route.methods
    }


def test_the_schema_lists_every_api_route_of_the_app(app):
    schema = TestClient(app).get("/openapi.json").json()
    listed = {(path, method.upper()) for path, item in schema["paths"].items() for method in item}
    operations = _api_operations(app)
    assert {path for path, _ in operations} >= {"/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/options"}
    assert operations <= listed, f"routes missing from the schema: {sorted(operations - listed)}"
    assert all(path.startswith(API_PREFIXES) for path, _ in listed)  # nothing of gradio's
    txt2img = schema["paths"]["/sdapi/v1/txt2img"]["post"]
    request = schema["components"]["schemas"][
        txt2img["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    ]
    # A1111's fields, each nullable (null: its default)
    seed = request["properties"]["seed"]
    assert seed["default"] == -1 and {"type": "null"} in seed["anyOf"]
    assert {"firstpass_image", "styles", "override_settings", "denoising_strength"} <= set(
        request["properties"]
    )
    assert {"200", "400", "404", "422", "500", "503"} <= set(txt2img["responses"])


def test_docs_is_the_swagger_page_of_the_schema(app):
    page = TestClient(app).get("/docs")
    assert page.status_code == 200 and "swagger-ui" in page.text and "/openapi.json" in page.text


def test_with_a_login_the_schema_and_docs_need_it(tmp_path_factory, tiny_model_dir):
    client = TestClient(_app(tmp_path_factory, tiny_model_dir, credentials=LOGIN))
    for path in ("/openapi.json", "/docs"):
        refused = client.get(path)
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic")
        assert client.get(path, auth=(LOGIN.username, LOGIN.password)).status_code == 200


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# What keeps a schema-valid generation tiny (so some really run); the other fields stay as generated.
TINY_GENERATION = {"width": 64, "height": 64, "steps": 2, "batch_size": 1, "n_iter": 1, "hr_scale": 1.0}


def _picture() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 140, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _tiny(case, picture: str) -> None:
    """A valid generation request made tiny: the caps would refuse most generated sizes unrun."""
    if not isinstance(case.body, dict) or not case.path.endswith(("/txt2img", "/img2img")):
        return
    case.body.update(TINY_GENERATION)
    if case.path.endswith("/img2img"):
        case.body.update(init_images=[picture], mask=None)


def test_schemathesis_finds_no_server_error_and_no_schema_violation(tmp_path_factory, tiny_model_dir):
    """A few generated requests per operation, valid and invalid ones, each answer checked against the
    schema; every operation runs even when one fails, and the failures are reported together."""
    app = _app(tmp_path_factory, tiny_model_dir)
    app.state.nbkit.service.ensure_model()  # loaded before the first call's timeout starts
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    picture = _picture()
    failures = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= len(_api_operations(schema.app)) // 2  # HEAD is no operation of its own

    for operation, mode in itertools.product(operations, (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)):

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def call(case):
            if mode is GenerationMode.POSITIVE:  # noqa: B023 (called within its own iteration)
                _tiny(case, picture)
            case.call_and_validate(checks=CHECKS, timeout=CALL_SECONDS)

        try:
            call()
        except Unsatisfiable:  # no invalid request exists (a GET without parameters)
            assert mode is GenerationMode.NEGATIVE, operation.label
        except Exception as error:  # one operation's failure must not hide another's
            failures.append(f"{operation.label} ({mode.value}): {error}")
    assert not failures, "\n\n".join(failures)
