# `make bench`: the full relay benchmark (see README, "Benchmark"). Options: make bench ARGS="--levels 1,50 --tokens 100"
PYTHON ?= .venv/bin/python

.PHONY: bench bench-quick test

bench:
	$(PYTHON) -m bench $(ARGS)

bench-quick:
	$(PYTHON) -m bench --levels 1,50 --tokens 100 --no-images $(ARGS)

test:
	$(PYTHON) -m pytest
