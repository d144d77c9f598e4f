"""LoRA adapters (PEFT format) served on one base model.

    config.py   read and check an adapter directory (no torch): what LMC refuses, and why
    weights.py  load an adapter's A/B matrices (this rank's shard), merge several linearly
    store.py    the adapters a worker knows: registry by name, host-memory LRU cache
    slots.py    which adapter occupies which of the engine's `max_loras` slots (pure Python)
"""
