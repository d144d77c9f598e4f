"""LMI's codec helpers for model.py files: `decode(inputs, content_type)` picks how to read a
request body by its content type, `encode(outputs, prediction, accept)` how to write the answer;
`decode_csv` / `encode_csv` are the CSV halves of both."""

from __future__ import annotations

import csv
import io
from typing import Any

from handlers.inputs import Input
from handlers.outputs import Output

# A CSV with headers must name at least one of these columns (LMI's inference toolkit rule).
CSV_HEADER_COLUMNS = ("question", "context", "inputs")


def decode_csv(inputs: Input, require_headers: bool = True, key: str | None = None) -> Any:
    """A CSV body.

    With `require_headers` (the default) the first line is a header naming an "inputs",
    "question" or "context" column (ValueError otherwise); the result is
    {"inputs": [value of the "inputs" column per row]} when there is an "inputs" column, else
    {"inputs": [one dict per row]}.

    Without headers the body is numbers for a predictive model: a numpy float array
    (np.genfromtxt, comma-separated; one row gives a 1-D array). A cell that is not a number
    is a ValueError."""
    text = inputs.get_as_string(key=key)
    if not require_headers:
        import numpy as np  # only handlers that read numeric CSV pay for numpy

        values = np.genfromtxt(io.StringIO(text), delimiter=",")
        if np.isnan(values).any():
            raise ValueError("CSV contains non-numeric data. Please provide numeric data only.")
        return values
    lines = text.splitlines()
    first = lines[0].lower() if lines else ""
    if not any(column in first for column in CSV_HEADER_COLUMNS):
        raise ValueError(
            "You need to provide the correct CSV with Header columns to use it with the "
            f"inference toolkit default handler: the first line must name one of "
            f"{', '.join(CSV_HEADER_COLUMNS)}")
    rows = list(csv.DictReader(io.StringIO(text)))
    if rows and "inputs" in rows[0]:
        return {"inputs": [row["inputs"] for row in rows]}
    return {"inputs": rows}


def encode_csv(content: Any) -> str:
    """Rows (dicts, or an iterable of dicts) as CSV text: a header line from the first row's
    keys, then one line per row, "\\r\\n"-terminated as the csv module writes them."""
    rows = content if isinstance(content, list) else list(content)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, list(rows[0].keys()) if rows else [])
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def decode(inputs: Input, content_type: str | None, key: str | None = None,
           require_csv_headers: bool = True) -> Any:
    ct = (content_type or "").lower()
    if not ct:
        # No Content-Type: LMI treats the body as JSON, and an empty body as an empty prompt.
        if not inputs.get_as_bytes(key=key):
            return {"inputs": ""}
        return inputs.get_as_json(key=key)
    if "application/json" in ct:
        return inputs.get_as_json(key=key)
    if "text/csv" in ct:
        if key is None:
            return decode_csv(inputs, require_headers=require_csv_headers)
        return decode_csv(inputs, require_headers=require_csv_headers, key=key)
    if "text/plain" in ct:
        return {"inputs": [inputs.get_as_string(key=key)]}
    if ct.startswith("image/"):
        return {"inputs": inputs.get_as_image(key=key)}
    if ct.startswith("audio/"):
        return {"inputs": inputs.get_as_bytes(key=key)}
    if "tensor/npz" in ct:
        return {"inputs": inputs.get_as_npz(key=key)}
    if ct in ("tensor/ndlist", "application/x-npy"):
        return {"inputs": inputs.get_as_numpy(key=key)}
    if ct == "application/x-www-form-urlencoded":
        return {"inputs": inputs.get_as_string(key=key)}
    return {"inputs": inputs.get_as_bytes(key=key)}  # application/octet-stream and the rest


def encode(outputs: Output, prediction: Any, accept: str | None, key: str | None = None) -> Output:
    ct = (accept or "").lower()
    # "*/*" (what curl and most SDKs send) answers JSON here; DJL would send tensor/ndlist.
    if not ct or "application/json" in ct or ct == "*/*":
        outputs.add_as_json(prediction, key=key)
        outputs.add_property("Content-Type", "application/json")
    elif "text/csv" in ct:
        outputs.add_as_string(encode_csv(prediction), key=key)
        outputs.add_property("Content-Type", "text/csv")
    elif "tensor/npz" in ct:
        outputs.add_as_npz(prediction, key=key)
        outputs.add_property("Content-Type", "tensor/npz")
    else:
        outputs.add_as_numpy(prediction, key=key)
        outputs.add_property("Content-Type", "tensor/ndlist")
    return outputs
