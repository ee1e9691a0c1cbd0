# onprem: `make run` starts a demo control plane and agent; `make test` sets up and runs everything.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROTOS := $(shell find protos -name '*.proto' | sort)
# Python code is generated for our protos; third-party ones (gRPC's reflection v1) go into the descriptor set only.
PY_PROTOS := $(shell find protos/onprem -name '*.proto' | sort)
# Every file with its comments (source info) and imports, which server reflection serves (control_plane/api/reflection.py).
DESCRIPTOR_SET := onprem/v1/descriptors.binpb

.PHONY: setup system-deps venv proto check-generated lint test test-faults test-fast stubs run bench dist clean

setup: system-deps venv stubs

system-deps:
	@tools/setup_system.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

# Regenerate the Python code and stubs in generated/ from protos/ (commit the result).
proto: venv
	$(BIN)/python -m grpc_tools.protoc -Iprotos \
		--python_out=generated --pyi_out=generated --grpc_python_out=generated \
		--plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc --mypy_grpc_out=generated \
		$(PY_PROTOS)
	$(BIN)/python -m grpc_tools.protoc -Iprotos --include_imports --include_source_info \
		--descriptor_set_out=generated/$(DESCRIPTOR_SET) $(PROTOS)
	@touch generated/onprem/__init__.py generated/onprem/v1/__init__.py

# Fails when generated/ does not match protos/.
check-generated: venv
	@tmp=$$(mktemp -d); \
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=$$tmp --pyi_out=$$tmp --grpc_python_out=$$tmp \
		--plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc --mypy_grpc_out=$$tmp $(PY_PROTOS) 2>&1 | grep -v "^Writing mypy" >&2; \
	$(BIN)/python -m grpc_tools.protoc -Iprotos --include_imports --include_source_info \
		--descriptor_set_out=$$tmp/$(DESCRIPTOR_SET) $(PROTOS); \
	if ! diff -r -x __init__.py -x __pycache__ $$tmp/onprem generated/onprem >/dev/null; then \
		echo "generated/ is stale: run 'make proto' and commit the result"; \
		diff -r -q -x __init__.py -x __pycache__ $$tmp/onprem generated/onprem; rm -rf $$tmp; exit 1; fi; \
	rm -rf $$tmp; echo "generated/ is up to date"

lint: venv check-generated
	$(BIN)/ruff check .
	$(BIN)/mypy onprem tools tests
	$(BIN)/buf lint
	@# The protos are a public contract: no breaking change against the previous commit.
	@if git rev-parse -q --verify HEAD~1 >/dev/null 2>&1; then \
		$(BIN)/buf breaking --against '.git#ref=HEAD~1' && echo "buf breaking: no breaking change since HEAD~1"; \
	else echo "buf breaking: no previous commit to compare with"; fi

test: setup lint
	$(BIN)/pytest -q -ra

# Kills, partitions, full disks, expired certificates: bounded in time, run by CI after `make test`.
test-faults: setup
	$(BIN)/pytest -q -ra tests/faults -p no:cacheprovider --override-ini addopts=

# Client code for other languages from the protos, into build/stubs/<language>.
stubs: system-deps venv
	tools/stubs/generate.sh

test-fast: venv
	$(BIN)/pytest -q -x -m "not slow"

# Python alone: a venv with the project, its runtime dependencies and grpcurl; nothing from apt, no stubs.
run: $(VENV)/.run-installed
	$(BIN)/python -m tools.demo

$(VENV)/.run-installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[demo]'
	@touch $@

# Figures against baselines measured in the same run; writes docs/benchmarks.md.
bench: setup
	$(BIN)/python -m tools.bench

# The wheel, the sdist and the onprem-agent and onprem-control-plane .debs, into dist/ (docs/install.md).
# DIST_VERSION=0.3.1 builds the same code as another version (e.g. to test an upgrade).
dist: system-deps venv
	$(BIN)/python -m tools.dist --out dist $(if $(DIST_VERSION),--version $(DIST_VERSION))

clean:
	rm -rf var/demo build dist .pytest_cache .mypy_cache .ruff_cache
