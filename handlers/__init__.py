"""The model.py handler contract (djl_python compatible): Input, Output, the formatter
decorators, and ModelService, which loads a handler and runs requests through it."""

from handlers.formatters import input_formatter, output_formatter
from handlers.inputs import Input
from handlers.outputs import Output
from handlers.service import HandlerLoadError, ItemResult, ModelService

__all__ = ["HandlerLoadError", "Input", "ItemResult", "ModelService", "Output",
           "input_formatter", "output_formatter"]
