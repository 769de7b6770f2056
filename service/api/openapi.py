"""The OpenAPI document, completed with every answer the middlewares and handlers can give.

The routes declare their own outcomes (404, 409, …); what holds for every route is added
here from the same rules the middlewares apply, so a route added later is documented
without an edit: 401/403 from :mod:`service.api.security`, 413 (and 400 for unreadable bodies)
from :mod:`service.api.limits`, 422 and 500 in the error envelope, and ``X-Request-ID`` on every
response.
"""

from __future__ import annotations

import json
from typing import Any

from service.api.security import Access, required_access
from service.schemas import ErrorEnvelope

BODY_METHODS = frozenset({"post", "put", "patch"})
ENVELOPE_REF = "#/components/schemas/ErrorEnvelope"
# FastAPI's own 422 models, unused once every 422 is declared as the envelope.
FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


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
    schema: dict[str, Any], *, auth: bool, docs_public: bool, max_form_parts: int
) -> dict[str, Any]:
    """``schema`` (as FastAPI generated it) with the common answers added; returns it."""
    components = schema.setdefault("components", {})
    definitions = components.setdefault("schemas", {})
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
