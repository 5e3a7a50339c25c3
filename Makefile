# The two commands a fresh machine needs; each installs what it needs first.
#   make demo   the whole pipeline on a simulated fleet, in one process
#   make test   every test of the workspace (unit, property and integration)
CARGO ?= cargo
JOBS ?= 2
DEMO_ARGS ?=

.PHONY: demo test setup

setup:
	@scripts/setup.sh

# The demo runs in the profile the tests build (dependencies at -O1, see Cargo.toml): RocksDB,
# librdkafka and the embedded broker compile once for both commands, and a small simulated
# fleet needs no more speed. `cargo run --release -- demo` for a large one.
demo: setup
	$(CARGO) run -j$(JOBS) -- demo $(DEMO_ARGS)

test: setup
	$(CARGO) test -j$(JOBS) --workspace
