# envbuild: one command to set up and run the main job, one to set up and pass the tests.
#   make image MODEL=sparsedrive CARD=h20 CUDA=11.8
#   make test
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?= maptr
CARD ?= a800
CUDA ?=
IMAGE ?=
CUDA_FLAG := $(if $(CUDA),--cuda $(CUDA),)
VCUDA ?= 11.8

.PHONY: locks verify setup test test-unit test-integration image images resolve dockerfiles bench bench-build bench-ci lint clean base smoke smoke-gpu selftest-gpu doctor export bake

$(BIN)/envbuild: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(BIN)/envbuild  ## create .venv with envbuild and the test tools

# Two workers: one compiles while the other exports, pushes or runs unit tests (tests/conftest.py
# keeps each integration module, and everything sharing the fixture image, on one worker).
TEST_WORKERS ?= 2
test: setup  ## all tests; integration tests need a Docker engine (.ci/run starts one)
	$(BIN)/pytest -q -rs --durations=12 -n $(TEST_WORKERS)

test-unit: setup
	$(BIN)/pytest -q -m 'not integration' -n $(TEST_WORKERS)

test-integration: setup
	$(BIN)/pytest -q -rs -m integration

resolve: setup
	$(BIN)/envbuild resolve $(MODEL) --card $(CARD) $(CUDA_FLAG)

image: setup  ## resolve, render, build (and say clearly what is missing)
	$(BIN)/envbuild image $(MODEL) --card $(CARD) $(CUDA_FLAG)

images: setup  ## every catalog model on its default cards
	for m in $$($(BIN)/envbuild models --json | $(BIN)/python -c 'import json,sys;print(" ".join(m["name"] for m in json.load(sys.stdin)))'); do \
	  for c in a800 h20; do $(BIN)/envbuild image $$m --card $$c || exit 1; done; done

base: setup  ## offline CUDA devel bases without Docker Hub: 11.8 from Debian non-free, 13.0 from PyPI's NVIDIA wheels
	$(BIN)/envbuild base --cuda 11.8
	$(BIN)/envbuild base --cuda 13.0

dockerfiles: setup  ## regenerate dockerfiles/ (a test fails when they are stale)
	$(BIN)/python -m envbuild.render --regenerate dockerfiles

locks: setup  ## hash-lock every committed cell in its own Python (needs its base image; Python 3.8 cells cannot be locked on Debian 12)
	for d in dockerfiles/*/; do cell=$$(basename $$d); tmp=$$(mktemp -d); \
	  if $(BIN)/envbuild lock $${cell%-*} --card $${cell##*-} -o $$tmp/ctx; \
	  then cp $$tmp/ctx/requirements.lock $$tmp/ctx/torch.lock $$d; else echo "skipped $$cell (not locked: above)"; fi; \
	  rm -rf $$tmp; done
	$(MAKE) dockerfiles

verify: setup  ## rebuild one cell from its real source here and record it: make verify MODEL=qcnet CARD=a800 SOURCE=../QCNet [TIME_LIMIT=seconds] [VCUDA=13.0 for Hopper/Blackwell: CARD=h20,b200] [TRIM=1: --trim-kernels]
	$(BIN)/envbuild base --cuda $(VCUDA)
	ENVBUILD_TORCH_INDEX=none $(BIN)/envbuild verify $(MODEL) --card $(CARD) --python 3.11 --cuda $(VCUDA) \
	  --source $(SOURCE) --base-image envbuild/cuda:$(VCUDA)-devel-debian12 --runtime-image envbuild/debian:12 \
	  $(if $(TIME_LIMIT),--time-limit $(TIME_LIMIT)) $(if $(TRIM),--trim-kernels)

bench: setup  ## resolver timing and data-loader tuning; bench-build for the (slow) image build numbers
	$(BIN)/python benchmarks/bench_resolve.py
	$(BIN)/python benchmarks/bench_dataloader.py
	$(BIN)/python benchmarks/bench_archs.py
	$(BIN)/python benchmarks/results.py --write

bench-build: setup  ## cold/incremental/no-op builds and compile-once (prunes BuildKit's cache first)
	$(BIN)/python benchmarks/bench_build.py
	$(BIN)/python benchmarks/bench_compile_once.py
	$(BIN)/python benchmarks/results.py --write

bench-ci: setup  ## .ci/run from a fresh clone of HEAD: wall time, tests, peak disk
	$(BIN)/python benchmarks/bench_ci.py
	$(BIN)/python benchmarks/results.py --write

smoke: setup  ## CPU-capable smoke levels for IMAGE (or MODEL + CARD)
	$(BIN)/envbuild smoke $(or $(IMAGE),$(MODEL) --card $(CARD)) --report smoke-report.json

smoke-gpu: setup  ## every GPU level for one image, in one go, on a GPU host
	$(BIN)/envbuild smoke $(or $(IMAGE),$(MODEL) --card $(CARD)) --gpus all --level env,model,arch,ops,comm,train,io --compile \
	  --steps 50 --report smoke-$(CARD)-$$(hostname).json

selftest-gpu:  ## the smoke script's GPU levels against this host's torch (no Docker): CARD=h200
	CARD=$(or $(CARD),h200) scripts/gpu-selftest.sh

doctor: setup
	$(BIN)/envbuild doctor

export: setup  ## make export MODEL=maptr CARD=h20 (or IMAGE=...) [FORMAT=apptainer]
	$(BIN)/envbuild export $(or $(IMAGE),$(MODEL) --card $(CARD)) $(CUDA_FLAG) --format $(or $(FORMAT),tar) -o export/

bake: setup  ## docker-bake file for the whole matrix
	$(BIN)/envbuild bake -o bake/docker-bake.json

lint: setup  ## hadolint on the committed Dockerfiles (same settings as the test)
	$(BIN)/hadolint --config .hadolint.yaml dockerfiles/*/Dockerfile

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
