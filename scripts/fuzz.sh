#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time: `scripts/fuzz.sh [SECONDS]`
# (default 30 per target). Installs what it needs when missing: a nightly toolchain (rustup)
# and cargo-fuzz. Each run starts from the seeds in fuzz/seeds/TARGET (copied, so the tree
# stays clean). A crash stops the script with the input under fuzz/artifacts/TARGET/ and the
# command that replays it; make the input a regression test next to the code it broke.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-30}"

if ! rustup toolchain list | grep -q '^nightly'; then
  echo "fuzz: installing a nightly toolchain (cargo-fuzz needs one)"
  rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install cargo-fuzz --locked -j"${JOBS:-2}"
fi

# One build cache for the fuzz targets, apart from the main one (other toolchain, other flags).
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$HOME/.cache/meterflow/fuzz-target}"
corpora="$(mktemp -d)"
trap 'rm -rf "$corpora"' EXIT
cargo +nightly fuzz build -O
targets="$(cargo +nightly fuzz list)"
if [ -z "$targets" ]; then
  echo "fuzz: cargo fuzz list found no target in fuzz/: nothing was fuzzed" >&2
  exit 1
fi
ran=0
for target in $targets; do
  ran=$((ran + 1))
  mkdir -p "$corpora/$target"
  cp fuzz/seeds/"$target"/* "$corpora/$target"/ 2>/dev/null || true
  echo "== fuzz $target for ${seconds}s"
  if ! cargo +nightly fuzz run -O "$target" "$corpora/$target" -- \
      -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 2>&1 | tail -n 25; then
    echo "fuzz: $target found a crash; the input is in fuzz/artifacts/$target/"
    echo "fuzz: replay it with: cargo +nightly fuzz run -O $target fuzz/artifacts/$target/<file>"
    exit 1
  fi
done
echo "fuzz: every target ($ran) ran ${seconds}s without a crash"
