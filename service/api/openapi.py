"""The OpenAPI document, completed with every answer the middlewares and handlers can give.

The routes declare their own outcomes (404, 409, …); what holds for every route is added
here from the same rules the middlewares apply, so a route added later is documented
without an edit: 401/403 from :mod:`service.api.security`, 413 (and 400 for unreadable bodies)
from :mod:`service.api.limits`, 422 and 500 in the error envelope, and ``X-Request-ID`` on every
response.

What a client generator turns into names is chosen here too: each operation's id (its
method's name), the tags (its modules) with their descriptions, and the server.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from fastapi.routing import APIRoute
from fastapi.utils import generate_unique_id

from service.api.security import Access, required_access
from service.schemas import ErrorEnvelope

# Every documented operation's id, by hand: FastAPI's own
# (``get_metrics_jobs__job_id__metrics_get``) would become every generated client's method
# names. An operation missing here stops the app from starting (:func:`operation_id`).
OPERATION_IDS = {
    ("POST", "/jobs"): "createJob",
    ("GET", "/jobs"): "listJobs",
    ("GET", "/jobs/{job_id}"): "getJob",
    ("DELETE", "/jobs/{job_id}"): "deleteJob",
    ("POST", "/jobs/{job_id}/cancel"): "cancelJob",
    ("GET", "/jobs/{job_id}/metrics"): "getJobMetrics",
    ("GET", "/jobs/{job_id}/metrics.csv"): "getJobMetricsCsv",
    ("GET", "/jobs/{job_id}/events"): "streamJobEvents",
    ("POST", "/sweeps"): "createSweep",
    ("GET", "/sweeps"): "listSweeps",
    ("GET", "/sweeps/{sweep_id}"): "getSweep",
    ("POST", "/sweeps/{sweep_id}/cancel"): "cancelSweep",
    ("DELETE", "/sweeps/{sweep_id}"): "deleteSweep",
    ("POST", "/predict"): "predict",
    ("GET", "/models"): "listModels",
    ("GET", "/models/{job_id}"): "getModel",
    ("GET", "/models/{job_id}/checkpoint"): "downloadCheckpoint",
    ("GET", "/models/aliases"): "listAliases",
    ("GET", "/models/aliases/{name}"): "getAlias",
    ("PUT", "/models/aliases/{name}"): "setAlias",
    ("DELETE", "/models/aliases/{name}"): "deleteAlias",
    ("GET", "/workers"): "listWorkers",
    ("GET", "/healthz"): "getHealth",
    ("GET", "/readyz"): "getReadiness",
    ("GET", "/metrics"): "getPrometheusMetrics",
}
# The tags the routes use, in the order the documentation shows them.
TAGS = [
    {
        "name": "jobs",
        "description": "Training jobs: submit one, follow it (polls or Server-Sent Events), "
        "read every step's loss and every epoch's accuracy, cancel it.",
    },
    {
        "name": "sweeps",
        "description": "Many trainings at once: a grid or a random search over job parameters, "
        "each trial an ordinary job; the best can be promoted to a model alias.",
    },
    {"name": "predict", "description": "The digit in an image, read by a trained model."},
    {
        "name": "models",
        "description": "The trained models (one per succeeded job), their weights, and the "
        "aliases that name them (`production` answers predict by default).",
    },
    {"name": "workers", "description": "The worker processes that train the queued jobs."},
    {"name": "health", "description": "Liveness, readiness and Prometheus metrics."},
]
# Relative: the server that served this document, wherever it is reached (FastAPI puts a
# proxy's root path first).
SERVERS = [{"url": "/", "description": "This server."}]

BODY_METHODS = frozenset({"post", "put", "patch"})
ENVELOPE_REF = "#/components/schemas/ErrorEnvelope"
# FastAPI's own 422 models, unused once every 422 is declared as the envelope.
FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


def operation_id(route: APIRoute) -> str:
    """The id of ``route``'s operation (FastAPI's ``generate_unique_id_function``): from
    :data:`OPERATION_IDS`; :class:`LookupError` for a documented route that has none."""
    if not route.include_in_schema:
        return generate_unique_id(route)  # never shown
    method = ",".join(sorted(route.methods or ()))  # one per route here
    try:
        return OPERATION_IDS[(method, route.path_format)]
    except KeyError:
        raise LookupError(
            f"{method} {route.path_format} has no operationId: name it in OPERATION_IDS"
        ) from None


def error_response(description: str) -> dict[str, Any]:
    """A response whose body is the service's error envelope."""
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": ENVELOPE_REF}}},
    }


