from handlers.encode_decode import decode, encode

__all__ = ["decode", "encode"]
