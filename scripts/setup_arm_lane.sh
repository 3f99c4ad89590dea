#!/usr/bin/env bash
# Prepare the aarch64 emulation lane of the test suite (tests/backends/test_tvm_aarch64.py).
#
#   scripts/setup_arm_lane.sh [PYTHON]      PYTHON: the project's venv python (default .venv/bin/python)
#
# 1. Host tools from Debian: qemu-user-static (runs aarch64 binaries), gcc/g++-aarch64-linux-gnu (TVM's
#    cross-linker for export_library). Installed with apt-get when missing (needs root).
# 2. An arm64 root under $DEPTHFOLD_CACHE/arm64-root (default ~/.cache/depthfold/arm64-root): Debian arm64
#    python3.11 and the libraries it needs, unpacked with dpkg -x (nothing is installed on the host), plus
#    aarch64 wheels of apache-tvm and apache-tvm-ffi (the venv's versions), numpy, ml_dtypes and
#    typing_extensions unzipped into <root>/opt/site.
#
# Idempotent: a stamp file records what the root was built from; when it matches, the script only checks the
# host tools and exits in well under a second. Set DEPTHFOLD_ARM_LANE=0 to skip everything (the lane's tests
# then skip and say so). onnxruntime's aarch64 wheel crashes at import under qemu, so it is not in the root.
set -euo pipefail

PY=${1:-.venv/bin/python}
if [[ "${DEPTHFOLD_ARM_LANE:-1}" == "0" ]]; then
    echo "arm lane: DEPTHFOLD_ARM_LANE=0, skipping setup"
    exit 0
fi

CACHE=${DEPTHFOLD_CACHE:-$HOME/.cache/depthfold}
ROOT="$CACHE/arm64-root"
WORK="$CACHE/arm64-work"
DEBS="python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libstdc++6 libgcc-s1 libc6 libffi8 zlib1g libexpat1 libbz2-1.0 liblzma5 libssl3 libuuid1 libgomp1"
WHEELS="numpy ml_dtypes typing_extensions"

die() { echo "arm lane setup FAILED: $*" >&2; exit 1; }

apt_retry() {  # apt-get with retries: mirrors hiccup, and CI must not fail on one dropped connection
    local i
    for i in 1 2 3; do
        if "$@"; then return 0; fi
        echo "arm lane: '$*' failed (try $i of 3), retrying in 5 s" >&2
        sleep 5
    done
    return 1
}

# --- 1. host tools ---------------------------------------------------------------------------------------
missing=()
command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
command -v aarch64-linux-gnu-g++ >/dev/null || missing+=(g++-aarch64-linux-gnu)
command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu)
command -v dpkg >/dev/null || die "dpkg not found: the lane needs a Debian-based machine (or DEPTHFOLD_ARM_LANE=0)"
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        die "missing ${missing[*]}; install with: sudo apt-get install -y ${missing[*]} (or DEPTHFOLD_ARM_LANE=0)"
    fi
    echo "arm lane: installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt_retry apt-get update -qq || die "apt-get update failed"
    apt_retry apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || die "apt-get install ${missing[*]} failed"
fi

# --- 2. arm64 root ---------------------------------------------------------------------------------------
# The arm64 side gets exactly the venv's apache-tvm and apache-tvm-ffi, so libraries built here load there.
TVM_VERSION=$("$PY" -c 'import importlib.metadata as m; print(m.version("apache-tvm"))' 2>/dev/null) \
    || die "apache-tvm is not installed in $PY; run: $PY -m pip install 'apache-tvm>=0.27'"
FFI_VERSION=$("$PY" -c 'import importlib.metadata as m; print(m.version("apache-tvm-ffi"))' 2>/dev/null) \
    || die "apache-tvm-ffi is not installed in $PY; reinstall apache-tvm"
STAMP_WANT="tvm=$TVM_VERSION ffi=$FFI_VERSION debs=$DEBS wheels=$WHEELS v1"
root_ready() {
    [[ -f "$ROOT/.depthfold-stamp" && "$(cat "$ROOT/.depthfold-stamp")" == "$STAMP_WANT" \
       && -x "$ROOT/usr/bin/python3.11" ]]
}
if root_ready; then
    exit 0
fi
# One builder at a time (two test runs sharing a cache): the second waits, then finds the root ready.
mkdir -p "$CACHE"
exec 9>"$ROOT.lock"
if ! flock -n 9; then
    echo "arm lane: waiting for another process building $ROOT"
    flock 9
fi
if root_ready; then
    exit 0
fi

echo "arm lane: building the arm64 root in $ROOT (Debian arm64 python3.11 + aarch64 wheels, apache-tvm $TVM_VERSION)"
rm -rf "$WORK" "$ROOT.tmp"
mkdir -p "$WORK/lists/partial" "$WORK/archives/partial" "$WORK/cache" "$ROOT.tmp/opt/site"
: > "$WORK/status"
# A private apt state (lists, cache, empty dpkg status) for arm64 only: the host's apt state is untouched, and
# the empty status makes apt download the whole dependency closure of the packages named.
APT=(apt-get -q -o APT::Architecture=arm64 -o APT::Architectures=arm64
     -o Dir::State::Lists="$WORK/lists" -o Dir::State::status="$WORK/status"
     -o Dir::Cache="$WORK/cache" -o Dir::Cache::archives="$WORK/archives" -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
apt_retry "${APT[@]}" update >/dev/null || die "apt-get update for arm64 failed"
# shellcheck disable=SC2086
apt_retry "${APT[@]}" install -y --download-only --no-install-recommends $DEBS >/dev/null \
    || die "downloading arm64 .debs ($DEBS) failed"
for deb in "$WORK"/archives/*.deb; do
    dpkg -x "$deb" "$ROOT.tmp"
done
[[ -x "$ROOT.tmp/usr/bin/python3.11" ]] || die "arm64 python3.11 missing after unpacking the .debs"
# Debian's libc6 puts the loader in /usr/lib but points at /lib; qemu -L resolves /lib inside the root.
if [[ ! -e "$ROOT.tmp/lib" ]]; then ln -s usr/lib "$ROOT.tmp/lib"; fi

# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
    --implementation cp --dest "$WORK/wheels" "apache-tvm==$TVM_VERSION" "apache-tvm-ffi==$FFI_VERSION" $WHEELS \
    || die "pip download of the aarch64 wheels failed"
for whl in "$WORK"/wheels/*.whl; do
    "$PY" -m zipfile -e "$whl" "$ROOT.tmp/opt/site" >/dev/null
done
echo "$STAMP_WANT" > "$ROOT.tmp/.depthfold-stamp"
rm -rf "$ROOT"
mv "$ROOT.tmp" "$ROOT"
rm -rf "$WORK"
echo "arm lane: ready ($(du -sh "$ROOT" | cut -f1))"
