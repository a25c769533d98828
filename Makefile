# One-command workflows. `make serve` and `make test` work on a fresh machine: they create
# .venv, install everything, build the Rust core and run.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
DEPS := $(VENV)/.deps-installed
CORE := $(VENV)/.core-built
RUST_SRC := $(shell find core_rs/src -name '*.rs') core_rs/Cargo.toml Cargo.toml pyproject.toml
PORT ?= 50051
DATA_DIR ?= ./data/banditd
HTTP_PORT ?= 8080

.PHONY: install serve test test-rust test-python lint fmt proto demo demo-dashboard bench bench-server bench-observability loadtest simulate clean

install: $(CORE)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(DEPS): requirements-dev.txt client/pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q -e client
	touch $@

$(CORE): $(DEPS) $(RUST_SRC)
	VIRTUAL_ENV=$(abspath $(VENV)) PATH=$(abspath $(BIN)):$$PATH $(BIN)/maturin develop --release -q
	touch $@

serve: install
	$(BIN)/banditd serve --port $(PORT) --data-dir $(DATA_DIR) --http-port $(HTTP_PORT)

test: install lint test-rust test-python

test-rust:
	PYO3_PYTHON=$(abspath $(BIN)/python) cargo test --release -q

test-python: install
	$(BIN)/pytest tests

lint: $(DEPS)
	$(BIN)/ruff check server client/banditd_client tests loadtest proto
	$(BIN)/python -m mypy
	cargo fmt --all --check
	PYO3_PYTHON=$(abspath $(BIN)/python) cargo clippy --release -q --all-targets -- -D warnings

fmt: $(DEPS)
	$(BIN)/ruff check --fix server client/banditd_client tests loadtest proto
	cargo fmt --all

proto: $(DEPS)
	$(BIN)/python proto/generate.py

demo: install
	$(BIN)/python loadtest/demo.py --target localhost:$(PORT)

# MABWiser is a reference in the contextual rows only (not a dependency of banditd).
bench: install
	$(BIN)/pip install -q mabwiser || echo "MABWiser could not be installed: its rows are skipped"
	$(BIN)/python loadtest/bench_core.py
	cd loadtest && ../$(BIN)/python bench_contextual.py

# Decisions/s at p99 <= 10 ms (Python closed/open-loop generator) vs a numpy reference server and a
# no-op baseline; server CPU per Decide with h2load (compiled generator, Debian's nghttp2-client,
# installed when missing and root); then ingest and DecideBulk.
bench-server: install
	$(BIN)/python loadtest/bench_server.py

# Server CPU per decision with and without the metrics interceptor and history snapshots.
bench-observability: install
	cd loadtest && ../$(BIN)/python bench_observability.py

# A demo experiment and screenshots of its dashboard (needs Debian's chromium) in docs/img.
demo-dashboard: install
	$(BIN)/python loadtest/demo_dashboard.py --out docs/img

# Locust, headless, against a server it starts itself (HOST=... to point it elsewhere).
LOADTEST_ARGS ?=
loadtest: install
	$(BIN)/python loadtest/run_locust.py $(if $(HOST),--host $(HOST),) $(LOADTEST_ARGS)

# Every simulation world, in process, with tables and PNG plots under reports/.
simulate: install
	$(BIN)/banditd simulate all --report-dir reports/simulate

clean:
	rm -rf $(VENV) target build
