"""The `deepspeed` engine: the hf engine's decode loop over a DeepSpeed AutoTP-sharded model.

Importing this package imports torch; `deepspeed` itself is imported only when an engine is built.
"""

from engines.deepspeed.engine import DeepSpeedEngine

__all__ = ["DeepSpeedEngine"]
