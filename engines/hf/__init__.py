"""The `hf` engine: transformers models from local dirs. Importing this package imports torch."""

from engines.hf.engine import HFEngine

__all__ = ["HFEngine"]
