# kube-audit-operator. `make help` lists the targets; `make test` and `make demo` set up .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   := build/demo
GO     ?= go
CP_SRC := tests/controlplane
CP_BIN := build/controlplane/bin
VL_BIN := build/victorialogs/bin
ACTIONLINT_VERSION := v1.7.12
ACTIONLINT := build/tools/actionlint-$(ACTIONLINT_VERSION)/actionlint
K8S_VERSION := $(shell sed -n 's|^[[:space:]]*k8s.io/kubernetes \(v[0-9.]*\)$$|\1|p' $(CP_SRC)/go.mod)
CP_LDFLAGS := -s -w -X k8s.io/component-base/version.gitVersion=$(K8S_VERSION) \
	-X k8s.io/component-base/version.gitMajor=$(word 2,$(subst ., ,$(subst v,v ,$(K8S_VERSION)))) \
	-X k8s.io/component-base/version.gitMinor=$(word 2,$(subst ., ,$(K8S_VERSION))) \
	-X k8s.io/component-base/version.gitTreeState=clean

.DEFAULT_GOAL := help
.PHONY: help setup test unit lint bench demo crds clean controlplane haproxy image node-tools gitops-health victorialogs

help: ## list the targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-13s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python 3.11+ is needed; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@

setup: $(STAMP) ## create .venv and install the project with its test extras

test: setup lint ## lint, build the real programs and the image where Go is, run every test
	@if $(GO) version >/dev/null 2>&1; then $(MAKE) --no-print-directory controlplane haproxy node-tools gitops-health victorialogs; \
	   if [ "$$(id -u)" = 0 ]; then $(MAKE) --no-print-directory image; \
	   else echo "make test: not root: no image is built and the real node tests (tests/realnode) will skip"; fi; \
	 else echo "make test: no Go on PATH: the control-plane and real node tests will skip"; fi
	$(BIN)/python -m pytest -n 2 --dist loadscope --no-loadscope-reorder

haproxy: ## install HAProxy (Debian package) for the three-node tests, if missing and root
	@command -v haproxy >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null; } \
	  || echo "make: HAProxy could not be installed: the three-node tests will skip"

node-tools: ## install containerd, runc, iptables, mmdebstrap, umoci, skopeo (Debian packages) if missing and root
	@missing=""; for t in containerd runc iptables mmdebstrap umoci skopeo; do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	 [ -z "$$missing" ] || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && echo "make: installing$$missing (Debian packages)" && apt-get update -qq \
	  && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq containerd runc iptables mmdebstrap umoci skopeo >/dev/null; } \
	  || echo "make: could not install$$missing: the real node tests will skip"

image: ## the operator's image as build/image/kube-audit-operator-VERSION.tar, no Docker needed (root)
	PYTHON=$(PYTHON) bash image/build.sh

controlplane: ## build kube-apiserver, etcd, kubeadm, kube-controller-manager, kube-scheduler, kubelet, pause, kubelet-standin (Go 1.24+)
	@$(GO) version | grep -Eq 'go1\.(2[4-9]|[3-9][0-9])' || { echo "controlplane: Go 1.24+ is needed, found: $$($(GO) version)"; exit 1; }
	@mkdir -p $(CP_BIN)
	cd $(CP_SRC) && GOWORK=off CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=readonly \
	  $(GO) build -trimpath -ldflags '$(CP_LDFLAGS)' -o $(abspath $(CP_BIN))/ ./cmd/...

gitops-health: ## build Flux's kstatus and CEL evaluator and Argo CD's Lua health check as one judge for tests/gitops (Go 1.26+)
	@if $(GO) version | grep -Eq 'go1\.(2[6-9]|[3-9][0-9])'; then \
	   cd tests/gitops && GOWORK=off CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=readonly \
	   $(GO) build -trimpath -o $(abspath build/gitops/bin)/gitops-health ./health; \
	 else echo "gitops-health: needs Go 1.26+, found $$($(GO) version): tests/gitops will skip"; fi

victorialogs: ## build VictoriaLogs (victoria-logs) and vlagent from their Go module for the audit-store tests (Go 1.26+)
	@if $(GO) version | grep -Eq 'go1\.(2[6-9]|[3-9][0-9])'; then \
	   cd tests/store && GOWORK=off CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=readonly \
	   $(GO) build -trimpath -ldflags '-s -w' -o $(abspath $(VL_BIN))/ \
	     github.com/VictoriaMetrics/VictoriaLogs/app/victoria-logs github.com/VictoriaMetrics/VictoriaLogs/app/vlagent; \
	 else echo "victorialogs: needs Go 1.26+, found $$($(GO) version): tests/store will skip"; fi

unit: setup ## only the fast pure-core tests
	$(BIN)/python -m pytest tests/unit

lint: setup ## ruff (lint + format check), mypy --strict, import-linter (the layers), actionlint (the workflows)
	$(BIN)/ruff check operator tests bench setup.py
	$(BIN)/ruff format --check operator tests bench setup.py
	$(BIN)/mypy
	$(BIN)/lint-imports
	@if $(GO) version >/dev/null 2>&1; then $(MAKE) --no-print-directory $(ACTIONLINT) && $(ACTIONLINT) && echo "actionlint: .github/workflows pass"; \
	 else echo "make lint: no Go on PATH: the GitHub workflows are not checked (actionlint)"; fi

$(ACTIONLINT):
	GOBIN=$(abspath $(dir $(ACTIONLINT))) GOTOOLCHAIN=local GOFLAGS=-mod=mod \
	  $(GO) install github.com/rhysd/actionlint/cmd/actionlint@$(ACTIONLINT_VERSION)

bench: setup ## render, patch, agent, who (vs jq) and operator benchmarks against their targets
	$(BIN)/python bench/run.py

demo: setup ## run the node agent on a bundled sample control-plane tree (no cluster needed)
	rm -rf $(DEMO) && mkdir -p $(DEMO) && cp -R examples/demo/host $(DEMO)/host
	@echo "== plan: what apply would change on this kubeadm node (tokens as fingerprints)"
	$(BIN)/kube-audit node plan --host-root $(DEMO)/host -f examples -f examples/demo || [ $$? -eq 1 ]  # 1: changes, as kubectl diff
	@echo; echo "== apply: files written, the manifest switched in one rename (no apiserver here: --no-wait)"
	$(BIN)/kube-audit node apply --no-wait --host-root $(DEMO)/host -f examples -f examples/demo
	@echo; echo "== files the apiserver reads:"; find $(DEMO)/host/etc/kubernetes/kube-audit -type f | sort
	@echo; echo "== apply again: the node already runs this content, so nothing is written and"
	@echo "   the apiserver would not be restarted"
	$(BIN)/kube-audit node apply --no-wait --host-root $(DEMO)/host -f examples -f examples/demo

crds: setup ## regenerate crds/ from the pydantic models
	$(BIN)/kube-audit crds --out crds

clean: ## remove .venv and build output
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache .hypothesis
