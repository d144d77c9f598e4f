"""`Input`: what a model.py `handle(inputs)` receives (djl_python compatible).

A single request is an Input whose properties are the HTTP headers and whose content is the body
under "data" followed by the query parameters. A dynamic batch is ONE Input using DJL's
convention: property "batch_size" = N, and every property and content key of item i prefixed
with "batch_%03d_" (e.g. "batch_001_data"); `get_batches()` splits it back.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from engines.contracts.errors import parse_json
from handlers.pair_list import PairList

if TYPE_CHECKING:
    import numpy as np

    from engines.contracts.protocol import RequestItem

BATCH_SIZE_KEY = "batch_size"
CUSTOM_ATTRIBUTES_HEADER = "x-amzn-sagemaker-custom-attributes"
_BATCH_KEY = re.compile(r"^batch_(\d{3})_(.*)$", re.DOTALL)


def batch_key(index: int, key: str) -> str:
    return f"batch_{index:03d}_{key}"


def split_batch_key(key: str | None) -> tuple[int, str] | None:
    """"batch_002_data" -> (2, "data"); None for a key without the batch prefix."""
    m = _BATCH_KEY.match(key) if key else None
    return (int(m.group(1)), m.group(2)) if m else None


class Input:
    def __init__(self, properties: dict[str, str] | None = None,
                 content: PairList | None = None) -> None:
        self.properties: dict[str, str] = properties if properties is not None else {}
        self.content: PairList = content if content is not None else PairList()

    # ---- properties -----------------------------------------------------------------------

    def get_properties(self) -> dict[str, str]:
        return self.properties

    def get_property(self, key: str) -> str | None:
        """Case-insensitive, because HTTP header names are."""
        if key in self.properties:
            return self.properties[key]
        lower = key.lower()
        return next((v for k, v in self.properties.items() if k.lower() == lower), None)

    # ---- batches --------------------------------------------------------------------------

    def is_batch(self) -> bool:
        return BATCH_SIZE_KEY in self.properties

    def get_batch_size(self) -> int:
        return int(self.properties.get(BATCH_SIZE_KEY, "1"))

    def get_batches(self) -> list[Input]:
        if not self.is_batch():
            return [self]
        batch = [Input() for _ in range(self.get_batch_size())]
        for key, value in self.properties.items():
            if key == BATCH_SIZE_KEY:
                continue
            split = split_batch_key(key)
            if split is None:
                # A property without a prefix was set for the whole batch: every item sees it.
                for item in batch:
                    item.properties.setdefault(key, value)
            elif split[0] < len(batch):
                batch[split[0]].properties[split[1]] = value
        for key, value in self.content:
            split = split_batch_key(key)
            if split is not None and split[0] < len(batch):
                batch[split[0]].content.add(split[1], value)
        return batch

    # ---- content --------------------------------------------------------------------------

    def get_content(self) -> PairList:
        return self.content

    def contains_key(self, key: str) -> bool:
        return self.content.get(key) is not None

    def is_empty(self) -> bool:
        return self.content.is_empty()

    def get_as_bytes(self, key: str | None = None) -> bytes | None:
        """The entry `key`; without a key, "data" (the body) or else the first entry. None when
        there is no content at all (the warm-up call)."""
        if self.content.is_empty():
            return None
        if key:
            value = self.content.get(key)
            if value is None:
                raise KeyError(f"no content entry {key!r}; entries are {self.content.get_keys()}")
            return value
        value = self.content.get("data")
        return value if value is not None else self.content.value_at(0)

    def get_as_string(self, key: str | None = None) -> str:
        return bytes(self._require(key)).decode("utf-8")

    def get_as_json(self, key: str | None = None) -> Any:
        """The content as JSON. A body that is not JSON (or nests too deeply to parse) is the
        client's mistake: a ValidationError (a ValueError), which answers 400."""
        return parse_json(bytes(self._require(key)))

    def get_as_csv(self, key: str | None = None) -> list[dict[str, str]]:
        return list(csv.DictReader(io.StringIO(self.get_as_string(key))))

    def get_as_numpy(self, key: str | None = None) -> list[np.ndarray]:
        """A DJL `tensor/ndlist` (or .npz) body as a list of numpy arrays."""
        from handlers.ndlist import decode_ndlist  # numpy only for handlers that use it

        return decode_ndlist(bytes(self._require(key)))

    def get_as_npz(self, key: str | None = None) -> list[np.ndarray]:
        import numpy as np

        npz = np.load(io.BytesIO(self._require(key)))
        return [npz[name] for name in npz.files]

    def get_as_image(self, key: str | None = None) -> Any:
        try:
            from PIL import Image
        except ImportError as e:
            raise RuntimeError("get_as_image needs Pillow: add `pillow` to requirements.txt "
                               "next to model.py") from e
        return Image.open(io.BytesIO(self._require(key)))

    def get_data(self, key: str | None = None) -> Any:
        """Decode by the request's Content-Type: JSON, text, tensors, images; else bytes."""
        content_type = (self.get_property("content-type") or "").lower()
        if content_type == "tensor/ndlist":
            return self.get_as_numpy(key)
        if content_type == "tensor/npz":
            return self.get_as_npz(key)
        if content_type.startswith("application/json"):
            return self.get_as_json(key)
        if content_type.startswith("text/"):
            return self.get_as_string(key)
        if content_type.startswith("image/"):
            return self.get_as_image(key)
        return self.get_as_bytes(key)

    def _require(self, key: str | None) -> bytes:
        value = self.get_as_bytes(key)
        if value is None:
            raise ValueError("the request has no content")
        return value

    def __repr__(self) -> str:
        keys = self.content.get_keys()
        return f"Input(properties={self.properties!r}, content_keys={keys!r})"


# ---- building Inputs from the wire -----------------------------------------------------------


def split_custom_attributes(headers: dict[str, str]) -> dict[str, str]:
    """Headers plus the `k=v;k2=v2` pairs of X-Amzn-SageMaker-Custom-Attributes as properties.
    A real header wins over an attribute of the same name: the attribute string is opaque
    client data, so it must not be able to override e.g. Content-Type."""
    props = dict(headers)
    raw = next((v for k, v in headers.items() if k.lower() == CUSTOM_ATTRIBUTES_HEADER), None)
    if raw:
        present = {k.lower() for k in props}
        for part in raw.split(";"):
            name, sep, value = part.partition("=")
            name = name.strip()
            if sep and name and name.lower() not in present:
                props[name] = value.strip()
    return props


def input_from_items(items: Sequence[RequestItem]) -> Input:
    """One Input for a dispatch: plain for one request, DJL batch convention for several."""
    if len(items) == 1:
        item = items[0]
        return Input(split_custom_attributes(item.properties), PairList(item.content))
    props = {BATCH_SIZE_KEY: str(len(items))}
    content = PairList()
    for i, item in enumerate(items):
        for k, v in split_custom_attributes(item.properties).items():
            props[batch_key(i, k)] = v
        for k, v in item.content:
            content.add(batch_key(i, k), v)
    return Input(props, content)
