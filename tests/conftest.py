"""Fixtures shared by several test modules."""

import os
from pathlib import Path

import pytest

# Without a GPU, the Triton kernels run in Triton's interpreter; Triton reads this once, when it
# is first imported (DeepSpeed and transformers may import it before the engine does).
if not any(Path("/dev").glob("nvidia[0-9]*")):
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The native engine's C++ CPU kernels are built once (10-20 s) and shared by every test and
# server process, also those that point LMC_CACHE at a fresh directory.
os.environ.setdefault("LMC_KERNEL_CACHE",
                      str(Path(os.environ.get("LMC_CACHE", "~/.cache/lmc")).expanduser()
                          / "cpu_kernels"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models' ops gain nothing from intra-op threads, and on a busy 2-core CI box the
    threads' spinning made such modules several times slower."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def tiny_llm_server(tmp_path_factory):
    """A real LMC server on a loopback port serving a tiny random Llama named "tiny-llama"."""
    from server_utils import LmcServer
    from tiny_models import make_tiny_llama

    d = make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")
    # The notebooks register packages they unpack under pytest's temp dirs.
    env = {"LMC_ALLOWED_URLS": str(tmp_path_factory.getbasetemp())}
    with LmcServer(["--model-dir", str(d)], env=env, timeout_s=180) as s:
        yield s
