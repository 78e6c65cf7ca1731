# kube-audit-operator. `make help` lists the targets; `make test` and `make demo` set up .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   := build/demo

.DEFAULT_GOAL := help
.PHONY: help setup test unit lint bench demo e2e crds clean

help: ## list the targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python 3.11+ is needed; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@

setup: $(STAMP) ## create .venv and install the project with its test extras

test: setup lint ## lint, then run every test (kind end-to-end tests skip without Docker)
	$(BIN)/python -m pytest

unit: setup ## only the fast pure-core tests
	$(BIN)/python -m pytest tests/unit

lint: setup ## ruff (lint + format check) and mypy --strict
	$(BIN)/ruff check operator tests bench
	$(BIN)/ruff format --check operator tests bench
	$(BIN)/mypy

bench: setup ## render, patch, agent, who (vs jq) and operator benchmarks against their targets
	$(BIN)/python bench/run.py

demo: setup ## run the node agent on a bundled sample control-plane tree (no cluster needed)
	rm -rf $(DEMO) && mkdir -p $(DEMO) && cp -R examples/demo/host $(DEMO)/host
	$(BIN)/kube-audit node plan --host-root $(DEMO)/host -f examples -f examples/demo
	$(BIN)/kube-audit node apply --no-wait --host-root $(DEMO)/host -f examples -f examples/demo
	@echo; echo "== kube-apiserver.yaml after apply (diff against kubeadm's):"
	@diff -u examples/demo/host/etc/kubernetes/manifests/kube-apiserver.yaml \
	   $(DEMO)/host/etc/kubernetes/manifests/kube-apiserver.yaml || true
	@echo; echo "== files the apiserver reads:"; find $(DEMO)/host/etc/kubernetes/kube-audit -type f | sort
	$(BIN)/kube-audit node apply --no-wait --host-root $(DEMO)/host -f examples -f examples/demo

crds: setup ## regenerate crds/ from the pydantic models
	$(BIN)/kube-audit crds --out crds

e2e: setup ## end-to-end suite on a kind cluster (needs Docker and kind)
	$(BIN)/python -m pytest -m e2e tests/e2e -rs

clean: ## remove .venv and build output
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache .hypothesis
