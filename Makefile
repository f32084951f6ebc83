# vllm-router: `make run` to start it, `make test` for the whole suite.
CARGO ?= cargo
RELEASE_BIN := target/release/vllm-router
MOCK_BIN := target/release/mock-vllm

.PHONY: build run test lint demo clean

build:
	$(CARGO) build --release --locked

## Start the router with ./servers.toml on 0.0.0.0:8888, logging to the console too.
run: build
	./$(RELEASE_BIN) run --config ./servers.toml --console

## The whole test suite: unit and integration tests against the real binaries.
test:
	$(CARGO) test --locked --all-targets

## Formatting and lints, as CI runs them.
lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

## Two mock vLLM servers on 8081 and 8082 (as in ./servers.toml) and the router on
## 8888. Ctrl-C stops all three.
demo: build
	@set -e; \
	trap 'kill $$M1 $$M2 $$R 2>/dev/null; wait 2>/dev/null; echo; echo "demo stopped"' INT TERM EXIT; \
	./$(MOCK_BIN) --port 8081 --id gpu-1 --delay-ms 150 --tokens 20 > /dev/null & M1=$$!; \
	./$(MOCK_BIN) --port 8082 --id gpu-2 --delay-ms 150 --tokens 20 > /dev/null & M2=$$!; \
	./$(RELEASE_BIN) run --config ./servers.toml --console & R=$$!; \
	sleep 1; \
	echo; \
	echo "Try, in another terminal:"; \
	echo "  curl -N localhost:8888/v1/chat/completions -H 'Content-Type: application/json' \\"; \
	echo "       -d '{\"model\":\"mock-model\",\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}'"; \
	echo "  curl -s localhost:8888/load-stats"; \
	echo; \
	wait $$R

clean:
	$(CARGO) clean
