# Build stage: a release binary of vllm-router.
FROM rust:1-slim AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY tests ./tests
RUN cargo build --release --locked --bin vllm-router

# Run stage: just the binary and the config.
FROM debian:stable-slim
RUN useradd --system --uid 10001 vllm-router
WORKDIR /app
COPY --from=build /src/target/release/vllm-router /usr/local/bin/vllm-router
COPY servers.toml /app/servers.toml
RUN mkdir -p /app/logs && chown vllm-router /app/logs
USER vllm-router
EXPOSE 8888
ENV CONFIG_PATH=/app/servers.toml
ENTRYPOINT ["/usr/local/bin/vllm-router"]
CMD ["run"]
