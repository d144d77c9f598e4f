"""`decode(inputs, content_type)` / `encode(outputs, prediction, accept)`: LMI's helpers that pick
a body codec by content type, for model.py files that call them."""

from __future__ import annotations

import csv
import io
from typing import Any

from handlers.inputs import Input
from handlers.outputs import Output


def decode(inputs: Input, content_type: str | None, key: str | None = None) -> Any:
    ct = (content_type or "").lower()
    if not ct:
        # No Content-Type: LMI treats the body as JSON, and an empty body as an empty prompt.
        if not inputs.get_as_bytes(key):
            return {"inputs": ""}
        return inputs.get_as_json(key)
    if "application/json" in ct:
        return inputs.get_as_json(key)
    if "text/csv" in ct:
        return {"inputs": inputs.get_as_csv(key)}
    if "text/plain" in ct:
        return {"inputs": [inputs.get_as_string(key)]}
    if ct.startswith("image/"):
        return {"inputs": inputs.get_as_image(key)}
    if "tensor/npz" in ct:
        return {"inputs": inputs.get_as_npz(key)}
    if ct in ("tensor/ndlist", "application/x-npy"):
        return {"inputs": inputs.get_as_numpy(key)}
    if ct == "application/x-www-form-urlencoded":
        return {"inputs": inputs.get_as_string(key)}
    return {"inputs": inputs.get_as_bytes(key)}  # audio/*, application/octet-stream, ...


def encode(outputs: Output, prediction: Any, accept: str | None, key: str | None = None) -> Output:
    ct = (accept or "").lower()
    if not ct or "application/json" in ct or ct == "*/*":
        outputs.add_as_json(prediction, key=key)
        outputs.add_property("Content-Type", "application/json")
    elif "text/csv" in ct:
        rows = prediction if isinstance(prediction, list) else list(prediction)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, list(rows[0].keys()) if rows else [])
        writer.writeheader()
        writer.writerows(rows)
        outputs.add_as_string(buf.getvalue(), key=key)
        outputs.add_property("Content-Type", "text/csv")
    elif "tensor/npz" in ct:
        outputs.add_as_npz(prediction, key=key)
        outputs.add_property("Content-Type", "tensor/npz")
    else:
        outputs.add_as_numpy(prediction, key=key)
        outputs.add_property("Content-Type", "tensor/ndlist")
    return outputs
