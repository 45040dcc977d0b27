"""The server's OpenAPI document, written out by hand: the handlers read their bodies themselves (JSON or
multipart, images as files or base64), so FastAPI cannot infer it. Served at `/openapi.json`; the fuzz test
generates requests from it and checks every answer against it."""

from __future__ import annotations

from typing import Any

from kleinbild import __version__
from kleinbild.serve.bfl import ENDPOINTS

_INT = {"type": "integer"}
_STR = {"type": "string"}
_NULL_INT = {"type": ["integer", "null"]}
_NULL_STR = {"type": ["string", "null"]}

_FIELDS: dict[str, Any] = {
    "prompt": {"type": "string", "minLength": 1, "maxLength": 32000},
    "n": {"type": "integer", "minimum": 1},
    "size": {"type": "string", "description": "WIDTHxHEIGHT or auto", "example": "128x128"},
    "seed": {"type": "integer", "minimum": 0, "description": "image i gets seed + i"},
    "steps": {"type": "integer", "minimum": 1},
    "guidance": {"type": "number", "minimum": 0},
    "negative_prompt": _STR,
    "literal_prompt": {"type": "boolean", "description": "encode the prompt as written (nano otherwise completes "
                       "a prompt that leaves sizes or positions out)"},
    "model": _STR,
    "response_format": {"enum": ["b64_json", "url"]},
    "output_format": {"enum": ["png", "jpeg", "webp"]},
    "output_compression": {"type": "integer", "minimum": 0, "maximum": 100},
    "background": {"enum": ["auto", "opaque", "transparent"]},
    "user": _STR,
}
# Masked editing (edits and jobs): the first image is the one edited.
_EDIT_FIELDS: dict[str, Any] = {
    "mask": {"type": "string", "description": "base64 or a data URI of a PNG of the first image's size: fully "
             "transparent pixels are edited; without transparency, white = edit"},
    "strength": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "description": "1: from pure noise"},
    "keep_unmasked": {"type": "boolean", "description": "paste the source back outside the mask (default: on "
                      "with a mask)"},
    "mask_crop": {"type": "integer", "minimum": 0, "description": "edit a crop around the mask, padded by this"},
    "expand": {"description": "outpaint: pixels added left, top, right, bottom", "oneOf": [
        {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 4, "maxItems": 4}, _STR]},
}
_IMAGES = {"description": "base64 or data URIs", "oneOf": [_STR, {"type": "array", "items": _STR, "maxItems": 4}]}

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {"message": _STR, "type": _STR, "param": _NULL_STR, "code": _NULL_STR},
    }},
}

_IMAGES_RESPONSE = {
    "type": "object",
    "required": ["created", "data", "output_format", "size", "usage", "kleinbild"],
    "properties": {
        "created": _INT,
        "data": {"type": "array", "items": {"type": "object", "required": ["seed"], "properties": {
            "seed": _INT, "b64_json": _STR, "url": _STR}}},
        "background": _STR,
        "output_format": {"enum": ["png", "jpeg", "webp"]},
        "size": {"type": "string", "pattern": "^[0-9]+x[0-9]+$"},
        "usage": {"type": "object", "required": ["input_tokens", "output_tokens", "total_tokens"], "properties": {
            "input_tokens": _INT, "output_tokens": _INT, "total_tokens": _INT}},
        "kleinbild": {"type": "object", "required": ["job", "seeds", "steps", "notes"], "properties": {
            "job": _STR, "seeds": {"type": "array", "items": _INT}, "steps": _INT,
            "notes": {"type": "array", "items": _STR}, "edit": {"type": "object"}}},
    },
}

_JOB = {
    "type": "object",
    "required": ["id", "object", "status", "kind", "created_at", "progress", "request", "result", "error"],
    "properties": {
        "id": _STR,
        "object": {"const": "image.job"},
        "status": {"enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
        "kind": {"enum": ["generation", "edit"]},
        "created_at": _INT, "started_at": _NULL_INT, "finished_at": _NULL_INT,
        "progress": {"type": "object", "required": ["step", "total"], "properties": {"step": _INT, "total": _INT}},
        "batch_size": _INT,
        "request": {"type": "object", "required": ["prompt", "size", "n", "seeds", "steps"]},
        "result": {"oneOf": [{"type": "null"}, {"$ref": "#/components/schemas/ImagesResponse"}]},
        "error": {"oneOf": [{"type": "null"}, _ERROR["properties"]["error"]]},
    },
}


def _json(ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): {"description": "an error, as OpenAI answers them", "content": _json("Error")} for c in codes}


