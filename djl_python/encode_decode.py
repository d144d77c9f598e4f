from handlers.encode_decode import decode, decode_csv, encode, encode_csv

__all__ = ["decode", "decode_csv", "encode", "encode_csv"]
