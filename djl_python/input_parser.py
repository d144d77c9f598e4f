from handlers.formatters import input_formatter

__all__ = ["input_formatter"]
