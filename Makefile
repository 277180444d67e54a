# The README's two commands. Both create .venv with the system python3 if it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
OUT ?= outputs/reproduce

.PHONY: demo test install install-test browser clean

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

# Headless Chromium renders the HTML report in tests/test_report.py (which skips without it):
# installed with apt when run as root, never fatal.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && { \
	  apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || { \
	  apt-get update -q >/dev/null && \
	  apt-get install -y -q --no-install-recommends chromium >/dev/null; }; }; } || \
	  echo "Chromium is not installed: the report's browser check will be skipped."

demo: install
	$(PY) -m experiments.reproduce --workdir=$(OUT)

test: install-test browser
	$(PY) -m pytest -q -n 2 --maxschedchunk=1 --durations=15

clean:
	rm -rf $(VENV) outputs
