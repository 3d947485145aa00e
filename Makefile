# Two commands do everything on a fresh machine:
#   make demo   create .venv, install, generate the demo data, run all five stages, print the report path
#   make test   create .venv, install with test extras (and Chromium for the report test), run the tests
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   := configs/demo_l3_ct.py

.PHONY: demo test install install-test system-test-deps readme-figures clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# The HTML report test renders report.html in Debian's headless Chromium.
system-test-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; fi; }

demo: $(VENV)/.installed
	$(BIN)/python -m segmenter.demo_data original_dataset/demo_l3_ct --num-slices 40
	$(BIN)/segmenter preload  --config $(DEMO)
	$(BIN)/segmenter tune     --config $(DEMO)
	$(BIN)/segmenter train    --config $(DEMO)
	$(BIN)/segmenter predict  --config $(DEMO)
	$(BIN)/segmenter evaluate --config $(DEMO)

# The README's figures: the demo run's comparison figure and a screenshot of its report (needs Chromium).
readme-figures: demo system-test-deps
	$(BIN)/python -m segmenter.readme_figures

# One test process per core (at most 4, pytest-xdist): TensorFlow's start-up and the stage subprocesses
# overlap, 9.5 instead of 15.5 minutes on the 2-core CI machine; the slowest tests are listed at the end.
test: $(VENV)/.installed-test system-test-deps
	$(BIN)/python -m pytest --numprocesses=auto --maxprocesses=4 --durations=15

clean:
	rm -rf experiments preloaded_dataset/*/ original_dataset/demo_l3_ct
