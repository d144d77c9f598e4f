"""option.rolling_batch=vllm: vLLM's own async engine in the worker process (engine.py)."""
