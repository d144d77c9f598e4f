from handlers.formatters import output_formatter
from handlers.request_io import RequestOutput, TextGenerationOutput

__all__ = ["RequestOutput", "TextGenerationOutput", "output_formatter"]
