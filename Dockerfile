# The image the manifests name (deploy/kubernetes/base: ghcr.io/meterflow/meterflow:VERSION):
# one binary, every component (`meterflow agent|processor|sink ...`).
#   docker build -t ghcr.io/meterflow/meterflow:0.1.0 .
# Not built in CI here: this machine has no container builder.

# Build: the system packages RocksDB (libclang for bindgen, g++) and librdkafka (make,
# pkg-config, zlib, OpenSSL) need. Without the embedded broker (`--no-default-features`: tansu
# and some 190 crates are for the demo and the tests), which also drops cmake (aws-lc).
FROM rust:1.88-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends libclang-dev pkg-config zlib1g-dev libssl-dev g++ make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --no-default-features --bin meterflow

# Run: a slim Debian with what the binary links (OpenSSL for Kafka over TLS, zlib), as a
# non-root user with the uid the manifests run it as.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/meterflow /usr/local/bin/meterflow
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/meterflow"]
