"""The adapters one engine knows: a registry by name (any number: a record is a path and a
few flags) and a host-memory LRU cache of loaded weights (`option.max_cpu_loras`; pinned adapters
are never dropped). Thread-safe: request threads resolve names and load weights here, off the
engine thread, so loading an adapter from disk never stalls requests of other adapters.

Every registration gets a new uid; an update that changes the weights gets a new uid too, so a
request already running keeps the weights it started with, and the prefix cache (keyed by uid)
never mixes the two.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

from engines.contracts.errors import AdapterNotFound, Conflict, InvalidAdapter
from engines.lora.config import AdapterSpec, read_adapter
from engines.native.spec import ModelSpec

_uids = itertools.count(1)
# Request-time merges (LoRAX merged_adapters) remembered by their key, least recently used
# dropped first; they are not part of the registry (not listed, not in 404 messages).
MAX_MERGES = 256


@dataclass(frozen=True)
class AdapterRecord:
    name: str
    uid: int
    path: str  # an adapter dir, or a merge (engines.lora.weights.merge_path)
    rank: int
    spec: AdapterSpec | None = None  # None for a merge
    pinned: bool = False
    preload: bool = True

    def describe(self) -> dict:
        out = {"name": self.name, "src": self.path, "rank": self.rank, "pin": self.pinned,
               "preload": self.preload}
        if self.spec is not None:
            out.update(target_modules=list(self.spec.targets), alpha=self.spec.alpha)
        return out


class AdapterStore:
    def __init__(self, base: ModelSpec | None, *, max_rank: int, max_cpu_loras: int,
                 load: Callable[[str], object],
                 on_evict: Callable[[object], None] | None = None) -> None:
        """`load(path)` -> the engine's weights object for an adapter path; `on_evict(weights)`
        when the cache lets one go. `base`: the base model's shapes for the checks (None: a
        model the checks do not know, e.g. not Llama-family on the hf engine)."""
        self.base = base
        self.max_rank = max_rank
        self.max_cpu_loras = max_cpu_loras
        self._load = load
        self._on_evict = on_evict
        self._lock = threading.Lock()
        self._by_name: dict[str, AdapterRecord] = {}
        self._by_uid: dict[int, AdapterRecord] = {}
        self._merges: OrderedDict[str, AdapterRecord] = OrderedDict()
        self._cache: OrderedDict[int, object] = OrderedDict()  # uid -> weights, LRU first
        self.host_evictions = 0

    # -- the registry -------------------------------------------------------------------------

    def register(self, name: str, path: str, *, pin: bool = False,
                 preload: bool = True) -> AdapterRecord:
        if not name:
            raise InvalidAdapter("name", "an adapter needs a non-empty name")
        if pin and not preload:
            raise InvalidAdapter("pin", "pin=true needs preload=true (a pinned adapter is "
                                        "loaded at registration)")
        with self._lock:
            if name in self._by_name:
                raise Conflict(f"adapter {name!r} is already registered; unregister it first "
                               f"or use the update API")
        spec = read_adapter(path, max_rank=self.max_rank, base=self.base)
        record = AdapterRecord(name, next(_uids), str(path), spec.rank, spec, pin, preload)
        if preload or pin:
            self._insert(record.uid, self._load(record.path), pinned=pin)
        with self._lock:
            if name in self._by_name:  # registered meanwhile by another thread
                self._cache.pop(record.uid, None)
                raise Conflict(f"adapter {name!r} is already registered")
            self._by_name[name] = record
            self._by_uid[record.uid] = record
        return record

    def update(self, name: str, *, path: str | None = None, pin: bool | None = None,
               preload: bool | None = None) -> tuple[AdapterRecord, AdapterRecord]:
        """(old, new) records; new weights (another path) get a new uid."""
        old = self.get(name)
        new = replace(old, pinned=old.pinned if pin is None else pin,
                      preload=old.preload if preload is None else preload)
        if path is not None and path != old.path:
            spec = read_adapter(path, max_rank=self.max_rank, base=self.base)
            new = replace(new, uid=next(_uids), path=str(path), rank=spec.rank, spec=spec)
        if new.preload or new.pinned:
            self.weights_of(new)
        with self._lock:
            if self._by_name.get(name) is not old:
                raise Conflict(f"adapter {name!r} changed while being updated; retry")
            self._by_name[name] = new
            self._by_uid[new.uid] = new
        if new.uid != old.uid:
            self.evict(old.uid)
        return old, new

    def remove(self, name: str) -> AdapterRecord:
        with self._lock:
            record = self._by_name.pop(name, None)
            if record is None:
                raise self._not_found(name)
            dropped = self._cache.pop(record.uid, None)
        self._evicted(dropped)
        return record

    def evict(self, uid: int) -> None:
        with self._lock:
            dropped = self._cache.pop(uid, None)
        self._evicted(dropped)

    def _evicted(self, weights: object | None) -> None:
        if weights is not None and self._on_evict is not None:
            self._on_evict(weights)

    def get(self, name: str) -> AdapterRecord:
        with self._lock:
            record = self._by_name.get(name) or self._merges.get(name)
            if record is None:
                raise self._not_found(name)
            return record

    def by_uid(self, uid: int) -> AdapterRecord | None:
        with self._lock:
            return self._by_uid.get(uid)

    def records(self) -> list[AdapterRecord]:
        with self._lock:
            return [self._by_name[n] for n in sorted(self._by_name)]

    def _not_found(self, name: str) -> AdapterNotFound:
        known = ", ".join(sorted(self._by_name)) or "none"
        return AdapterNotFound(f"adapter {name!r} is not registered; registered adapters: "
                               f"{known}")

    def add_dynamic(self, name: str, path: str, rank: int) -> AdapterRecord:
        """A record for a request-time adapter (a linear merge), kept under `name`."""
        if rank > self.max_rank:
            raise InvalidAdapter("merged_adapters", f"the merged adapter's rank {rank} (the sum "
                                 f"of its adapters' ranks) is above option.max_lora_rank="
                                 f"{self.max_rank}")
        dropped = []
        with self._lock:
            record = self._merges.get(name)
            if record is None or record.path != path:
                record = AdapterRecord(name, next(_uids), path, rank)
                self._merges[name] = record
                self._by_uid[record.uid] = record
                while len(self._merges) > MAX_MERGES:
                    _, old = self._merges.popitem(last=False)
                    dropped.append(old.uid)
            self._merges.move_to_end(name)
        for uid in dropped:
            self.evict(uid)
        return record

    # -- the host cache -----------------------------------------------------------------------

    def weights_of(self, record: AdapterRecord) -> object:
        """The record's loaded weights, from the cache or read now (on the calling thread)."""
        return self.weights(record.uid, record.path, pinned=record.pinned)

    def weights(self, uid: int, path: str, *, pinned: bool = False) -> object:
        with self._lock:
            w = self._cache.get(uid)
            if w is not None:
                self._cache.move_to_end(uid)
                return w
        w = self._load(path)
        self._insert(uid, w, pinned=pinned)
        return w

    def _insert(self, uid: int, weights: object, *, pinned: bool) -> None:
        dropped = []
        with self._lock:
            self._cache[uid] = weights
            self._cache.move_to_end(uid)
            pinned_uids = {r.uid for r in self._by_name.values() if r.pinned}
            if pinned:
                pinned_uids.add(uid)
            for old in list(self._cache):
                if len(self._cache) <= self.max_cpu_loras:
                    break
                if old != uid and old not in pinned_uids:
                    dropped.append(self._cache.pop(old))
                    self.host_evictions += 1
        for weights in dropped:
            self._evicted(weights)
