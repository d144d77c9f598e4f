from handlers.outputs import Output

__all__ = ["Output"]
