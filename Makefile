# Two commands on a fresh Debian machine with only Python: `make test` and `make demo`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
APT_PACKAGES := mosquitto influxdb

.PHONY: test demo lint typecheck check-dashboards unit services schema bench chaos lock clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

# Debian's mosquitto and influxd (the tests start their own on free ports), docker-compose (to validate the
# compose file without an engine), strace (to prove the secrets script puts no password on a command line), npm
# (to type-check the dashboards against Grafana's schema), systemd (systemd-analyze scores the unit's hardening
# offline; nothing is started) and openssl (the secrets script's CA and certificates, the TLS and bridge tests),
# installed when missing.
services:
	@missing=""; \
	command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	command -v influxd >/dev/null 2>&1 || [ -x /usr/bin/influxd ] || missing="$$missing influxdb"; \
	command -v docker-compose >/dev/null 2>&1 || missing="$$missing docker-compose"; \
	command -v strace >/dev/null 2>&1 || missing="$$missing strace"; \
	command -v npm >/dev/null 2>&1 || missing="$$missing npm"; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	command -v openssl >/dev/null 2>&1 || missing="$$missing openssl"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; \
	  elif sudo -n true 2>/dev/null; then SUDO="sudo"; \
	  else echo "error: test services missing and no root. Run: sudo apt-get update && sudo apt-get install -y$$missing" >&2; exit 1; fi; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends$$missing >/dev/null || \
	  { echo "error: apt-get install$$missing failed" >&2; exit 1; }; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# The generated dashboards against @grafana/schema with tsc (dashboards/typecheck.py): npm ci from the committed
# lock once (needs the npm registry), then offline, a few seconds.
DASH_TC := dashboards/.typecheck
$(DASH_TC)/node_modules/.package-lock.json: $(DASH_TC)/package-lock.json $(DASH_TC)/package.json
	npm ci --prefix $(DASH_TC) --no-audit --no-fund --loglevel=error

check-dashboards: $(STAMP) services $(DASH_TC)/node_modules/.package-lock.json
	$(BIN)/python -m dashboards.typecheck

test: $(STAMP) services lint typecheck check-dashboards
	$(BIN)/pytest

demo: $(STAMP) services
	$(BIN)/infusion-telemetry demo

# Figures, not tests: about 40 minutes on the 2-core reference machine, the side-by-side table with the Node-RED
# peer first (docs/benchmarks.md).
bench: $(STAMP) services
	$(BIN)/python -m benchmarks

# A seeded fault schedule (SIGKILL of mosquitto, influxd and the gateway, ptys closed and recreated, overlapping)
# checked against the truth: /health, retained statuses, every reading on both sinks (docs/reliability.md).
# About 5-6 minutes with the defaults; exit 1 names each violation. make chaos SEED=2 MINUTES=4 DEVICES=10
SEED ?= 1
MINUTES ?= 3
DEVICES ?= 10
chaos: $(STAMP) services
	$(BIN)/python -m tests.chaos --seed $(SEED) --minutes $(MINUTES) --devices $(DEVICES)

# The image's pinned dependencies (the Dockerfile installs only these, with --require-hashes): every runtime
# dependency of pyproject.toml and theirs, plus the build backend (deploy/build-requirements.in), resolved by uv from
# PyPI for Python 3.11 on every platform. Run after changing [project] dependencies (tests/deploy/test_lock.py fails
# until then); pins already in requirements.lock are kept unless a change needs another (delete it to refresh all).
UV_VERSION := 0.13.9
lock: $(STAMP)
	$(BIN)/python -m pip install -q "uv==$(UV_VERSION)"
	$(BIN)/uv pip compile pyproject.toml deploy/build-requirements.in --universal --python-version 3.11 \
	  --generate-hashes --no-config --custom-compile-command "make lock" -o requirements.lock

schema: $(STAMP)
	$(BIN)/infusion-telemetry schema > docs/mqtt-schema.json

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
