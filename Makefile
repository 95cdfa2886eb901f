# Two entry points (see README): `make run` starts embedded mode, `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8000
# Test processes (pytest-xdist): 2 takes the suite on a 2-core machine from about 18 to 13 minutes;
# each e2e module stays on one process (--dist loadscope) with its servers. 1: one process, no xdist.
TEST_PROCESSES ?= 2

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
	$(BIN)/python -m pytest -q $(if $(filter 1,$(TEST_PROCESSES)),,-n $(TEST_PROCESSES) --dist loadscope) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache
