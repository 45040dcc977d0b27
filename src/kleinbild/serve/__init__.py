"""The HTTP server: an OpenAI-compatible images API, async jobs with server-sent progress, metrics, a playground.

A shell over the engine: `protocol` turns a request body into the engine's one validated `Request` (adding only
HTTP's own limits), `worker` runs the queue and batches, `routes` and `app` are FastAPI.
"""

from kleinbild.serve.app import ServerSettings, api_keys_from_env, create_app, serve

__all__ = ["ServerSettings", "api_keys_from_env", "create_app", "serve"]
