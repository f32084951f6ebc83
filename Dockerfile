# vllm-router container image: a static (musl) binary on an empty base.
#
#   docker build -t vllm-router:latest .
#   docker run -d -p 8888:8888 -v $(pwd)/servers.toml:/app/servers.toml vllm-router:latest
#   docker run -d -p 8888:8888 -v $(pwd)/servers.toml:/app/servers.toml \
#       -e LOG_LEVEL=DEBUG vllm-router:latest run --console
#
# The final image holds the binary, an example /app/servers.toml (mount your own over
# it) and an empty /app/logs owned by the runtime user: no shell, no libc, no curl. The
# HEALTHCHECK uses the binary's own `healthcheck` subcommand (GET /livez on loopback).

# ---- build: the same static binary as `make static` ----
FROM rust:1-slim AS build
ARG RUST_TARGET=x86_64-unknown-linux-musl
RUN rustup target add "${RUST_TARGET}"
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY tests ./tests
# The workspace's other member: cargo reads its manifest (only vllm-router is built).
COPY tools ./tools
RUN cargo build --release --locked --target "${RUST_TARGET}" --bin vllm-router \
    && mkdir -p /out/logs \
    && cp "target/${RUST_TARGET}/release/vllm-router" /out/vllm-router \
    && /out/vllm-router --version

# ---- run: nothing but the binary, the example config and the log directory ----
FROM scratch
COPY --from=build /out/vllm-router /usr/local/bin/vllm-router
WORKDIR /app
COPY servers.toml /app/servers.toml
COPY --from=build --chown=10001:10001 /out/logs /app/logs
ENV CONFIG_PATH=/app/servers.toml \
    LOG_DIR=/app/logs \
    HOST=0.0.0.0
USER 10001:10001
EXPOSE 8888
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/vllm-router", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/vllm-router"]
CMD ["run"]
