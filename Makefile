# The two commands of the README, plus the setup they share.
#   make demo   run the quickstart (1 gateway, 5 devices, 5 rounds) -> report.json
#   make test   run the test suite
# Both create .venv with everything Starling needs on first use.

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup demo test clean

$(STAMP): pyproject.toml
	bash hw/install-system.sh
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	OPENBLAS_NUM_THREADS=1 $(BIN)/starling-emulate --scenario hw/scenarios/quickstart.toml --report report.json

test: $(STAMP)
	OPENBLAS_NUM_THREADS=1 $(BIN)/python -m pytest

clean:
	rm -rf $(VENV) report.json report.run
