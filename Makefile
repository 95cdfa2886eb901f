# Two entry points (see README): `make run` starts embedded mode, `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8000

.PHONY: install run test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# One pip call for both distributions, so that pip takes the server's felis-client==0.1.0 from ./felis_client.
$(VENV)/.installed: pyproject.toml felis_client/pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ./felis_client -e '.[test,s3]'
	touch $@

install: $(VENV)/.installed

run: install
	FELIS_PORT=$${FELIS_PORT:-$(PORT)} $(BIN)/felis up

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache
