# The two commands a fresh machine needs; each installs what it needs first.
#   make demo   the whole pipeline on a simulated fleet, in one process
#   make test   every test of the workspace (unit, property and integration)
CARGO ?= cargo
JOBS ?= 2
DEMO_ARGS ?=

.PHONY: demo test setup

setup:
	@scripts/setup.sh

demo: setup
	$(CARGO) run --release -j$(JOBS) -- demo $(DEMO_ARGS)

test: setup
	$(CARGO) test -j$(JOBS) --workspace
