"""The service's OpenAPI document, written for the bundle it serves: pack names, whether items take images, limits.

Written by hand (no schema generator) so that it says exactly what the handlers accept: the property-based tests
(schemathesis) generate requests from it and check that nothing answers 5xx and every answer fits it.
"""

from __future__ import annotations

from typing import Any, Sequence

from .. import __version__
from .payload import Limits

_ERROR = {"$ref": "#/components/schemas/Error"}
_JSON_ERROR = {"application/json": {"schema": _ERROR}}


def openapi_document(pack_names: Sequence[str], takes_images: bool, limits: Limits) -> dict[str, Any]:
    images = {
        "type": "array",
        "maxItems": limits.max_images if takes_images else 0,
        "description": "Images as base64 strings or data: URLs (data:image/png;base64,...)"
                       if takes_images else "This bundle's prompt is text-only: no images.",
        "items": {"type": "string", "format": "byte"},
    }
    if takes_images:
        images["minItems"] = 1
    item: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "properties": {"text": {"type": "string"}, "images": images},
    }
    if takes_images:
        item["required"] = ["images"]
        item_or_text: dict[str, Any] = item
    else:
        item["required"] = ["text"]
        item["properties"]["text"]["minLength"] = 1
        item_or_text = {"oneOf": [{"type": "string", "minLength": 1}, item]}
    pack_result = {
        "type": "object",
        "required": ["label", "votes", "shares", "probabilities", "calibrated", "abstained"],
        "properties": {
            "label": {"type": "string", "nullable": True},
            "votes": {"type": "object", "additionalProperties": {"type": "integer"}},
            "shares": {"type": "object", "additionalProperties": {"type": "number"}},
            "probabilities": {"type": "object", "additionalProperties": {"type": "number"}},
            "calibrated": {"type": "boolean", "description": "false: a format-1 pack; its probabilities are the vote shares"},
            "abstained": {"type": "boolean"},
        },
    }
    result = {
        "type": "object",
        "required": pack_result["required"],
        "properties": {**pack_result["properties"],
                       "packs": {"type": "object", "additionalProperties": {"$ref": "#/components/schemas/PackResult"}}},
        "description": "The record `savpack-run classify --json` prints: the first pack's result, and with several packs "
                       "each pack's under `packs`.",
    }
    classify_request = {
        "type": "object",
        "additionalProperties": False,
        "required": ["inputs"],
        "properties": {
            "inputs": {"type": "array", "minItems": 1, "maxItems": limits.max_inputs, "items": item_or_text},
            "packs": {"type": "array", "minItems": 1, "uniqueItems": True, "items": {"type": "string", "enum": list(pack_names)},
                      "description": "The packs to answer with (default: all); the first one gives the top-level label."},
            "abstain_below": {"type": "number", "minimum": 0, "maximum": 1,
                              "description": "Answer label null (abstained) when the top probability is below this."},
        },
    }
    form = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "text": {"type": "string"},
            "images": {"type": "array", "items": {"type": "string", "format": "binary"}, "maxItems": limits.max_images},
            "packs": {"type": "array", "items": {"type": "string", "enum": list(pack_names)}},
            "abstain_below": {"type": "number", "minimum": 0, "maximum": 1},
        },
    }
    classify_response = {
        "type": "object",
        "required": ["results", "bundle"],
        "properties": {
            "results": {"type": "array", "items": {"$ref": "#/components/schemas/Result"}},
            "bundle": {"type": "object", "required": ["model", "packs"],
                       "properties": {"model": {"type": "string"}, "packs": {"type": "array", "items": {"type": "string"}}}},
        },
    }
    error = {
        "type": "object",
        "required": ["error", "error_type"],
        "properties": {"error": {"type": "string"}, "error_type": {"type": "string"}},
    }
    retry_after = {"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer", "minimum": 1}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "savpack-run serve", "version": __version__,
                 "description": "Classify text and images with a savpack bundle (SAV packs over a truncated ONNX graph)."},
        "paths": {
            "/v1/classify": {"post": {
                "summary": "Classify items with the bundle's packs",
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ClassifyRequest"}},
                    "multipart/form-data": {"schema": form},
                }},
                "responses": {
                    "200": {"description": "One result per input, in order",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ClassifyResponse"}}}},
                    "413": {"description": "Body, item count or image too large", "content": _JSON_ERROR},
                    "415": {"description": "Body is neither JSON nor multipart/form-data", "content": _JSON_ERROR},
                    "422": {"description": "Invalid input; the message names the field at fault", "content": _JSON_ERROR},
                    "429": {"description": "The queue is full", "headers": retry_after, "content": _JSON_ERROR},
                    "503": {"description": "The server is shutting down", "content": _JSON_ERROR},
                },
            }},
            "/health": {"get": {"summary": "Ready to classify", "responses": {"200": {
                "description": "The model is loaded", "content": {"application/json": {"schema": {
                    "type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}}}}}}},
            "/info": {"get": {"summary": "Packs, labels, model, versions, digests and limits", "responses": {"200": {
                "description": "What this server serves", "content": {"application/json": {"schema": {
                    "type": "object", "required": ["model", "packs", "versions", "digests", "limits"]}}}}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {
                "description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/": {"get": {"summary": "The playground page", "responses": {"200": {
                "description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}}}},
        },
        "components": {"schemas": {
            "ClassifyRequest": classify_request, "ClassifyResponse": classify_response, "Result": result,
            "PackResult": pack_result, "Error": error,
        }},
    }
