# The README's two commands. Both create .venv with the system python3 if it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
OUT ?= outputs/reproduce

.PHONY: demo test install install-test clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: setup.py $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: setup.py $(PY)
	$(PY) -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(PY) -m experiments.reproduce --workdir=$(OUT)

test: install-test
	$(PY) -m pytest -q -n 2 --durations=15

clean:
	rm -rf $(VENV) outputs