# What any request may meet before its handler: keys, hosts, body limits and timeouts, a full queue, loading.
_GUARDS = (400, 401, 404, 405, 408, 409, 413, 415, 422, 429, 503)


def _body(multipart: bool, images: bool) -> dict[str, Any]:
    props = dict(_FIELDS)
    if images:
        props["image"] = _IMAGES
        props["images"] = _IMAGES
        props |= _EDIT_FIELDS
    content: dict[str, Any] = {"application/json": {"schema": {"type": "object", "required": ["prompt"],
                                                              "properties": props}}}
    if multipart:
        form = {k: {"type": "string"} for k in (*_FIELDS, *_EDIT_FIELDS)} | {
            k: {"type": "string", "format": "binary"} for k in ("image", "mask")}
        content["multipart/form-data"] = {"schema": {"type": "object", "required": ["prompt"], "properties": form}}
    return {"required": True, "content": content}


def _images_op(summary: str, multipart: bool, images: bool) -> dict[str, Any]:
    return {"post": {"summary": summary, "requestBody": _body(multipart, images), "responses": {
        "200": {"description": "the images", "content": _json("ImagesResponse")}, **_errors(*_GUARDS)}}}


_ID = [{"name": "job_id", "in": "path", "required": True, "schema": _STR}]


# BFL's API (serve/bfl.py): its own request fields and answer shapes.
_BFL_FIELDS: dict[str, Any] = {
    "prompt": {"type": "string", "minLength": 1, "maxLength": 32000},
    **{k: {"type": ["string", "null"], "description": "base64 or a data URI (URLs are not fetched)"}
       for k in ("input_image", "input_image_2", "input_image_3", "input_image_4")},
    "seed": {"type": ["integer", "null"], "minimum": 0},
    "width": {"type": ["integer", "null"], "minimum": 0, "description": "0 or null: from the first input image"},
    "height": {"type": ["integer", "null"], "minimum": 0},
    "output_format": {"enum": ["jpeg", "png", "webp"]},
    "safety_tolerance": {"type": "integer", "minimum": 0, "maximum": 6, "description": "accepted, not applied"},
    "prompt_upsampling": {"type": "boolean", "description": "accepted, not applied"},
    "webhook_url": {"type": ["string", "null"], "description": "only to hosts allowed with --webhook-host"},
    "webhook_secret": {"type": ["string", "null"], "description": "signs the webhook: X-BFL-Signature"},
}
_BFL_ERROR = {"type": "object", "required": ["detail"], "properties": {"detail": {"anyOf": [
    _STR, {"type": "array", "items": {"type": "object", "required": ["loc", "msg", "type"]}}]}}}
_BFL_SUBMITTED = {"type": "object", "required": ["id", "polling_url"], "properties": {
    "id": _STR, "polling_url": _STR, "cost": {"type": "number"}, "input_mp": {"type": "number"},
    "output_mp": {"type": "number"}}}
_BFL_RESULT = {"type": "object", "required": ["id", "status", "result", "progress"], "properties": {
    "id": _STR,
    "status": {"enum": ["Task not found", "Pending", "Request Moderated", "Content Moderated", "Ready", "Error"]},
    "result": {"oneOf": [{"type": "null"}, {"type": "object", "required": ["sample", "seed", "prompt"],
                                            "properties": {"sample": _STR, "seed": _INT, "prompt": _STR}}]},
    "progress": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
    "details": {"type": ["object", "null"]}, "preview": {"type": ["object", "null"]}}}


def _bfl_errors(*codes: int) -> dict[str, Any]:
    # The guards in front of every route answer in OpenAI's shape; the handlers in BFL's.
    schema = {"anyOf": [{"$ref": "#/components/schemas/BflError"}, {"$ref": "#/components/schemas/Error"}]}
    return {str(c): {"description": "an error", "content": {"application/json": {"schema": schema}}} for c in codes}


