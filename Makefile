# loraq: `make demo` and `make test` work on a fresh machine (they create .venv and fetch what they need).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CACHE ?= $(HOME)/.cache/loraq
export LORAQ_CACHE := $(CACHE)
SMOL := $(CACHE)/SmolLM2-135M-Instruct.Q4_1.gguf
DEMO := runs/demo-inputs

.PHONY: setup demo test test-slow lint test-interop bench big-check clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

$(SMOL): | $(BIN)/python
	$(BIN)/python -m scripts.fetch_smollm2

# The demo's inputs. Cached beside the model (built once per machine): SmolLM2 as a Hugging Face
# folder, written from the fetched GGUF, and the LoRA trained on it (the script keys its cache by
# the corpus, the base and itself, so a change retrains). In runs/demo-inputs: the domain corpus
# (shipping bulletins; train / calibration / held-out splits), a copy of the trained adapter and a
# link to the HF folder (configs/smollm2-demo.yaml's base).
HF := $(CACHE)/SmolLM2-135M-Instruct-hf
CORPUS := $(DEMO)/corpus

$(VENV)/.demo: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev,demo]'
	touch $@

$(HF)/config.json: $(SMOL) | $(VENV)/.installed
	rm -rf $(HF).tmp
	$(BIN)/python -m scripts.hf_folder $(SMOL) $(HF).tmp
	rm -rf $(HF) && mv $(HF).tmp $(HF)

$(CORPUS)/heldout.txt: scripts/make_domain_corpus.py | $(BIN)/python
	$(BIN)/python -m scripts.make_domain_corpus $(CORPUS)

$(DEMO)/adapter/adapter_model.safetensors: $(HF)/config.json $(CORPUS)/heldout.txt scripts/train_demo_adapter.py $(VENV)/.demo
	$(BIN)/python -m scripts.train_demo_adapter $(HF) $(CORPUS) $(DEMO)/adapter --cache $(CACHE)

# Generic evaluation text: the GPL v3 (Debian's base-files ships it); elsewhere, Python's own license.
$(DEMO)/eval.txt: | $(BIN)/python
	mkdir -p $(DEMO)
	if [ -f /usr/share/common-licenses/GPL-3 ]; then cp /usr/share/common-licenses/GPL-3 $@; \
	else $(BIN)/python -c "import sys,pathlib; print(pathlib.Path(sys.base_prefix, 'lib', 'python%d.%d' % sys.version_info[:2], 'LICENSE.txt').read_text())" > $@; fi

demo: $(DEMO)/adapter/adapter_model.safetensors $(DEMO)/eval.txt $(HF)/config.json
	ln -sfn $(HF) $(DEMO)/smollm2-hf
	$(BIN)/loraq run configs/smollm2-demo.yaml

# torch, transformers and peft build PEFT adapters (DoRA, modules_to_save, ...) in the tests, to
# check loraq's merge against PEFT's own merge_and_unload; never needed at run time.
$(VENV)/.peft: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev,peft-tests]'
	touch $@

# The fast tier (under 5 minutes on 2 cores): two pytest-xdist workers, since most cases are one
# Python thread (7.2 min serial on a 2-core AVX2 EPYC). The slow tier holds the real-model
# end-to-end and subprocess-heavy cases, serial (its signal and memory cases time themselves).
# .ci/run runs both, then lint, then the interop tier.
test: $(VENV)/.installed $(VENV)/.peft $(SMOL)
	$(BIN)/pytest -q -n 2

test-slow: $(VENV)/.installed $(VENV)/.peft $(SMOL)
	$(BIN)/pytest -q -m 'slow and not interop'

# ruff (lint + format check) and mypy, configured in pyproject.toml.
lint: $(VENV)/.installed
	$(BIN)/ruff check loraq tests scripts
	$(BIN)/ruff format --check loraq tests scripts
	$(BIN)/mypy

$(VENV)/.interop: $(VENV)/.installed $(VENV)/.peft
	$(BIN)/pip install -q -e '.[dev,interop,peft-tests]'
	touch $@

test-interop: $(VENV)/.interop $(SMOL)
	$(BIN)/pytest -q -m interop

bench: $(VENV)/.interop $(SMOL)
	$(BIN)/python -m scripts.bench

# A 1.1B-parameter TinyLlama-shaped model (generated into $(CACHE)/bench/big, 2.2 GB) through merge,
# Q4_K_M and compare, each stage's peak RSS checked against 1.5 GB.
big-check: $(VENV)/.installed $(SMOL)
	$(BIN)/python -m scripts.big_model_check

clean:
	rm -rf runs .pytest_cache
