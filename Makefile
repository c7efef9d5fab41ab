# onnxq: `make demo` and `make test` work from a fresh clone; both create .venv first.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The stamp records a finished install: a second `make test` does not reinstall, and
# an edited pyproject.toml does.
STAMP := $(VENV)/.onnxq-installed
# torch goes in first and pinned: this machine has the 2.13.0 CPU wheel on disk, and a
# plain `torch` requirement would download a multi-GB CUDA build instead.
TORCH ?= torch==2.13.0
PIP := $(BIN)/python -m pip -qq --disable-pip-version-check --no-input

.PHONY: venv test demo lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing $(TORCH) and onnxq (editable) into $(VENV) ..."
	$(PIP) install '$(TORCH)'
	$(PIP) install -e '.[torch,plot,dev,ray]'
	@touch $@

# pytest's exit code 5 means no test was collected: report it as a failure.
test: venv
	@$(BIN)/python -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; \
	exit $$rc

demo: venv
	$(BIN)/onnxq demo

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Runs every script in benchmarks/, if there are any.
bench: venv
	@set -e; found=0; \
	for script in benchmarks/*.py; do \
		[ -f "$$script" ] || continue; found=1; \
		echo "== $$script"; $(BIN)/python "$$script"; \
	done; \
	[ $$found -eq 1 ] || echo "no benchmark scripts in benchmarks/"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
