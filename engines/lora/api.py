"""The adapter API an engine with `capabilities.lora` offers (engines/contracts/engine.py's
LoraEngine), over its AdapterStore. Engines differ only in what pinning and dropping mean for
them: `_pin`, `_unpin`, `_drop` (the native engine's slots; nothing for the hf engine, which
keeps every adapter it loaded in memory).
"""

from __future__ import annotations

from engines.contracts.errors import NoAdapterSlot, ValidationError
from engines.lora.store import AdapterRecord, AdapterStore

NOT_ENABLED = ("LoRA adapters are not enabled for this model; set option.enable_lora=true to "
               "serve them")


class LoraApi:
    lora_store: AdapterStore | None

    # -- what an engine overrides ---------------------------------------------------------------

    def _pin(self, record: AdapterRecord) -> bool:
        """Keep the adapter on the device for good; False when there is no room."""
        return True

    def _unpin(self, record: AdapterRecord) -> None:
        pass

    def _drop(self, record: AdapterRecord) -> None:
        """The adapter was unregistered (or replaced by an update)."""

    def _slots_text(self) -> str:
        return "adapter slots"

    # -- the API ---------------------------------------------------------------------------------

    def _lora(self) -> AdapterStore:
        if self.lora_store is None:
            raise ValidationError("adapters", NOT_ENABLED)
        return self.lora_store

    def add_adapter(self, name: str, src: str, *, pin: bool = False,
                    preload: bool = True) -> dict:
        record = self._lora().register(name, src, pin=pin, preload=preload)
        if pin and not self._pin(record):
            self._lora().remove(name)
            self._drop(record)
            raise NoAdapterSlot(f"adapter {name!r} cannot be pinned: all {self._slots_text()} "
                                f"are pinned or in use (option.max_loras); unpin one or raise "
                                f"option.max_loras")
        return record.describe()

    def update_adapter(self, name: str, *, src: str | None = None, pin: bool | None = None,
                       preload: bool | None = None) -> dict:
        old, new = self._lora().update(name, path=src, pin=pin, preload=preload)
        if new.uid != old.uid:
            self._drop(old)
        elif old.pinned and not new.pinned:
            self._unpin(new)
        if new.pinned and not self._pin(new):
            self._lora().update(name, pin=False)
            raise NoAdapterSlot(f"adapter {name!r} cannot be pinned: all {self._slots_text()} "
                                f"are pinned or in use (option.max_loras)")
        return new.describe()

    def remove_adapter(self, name: str) -> dict:
        record = self._lora().remove(name)
        self._drop(record)
        return record.describe()

    def check_adapter(self, name: str) -> None:
        self._lora().get(name)

    def list_adapters(self) -> list[dict]:
        return [r.describe() for r in self._lora().records()]

    def merge_adapters(self, names: list[str], weights: list[float]) -> str:
        """A linear merge of registered adapters (ΔW = Σ w_i ΔW_i), as a request-time adapter;
        its name."""
        from engines.lora.weights import merge_path

        store = self._lora()
        records = [store.get(n) for n in names]
        key = "merge(" + ",".join(f"{n}*{w:g}" for n, w in zip(names, weights)) + ")"
        return store.add_dynamic(key, merge_path([r.path for r in records], list(weights)),
                                 sum(r.rank for r in records)).name

    def adapter_records(self, adapters: list[str | None] | None,
                        n: int) -> list[AdapterRecord | None]:
        """The records of a call's per-prompt adapter names (None: base), their weights loaded
        into host memory now, on the calling thread."""
        if not adapters or not any(adapters):
            return [None] * n
        store = self._lora()
        if len(adapters) != n:
            raise ValueError(f"got {n} prompts but {len(adapters)} adapters")
        records = [store.get(a) if a else None for a in adapters]
        for r in {r.uid: r for r in records if r is not None}.values():
            store.weights_of(r)
        return records
