#!/usr/bin/env bash
# Installs the system packages Meterflow's build needs, when they are missing:
#   libclang-dev  bindgen (rocksdb, libsql) needs libclang
#   cmake         aws-lc-sys (TLS in the embedded broker's dependencies) builds with it
#   pkg-config, zlib1g-dev, g++, make   librdkafka's bundled build
#   libssl-dev    librdkafka's TLS (and SASL SCRAM) against the system's OpenSSL
#   chromium      the dashboard test renders the page in headless Chromium
#   prometheus    the Prometheus comparison (`compare`, and its test) runs a real one
# Debian/Ubuntu only (apt-get); elsewhere it prints what to install and carries on.
set -euo pipefail

missing=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
for pkg in libclang-dev cmake pkg-config zlib1g-dev libssl-dev g++ make chromium prometheus; do
  have_pkg "$pkg" || missing+=("$pkg")
done

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is not on PATH; install Rust from https://rustup.rs first" >&2
  exit 1
fi

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup: please install the equivalents of: ${missing[*]}" >&2
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
    echo "setup: need root to install ${missing[*]}; run as root or install them yourself" >&2
    exit 1
  fi
fi
echo "setup: installing ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
