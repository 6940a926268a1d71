# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: install demo test lint clean bytecode

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The pin takes the CPU wheel on disk; never let pip resolve torch on its own.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Every Ray worker and Flower process imports fedshop afresh; with PYTHONDONTWRITEBYTECODE set (as on
# some machines) each would recompile it (~0.6 CPU s). Stale .pyc files are ignored by Python.
bytecode: $(STAMP)
	$(PY) -m compileall -q client server shared simulations

demo: bytecode
	$(VENV)/bin/fedshop compare default

test: bytecode
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
