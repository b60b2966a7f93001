# The two commands of the README, plus the setup they share.
#   make demo   run the quickstart (1 gateway, 5 devices, 5 rounds) -> report.json
#   make test   run the test suite (then the agent's tests again under tflite-runtime with numpy<2, and the
#               model-build and MCU-export tests with TensorFlow)
#   make bench-vs-flower   the same FL task on Flower's own runtime and on Starling -> JSON (issue 8)
# Both create .venv with everything Starling needs on first use.

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# The agent as 32-bit Raspberry Pi OS runs it: tflite-runtime 2.14 with numpy<2, no LiteRT.
TFL     := .venv-tflite-runtime
TFL_STAMP := $(TFL)/.installed
AGENT_TESTS := tests/test_firmware_models.py tests/test_firmware_models_zoo.py tests/agent
# TensorFlow: builds the model zoo; runs the tests that need it (reproducible builds, MCU export).
TFB     := .venv-build
TFB_STAMP := $(TFB)/.installed
BUILD_TESTS := tests/test_firmware_models_build.py

.PHONY: setup demo test models bench-vs-flower clean

$(STAMP): pyproject.toml
	bash hw/install-system.sh
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	@touch $(STAMP)

$(TFL_STAMP): pyproject.toml
	$(PY) -m venv $(TFL)
	$(TFL)/bin/pip install -q --upgrade pip
	$(TFL)/bin/pip install -q "tflite-runtime==2.14.0" "numpy<2" "cbor2>=6.0" "pynacl>=1.5" "paho-mqtt>=2.0" \
		"smbus2>=0.4" "pytest>=8" "pytest-timeout>=2.2" "hypothesis>=6.100"
	$(TFL)/bin/pip install -q --no-deps seglearn   # only its bundled data file is read
	$(TFL)/bin/pip install -q --no-deps -e .
	@touch $(TFL_STAMP)

$(TFB_STAMP): pyproject.toml
	$(PY) -m venv $(TFB)
	$(TFB)/bin/pip install -q --upgrade pip
	$(TFB)/bin/pip install -q -e ".[build]" "pytest>=8" "pytest-timeout>=2.2"
	@touch $(TFB_STAMP)

setup: $(STAMP) $(TFL_STAMP) $(TFB_STAMP)

demo: $(STAMP)
	OPENBLAS_NUM_THREADS=1 $(BIN)/starling-emulate --scenario hw/scenarios/quickstart.toml --report report.json

test: $(STAMP) $(TFL_STAMP) $(TFB_STAMP)
	OPENBLAS_NUM_THREADS=1 STARLING_EXPECT_INTERPRETER=ai_edge_litert $(BIN)/python -m pytest
	OPENBLAS_NUM_THREADS=1 STARLING_EXPECT_INTERPRETER=tflite_runtime $(TFL)/bin/python -m pytest $(AGENT_TESTS)
	OPENBLAS_NUM_THREADS=1 $(TFB)/bin/python -m pytest $(BUILD_TESTS)

models: $(TFB_STAMP)
	for f in imu_cnn tabular_mlp imu_autoencoder; do $(TFB)/bin/starling-models build --family $$f; done

bench-vs-flower: $(STAMP)
	OPENBLAS_NUM_THREADS=1 $(BIN)/python bench/vs_flower.py

clean:
	rm -rf $(VENV) $(TFL) $(TFB) report.json report.run
