#!/usr/bin/env bash
# Builds a fully static x86_64 Linux vllm-router (`make static`), checks that it is
# static, and copies it to target/static/vllm-router (under CARGO_TARGET_DIR if set).
#
# musl (x86_64-unknown-linux-musl) is preferred: a static-pie with musl's own resolver,
# which reads /etc/hosts and /etc/resolv.conf itself, so the binary runs on any x86_64
# Linux and in a `scratch` image. If the musl target cannot be installed (rustup
# missing, or no way to download it), static glibc (+crt-static) is built instead.
# STATIC_KIND=musl or STATIC_KIND=glibc forces one.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO=${CARGO:-cargo}
MUSL=x86_64-unknown-linux-musl
GNU=x86_64-unknown-linux-gnu
kind=${STATIC_KIND:-auto}
tgt=${CARGO_TARGET_DIR:-target}
out_dir=$tgt/static

have_musl() {
    command -v rustup >/dev/null 2>&1 || return 1
    rustup target list --installed 2>/dev/null | grep -qx "$MUSL" && return 0
    echo "static: installing the $MUSL target (rustup target add)" >&2
    rustup target add "$MUSL" >&2
}

case "$kind" in
    musl) have_musl || { echo "static: cannot install $MUSL" >&2; exit 1; } ;;
    glibc) ;;
    auto)
        if have_musl; then
            kind=musl
        else
            echo "static: the $MUSL target is not available here; building static glibc instead" >&2
            kind=glibc
        fi
        ;;
    *) echo "static: STATIC_KIND must be musl, glibc or auto" >&2; exit 2 ;;
esac

if [ "$kind" = musl ]; then
    "$CARGO" build --release --locked --target "$MUSL" --bin vllm-router ${FEATURES:+--features "$FEATURES"}
    bin=$tgt/$MUSL/release/vllm-router
else
    # With --target, RUSTFLAGS reach only the target's code, not build scripts.
    RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
        "$CARGO" build --release --locked --target "$GNU" --bin vllm-router ${FEATURES:+--features "$FEATURES"}
    bin=$tgt/$GNU/release/vllm-router
fi

# Static means: no program interpreter (dynamic loader) and no shared-library needs.
if readelf -lW "$bin" | grep -q 'INTERP'; then
    echo "static: $bin has a program interpreter: it is dynamically linked" >&2
    readelf -lW "$bin" | grep -A1 INTERP >&2
    exit 1
fi
if readelf -dW "$bin" | grep -q '(NEEDED)'; then
    echo "static: $bin needs shared libraries:" >&2
    readelf -dW "$bin" | grep '(NEEDED)' >&2
    exit 1
fi
if command -v ldd >/dev/null 2>&1; then
    # glibc's ldd says "not a dynamic executable" or "statically linked"; never a list.
    if ldd "$bin" 2>&1 | grep -q '=>'; then
        echo "static: ldd lists shared libraries for $bin" >&2
        exit 1
    fi
fi
"$bin" --version >/dev/null

mkdir -p "$out_dir"
cp -f "$bin" "$out_dir/vllm-router.tmp"
mv -f "$out_dir/vllm-router.tmp" "$out_dir/vllm-router"
echo "$kind" > "$out_dir/KIND"
size=$(stat -c %s "$out_dir/vllm-router")
echo "static: $out_dir/vllm-router ($kind, $size bytes): $(file -b "$out_dir/vllm-router" 2>/dev/null || echo 'no file(1) here')"