HEADERS = {
    "RequestId": "The request's id (the client's own X-Request-ID when it sent a plain one).",
    "BearerChallenge": 'The bearer challenge (RFC 6750), e.g. Bearer realm="mnist".',
}


def _header(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/headers/{name}"}


def _operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, operation)
        for path, item in schema.get("paths", {}).items()
        for method, operation in item.items()
        if isinstance(operation, dict) and "responses" in operation
    ]


def _document_auth(path: str, method: str, operation: dict[str, Any], docs_public: bool) -> None:
    needed = required_access(method, path, docs_public=docs_public)
    if needed is Access.PUBLIC:
        return
    operation["security"] = [{"bearer": []}]
    responses = operation["responses"]
    unauthorized = responses.setdefault("401", error_response("No API key, or a wrong one."))
    unauthorized.setdefault("headers", {})["WWW-Authenticate"] = _header("BearerChallenge")
    if needed is Access.WRITE:
        forbidden = responses.setdefault("403", error_response("The read-only key may not."))
        forbidden.setdefault("headers", {})["WWW-Authenticate"] = _header("BearerChallenge")


def _document_limits(
    method: str, operation: dict[str, Any], definitions: dict[str, Any], max_form_parts: int
) -> None:
    if method not in BODY_METHODS:
        return
    responses = operation["responses"]
    responses.setdefault("413", error_response("The body is over MNIST_MAX_REQUEST_BYTES."))
    if "requestBody" in operation:
        responses.setdefault(
            "400",
            error_response("The body cannot be read (not UTF-8; a broken or too big form)."),
        )
    form = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data")
    if form is not None:
        ref = form.get("schema", {}).get("$ref", "")
        body = definitions.get(ref.rsplit("/", 1)[-1], form.get("schema", {}))
        # A field takes a part at least; a route's own tighter bound stays.
        body["maxProperties"] = min(body.get("maxProperties", max_form_parts), max_form_parts)


def _without_null(parameter: dict[str, Any]) -> None:
    # FastAPI spells an optional parameter `anyOf: [X, {type: null}]`, but a query string
    # cannot carry a null: the parameter is absent or a string. Keep only X.
    schema = parameter.get("schema", {})
    options = schema.get("anyOf")
    if not isinstance(options, list):
        return
    kept = [option for option in options if option != {"type": "null"}]
    if len(kept) == 1 and len(kept) < len(options):
        del schema["anyOf"]
        schema.update(kept[0])


def _is_referenced(schema: dict[str, Any], name: str) -> bool:
    return f'"#/components/schemas/{name}"' in json.dumps(schema)


def complete(
    schema: dict[str, Any],
    *,
    auth: bool,
    docs_public: bool,
    max_form_parts: int,
    named: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``schema`` (as FastAPI generated it) with the common answers added, and the ``named``
    schemas that routes refer to from bodies they describe by hand; returns it."""
    components = schema.setdefault("components", {})
    definitions = components.setdefault("schemas", {})
    definitions.update(copy.deepcopy(named or {}))  # completed per app: never the originals
    envelope = ErrorEnvelope.model_json_schema(ref_template="#/components/schemas/{model}")
    definitions.update(envelope.pop("$defs", {}))
    definitions["ErrorEnvelope"] = envelope
    components.setdefault("headers", {}).update(
        {
            name: {"description": text, "required": True, "schema": {"type": "string"}}
            for name, text in HEADERS.items()
        }
    )
    if auth:
        components.setdefault("securitySchemes", {})["bearer"] = {
            "type": "http",
            "scheme": "bearer",
            "description": "MNIST_API_KEY, or MNIST_READONLY_API_KEY to read and predict.",
        }
    for path, method, operation in _operations(schema):
        responses: dict[str, Any] = operation["responses"]
        for parameter in operation.get("parameters", []):
            _without_null(parameter)
        if "422" in responses:
            responses["422"]["content"] = error_response("")["content"]
        if auth:
            _document_auth(path, method, operation, docs_public)
        _document_limits(method, operation, definitions, max_form_parts)
        responses.setdefault("500", error_response("Unexpected; the body has the request id."))
        for response in responses.values():
            response.setdefault("headers", {})["X-Request-ID"] = _header("RequestId")
    for name in FASTAPI_VALIDATION_SCHEMAS:
        if name in definitions and not _is_referenced(schema, name):
            del definitions[name]
    return schema
