"""Ordered (key, value) list: the content of an Input or an Output.

Keys may repeat and may be None (an Output entry added without a key), so this is a list of
pairs rather than a dict; order matters because a batch is split back by position.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any


class PairList:
    def __init__(self, pairs: Iterable[tuple[str | None, Any]] | None = None) -> None:
        self._keys: list[str | None] = []
        self._values: list[Any] = []
        for k, v in pairs or ():
            self.add(k, v)

    def add(self, key: str | None = None, value: Any = None,
            pair: tuple[str | None, Any] | None = None) -> None:
        # `pair=` keeps djl_python's calling convention working.
        if pair is not None:
            key, value = pair
        self._keys.append(key)
        self._values.append(value)

    def get(self, key: str) -> Any:
        """Value of the first entry named `key`, or None."""
        for k, v in zip(self._keys, self._values):
            if k == key:
                return v
        return None

    def key_at(self, index: int) -> str | None:
        return self._keys[index]

    def value_at(self, index: int) -> Any:
        return self._values[index]

    def get_keys(self) -> list[str | None]:
        return list(self._keys)

    def get_values(self) -> list[Any]:
        return list(self._values)

    def size(self) -> int:
        return len(self._keys)

    def is_empty(self) -> bool:
        return not self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[tuple[str | None, Any]]:
        return iter(zip(self._keys, self._values))

    def __repr__(self) -> str:
        return f"PairList({list(self)!r})"
