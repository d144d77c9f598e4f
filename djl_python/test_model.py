"""`python -m djl_python.test_model --model-dir DIR --input FILE`: DJL's local harness, on LMC's
loader (handlers/harness.py)."""

from handlers.harness import *  # noqa: F403
from handlers.harness import __all__, run

if __name__ == "__main__":
    raise SystemExit(run())
