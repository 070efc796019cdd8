# `make demo` and `make test` create the environment they need on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test install clean-demo

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: here that takes the local CPU wheel instead of a 5 GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m training demo --out runs/demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean-demo:
	rm -rf runs/demo
