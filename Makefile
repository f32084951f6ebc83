# vllm-router: `make run` to start it, `make test` for the whole suite.
CARGO ?= cargo
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
RELEASE_BIN := $(TARGET_DIR)/release/vllm-router
# The tools (mock-vllm, bench, soak) are the workspace member tools/ (package
# vllm-router-tools); their binaries need its `bins` feature.
MOCK_BIN := $(TARGET_DIR)/release/mock-vllm
TOOLS_FLAGS := -p vllm-router-tools --features bins
# `make static`: a fully static x86_64 Linux binary (musl; see deploy/static.sh).
STATIC_BIN := $(TARGET_DIR)/static/vllm-router
# `make install`: PREFIX for the binary; DESTDIR for staged installs (packaging).
PREFIX ?= /usr/local
DESTDIR ?=
SYSTEMD_UNIT_DIR ?= /etc/systemd/system

# `make build FEATURES=tls` (or `make static FEATURES=tls`): with HTTPS support.
FEATURES ?=
FEATURE_FLAGS := $(if $(FEATURES),--features $(FEATURES),)

.PHONY: build tools run test lint demo clean static install deploy-check soak

## The product alone: the release vllm-router (fat LTO), no tool.
build:
	$(CARGO) build --release --locked -p vllm-router $(FEATURE_FLAGS)

## The tools in release: mock-vllm, bench, soak (for demo, soak and bench).
tools:
	$(CARGO) build --release --locked $(TOOLS_FLAGS) --bins

## Start the router with ./servers.toml on 0.0.0.0:8888, logging to the console too.
run: build
	$(RELEASE_BIN) run --config ./servers.toml --console

# $(call need,COMMAND,DEBIAN-PACKAGE): installs the package when COMMAND is missing and
# root may (apt-get), or stops saying what to install.
define need
@command -v $(1) >/dev/null 2>&1 || \
		{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		  { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(2) >/dev/null 2>&1 || \
		    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(2) >/dev/null; }; }; } || \
		{ echo "$(1) is missing and cannot be installed here: install the Debian package $(2)" >&2; exit 1; }
endef

comma := ,
# $(call need_py,MODULES,PIP-PACKAGES): pip-installs the packages when python3 cannot
# import the modules, or stops saying what to install.
define need_py
@python3 -c 'import $(1)' >/dev/null 2>&1 || \
		{ python3 -m pip install -q $(2) >/dev/null 2>&1 || \
		  python3 -m pip install -q --break-system-packages $(2) >/dev/null 2>&1; } || \
		{ echo "python3 cannot import $(1) and pip cannot install it here: pip install $(2)" >&2; exit 1; }
endef

## The whole test suite: unit and integration tests against the real binaries, then
## the HTTPS tests in a build with the `tls` feature. Real tools are used, and
## installed here when missing and root may, as .ci/run does: promtool (Debian package
## prometheus) checks the /metrics exposition, Node's llhttp (package nodejs) is the
## reference parser of the differential test, curl and the Python packages openai and
## websockets (pip) are the clients of the routes tests (tests/routes.rs), tmux (package
## tmux) is the pseudo-terminal `vllm-router top` runs under.
test:
	$(call need,promtool,prometheus)
	$(call need,node,nodejs)
	$(call need,curl,curl)
	$(call need,python3,python3)
	$(call need,pip3,python3-pip)
	$(call need_py,openai$(comma) websockets,openai websockets)
	$(call need,tmux,tmux)
	$(CARGO) test --locked --workspace --all-targets
	$(CARGO) test --locked -p vllm-router --features tls --test integration tls::

## Formatting and lints, as CI runs them.
lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings
	$(CARGO) clippy --locked -p vllm-router --all-targets --features tls -- -D warnings

## Two mock vLLM servers on 8081 and 8082 (as in ./servers.toml) and the router on
## 8888. Ctrl-C stops all three.
demo: build tools
	@set -e; \
	trap 'kill $$M1 $$M2 $$R 2>/dev/null; wait 2>/dev/null; echo; echo "demo stopped"' INT TERM EXIT; \
	$(MOCK_BIN) --port 8081 --id gpu-1 --first-token-ms 250 --delay-ms 150 --tokens 20 > /dev/null & M1=$$!; \
	$(MOCK_BIN) --port 8082 --id gpu-2 --first-token-ms 250 --delay-ms 150 --tokens 20 > /dev/null & M2=$$!; \
	$(RELEASE_BIN) run --config ./servers.toml --console & R=$$!; \
	sleep 1; \
	echo; \
	echo "Try, in another terminal:"; \
	echo "  curl -N localhost:8888/v1/chat/completions -H 'Content-Type: application/json' \\"; \
	echo "       -d '{\"model\":\"mock-model\",\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}'"; \
	echo "  curl -s localhost:8888/load-stats"; \
	echo "  $(RELEASE_BIN) top"; \
	echo; \
	wait $$R

clean:
	$(CARGO) clean

