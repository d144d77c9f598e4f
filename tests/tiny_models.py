"""Tiny random-weight models for tests, built in-process (no downloads).

`make_tiny_llama` writes a complete HF model dir: a 2-layer LlamaForCausalLM in safetensors and a
byte-level BPE tokenizer trained on a few sentences, with BOS/EOS/PAD tokens and a ChatML-style
chat template, so engines and handlers can load it exactly like a real checkpoint. `make_tiny_model`
(and the `make_tiny_mistral` / `make_tiny_qwen2` shortcuts) does the same for the other
Llama-family architectures the native engine runs.
"""

from __future__ import annotations

from pathlib import Path

BOS = "<|im_start|>"
EOS = "<|im_end|>"
PAD = "<|endoftext|>"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = [
    "The capital of France is Paris.",
    "What is the capital of France?",
    "Once upon a time there was a small model that served requests.",
    "The quick brown fox jumps over the lazy dog.",
    "Large language models generate one token at a time.",
    "Hello world! How are you today?",
    "Batching requests together keeps the accelerator busy.",
    "Numbers like 0 1 2 3 4 5 6 7 8 9 appear too.",
]


def make_tokenizer(*, vocab_size: int = 384):
    """A byte-level BPE tokenizer: any text encodes, and decoding gives the text back."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],  # ids 0, 1, 2 as in SmolLM2
        # All 256 byte symbols, so text outside the corpus still encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=PAD,
        chat_template=CHAT_TEMPLATE,
    )


def make_tiny_llama(
    path: str | Path,
    *,
    vocab_size: int = 384,
    seed: int = 0,
    max_position_embeddings: int = 256,
) -> Path:
    """Write a tiny LlamaForCausalLM with random weights and its tokenizer to `path`."""
    return make_tiny_model(path, vocab_size=vocab_size, seed=seed,
                           max_position_embeddings=max_position_embeddings)


def make_tiny_mistral(path: str | Path, *, sliding_window: int = 16, seed: int = 1, **kw) -> Path:
    """Tiny MistralForCausalLM whose sliding window is shorter than typical test prompts."""
    return make_tiny_model(path, arch="mistral", seed=seed,
                           extra={"sliding_window": sliding_window}, **kw)


def make_tiny_qwen2(path: str | Path, *, seed: int = 2, **kw) -> Path:
    """Tiny Qwen2ForCausalLM (q/k/v projections with bias), tied embeddings by default."""
    kw.setdefault("tie_word_embeddings", True)
    return make_tiny_model(path, arch="qwen2", seed=seed, **kw)


_ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}


def make_tiny_model(
    path: str | Path,
    *,
    arch: str = "llama",
    vocab_size: int = 384,
    seed: int = 0,
    max_position_embeddings: int = 256,
    num_kv_heads: int = 2,
    num_heads: int = 4,
    tie_word_embeddings: bool = False,
    rope_parameters: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write a tiny random-weight Llama-family model (`arch`: llama, mistral, qwen2) and its
    tokenizer to `path`: hidden 64, 2 layers, 4 query heads (`num_heads`)."""
    import torch
    import transformers

    config_name, model_name = _ARCHS[arch]
    path = Path(path)
    tokenizer = make_tokenizer(vocab_size=vocab_size)
    kwargs = dict(extra or {})
    if rope_parameters is not None:
        kwargs["rope_parameters"] = rope_parameters
    config = getattr(transformers, config_name)(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,  # 2: grouped-query attention, as in SmolLM2, Llama 3
        max_position_embeddings=max_position_embeddings,
        # Larger than the default 0.02 so logits are spread out: greedy choices then do not
        # hinge on near-ties that float noise (e.g. from padding) could flip.
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
        architectures=[model_name],
        **kwargs,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    if arch == "qwen2":
        # Biases are initialised to zero; random ones make the test exercise them.
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                             layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.2)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def hub_cache_layout(cache: Path, repo_id: str, files: dict[str, bytes], *, commit: str,
                     ref: str | None = "main") -> Path:
    """A repo as huggingface_hub caches it: files in blobs/ named by their hash, the snapshot's
    files relative symlinks to them, refs/<name> holding the commit (no newline). Returns the
    snapshot dir."""
    import hashlib

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        depth = "../" * (len(Path(name).parts) + 1)
        (snapshot / name).symlink_to(f"{depth}blobs/{blob}")
    if ref is not None:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR_MODULES = ATTENTION_MODULES + ("gate_proj", "up_proj", "down_proj")


def make_tiny_lora(base_dir: str | Path, path: str | Path, *, r: int = 8, alpha: int = 16,
                   targets: tuple[str, ...] = ALL_LINEAR_MODULES, seed: int = 0,
                   use_rslora: bool = False, scale: float = 0.3, safetensors: bool = True,
                   **config_extra) -> Path:
    """A PEFT LoRA adapter for the model in `base_dir`, saved as PEFT saves it, with random
    non-zero A *and* B (PEFT initialises B to zero, which would make every adapter a no-op and
    every test of it pass)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                        use_rslora=use_rslora, task_type="CAUSAL_LM", **config_extra)
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * scale)
    model.save_pretrained(str(path), safe_serialization=safetensors)
    return Path(path)


def merged_lora_model(base_dir: str | Path, adapter_dir: str | Path):
    """The reference for an adapter: HF transformers with the PEFT adapter merged into the
    base weights (merge_and_unload), fp32, eval mode."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().eval()
