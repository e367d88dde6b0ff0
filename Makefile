# The two commands a new user needs: `make test` and `make demo`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo lint typecheck unit install clean tools

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check router policies simulator kvrouter tests bench

typecheck: $(STAMP)
	$(BIN)/mypy policies router simulator kvrouter

unit: $(STAMP)
	$(BIN)/pytest -q

# Helm for the chart tests, cached in .tools/ (kubernetes-validate comes with the test extras).
tools: .tools/helm

.tools/helm: scripts/install-helm
	scripts/install-helm
	touch $@

test: tools lint typecheck unit

demo: $(STAMP)
	$(BIN)/kvrouter demo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
