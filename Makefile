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

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) bench/transfer.py
	$(PY) bench/upload.py
	$(PY) bench/search.py
	$(PY) bench/signaling.py
	$(PY) bench/jobs.py
	$(PY) bench/queue.py
	$(PY) bench/slurm.py
	$(PY) bench/upstream.py
	$(PY) bench/nat.py
