"""OpenAI- and TGI-compatible routes. The front end only routes: it passes the body unchanged and
tells the handler which API the client spoke through the `X-LMC-API` property; the handler
(handlers/llm.py) parses, generates and formats the answer, streamed or not.
"""

from __future__ import annotations

import json

from aiohttp import web

from engines.contracts import errors as E
from container import invoke
from engines.contracts.names import ADAPTER_HEADER, API_PROPERTY
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


def _openai_model(request: web.Request, body: bytes) -> tuple[Model, str | None]:
    """The model (and LoRA adapter) the body's "model" field names: a model of ours, an
    adapter of one (OpenAI clients select an adapter by model name, as with vLLM), else the
    only model served, since OpenAI clients must send some name and most send a hub id we do
    not know. With LoRA enabled an unknown name is a 404 listing the names, rather than the
    base model answering for a mistyped adapter."""
    payload = E.parse_json(body)
    if not isinstance(payload, dict):
        raise E.ValidationError("body", f"the request body must be a JSON object, got "
                                        f"{type(payload).__name__}")
    mgr = request.app["models"]
    name = payload.get("model")
    if isinstance(name, str) and name in mgr.models:
        return mgr.models[name], None
    if isinstance(name, str) and name:
        for model in mgr.models.values():
            if name in model.adapters.adapters:
                return model, name
    model = mgr.default()
    if isinstance(name, str) and name and model.adapters.lora_enabled:
        names = [model.name, *sorted(model.adapters.adapters)]
        raise E.AdapterNotFound(f"model {name!r} is neither the base model nor one of its "
                                f"adapters; available: {', '.join(names)}")
    return model, None


def _openai_handler(api: str):
    async def handle(request: web.Request) -> web.StreamResponse:
        body = await invoke.read_body(request)
        model, adapter = _openai_model(request, body)
        props = _properties(request, api)
        props = {k: v for k, v in props.items() if k.lower() != ADAPTER_HEADER.lower()}
        if adapter is not None:
            props[ADAPTER_HEADER] = adapter
        inv = await invoke.submit(request, model, props, body=body)
        return await invoke.respond(request, inv)
    return handle


async def _lorax_adapter(model: Model, body: bytes) -> None:
    """LoRAX loads the adapter a request names on first use (adapter_source local, s3 or hub):
    register it then, under its adapter_id, so the handler finds it. Registered names and
    bodies that name no adapter pass through untouched."""
    if b"adapter_id" not in body or not model.adapters.lora_enabled:
        return  # most requests: no second parse (the handler refuses an adapter without LoRA)
    try:
        params = json.loads(body).get("parameters") or {}
        adapter_id, source = params.get("adapter_id"), params.get("adapter_source")
    except (ValueError, AttributeError, RecursionError):
        return  # the handler answers a malformed body with the precise 400
    if not isinstance(adapter_id, str) or not adapter_id or adapter_id in model.adapters.adapters:
        return
    if source == "pbase":
        raise E.ValidationError("adapter_source", "adapter_source=pbase (Predibase) is not "
                                                  "supported; use local, s3 or hub")
    hub = source in (None, "hub")
    if hub:
        from engines.sources.hub import looks_like_hub_id

        if "/" not in adapter_id or not looks_like_hub_id(adapter_id):
            return  # a plain name: registered or not, the handler says (404 with the list)
    src = adapter_id
    if source == "s3" and not src.startswith("s3://"):
        src = "s3://" + src
    try:
        await model.adapters.register(adapter_id, src)
    except E.Conflict:
        pass  # another request registered it meanwhile
    except E.InvalidAdapter as e:
        if not hub or e.field != "src":
            raise
        known = ", ".join(sorted(model.adapters.adapters)) or "none"
        raise E.AdapterNotFound(f"adapter {adapter_id!r} is not registered (registered "
                                f"adapters: {known}) and not in the local Hugging Face cache: "
                                f"{e.message}") from None


def _tgi_handler(api: str):
    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            model = invoke.select_model(request)
            body = await invoke.read_body(request)
            await _lorax_adapter(model, body)
            inv = await invoke.submit(request, model, _properties(request, api), body=body)
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
    """Models, and each model's LoRA adapters with `parent` (as vLLM lists them)."""
    mgr = request.app["models"]
    data = []
    for name, model in mgr.models.items():
        created = mgr.created.get(name, 0)
        data.append({"id": name, "object": "model", "created": created, "owned_by": "lmc",
                     "root": model.config.model_dir, "parent": None})
        data += [{"id": a.name, "object": "model", "created": created, "owned_by": "lmc",
                  "root": a.src, "parent": name} for a in model.adapters.adapters.values()]
    return web.json_response({"object": "list", "data": data})


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/v1/models", list_models)
    for path, api in OPENAI_ROUTES.items():
        router.add_post(path, _openai_handler(api))
    for path, api in TGI_ROUTES.items():
        router.add_post(path, _tgi_handler(api))
