# Two commands for a newcomer: `make demo` (train + sample + evaluate the default preset)
# and `make test` (install and run the whole test suite). Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
RUN    ?= runs/digits

.PHONY: demo test test-fast install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned to the release on local disk; the package itself asks only torch>=2.4
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,text,ccd]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m adaln demo --out $(RUN)

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
