"""option.rolling_batch=trtllm: TensorRT-LLM's LLM API, PyTorch backend (engine.py). Written
against NVIDIA's documented API; it has not run on LMC's machines (no NVIDIA GPU there)."""
