# The two set-up commands of the README: `make test` and `make demo`.
PYTHON ?= python

test:
	bash scripts/setup.sh --dev
	$(PYTHON) -m pytest -q tests

.PHONY: test
