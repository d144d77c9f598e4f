"""Which adapter occupies which of the native engine's `max_loras` weight slots (pure Python).

Slot 0 means "no adapter" (the base model); slots 1..max_loras hold adapter weights in the
runner's slot tensors. A running sequence holds a reference on its adapter's slot. A request
whose adapter has no slot waits (the scheduler skips it for now) until one frees up: a slot is
reused for another adapter only when no running sequence holds it and it is not pinned, least
recently used first.

Loads are queued here and carried by the next step's plan, which the runner applies before the
forward pass, so a slot's weights always arrive before the first row that uses them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(slots=True)
class _Slot:
    uid: int = 0  # adapter in it (0: empty)
    refs: int = 0  # running sequences using it
    pinned: bool = False


class SlotTable:
    def __init__(self, max_loras: int) -> None:
        assert max_loras >= 1
        self.slots = [_Slot() for _ in range(max_loras + 1)]  # index 0 unused (base model)
        self.where: dict[int, int] = {}  # uid -> slot
        self._idle: OrderedDict[int, None] = OrderedDict()  # unreferenced slots, LRU first
        self._pending: list[tuple[int, int]] = []  # (slot, uid) loads for the next plan
        self._removed: set[int] = set()  # unregistered while still referenced
        self.evictions = 0

    @property
    def max_loras(self) -> int:
        return len(self.slots) - 1

    def _free_slot(self) -> int | None:
        """An empty slot, else the least recently used unpinned idle one (evicting it)."""
        for i in range(1, len(self.slots)):
            if self.slots[i].uid == 0:
                return i
        for i in self._idle:
            s = self.slots[i]
            if not s.pinned:
                del self._idle[i]
                del self.where[s.uid]
                self.evictions += 1
                return i
        return None

    def _place(self, uid: int) -> int | None:
        """`uid`'s slot, given one (and its load queued) if it has none; None: no room."""
        i = self.where.get(uid)
        if i is None:
            i = self._free_slot()
            if i is None:
                return None
            self.slots[i] = _Slot(uid)
            self.where[uid] = i
            self._pending.append((i, uid))
            self._idle[i] = None  # unreferenced until a sequence takes it
        return i

    def acquire(self, uid: int) -> int | None:
        """The slot for a sequence of adapter `uid`, taking a reference; None: none free now."""
        assert uid > 0
        i = self._place(uid)
        if i is None:
            return None
        s = self.slots[i]
        s.refs += 1
        self._idle.pop(i, None)
        return i

    def release(self, uid: int) -> None:
        i = self.where.get(uid)
        if i is None:
            return
        s = self.slots[i]
        s.refs -= 1
        assert s.refs >= 0
        if s.refs == 0:
            if uid in self._removed:
                self._clear(i)
            else:
                self._idle[i] = None  # most recently used at the end

    def pin(self, uid: int) -> int | None:
        """Give `uid` a slot for good (loaded now, never evicted); None if every slot is pinned
        or in use."""
        i = self._place(uid)
        if i is not None:
            self.slots[i].pinned = True
        return i

    def unpin(self, uid: int) -> None:
        i = self.where.get(uid)
        if i is not None:
            self.slots[i].pinned = False

    def remove(self, uid: int) -> None:
        """Unregistered: free its slot now, or when its last running sequence ends."""
        i = self.where.get(uid)
        if i is None:
            return
        if self.slots[i].refs:
            self._removed.add(uid)
            self.slots[i].pinned = False
        else:
            self._clear(i)

    def _clear(self, i: int) -> None:
        uid = self.slots[i].uid
        self.where.pop(uid, None)
        self._removed.discard(uid)
        self._idle.pop(i, None)
        self.slots[i] = _Slot()

    def take_loads(self) -> list[tuple[int, int]]:
        """(slot, uid) loads queued since the last call, in order."""
        loads, self._pending = self._pending, []
        return loads
