# The README's two commands: `make quickstart` (main job on the embedded default) and `make test`.
# Both create .venv and install everything first; the install is skipped while pyproject.toml
# and the install script are unchanged.
PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.llmser-installed

.PHONY: install quickstart test test-fast lint bench clean

$(STAMP): pyproject.toml scripts/install_llm_cpu.sh
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[cpu,dev]"
	bash scripts/install_llm_cpu.sh $(VENV)
	touch $(STAMP)

install: $(STAMP)

quickstart: install
	$(VENV)/bin/llmser-ray tune --config tune_configs/quickstart.yaml

lint: install
	$(VENV)/bin/ruff check llmser_ray tests bench

test: install lint
	$(VENV)/bin/pytest -q --durations=30

test-fast: install
	$(VENV)/bin/pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
