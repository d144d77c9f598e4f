"""OpenAI- and TGI-compatible routes. The front end only routes: it passes the body unchanged and
tells the handler which API the client spoke through the `X-LMC-API` property; the handler
(handlers/llm.py) parses, generates and formats the answer, streamed or not.
"""

from __future__ import annotations

import json

from aiohttp import web

from engines.contracts import errors as E
from container import invoke
from engines.contracts.names import API_PROPERTY
from container.wlm import Model

# path -> X-LMC-API value. "/" is TGI's compat root: it answers like /generate or
# /generate_stream depending on the body's "stream"; huggingface_hub's InferenceClient posts
# there when given a server URL instead of a model id.
OPENAI_ROUTES = {"/v1/completions": "openai.completions",
                 "/v1/chat/completions": "openai.chat"}
TGI_ROUTES = {"/generate": "tgi.generate",
              "/generate_stream": "tgi.generate_stream",
              "/": "tgi"}


def _properties(request: web.Request, api: str) -> dict[str, str]:
    # A client-sent X-LMC-API must not survive next to ours under another spelling.
    props = {k: v for k, v in request.headers.items() if k.lower() != API_PROPERTY.lower()}
    props[API_PROPERTY] = api
    return props


def _openai_model(request: web.Request, body: bytes) -> Model:
    """The model the body's "model" field names when it is one of ours, else the only one
    served: OpenAI clients must send some model name, and most send a hub id we don't know."""
    try:
        payload = json.loads(body)
    except ValueError as e:
        raise E.invalid_json(e) from None
    if not isinstance(payload, dict):
        raise E.ValidationError("body", f"the request body must be a JSON object, got "
                                        f"{type(payload).__name__}")
    mgr = request.app["models"]
    name = payload.get("model")
    if isinstance(name, str) and name in mgr.models:
        return mgr.models[name]
    return mgr.default()


def _openai_handler(api: str):
    async def handle(request: web.Request) -> web.StreamResponse:
        body = await invoke.read_body(request)
        model = _openai_model(request, body)
        inv = await invoke.submit(request, model, _properties(request, api), body=body)
        return await invoke.respond(request, inv)
    return handle


def _tgi_handler(api: str):
    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            inv = await invoke.submit(request, invoke.select_model(request),
                                      _properties(request, api))
        except E.LmcError as e:
            code, body = E.tgi_error(e.status, e.message, e.type, field=getattr(e, "field", None))
            return _tgi_response(code, body, e.headers)
        if not inv.ok and not inv.response.stream:
            return _tgi_response(*_tgi_from_worker(inv.response))
        return await invoke.respond(request, inv)
    return handle


def _tgi_response(status: int, body: bytes, headers: dict[str, str] | None = None) -> web.Response:
    """An error in TGI's shape (engines/contracts/errors.tgi_error), so TGI's and LoRAX's clients
    raise their own typed errors with our message. A stream that fails after its first byte
    already ends with TGI's SSE error event (handlers/llm_formats.TgiSSE)."""
    return web.Response(status=status, body=body, content_type=invoke.JSON_TYPE,
                        headers=headers or None)


def _tgi_from_worker(response) -> tuple[int, bytes]:
    """A worker's error answer ({"code", "type", "message", "field"?}) in TGI's shape."""
    try:
        payload = json.loads(response.body)
    except ValueError:
        payload = None
    if not isinstance(payload, dict) or not isinstance(payload.get("message"), str):
        return E.tgi_error(response.code, response.body.decode("utf-8", errors="replace"))
    return E.tgi_error(response.code, payload["message"], payload.get("type"),
                       field=payload.get("field"))


async def list_models(request: web.Request) -> web.Response:
    mgr = request.app["models"]
    data = [{"id": name, "object": "model", "created": mgr.created.get(name, 0), "owned_by": "lmc"}
            for name in mgr.models]
    return web.json_response({"object": "list", "data": data})


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/v1/models", list_models)
    for path, api in OPENAI_ROUTES.items():
        router.add_post(path, _openai_handler(api))
    for path, api in TGI_ROUTES.items():
        router.add_post(path, _tgi_handler(api))
