"""The aiohttp front end: inference routes, /ping, and the management API.

This process never imports torch; models live in worker processes (container/wlm.py runs
each model's queue and pool, container/worker_process.py the processes).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from aiohttp import web

from engines.contracts import errors as E
from container import (header_timeout, invoke, llm_routes, metrics, observe, openapi,
                       sagemaker_runtime)
from container.access import (allowed_networks, check_model_dir, management,
                              model_roots)
from container.config import ModelSpec, load_model_config
from engines.options import ConfigError, ServerOptions
from engines.sources import SourceError
from container.groups import LayoutError
from container.wlm import Model, ModelStatus

log = logging.getLogger("lmc.server")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

_JSON = invoke.JSON_TYPE


class ModelManager:
    """The models this server serves, by name."""

    def __init__(self, server: ServerOptions | None = None) -> None:
        self.server = server
        self.models: dict[str, Model] = {}
        # Models whose source is still being fetched (None) or failed to fetch (the reason):
        # /ping reports them as loading or failed before a Model exists.
        self.fetching: dict[str, str | None] = {}
        # Registration time (unix seconds) by name: OpenAI's /v1/models reports it as `created`.
        self.created: dict[str, int] = {}
        # True until the startup models (incl. preparing the default model) are registered,
        # so /ping says 503 rather than 200-with-nothing.
        self.starting = True
        self.metrics: metrics.Metrics | None = None  # set by build_app when metrics are on

    def get(self, name: str) -> Model:
        m = self.models.get(name)
        if m is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise E.ModelNotFound(f"model {name!r} is not registered; registered models: {known}")
        return m

    def default(self) -> Model:
        if len(self.models) == 1:
            return next(iter(self.models.values()))
        if not self.models:
            raise E.ModelNotReady("no model is loaded yet; retry later")
        raise E.BadRequest(f"{len(self.models)} models are served; name one with ?model_name= or "
                           f"the X-Amzn-SageMaker-Target-Model header "
                           f"({', '.join(sorted(self.models))})")

    async def register(self, spec: ModelSpec, *, overrides: dict[str, str] | None = None,
                       wait: bool = True, keep_failed: bool = False) -> Model:
        """`keep_failed`: a source that cannot be fetched leaves the model FAILED with the
        reason (ping 500), as at startup; otherwise it is a 400 to the register call."""
        if spec.name in self.models or self.fetching.get(spec.name, "") is None:
            raise E.Conflict(f"model {spec.name!r} is already registered")
        self.fetching[spec.name] = None
        try:
            # On a thread: fetching an s3:// or hub source can take minutes, and /ping must
            # keep answering meanwhile.
            cfg = await asyncio.to_thread(
                load_model_config, spec.name, spec.model_dir, overrides=overrides,
                source=spec.source, cache_dir=self.server.cache_dir if self.server else None)
        except SourceError as e:
            log.error("model %s: %s", spec.name, e)
            if keep_failed:
                self.fetching[spec.name] = str(e)  # stays: /ping reports it FAILED
                raise E.ModelFailure(str(e)) from None
            raise E.BadRequest(str(e)) from None
        except ConfigError as e:
            raise E.BadRequest(str(e)) from None
        finally:
            if self.fetching.get(spec.name, "") is None:
                del self.fetching[spec.name]
        try:
            model = Model(cfg, server=self.server)
            if self.metrics is not None:
                model.request_stats_sink = self.metrics.engine_request
        except (LayoutError, ValueError) as e:
            raise E.BadRequest(f"model {spec.name!r}: {e}") from None
        try:
            await model.adapters.add_startup_adapters()
        except E.LmcError as e:
            raise E.BadRequest(f"model {spec.name!r}: {e.message}") from None
        self.models[spec.name] = model
        self.created[spec.name] = int(time.time())
        handler = (f"{cfg.llm.engine.name} engine ({cfg.llm.engine.reason})" if cfg.llm
                   else "handler chosen by the worker (model.py)")
        log.info("registering model %s from %s: %s, batch_size=%d, max_batch_delay=%dms, "
                 "workers=%d..%d", cfg.name, cfg.model_dir, handler, cfg.batch_size,
                 cfg.max_batch_delay_ms, cfg.min_workers, cfg.max_workers)
        task = asyncio.create_task(model.load())
        if wait:
            await task
        return model

    async def unregister(self, name: str) -> None:
        if self.fetching.get(name) is not None:  # its source failed: nothing runs to stop
            del self.fetching[name]
            return
        model = self.get(name)
        del self.models[name]
        self.created.pop(name, None)
        await model.stop()

    async def stop_all(self) -> None:
        await asyncio.gather(*(m.stop() for m in list(self.models.values())),
                             return_exceptions=True)
        self.models.clear()


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def json_response(obj, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(body=json.dumps(obj).encode(), status=status, content_type=_JSON,
                        headers=headers)


def error_response(status: int, message: str, type_: str | None = None,
                   headers: dict | None = None, *, field: str | None = None) -> web.Response:
    return web.Response(body=E.error_body(status, message, type_, field=field), status=status,
                        content_type=_JSON, headers=headers)


def _int_param(request: web.Request, key: str, *, minimum: int = 0) -> int | None:
    raw = request.query.get(key)
    if raw is None:
        return None
    try:
        v = int(raw)
    except ValueError:
        raise E.BadRequest(f"query parameter {key}={raw!r} is not an integer") from None
    if v < minimum:
        raise E.BadRequest(f"query parameter {key}={v} must be >= {minimum}")
    return v


@web.middleware
async def draining_middleware(request: web.Request, handler):
    """After SIGTERM the server drains: what is in flight finishes, anything new gets a 503
    (with Retry-After) so a load balancer or client retries elsewhere."""
    if request.app.get("draining"):
        raise E.ServiceUnavailable("the server is shutting down; retry on another instance")
    return await handler(request)


@web.middleware
async def error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except E.LmcError as e:
        return error_response(e.status, e.message, e.type, e.headers or None,
                              field=getattr(e, "field", None))
    except web.HTTPException as e:
        if e.status < 400:
            raise
        msg = {404: f"no route for {request.method} {request.path}",
               405: f"method {request.method} is not allowed on {request.path}",
               413: e.text or "request body too large"}.get(e.status, e.reason)
        return error_response(e.status, msg)
    except asyncio.CancelledError:
        raise
    except Exception as e:  # a bug of ours: log it, never leak a stack trace to the client
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, f"internal error: {type(e).__name__}")


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["x-request-id"] = observe.request_id(request)  # decided on arrival


# ---------------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------------


async def _invoke(request: web.Request, model: Model) -> web.StreamResponse:
    inv = await invoke.submit(request, model, dict(request.headers))
    return await invoke.respond(request, inv)


async def invocations(request: web.Request) -> web.StreamResponse:
    return await _invoke(request, invoke.select_model(request))


async def predictions(request: web.Request) -> web.StreamResponse:
    return await _invoke(request, request.app["models"].get(request.match_info["model"]))


async def ping(request: web.Request) -> web.Response:
    mgr: ModelManager = request.app["models"]
    statuses = {name: m.status for name, m in mgr.models.items()}
    failures = {name: m.failure for name, m in mgr.models.items() if m.failure}
    for name, reason in mgr.fetching.items():
        statuses[name] = ModelStatus.LOADING if reason is None else ModelStatus.FAILED
        if reason is not None:
            failures[name] = reason
    body = {name: {"status": s.value} for name, s in statuses.items()}
    for name, reason in failures.items():
        body[name]["error"] = reason
    if any(s is ModelStatus.FAILED for s in statuses.values()):
        return json_response(body, status=500)
    if mgr.starting or not statuses or any(s is not ModelStatus.READY for s in statuses.values()):
        return json_response(body or {"status": "Loading"}, status=503)
    return json_response(body)


# ---------------------------------------------------------------------------------------------
# Management API (DJL Serving's shape)
# ---------------------------------------------------------------------------------------------


async def list_models(request: web.Request) -> web.Response:
    mgr: ModelManager = request.app["models"]
    return json_response({"models": [{"modelName": m.name, "modelUrl": m.config.model_dir,
                                      "status": m.status.value} for m in mgr.models.values()]})


async def register_model(request: web.Request) -> web.Response:
    mgr: ModelManager = request.app["models"]
    url = request.query.get("url")
    if not url:
        raise E.BadRequest("query parameter 'url' (a local model directory) is required")
    path = Path(url[len("file://"):] if url.startswith("file://") else url)
    if not path.is_dir():
        raise E.BadRequest(f"url={url!r} is not a local directory (only local model "
                           f"directories can be registered on this build)")
    check_model_dir(path, model_roots(request.app["server_config"]))
    name = request.query.get("model_name") or path.name
    overrides: dict[str, str] = {}
    for q, key in (("batch_size", "batch_size"), ("max_batch_delay", "max_batch_delay"),
                   ("max_idle_time", "max_idle_time"), ("min_worker", "minWorkers"),
                   ("max_worker", "maxWorkers"), ("job_queue_size", "job_queue_size")):
        v = _int_param(request, q, minimum=0)
        if v is not None:
            overrides[key] = str(v)
    if "engine" in request.query:
        overrides["engine"] = request.query["engine"]
    sync = request.query.get("synchronous", "true").lower() != "false"
    model = await mgr.register(ModelSpec(name, str(path.resolve())), overrides=overrides,
                               wait=sync)
    if not sync:
        return json_response({"status": f'Model "{name}" registration scheduled.'}, status=202)
    if model.status is ModelStatus.FAILED:
        await mgr.unregister(name)
        raise E.ModelFailure(f"model {name!r} failed to load: {model.failure}")
    return json_response({"status": f'Model "{name}" registered.'})


async def describe_model(request: web.Request) -> web.Response:
    model = request.app["models"].get(request.match_info["model"])
    return json_response([model.describe()])


async def scale_model(request: web.Request) -> web.Response:
    model = request.app["models"].get(request.match_info["model"])
    lo = _int_param(request, "min_worker", minimum=0)
    hi = _int_param(request, "max_worker", minimum=1)
    try:
        await model.scale(min_workers=lo, max_workers=hi)
    except ValueError as e:
        raise E.BadRequest(str(e)) from None
    return json_response({"status": f'Model "{model.name}" worker scaled. '
                                    f'min_worker={model.min_workers} max_worker={model.max_workers}'})


async def unregister_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    await request.app["models"].unregister(name)
    return json_response({"status": f'Model "{name}" unregistered'})


# ---------------------------------------------------------------------------------------------
# LoRA adapters: DJL's adapter API and vLLM's load/unload routes (container/adapters.py)
# ---------------------------------------------------------------------------------------------


def _bool_param(request: web.Request, key: str) -> bool | None:
    raw = request.query.get(key)
    if raw is None:
        return None
    if raw.lower() not in ("true", "false"):
        raise E.ValidationError(key, f"query parameter {key}={raw!r} must be true or false")
    return raw.lower() == "true"


_ADAPTER_PARAMS = frozenset({"name", "src", "preload", "pin"})


def _adapter_model(request: web.Request) -> Model:
    name = request.match_info.get("model")
    mgr: ModelManager = request.app["models"]
    return mgr.get(name) if name else mgr.default()


async def list_adapters(request: web.Request) -> web.Response:
    """DJL's paginated list: ?limit= (default 100) and ?next_page_token= (an offset)."""
    model = _adapter_model(request)
    limit = _int_param(request, "limit", minimum=1) or 100
    start = _int_param(request, "next_page_token", minimum=0) or 0
    adapters = list(model.adapters.adapters.values())
    body: dict = {"adapters": [a.describe() for a in adapters[start:start + limit]]}
    if start + limit < len(adapters):
        body["nextPageToken"] = str(start + limit)
    return json_response(body)


