from engines.contracts.names import ADAPTER_HEADER as SAGEMAKER_ADAPTER_IDENTIFIER_HEADER
from handlers.formatters import init_handler, input_formatter, prediction_handler

__all__ = ["SAGEMAKER_ADAPTER_IDENTIFIER_HEADER", "init_handler", "input_formatter",
           "prediction_handler"]
