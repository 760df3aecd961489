# The two commands of the quick start: `make demo` and `make test`.
# Each (re)builds .venv when it is missing or older than the files that define it.
PY ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench venv clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[test]'
	$(VENV)/bin/python -m tpm_faas.runtime.prebuild
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/tpm-faas demo

# Services the tests use (PostgreSQL, RabbitMQ, Slurm) are started first when this machine
# can; the script never fails, and a test whose service is missing skips with a reason.
test: $(STAMP)
	scripts/services-up.sh
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/python bench/gateway_overhead.py
	$(VENV)/bin/python bench/decode.py
	$(VENV)/bin/python bench/interventions.py
	$(VENV)/bin/python bench/ledger.py
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/python bench/shard_memory.py
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/python bench/fuzz.py

lint: $(STAMP)
	$(VENV)/bin/ruff check tpm_faas tests bench
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) runs
