"""LMI's helpers for async handlers (DJL's python async engine contract).

An async handler answers each request with an Output whose content is ONE frame,
`Output.binary_encode({"data": ..., "last": ..., ["error": ..., "code": ...]})`: a whole JSON
answer (`create_non_stream_output`, last is True) or one chunk of a stream
(`create_stream_chunk_output`). "data" always ends with a newline so the chunks concatenate into
JSON lines. `handle_streaming_response` turns an async generator of engine outputs into such
chunk Outputs through a formatter, and `_extract_lora_adapter` finds the adapter a request names.

Lives here rather than in handlers/ because nothing in LMC itself calls it: it is library code
for model.py files written against djl_python.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterable, Callable
from typing import Any, Optional, Union

from engines.contracts.names import ADAPTER_HEADER as SAGEMAKER_ADAPTER_IDENTIFIER_HEADER
from handlers.inputs import Input
from handlers.outputs import Output

logger = logging.getLogger(__name__)

# The status a stream chunk carries when the formatter failed on it (DJL's choice).
FORMATTER_ERROR_CODE = 424


def _frame_output(data: Union[str, dict], last: bool, content_type: str,
                  properties: Optional[dict] = None, error: Optional[str] = None,
                  code: Optional[int] = None) -> Output:
    text = json.dumps(data, ensure_ascii=False) if isinstance(data, dict) else data
    frame: dict[str, Any] = {"data": text + "\n", "last": last}
    if error:
        frame["error"] = error
    if code:
        frame["code"] = code
    out = Output()
    out.add_property("Content-Type", content_type)
    for name, value in (properties or {}).items():
        out.add_property(name, value)
    out.add(Output.binary_encode(frame))
    return out


def create_non_stream_output(data: Union[str, dict], properties: Optional[dict] = None,
                             error: Optional[str] = None, code: Optional[int] = None) -> Output:
    """A complete answer: Content-Type application/json (plus `properties` as further
    headers), one frame with last=True."""
    return _frame_output(data, True, "application/json", properties=properties, error=error,
                         code=code)


def create_stream_chunk_output(data: Union[str, dict], last_chunk: bool,
                               error: Optional[str] = None,
                               code: Optional[int] = None) -> Output:
    """One chunk of a streamed answer: Content-Type application/jsonlines, one frame."""
    return _frame_output(data, last_chunk, "application/jsonlines", error=error, code=code)


async def handle_streaming_response(response: AsyncIterable[Any],
                                    stream_output_formatter: Callable,
                                    accumulate_chunks: bool = False,
                                    **kwargs) -> AsyncGenerator[Output, None]:
    """Yield one chunk Output per item of `response`.

    `stream_output_formatter(item, **kwargs)` returns (text, is_last); with `accumulate_chunks`
    it is called as `formatter(item, history=history, **kwargs)` and returns
    (text, is_last, history), the history handed back on the next call. The generator stops
    after the chunk marked last. If the formatter raises, one final chunk with empty data,
    last=True, the exception's text as "error" and code 424 ends the stream."""
    history: list = []
    async for item in response:
        try:
            if accumulate_chunks:
                text, last, history = stream_output_formatter(item, history=history, **kwargs)
            else:
                text, last = stream_output_formatter(item, **kwargs)
        except Exception as e:
            logger.exception("stream_output_formatter failed")
            yield create_stream_chunk_output("", True, error=str(e), code=FORMATTER_ERROR_CODE)
            return
        yield create_stream_chunk_output(text, last)
        if last:
            return


def _extract_lora_adapter(raw_request: Input, decoded_payload: dict) -> Optional[str]:
    """The adapter a request names: the X-Amzn-SageMaker-Adapter-Identifier header (any case)
    first, else the payload's "adapters" field, which is removed from the payload. None when
    neither is there."""
    adapter = raw_request.get_property(SAGEMAKER_ADAPTER_IDENTIFIER_HEADER)
    if adapter is not None:
        logger.debug("adapter from the request header: %s", adapter)
        return adapter
    if "adapters" in decoded_payload:
        adapter = decoded_payload.pop("adapters")
        logger.debug("adapter from the payload: %s", adapter)
        return adapter
    return None


__all__ = ["SAGEMAKER_ADAPTER_IDENTIFIER_HEADER", "create_non_stream_output",
           "create_stream_chunk_output", "handle_streaming_response", "_extract_lora_adapter"]
