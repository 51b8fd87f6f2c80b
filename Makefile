# Two entry points for a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test bench

$(VENV)/.installed: requirements.txt requirements-worker.txt requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

demo: install
	PYTHON=$(PY) bash demo/run.sh

# The netlab tests build network namespaces, which needs root (CI runs as root). Without
# it they are left out, and the line below says so.
NOT_ROOT := $(shell [ "$$(id -u)" = 0 ] || echo yes)

test: install
ifeq ($(NOT_ROOT),yes)
	@echo "not root: leaving out the netlab tests (tests/test_nat.py); run as root for all"
	$(PY) -m pytest -q tests -m "not netlab"
else
	$(PY) -m pytest -q tests
endif

bench: install
	$(PY) bench/transfer.py
	$(PY) bench/upload.py
	$(PY) bench/search.py
	$(PY) bench/signaling.py
	$(PY) bench/jobs.py
	$(PY) bench/queue.py
	$(PY) bench/slurm.py
	$(PY) bench/upstream.py
	@if [ "$$(id -u)" = 0 ]; then $(PY) bench/nat.py; \
	else echo "not root: bench/nat.py left out (it builds network namespaces)"; fi