async def register_adapter(request: web.Request) -> web.Response:
    model = _adapter_model(request)
    name, src = request.query.get("name"), request.query.get("src")
    if not name or not src:
        raise E.ValidationError("name" if not name else "src", "query parameters name and src "
                                "are required: POST /models/{model}/adapters?name=a1&src=/path")
    preload, pin = _bool_param(request, "preload"), _bool_param(request, "pin")
    # DJL: any other argument is a model-specific option, passed on to register_adapter.
    options = {k: v for k, v in request.query.items() if k not in _ADAPTER_PARAMS}
    await model.adapters.register(name, src, preload=True if preload is None else preload,
                                  pin=bool(pin), options=options)
    return json_response({"status": f"Adapter {name} registered"})


async def describe_adapter(request: web.Request) -> web.Response:
    adapter = _adapter_model(request).adapters.get(request.match_info["adapter"])
    return json_response([adapter.describe()])  # DJL answers a list


async def update_adapter(request: web.Request) -> web.Response:
    model = _adapter_model(request)
    name = request.match_info["adapter"]
    await model.adapters.update(name, src=request.query.get("src"),
                                preload=_bool_param(request, "preload"),
                                pin=_bool_param(request, "pin"))
    return json_response({"status": f"Adapter {name} updated"})


async def unregister_adapter(request: web.Request) -> web.Response:
    model = _adapter_model(request)
    name = request.match_info["adapter"]
    await model.adapters.unregister(name)
    return json_response({"status": f"Adapter {name} unregistered"})


