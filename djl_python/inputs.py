from handlers.inputs import Input

__all__ = ["Input"]
