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

.PHONY: setup test test-unit test-integration image images resolve dockerfiles bench lint clean base smoke-gpu doctor export bake

$(BIN)/envbuild: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(BIN)/envbuild  ## create .venv with envbuild and the test tools

test: setup  ## all tests; integration tests need a Docker engine (.ci/run starts one)
	$(BIN)/pytest -q -rs

test-unit: setup
	$(BIN)/pytest -q -m 'not integration'

test-integration: setup
	$(BIN)/pytest -q -rs -m integration

resolve: setup
	$(BIN)/envbuild resolve $(MODEL) --card $(CARD) $(CUDA_FLAG)

image: setup  ## resolve, render, build (and say clearly what is missing)
	$(BIN)/envbuild image $(MODEL) --card $(CARD) $(CUDA_FLAG)

images: setup  ## every catalog model on its default cards
	for m in $$($(BIN)/envbuild models --json | $(BIN)/python -c 'import json,sys;print(" ".join(m["name"] for m in json.load(sys.stdin)))'); do \
	  for c in a800 h20; do $(BIN)/envbuild image $$m --card $$c || exit 1; done; done

base:  ## offline CUDA 11.8 devel base from Debian packages (debootstrap + docker import)
	scripts/bootstrap-base.sh

dockerfiles: setup  ## regenerate dockerfiles/ (a test fails when they are stale)
	$(BIN)/python -m envbuild.render --regenerate dockerfiles

bench: setup
	$(BIN)/python benchmarks/bench_resolve.py

lint: setup
	$(BIN)/python -m envbuild.render --lint dockerfiles

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
