"""A model's LoRA adapters, as the front end knows them: the source of truth for every worker.

Each adapter is registered on every worker of its model through DJL's handler functions
(register_adapter / update_adapter / unregister_adapter: a request whose "handler" property
names the function, with properties name and src and content preload and pin), and a worker
that starts later (scale-up, restart) gets every adapter before its first request. The default
LLM handler implements the functions on its engine; a custom model.py may define them itself.

Sources: a local directory (under the model roots or the model's own directory), an s3:// prefix
or a hub id in the local Hugging Face cache, fetched into the cache by engines/sources before
any worker is told (so a worker only ever reads a local directory). For the default LLM handler
the adapter is checked here first, without torch (engines/lora/config.py): an adapter LMC
cannot apply is a 400 before any worker sees it.

Registering and unregistering never wait for requests in flight: workers load adapters off
their engine thread, and an adapter being unregistered keeps serving the requests already
running on it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from container.jobs import Job, new_request_item
from engines import sources
from engines.contracts import errors as E
from engines.contracts.names import FUNCTION_PROPERTY

if TYPE_CHECKING:
    from container.wlm import Model
    from container.worker_process import Worker

log = logging.getLogger("lmc.adapters")

ADAPTERS_DIR = "adapters"  # LMI: <model dir>/adapters/<name>/ is registered at load


@dataclass(frozen=True)
class Adapter:
    name: str
    src: str  # as the user gave it
    path: str  # the local directory workers load
    preload: bool = True
    pin: bool = False
    options: tuple[tuple[str, str], ...] = ()  # model-specific options given at registration

    def describe(self) -> dict:
        return {"name": self.name, "src": self.src, "path": self.path, "preload": self.preload,
                "pin": self.pin, **dict(self.options)}


def scan_adapters_dir(model_dir: str | Path) -> list[tuple[str, str]]:
    """(name, path) of every adapter folder under <model dir>/adapters/, sorted by name."""
    root = Path(model_dir) / ADAPTERS_DIR
    if not root.is_dir():
        return []
    return [(p.name, str(p)) for p in sorted(root.iterdir()) if p.is_dir()]


class AdapterRegistry:
    def __init__(self, model: Model, *, cache_dir: str | None,
                 allowed_roots: list[Path]) -> None:
        self.model = model
        self.cache_dir = cache_dir
        self.allowed_roots = allowed_roots
        self.adapters: dict[str, Adapter] = {}
        self._lock = asyncio.Lock()  # one registration change at a time, across workers

    # -- checks --------------------------------------------------------------------------------

    @property
    def lora_options(self):
        """The engine options when the default handler serves the model, else None (a custom
        model.py manages adapters itself)."""
        llm = self.model.config.llm
        return llm.engine.options if llm is not None else None

    @property
    def lora_enabled(self) -> bool:
        """The default handler serves LoRA (option.enable_lora; engines without the option,
        DeepSpeed, never do)."""
        return bool(getattr(self.lora_options, "enable_lora", False))

    def check_enabled(self) -> None:
        if self.lora_options is not None and not self.lora_enabled:
            raise E.BadRequest(f"model {self.model.name!r} does not serve LoRA adapters: set "
                               f"option.enable_lora=true (with the {self.model.config.llm.engine.name} "
                               f"engine) to serve them")

    def get(self, name: str) -> Adapter:
        adapter = self.adapters.get(name)
        if adapter is None:
            known = ", ".join(sorted(self.adapters)) or "none"
            raise E.AdapterNotFound(f"adapter {name!r} is not registered on model "
                                    f"{self.model.name!r}; registered adapters: {known}")
        return adapter

    def _local(self, src: str) -> str:
        """`src` as a local directory: fetched (s3://, hub cache) or checked (a local path must
        be under the model roots or the model's directory)."""
        try:
            remote = src.startswith("s3://") or (sources.is_remote(src) and not Path(src).exists())
            resolved = None if remote else Path(
                src[len("file://"):] if src.startswith("file://") else src).expanduser().resolve()
        except (OSError, ValueError, RuntimeError) as e:
            # A NUL byte (ValueError), an unknown ~user (RuntimeError): no directory has it.
            raise E.InvalidAdapter("src", f"src={src!r} is not a usable path ({e})") from None
        if resolved is None:
            if self.cache_dir is None:
                raise E.BadRequest("no cache directory to fetch adapters into (LMC_CACHE)")
            try:
                return str(sources.fetch(src, cache_dir=self.cache_dir, source="src"))
            except sources.SourceError as e:
                raise E.InvalidAdapter("src", str(e)) from None
        roots = [*self.allowed_roots, Path(self.model.config.model_dir).resolve()]
        if not any(resolved == r or r in resolved.parents for r in roots):
            raise E.Forbidden(f"src={src!r} is outside the directories adapters may be loaded "
                              f"from ({', '.join(map(str, roots))}); add its folder to "
                              f"LMC_ALLOWED_URLS (comma-separated) to allow it")
        if not resolved.is_dir():
            raise E.InvalidAdapter("src", f"src={src!r} is not a directory")
        return str(resolved)

    def _validate(self, path: str) -> None:
        options = self.lora_options
        if options is None:
            return  # a custom model.py decides what it accepts
        from engines.lora.config import base_spec_or_none, read_adapter

        read_adapter(path, max_rank=options.max_lora_rank,
                     base=base_spec_or_none(self.model.config.llm.engine.model_dir))

    async def prepare(self, name: str, src: str, *, preload: bool = True,
                      pin: bool = False) -> Adapter:
        """Fetch and check (on a thread: s3 downloads take time) without telling workers."""
        if not name:
            raise E.InvalidAdapter("name", "an adapter needs a name")
        if pin and not preload:
            raise E.InvalidAdapter("pin", "pin=true needs preload=true")

        def work() -> str:
            path = self._local(src)
            self._validate(path)
            return path

        path = await asyncio.to_thread(work)
        return Adapter(name, src, path, preload, pin)

    # -- changes, on every worker ---------------------------------------------------------------

    async def register(self, name: str, src: str, *, preload: bool = True,
                       pin: bool = False, options: dict[str, str] | None = None) -> Adapter:
        self.check_enabled()
        if name in self.adapters:
            raise E.Conflict(f"adapter {name!r} is already registered on model "
                             f"{self.model.name!r}; unregister it first or use its update route")
        adapter = await self.prepare(name, src, preload=preload, pin=pin)
        adapter = replace(adapter, options=tuple(sorted((options or {}).items())))
        async with self._lock:
            if name in self.adapters:
                raise E.Conflict(f"adapter {name!r} is already registered")
            done = []
            try:
                for w in self._workers():
                    await self._call(w, "register_adapter", adapter)
                    done.append(w)
            except E.LmcError:
                for w in done:  # all or nothing across workers
                    await self._call(w, "unregister_adapter", adapter, check=False)
                raise
            self.adapters[name] = adapter
        log.info("model %s: adapter %s registered from %s", self.model.name, name, src)
        return adapter

    async def update(self, name: str, *, src: str | None = None, preload: bool | None = None,
                     pin: bool | None = None) -> Adapter:
        self.check_enabled()
        old = self.get(name)
        new = replace(old, preload=old.preload if preload is None else preload,
                      pin=old.pin if pin is None else pin)
        if src is not None and src != old.src:
            fetched = await self.prepare(name, src, preload=new.preload, pin=new.pin)
            new = replace(new, src=src, path=fetched.path)
        async with self._lock:
            for w in self._workers():
                await self._call(w, "update_adapter", new)
            self.adapters[name] = new
        return new

    async def unregister(self, name: str) -> Adapter:
        adapter = self.get(name)
        async with self._lock:
            for w in self._workers():
                await self._call(w, "unregister_adapter", adapter, check=False)
            self.adapters.pop(name, None)
        log.info("model %s: adapter %s unregistered", self.model.name, name)
        return adapter

    async def add_startup_adapters(self) -> None:
        """LMI's <model dir>/adapters/<name>/ folders, registered before any worker starts
        (each worker then gets them in sync_worker). A folder LMC cannot serve stops the model
        with a message naming it."""
        found = scan_adapters_dir(self.model.config.model_dir)
        if not found:
            return
        if self.lora_options is not None and not self.lora_enabled:
            log.warning("model %s: %d adapter folder(s) in %s/%s are not served: set "
                        "option.enable_lora=true to serve them", self.model.name, len(found),
                        self.model.config.model_dir, ADAPTERS_DIR)
            return
        for name, path in found:
            self.adapters[name] = await self.prepare(name, path)
        log.info("model %s: %d adapter(s) from %s/: %s", self.model.name, len(found),
                 ADAPTERS_DIR, ", ".join(n for n, _ in found))

    async def sync_worker(self, w: Worker) -> None:
        """A worker that just started: every registered adapter, before its first request.
        From then on, registrations reach it like every other worker."""
        async with self._lock:
            for adapter in list(self.adapters.values()):
                await self._call(w, "register_adapter", adapter)
            w.adapters_synced = True

    def _workers(self) -> list[Worker]:
        from container.worker_process import WorkerState

        return [w for w in self.model.workers if w.adapters_synced
                and w.state in (WorkerState.READY, WorkerState.BUSY)]

    async def _call(self, w: Worker, function: str, adapter: Adapter, *,
                    check: bool = True) -> None:
        props = {**dict(adapter.options), FUNCTION_PROPERTY: function, "name": adapter.name,
                 "src": adapter.path, "preload": str(adapter.preload).lower(),
                 "pin": str(adapter.pin).lower()}
        content = [("preload", props["preload"].encode()), ("pin", props["pin"].encode())]
        job = Job(new_request_item(props, content))
        await w.run([job])
        try:
            response = await job.response
        except E.LmcError:
            if check:
                raise
            return
        if check and not 200 <= response.code < 300:
            raise _worker_error(response, f"worker {w.id}: {function}({adapter.name})")


def _worker_error(response, where: str) -> E.LmcError:
    """A worker's error answer as the same error here (status, type, message)."""
    message, type_ = response.body.decode("utf-8", errors="replace"), None
    try:
        payload = json.loads(response.body)
        message, type_ = payload.get("message", message), payload.get("type")
    except (ValueError, AttributeError):
        pass
    error = E.LmcError(message)
    error.status, error.type = response.code, type_ or E.status_type(response.code)
    log.warning("%s failed: %s %s", where, response.code, message)
    return error
