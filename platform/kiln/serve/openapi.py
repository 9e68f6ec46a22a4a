"""The OpenAPI 3.0 document of Kiln's HTTP API: the Open Inference Protocol (KServe v2 REST)
endpoints Kiln serves plus its additions (``/v2/models``, ``/predict``, ``/monitor``).

Published as ``docs/openapi.json`` (``python -m kiln.serve.openapi`` writes it; a test keeps it in
step) and used by the fuzz test, which generates requests from it against a running server. Every
operation documents its 4xx answers: a client never causes a 5xx.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from kiln.serve.limits import LimitsConfig
from kiln.serve.protocol import DATATYPES, MAX_ID_CHARS

ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    words = {
        400: "malformed request (the message names the field)",
        401: "API key missing (when serve.api_key_env is set)",
        403: "wrong API key",
        404: "no such model, version or endpoint",
        405: "method not allowed",
        413: "over a budget: serve.max_request_bytes or a serve.limits key (named)",
        422: "the model's output for this input is not finite",
        503: "not every Kiln application is running",
    }
    return {str(c): _json(ERROR, words[c]) for c in codes}


def _schemas() -> dict[str, Any]:
    limits = LimitsConfig()
    scalar = {"oneOf": [{"type": "number"}, {"type": "string"}, {"type": "boolean"}]}
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {"type": "string"}},
        },
        "Parameters": {"type": "object", "additionalProperties": True},
        "RequestInput": {
            "type": "object",
            "required": ["name", "shape", "datatype"],
            "properties": {
                "name": {"type": "string"},
                "shape": {
                    "type": "array",
                    "maxItems": limits.max_dims,
                    "items": {"type": "integer", "minimum": 0},
                },
                "datatype": {"type": "string", "enum": list(DATATYPES)},
                "parameters": {
                    "type": "object",
                    "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
                },
                "data": {
                    "description": "Row-major values, flat or nested (strings for BYTES).",
                    "type": "array",
                    "items": {"oneOf": [scalar, {"type": "array", "items": scalar}]},
                },
            },
        },
        "RequestOutput": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string"},
                "parameters": {
                    "type": "object",
                    "properties": {"binary_data": {"type": "boolean"}},
                },
            },
        },
        "InferenceRequest": {
            "type": "object",
            "required": ["inputs"],
            "properties": {
                "id": {"type": "string", "maxLength": MAX_ID_CHARS},
                "parameters": {
                    "type": "object",
                    "properties": {"binary_data_output": {"type": "boolean"}},
                },
                "inputs": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"$ref": "#/components/schemas/RequestInput"},
                },
                "outputs": {
                    "type": "array",
                    "items": {"$ref": "#/components/schemas/RequestOutput"},
                },
            },
        },
        "ResponseOutput": {
            "type": "object",
            "required": ["name", "shape", "datatype"],
            "properties": {
                "name": {"type": "string"},
                "shape": {"type": "array", "items": {"type": "integer"}},
                "datatype": {"type": "string"},
                "parameters": {"$ref": "#/components/schemas/Parameters"},
                "data": {"type": "array"},
            },
        },
        "InferenceResponse": {
            "type": "object",
            "required": ["model_name", "outputs"],
            "properties": {
                "model_name": {"type": "string"},
                "model_version": {"type": "string"},
                "id": {"type": "string"},
                "parameters": {"$ref": "#/components/schemas/Parameters"},
                "outputs": {
                    "type": "array",
                    "items": {"$ref": "#/components/schemas/ResponseOutput"},
                },
            },
        },
        "PredictRequest": {
            "description": "Image models: 'images' (base64 PNG/JPEG). Tabular: 'records'.",
            "type": "object",
            "properties": {
                "images": {"type": "array", "minItems": 1, "items": {"type": "string"}},
                "records": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": {"oneOf": [{"type": "number"}, {"type": "null"}]},
                    },
                },
            },
        },
        "PredictResponse": {
            "type": "object",
            "required": ["model_name", "model_version", "predictions"],
            "properties": {
                "model_name": {"type": "string"},
                "model_version": {"type": "string"},
                "predictions": {"type": "array", "items": {"type": "object"}},
                "parameters": {"$ref": "#/components/schemas/Parameters"},
            },
        },
        "ModelMetadata": {
            "type": "object",
            "required": ["name", "versions", "platform", "inputs", "outputs"],
            "properties": {
                "name": {"type": "string"},
                "versions": {"type": "array", "items": {"type": "string"}},
                "platform": {"type": "string"},
                "inputs": {"type": "array", "items": {"type": "object"}},
                "outputs": {"type": "array", "items": {"type": "object"}},
                "parameters": {"$ref": "#/components/schemas/Parameters"},
            },
        },
        "Object": {"type": "object", "additionalProperties": True},
    }


def _model_operations(versioned: bool) -> dict[str, dict[str, Any]]:
    base = "/v2/models/{model_name}" + ("/versions/{model_version}" if versioned else "")
    tag = ["model (version)" if versioned else "model"]
    obj = {"$ref": "#/components/schemas/Object"}

    def get(summary: str, schema: dict[str, Any], *codes: int) -> dict[str, Any]:
        return {
            "get": {
                "summary": summary,
                "tags": tag,
                "responses": {"200": _json(schema, "OK"), **_errors(*codes)},
            }
        }

    def post(summary: str, request: str, response: str) -> dict[str, Any]:
        return {
            "post": {
                "summary": summary,
                "tags": tag,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": f"#/components/schemas/{request}"}}
                    },
                },
                "responses": {
                    "200": _json({"$ref": f"#/components/schemas/{response}"}, "OK"),
                    **_errors(400, 401, 403, 404, 405, 413, 422),
                },
            }
        }

    return {
        base: get("Model metadata", {"$ref": "#/components/schemas/ModelMetadata"}, 404, 405),
        f"{base}/ready": get("Model readiness", obj, 404, 405),
        f"{base}/infer": post(
            "Open Inference Protocol inference", "InferenceRequest", "InferenceResponse"
        ),
        f"{base}/predict": post(
            "Convenience JSON prediction (Kiln)", "PredictRequest", "PredictResponse"
        ),
        f"{base}/monitor": get("Live monitoring of this replica (Kiln)", obj, 401, 403, 404, 405),
    }


def openapi_document(models: list[str] | None = None, version: str = "") -> dict[str, Any]:
    """The OpenAPI 3.0.3 document; ``models`` (served names) become the ``model_name`` enum, so that
    generated requests reach them. ``version``: Kiln's version, for ``info.version``."""
    model_name: dict[str, Any] = {"type": "string"}
    if models:
        model_name["enum"] = sorted(models)
    paths: dict[str, Any] = {
        "/v2/health/live": {
            "get": {
                "summary": "Liveness",
                "tags": ["server"],
                "responses": {"200": _json({"type": "object"}, "live")},
            }
        },
        "/v2/health/ready": {
            "get": {
                "summary": "Readiness: every served model has a replica running",
                "tags": ["server"],
                "responses": {"200": _json({"type": "object"}, "ready"), **_errors(503)},
            }
        },
        "/v2": {
            "get": {
                "summary": "Server metadata",
                "tags": ["server"],
                "responses": {"200": _json({"type": "object"}, "metadata")},
            }
        },
        "/v2/models": {
            "get": {
                "summary": "Served models (Kiln)",
                "tags": ["server"],
                "responses": {"200": _json({"type": "object"}, "models")},
            }
        },
        **_model_operations(False),
        **_model_operations(True),
    }
    parameters = {
        "model_name": {"name": "model_name", "in": "path", "required": True, "schema": model_name},
        "model_version": {
            "name": "model_version",
            "in": "path",
            "required": True,
            "schema": {"type": "string", "pattern": "^[0-9]{1,6}$"},
        },
    }
    for path, item in paths.items():
        names = [n for n in ("model_name", "model_version") if "{" + n + "}" in path]
        if names:
            item["parameters"] = [{"$ref": f"#/components/parameters/{n}"} for n in names]
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Kiln serving API",
            "version": version or "0",
            "description": "The Open Inference Protocol (KServe v2 REST, with Triton's binary "
            "tensor extension) plus Kiln's additions. With serve.api_key_env set, infer, predict "
            "and monitor need 'X-API-Key' or 'Authorization: Bearer'. Bodies over serve.limits "
            "budgets are answered 413 naming the key; no request answers 5xx.",
        },
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "parameters": parameters,
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "bearer": {"type": "http", "scheme": "bearer"},
            },
        },
    }


def main() -> None:
    """Print the document (what docs/openapi.json holds)."""
    from kiln.version import __version__

    sys.stdout.write(json.dumps(openapi_document(version=__version__), indent=2) + "\n")


if __name__ == "__main__":
    main()
