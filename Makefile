# bscrypto.py developer targets.  bscrypto.py itself needs nothing but Python 3.6+.
PYTHON ?= python3
VENV   := .venv
# Every CPython 3.x that pyenv has, plus the system python3 (absent ones skipped).
PYENV_ROOT ?= $(shell pyenv root 2>/dev/null || echo $(HOME)/.pyenv)
PYTHONS := $(wildcard $(PYENV_ROOT)/versions/3.*/bin/python) $(wildcard /usr/bin/python3)
DEVLIB := $(VENV)/devlib

.PHONY: help test test-all lint coverage bench fuzz systest devlib clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 12

test:  ## the suite on the default python3 (the README's test command)
	$(PYTHON) test_bscrypto.py

test-all:  ## the suite on every Python 3.x found (pyenv versions and system python3)
	@failed=""; for py in $(PYTHONS); do \
	  [ -x "$$py" ] || continue; \
	  echo "=== $$py ($$($$py -V 2>&1))"; \
	  PYTHONPATH=$(CURDIR)/$(DEVLIB)/$$($$py -c 'import sys;print("py%d%d" % sys.version_info[:2])') \
	    $$py test_bscrypto.py || failed="$$failed $$py"; \
	done; \
	if [ -n "$$failed" ]; then echo "test-all: FAILED on:$$failed"; exit 1; fi; \
	echo "test-all: passed on every interpreter"

$(VENV)/lint/bin/ruff:
	$(PYTHON) -m venv $(VENV)/lint
	$(VENV)/lint/bin/pip install --quiet ruff vermin

lint: $(VENV)/lint/bin/ruff  ## ruff, and vermin proving Python 3.6 suffices
	$(VENV)/lint/bin/ruff check --isolated --select E,F,W,B --ignore B904 --line-length 110 --target-version py37 bscrypto.py test_bscrypto.py systest
	$(VENV)/lint/bin/vermin --no-tips --violations -t=3.6- --backport argparse --eval-annotations bscrypto.py
	$(VENV)/lint/bin/vermin --no-tips -t=3.6- bscrypto.py | tail -1

$(VENV)/lint/bin/coverage: $(VENV)/lint/bin/ruff
	$(VENV)/lint/bin/pip install --quiet coverage

coverage: $(VENV)/lint/bin/coverage  ## line coverage of bscrypto.py under the suite (goal: 90%)
	$(VENV)/lint/bin/coverage run --include=bscrypto.py test_bscrypto.py
	$(VENV)/lint/bin/coverage report --show-missing --skip-covered | tail -3
	$(VENV)/lint/bin/coverage report --fail-under=90 > /dev/null

devlib:  ## dev-only packages per interpreter (pyaes for bench, cryptography oracle)
	@for py in $(PYTHONS); do \
	  [ -x "$$py" ] || continue; \
	  tag=$$($$py -c 'import sys;print("py%d%d" % sys.version_info[:2])'); \
	  [ -d $(DEVLIB)/$$tag ] && continue; \
	  echo "devlib: $$tag"; \
	  $$py -m pip install --quiet --disable-pip-version-check --target $(DEVLIB)/$$tag pyaes \
	    || echo "devlib: pyaes not installed for $$py"; \
	  $$py -m pip install --quiet --disable-pip-version-check --only-binary :all: --target $(DEVLIB)/$$tag cryptography \
	    || echo "devlib: cryptography not installed for $$py (its tests will skip)"; \
	done

bench: devlib  ## performance figures, side by side, on every interpreter found
	$(PYTHON) test_bscrypto.py --bench $(PYTHONS)

fuzz:  ## the long fuzz and crash runs
	BSCRYPTO_FUZZ=full $(PYTHON) test_bscrypto.py -k Fuzz -k Crash -k fuzz

systest:  ## the real-kernel test in a QEMU guest (needs qemu; see systest/README.md)
	$(PYTHON) systest/run.py

clean:
	rm -rf $(VENV) __pycache__ systest/build