async def _vllm_body(request: web.Request) -> dict:
    body = E.parse_json(await invoke.read_body(request) or b"{}")
    if not isinstance(body, dict) or not isinstance(body.get("lora_name"), str) \
            or not body["lora_name"]:
        raise E.ValidationError("lora_name", "the body must be a JSON object with lora_name")
    return body


async def vllm_load_lora(request: web.Request) -> web.Response:
    """vLLM's POST /v1/load_lora_adapter {"lora_name", "lora_path"}."""
    body = await _vllm_body(request)
    if not isinstance(body.get("lora_path"), str) or not body["lora_path"]:
        raise E.ValidationError("lora_path", "lora_path (the adapter's directory) is required")
    model = request.app["models"].default()
    await model.adapters.register(body["lora_name"], body["lora_path"])
    return web.Response(text=f"Success: LoRA adapter '{body['lora_name']}' added successfully.")


async def vllm_unload_lora(request: web.Request) -> web.Response:
    """vLLM's POST /v1/unload_lora_adapter {"lora_name"}."""
    body = await _vllm_body(request)
    model = request.app["models"].default()
    await model.adapters.unregister(body["lora_name"])
    return web.Response(text=f"Success: LoRA adapter '{body['lora_name']}' removed "
                             f"successfully.")


def build_app(server_config: ServerOptions, manager: ModelManager | None = None) -> web.Application:
    app = web.Application(middlewares=[observe.observe_middleware, error_middleware,
                                       draining_middleware],
                          client_max_size=server_config.max_request_size)
    app["server_config"] = server_config
    app["models"] = manager or ModelManager(server_config)
    if server_config.metrics:
        app[observe.METRICS_KEY] = app["models"].metrics = metrics.Metrics(app["models"])
    app.on_response_prepare.append(_on_prepare)
    r = app.router
    r.add_get("/ping", ping)
    r.add_get("/metrics", metrics.serve)
    r.add_get("/openapi.json", openapi.serve)  # the API as OpenAPI 3.1 (container/openapi.py)
    r.add_post("/invocations", invocations)
    r.add_post("/predictions/{model}", predictions)
    r.add_post("/predictions/{model}/{version}", predictions)
    r.add_post("/models/{model}/invoke", predictions)
    app["management_networks"] = allowed_networks(server_config.management_allow)
    r.add_get("/models", management(list_models))
    r.add_post("/models", management(register_model))
    r.add_get("/models/{model}", management(describe_model))
    r.add_put("/models/{model}", management(scale_model))
    r.add_delete("/models/{model}", management(unregister_model))
    for prefix in ("/models/{model}/adapters", "/adapters"):  # /adapters: the only model
        r.add_get(prefix, management(list_adapters))
        r.add_post(prefix, management(register_adapter))
        r.add_get(prefix + "/{adapter}", management(describe_adapter))
        r.add_delete(prefix + "/{adapter}", management(unregister_adapter))
        r.add_post(prefix + "/{adapter}/update", management(update_adapter))
    r.add_post("/v1/load_lora_adapter", management(vllm_load_lora))
    r.add_post("/v1/unload_lora_adapter", management(vllm_unload_lora))
    llm_routes.add_routes(r)
    sagemaker_runtime.add_routes(r)
    return app


