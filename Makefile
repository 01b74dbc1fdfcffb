# The two set-up commands of the README: `make test` and `make demo`.
PYTHON ?= python

test:
	bash scripts/setup.sh --dev
	$(PYTHON) -m pytest -q tests

# every stage of the paper in miniature on this machine's CPU (demo.py; ~9 minutes on 2 cores).
# --dev: the demo needs what the tests need (SmolLM2 for self-instruct, gguf, matplotlib)
demo:
	bash scripts/setup.sh --dev
	$(PYTHON) demo.py

.PHONY: test demo
