"""Names the front end and the worker must spell alike."""

from __future__ import annotations

# LMI's built-in handlers, as users name them in option.entryPoint. They all mean "serve this
# LLM with the default handler", which LMC's LLM handler does.
LMI_BUILTIN_ENTRY_POINTS = frozenset({
    "djl_python.huggingface",
    "djl_python.deepspeed",
    "djl_python.transformers_neuronx",
    "djl_python.tensorrt_llm",
    "djl_python.lmi_dist",
    "djl_python.lmi_vllm.vllm_async_service",
    "djl_python.lmi_trtllm.trtllm_async_service",
})

# Request property set by the front end: which wire API the client spoke (openai.chat, tgi.*,
# ...); absent for LMI routes. The handler picks the request schema and response shape by it.
API_PROPERTY = "X-LMC-API"

# Response property a handler sets (as batch_%03d_code) to give one item of a dynamic batch its
# own HTTP status; it is not sent as a header.
ITEM_CODE_PROPERTY = "code"

# DJL's request property naming the handler function to call instead of handle(inputs); the
# front end sets it on management calls (LoRA adapters) that it sends to every worker.
FUNCTION_PROPERTY = "handler"
ADAPTER_FUNCTIONS = ("register_adapter", "update_adapter", "unregister_adapter")
CONTROL_FUNCTIONS = ADAPTER_FUNCTIONS

# The request header that selects a LoRA adapter (SageMaker's name for it). The front end also
# sets it when an OpenAI `model` or a SageMaker inference component names an adapter.
ADAPTER_HEADER = "X-Amzn-SageMaker-Adapter-Identifier"