# ---------------------------------------------------------------------------------------------
# Running the server
# ---------------------------------------------------------------------------------------------


async def _prepare_default_model(cache_dir: str) -> ModelSpec:
    """Convert the default model in a subprocess: this process must not import torch."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engines.default_model", "--cache-dir", cache_dir,
        stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise ConfigError(f"preparing the default model failed (exit code {proc.returncode}); "
                          f"see the log above")
    return ModelSpec(DEFAULT_MODEL_NAME, out.decode().strip().splitlines()[-1])


async def _load_startup_models(app: web.Application, specs: list[ModelSpec] | None) -> None:
    mgr: ModelManager = app["models"]
    try:
        if specs is None:
            specs = [await _prepare_default_model(app["server_config"].cache_dir)]
        results = await asyncio.gather(
            *(mgr.register(s, wait=False, keep_failed=True) for s in specs),
            return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        # A source that could not be fetched leaves its model FAILED (ping 500 says why) and
        # the server up; a configuration error stops the server, as before.
        for e in errors:
            if not isinstance(e, E.ModelFailure):
                raise e
    except (ConfigError, E.LmcError) as e:
        log.error("startup failed: %s", e)
        app["startup_error"] = str(e)
        app["shutdown_event"].set()
        return
    finally:
        mgr.starting = False


async def serve(specs: list[ModelSpec] | None, server_config: ServerOptions, *,
                drain_timeout_s: float = 25.0) -> int:
    """Run until SIGTERM/SIGINT. Returns the process exit code."""
    app = build_app(server_config)
    mgr: ModelManager = app["models"]
    app["shutdown_event"] = stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    runner = header_timeout.AppRunner(app, header_timeout=server_config.header_timeout_s,
                                      access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, server_config.host, server_config.port, backlog=1024,
                       reuse_address=True)
    await site.start()
    log.info("LMC listening on http://%s:%d (pid %d)", server_config.host, server_config.port,
             os.getpid())
    loader = asyncio.create_task(_load_startup_models(app, specs))
    await stop.wait()
    log.info("shutting down: draining in-flight requests (up to %.0fs); new requests get 503",
             drain_timeout_s)
    loader.cancel()
    app["draining"] = True  # new requests: 503; requests in flight go on
    await asyncio.gather(*(m.drain(drain_timeout_s) for m in mgr.models.values()),
                         return_exceptions=True)
    await site.stop()
    await mgr.stop_all()
    await runner.cleanup()
    if "startup_error" in app:
        return 1
    return 0