def _bfl_paths() -> dict[str, Any]:
    body = {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": ["prompt"], "additionalProperties": False, "properties": _BFL_FIELDS}}}}
    submit = {"post": {"summary": "BFL API: queue a generation or edit", "requestBody": body, "responses": {
        "200": {"description": "the task", "content": _json("BflSubmitted")}, **_bfl_errors(*_GUARDS)}}}
    paths: dict[str, Any] = {f"/v1/{name}": submit for name in ENDPOINTS}
    paths["/v1/get_result"] = {"get": {"summary": "BFL API: a task's status and result", "parameters": [
        {"name": "id", "in": "query", "required": True, "schema": _STR}], "responses": {
        "200": {"description": "the task (status 'Task not found' for an unknown id)",
                "content": _json("BflResult")}, **_bfl_errors(*_GUARDS)}}}
    return paths


def openapi_document() -> dict[str, Any]:
    job_answer = {"200": {"description": "the job", "content": _json("Job")}, **_errors(*_GUARDS)}
    return {
        "openapi": "3.1.0",
        "info": {"title": "kleinbild", "version": __version__,
                 "description": "OpenAI-compatible images API for the FLUX.2 [klein] models, with async jobs"},
        "paths": {
            "/v1/images/generations": _images_op("text to image", multipart=False, images=False),
            "/v1/images/edits": _images_op("edit or compose reference images", multipart=True, images=True),
            "/v1/jobs": {"post": {"summary": "queue a generation or edit", "requestBody": _body(True, True),
                                  "responses": {"202": {"description": "the queued job", "content": _json("Job")},
                                                **_errors(*_GUARDS)}}},
            "/v1/jobs/{job_id}": {
                "get": {"summary": "a job's state", "parameters": _ID, "responses": job_answer},
                "delete": {"summary": "cancel a job", "parameters": _ID, "responses": job_answer},
            },
            "/v1/jobs/{job_id}/events": {"get": {"summary": "server-sent progress events", "parameters": _ID,
                                                 "responses": {"200": {"description": "the event stream", "content": {
                                                     "text/event-stream": {"schema": _STR}}}, **_errors(*_GUARDS)}}},
            "/v1/files/{name}": {"get": {"summary": "a url result", "parameters": [
                {"name": "name", "in": "path", "required": True, "schema": _STR}], "responses": {
                "200": {"description": "the image", "content": {f"image/{f}": {"schema": _STR}
                                                                for f in ("png", "jpeg", "webp")}},
                **_errors(*_GUARDS)}}},
            "/v1/models": {"get": {"summary": "the served model", "responses": {
                "200": {"description": "a list of one", "content": {"application/json": {"schema": {
                    "type": "object", "required": ["object", "data"], "properties": {
                        "object": {"const": "list"}, "data": {"type": "array", "items": {
                            "$ref": "#/components/schemas/Model"}}}}}}},
                **_errors(*_GUARDS)}}},
            "/health": {"get": {"summary": "ready, loading or failed", "responses": {
                code: {"description": "the status", "content": {"application/json": {"schema": {
                    "type": "object", "required": ["status", "queue_depth"], "properties": {
                        "status": {"enum": ["ready", "loading", "failed"]}, "queue_depth": _INT}}}}}
                for code in ("200", "503")} | _errors(400)}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
                "200": {"description": "the exposition text", "content": {"text/plain": {"schema": _STR}}},
                **_errors(400, 401)}}},
            **_bfl_paths(),
        },
        "components": {
            "schemas": {"Error": _ERROR, "ImagesResponse": _IMAGES_RESPONSE, "Job": _JOB, "BflError": _BFL_ERROR,
                        "BflSubmitted": _BFL_SUBMITTED, "BflResult": _BFL_RESULT,
                        "Model": {"type": "object", "required": ["id", "object", "ready"], "properties": {
                            "id": _STR, "object": {"const": "model"}, "ready": {"type": "boolean"}}}},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "x-key": {"type": "apiKey", "in": "header", "name": "x-key"}},
        },
    }
