from handlers.formatters import output_formatter

__all__ = ["output_formatter"]
