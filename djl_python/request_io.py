from handlers.request_io import (Iterator, RequestInput, RequestOutput, Sequence,
                                 TextGenerationOutput, TextInput, Token)

__all__ = ["Iterator", "RequestInput", "RequestOutput", "Sequence", "TextGenerationOutput",
           "TextInput", "Token"]
