PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PIN := torch==2.13.0

.PHONY: venv install install-dev demo test clean

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
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

demo: install
	$(PY) examples/demo.py

test: install-dev
	$(PY) -m pytest tests

clean:
	rm -rf $(VENV) demo-out
