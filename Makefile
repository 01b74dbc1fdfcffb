# The two set-up commands of the README: `make test` and `make demo`.
PYTHON ?= python

# -rs: every skipped test and why, in the summary (CI sets CODELLAMA_REQUIRE_SANDBOX=1: .ci/run).
# -n 2 --dist loadfile: two pytest-xdist workers, each running whole files; tests/conftest.py
# gives each its share of the cores and puts the longest files first (--no-loadscope-reorder keeps
# that order rather than xdist's, by number of tests)
test:
	bash scripts/setup.sh --dev
	$(PYTHON) -m pytest -q -rs -n 2 --dist loadfile --no-loadscope-reorder tests

# every stage of the paper in miniature on this machine's CPU (demo.py; ~9 minutes on 2 cores).
# --dev: the demo needs what the tests need (SmolLM2 for self-instruct, gguf, matplotlib)
demo:
	bash scripts/setup.sh --dev
	$(PYTHON) demo.py

.PHONY: test demo
