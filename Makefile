# `make demo` and `make test` create the environment they need on first use: a .venv with
# abdoseg installed in editable mode (pip install -e), so `abdoseg` and `python -m training` run
# this checkout's code.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU build by default. On a GPU machine: make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,dicom,notebooks

.PHONY: demo test install clean-demo

$(VENV)/.installed: pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: pip then keeps it (here the local CPU wheel, never a 5 GB CUDA build).
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/abdoseg demo --out runs/demo --overwrite  # a rerun replaces only what the last demo wrote

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean-demo:
	rm -rf runs/demo
