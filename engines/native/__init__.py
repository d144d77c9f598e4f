"""The native engine: paged KV cache and continuous batching (DESIGN.md §8).

block_manager, scheduler and sequence are pure Python and must never import torch; the model
runner is the only module that builds tensors. Import submodules directly.
"""