## A fully static x86_64 Linux binary in target/static/vllm-router, checked to be
## static (no interpreter, no shared libraries): copy it to any x86_64 Linux host.
static:
	CARGO="$(CARGO)" FEATURES="$(FEATURES)" ./deploy/static.sh

$(STATIC_BIN):
	CARGO="$(CARGO)" FEATURES="$(FEATURES)" ./deploy/static.sh

## Install the static binary, /etc/vllm-router/servers.toml (kept if present), the
## systemd unit and the logrotate file. Build first (`make static`), then as root
## `make install`; DESTDIR stages the tree elsewhere.
install: $(STATIC_BIN)
	install -d $(DESTDIR)$(PREFIX)/bin
	install -m 0755 $(STATIC_BIN) $(DESTDIR)$(PREFIX)/bin/vllm-router
	install -d -m 0755 $(DESTDIR)/etc/vllm-router
	@if [ -e $(DESTDIR)/etc/vllm-router/servers.toml ]; then \
		echo "keeping existing $(DESTDIR)/etc/vllm-router/servers.toml"; \
	else \
		install -m 0644 servers.toml $(DESTDIR)/etc/vllm-router/servers.toml; \
	fi
	install -d $(DESTDIR)$(SYSTEMD_UNIT_DIR)
	sed 's|/usr/local/bin/vllm-router|$(PREFIX)/bin/vllm-router|g' deploy/systemd/vllm-router.service \
		> $(DESTDIR)$(SYSTEMD_UNIT_DIR)/vllm-router.service.tmp
	chmod 0644 $(DESTDIR)$(SYSTEMD_UNIT_DIR)/vllm-router.service.tmp
	mv -f $(DESTDIR)$(SYSTEMD_UNIT_DIR)/vllm-router.service.tmp $(DESTDIR)$(SYSTEMD_UNIT_DIR)/vllm-router.service
	install -d $(DESTDIR)/etc/logrotate.d
	install -m 0644 deploy/logrotate/vllm-router $(DESTDIR)/etc/logrotate.d/vllm-router
	@echo "installed; now: systemctl daemon-reload && systemctl enable --now vllm-router"

## Deployment checks (CI runs them after `make test`): Dockerfile lint, compose and
## Kubernetes manifests, Helm chart render, systemd unit, logrotate, and the static
## binary run from an empty directory up to /readyz and a clean SIGTERM exit.
deploy-check:
	CARGO="$(CARGO)" ./deploy/check.sh

## A bounded soak on 127.0.0.1 (SOAK_SECONDS, default 180): the release router with
## two mocks and client keys on, normal streams and JSON replies checked byte-exact
## against the mocks, mixed with every hostile input the router refuses; then
## in-flight counts 0, threads near their start, RSS near its figure after the warm-up,
## no accept-loop restart. Exits non-zero on a failure.
soak: build tools
	$(TARGET_DIR)/release/soak

## The benchmark of issue 7 (docs/benchmark.md): the mock directly, through the router
## and through nginx, side by side on 127.0.0.1, in about 4 minutes. Installs nginx
## (Debian) when it is missing and root may; otherwise the benchmark runs without it.
## Exits non-zero when a run had errors; a target missed is reported, not a failure.
.PHONY: bench
bench: build tools
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || \
		{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		  { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null 2>&1 || \
		    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null; }; }; } || \
		echo "nginx not installed and cannot be installed here: the benchmark skips it"
	$(TARGET_DIR)/release/bench
	$(CARGO) bench --locked -p vllm-router --bench decision

## Fuzz the request framing and the chunked decoder (fuzz/, cargo-fuzz), each target for
## FUZZ_SECONDS (default 60); not part of `make test`. Installs cargo-fuzz when missing.
## Uses rustup's nightly when there is one, else the default toolchain with
## RUSTC_BOOTSTRAP=1 (FUZZ_TOOLCHAIN=stable forces that; FUZZ_FLAGS adds cargo-fuzz flags).
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := request_framing chunked_decoder
FUZZ_TOOLCHAIN ?= $(shell rustup toolchain list 2>/dev/null | grep -q '^nightly' && echo nightly)
FUZZ_CARGO = $(if $(filter nightly%,$(FUZZ_TOOLCHAIN)),,RUSTC_BOOTSTRAP=1 )$(CARGO)$(if $(FUZZ_TOOLCHAIN), +$(FUZZ_TOOLCHAIN))
FUZZ_FLAGS ?=
.PHONY: fuzz
fuzz:
	@$(CARGO) fuzz --version >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked
	$(FUZZ_CARGO) fuzz build $(FUZZ_FLAGS)
	@set -e; for t in $(FUZZ_TARGETS); do \
		mkdir -p fuzz/corpus/$$t; \
		echo "fuzz: $$t for $(FUZZ_SECONDS) s"; \
		$(FUZZ_CARGO) fuzz run $(FUZZ_FLAGS) $$t fuzz/corpus/$$t fuzz/seeds/$$t -- \
			-max_total_time=$(FUZZ_SECONDS); \
	done
