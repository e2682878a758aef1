# daybreak — every target sets up its own .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

export DAYBREAK_HOME ?= $(CURDIR)/.daybreak
export AIRFLOW_HOME ?= $(DAYBREAK_HOME)/airflow
export AIRFLOW__CORE__DAGS_FOLDER ?= $(CURDIR)/dags
export AIRFLOW__CORE__LOAD_EXAMPLES ?= False
# No blanket ignore of deprecations (Python hides a library's DeprecationWarning outside __main__
# already; the tests surface them, pyproject.toml): only Starlette's advice to install httpx2, which
# Airflow's API server triggers importing fastapi.testclient, every Airflow command.
export PYTHONWARNINGS ?= ignore::UserWarning:fastapi.testclient

.PHONY: install browser redis demo test test-fast lint docs reliability up bench constraints clean
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@echo ">> setting up $(VENV) (first run downloads the dependencies)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check uv
	# Bytecode compiled once here (about 40 s): with PYTHONDONTWRITEBYTECODE set (it is on these machines), every
	# process would otherwise compile sklearn, scipy, airflow and mlflow from source again.
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -c constraints.txt -e ".[all]" \
	  || $(BIN)/python -m pip install -q -c constraints.txt -e ".[all]"
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	@mkdir -p $(AIRFLOW_HOME)
	@$(BIN)/airflow db migrate > $(AIRFLOW_HOME)/db-migrate.log 2>&1 || (cat $(AIRFLOW_HOME)/db-migrate.log; exit 1)
	$(BIN)/python scripts/demo.py

# Headless Chromium for the tests that open pages (Debian's package; Playwright drives it).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { echo ">> installing Chromium (apt)"; $(SUDO) apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }

# Redis for the online store's tests (Debian's package; the tests start their own server on loopback
# and stop it by PID; the package's service is never used).
redis:
	@command -v redis-server >/dev/null 2>&1 || \
	  { echo ">> installing redis-server (apt)"; $(SUDO) apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends redis-server >/dev/null; }

# Two pytest-xdist workers, a test file at a time each (module fixtures start once), the longest
# files first (tests/conftest.py); TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2
test: $(STAMP) browser redis
	$(BIN)/python -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

# The pure cores, no servers (spec, expressions, features on in-process Ray, staging, the log
# writer, encoders and the spec attacks): a couple of minutes, for the edit-test loop.
FAST_TESTS := tests/test_spec.py tests/test_expr.py tests/test_features.py tests/test_features_property.py \
  tests/test_dsl_example.py tests/test_stage.py tests/test_predlog.py tests/test_encoders.py \
  tests/security/test_sec_spec.py tests/security/test_sec_credentials.py tests/test_records.py \
  tests/test_layout.py tests/test_gate_compute.py tests/test_train_compute.py
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) $(FAST_TESTS)

# The lint gate (.ci/run runs it before the tests): ruff (rule set in pyproject.toml), mypy on the
# library, and the import contracts (the core never imports Airflow or Prefect).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# The documentation site into site/ (mkdocs.yml): --strict fails on a broken link or anchor, and the
# spec and CLI references are generated from the code at build time (docs/_hooks/reference.py).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# The reliability suite with full trial counts (make test runs it with fewer); prints its table.
reliability: $(STAMP)
	DAYBREAK_RELIABILITY=full $(BIN)/python -m pytest -q tests/reliability

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

# Airflow standalone (repo dags/ and plugins/), the MLflow server and daybreak serve, logs in
# $(DAYBREAK_HOME)/logs; ports from AIRFLOW_PORT, MLFLOW_PORT, SERVE_PORT. Ctrl-C stops all three.
up: $(STAMP)
	@$(BIN)/python scripts/up.py

constraints: $(STAMP)
	$(BIN)/uv pip freeze --python $(BIN)/python --exclude-editable | grep -vi '^daybreak' > constraints.txt.new
	(echo '# Versions that reproduce a working install (Python 3.11, Linux x86_64). Regenerate with `make constraints`.'; \
	  cat constraints.txt.new) > constraints.txt && rm constraints.txt.new

clean:
	rm -rf $(VENV) .daybreak .pytest_cache
