# Two commands for a fresh machine: `make serve` and `make test`. Both set everything up first and are
# quick when it already is. Heavy artefacts live in .venv/ and ~/.cache/vllm_kvc/ (not in git).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/default.yaml
export PATH := $(CURDIR)/.cache/tools/bin:$(PATH)

.PHONY: setup venv corpus model tools serve test test-fast clean

setup: venv corpus model

venv:
	@bash scripts/setup_venv.sh

# English prose for calibration/evaluation comes from a Debian package at run time (see vllm_kvc/corpus.py)
corpus:
	@test -d /usr/share/doc/python3.11/html/_sources || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y -q python3.11-doc >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && apt-get install -y -q python3.11-doc >/dev/null; }; \
	  else sudo apt-get install -y -q python3.11-doc; fi; }

model: venv
	@$(VENV)/bin/vllm-kvc convert >/dev/null

tools: venv
	@bash scripts/setup_tools.sh --quiet

serve: setup
	$(VENV)/bin/vllm-kvc serve --config $(CONFIG)

test: setup tools
	$(PY) -m pytest -q -ra --durations=25 tests

test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow" tests

clean:
	rm -rf $(VENV) .cache
