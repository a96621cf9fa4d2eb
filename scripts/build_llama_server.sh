#!/usr/bin/env bash
# Build llama.cpp's `llama-server` once, into a per-user cache.
#
# The sources are the llama.cpp tree vendored in the llama-cpp-python sdist (pinned below), so the
# server matches the llama.cpp version that `llama_cpp` (Python) uses.  Only the `llama-server`
# target is built (CPU backend, static libs, no curl/OpenSSL, no web UI download): no network is
# needed once the sdist is in hand.
#
# Usage:
#   scripts/build_llama_server.sh               # build if needed; last stdout line = binary path
#   scripts/build_llama_server.sh --print-path  # print the path; exit 0 if built, 1 if not
#   scripts/build_llama_server.sh --force       # rebuild even if a working binary is cached
#
# Environment:
#   CNA_FAST_CACHE            cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/cna_fast)
#   LLAMA_CPP_PYTHON_VERSION  llama-cpp-python version whose vendored llama.cpp is built (0.3.36)
#   LLAMA_CPP_PYTHON_SDIST    path to an already downloaded llama_cpp_python-<v>.tar.gz (offline)
#   CNA_BUILD_JOBS            parallel compile jobs (default 2)
#   CNA_LLAMA_NATIVE          ON/OFF for GGML_NATIVE, i.e. -march=native (default ON)
#   CNA_KEEP_BUILD_DIR        1 keeps the work directory (sources + objects) after success
#   PYTHON                    interpreter whose pip downloads the sdist (default python3)
#
# Build logs go to stderr; stdout carries only the final path.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"

CACHE="${CNA_FAST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cna_fast}"
PREFIX="$CACHE/llama.cpp/$LLAMA_CPP_PYTHON_VERSION"
BIN_DIR="$PREFIX/bin"
BIN="$BIN_DIR/llama-server"
WORK="$PREFIX/work"
JOBS="${CNA_BUILD_JOBS:-2}"
NATIVE="${CNA_LLAMA_NATIVE:-ON}"
PY="${PYTHON:-python3}"

log() { printf '[build_llama_server] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

binary_works() {
    [[ -x "$BIN" ]] && "$BIN" --version >/dev/null 2>&1
}

FORCE=0
for arg in "$@"; do
    case "$arg" in
        --print-path)
            echo "$BIN"
            if binary_works; then exit 0; else exit 1; fi
            ;;
        --force) FORCE=1 ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        *) die "unknown argument: $arg (expected --print-path, --force or --help)" ;;
    esac
done

if [[ "$FORCE" == 0 ]] && binary_works; then
    log "already built: $BIN"
    echo "$BIN"
    exit 0
fi

for tool in cmake c++ tar; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found on PATH"
done

mkdir -p "$PREFIX"

# One build at a time per version: a second caller waits, then finds the binary.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$PREFIX/.lock"
    if ! flock -n 9; then
        log "another build holds $PREFIX/.lock; waiting"
        flock 9
    fi
    if [[ "$FORCE" == 0 ]] && binary_works; then
        log "built by a concurrent run: $BIN"
        echo "$BIN"
        exit 0
    fi
fi

mkdir -p "$WORK"
SDIST_NAME="llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
SDIST="$WORK/$SDIST_NAME"

# 1. The sdist (kept in WORK so an interrupted build resumes without downloading again).
if [[ -n "${LLAMA_CPP_PYTHON_SDIST:-}" ]]; then
    [[ -f "$LLAMA_CPP_PYTHON_SDIST" ]] || die "LLAMA_CPP_PYTHON_SDIST=$LLAMA_CPP_PYTHON_SDIST is not a file"
    cp -f "$LLAMA_CPP_PYTHON_SDIST" "$SDIST.part" && mv -f "$SDIST.part" "$SDIST"
elif [[ ! -s "$SDIST" ]] || ! tar tzf "$SDIST" >/dev/null 2>&1; then
    DL="$(mktemp -d "$WORK/download.XXXXXX")"
    spec="llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
    log "downloading the $spec sdist"
    # pip prepares the sdist's metadata after downloading it; --no-build-isolation needs the
    # backend (scikit-build-core) installed, so retry with isolation when it is not.
    if ! "$PY" -m pip download --no-binary :all: --no-deps --no-build-isolation "$spec" -d "$DL" >&2; then
        log "retrying without --no-build-isolation (build backend not installed here)"
        "$PY" -m pip download --no-binary :all: --no-deps "$spec" -d "$DL" >&2
    fi
    [[ -f "$DL/$SDIST_NAME" ]] || die "pip did not produce $SDIST_NAME (got: $(ls "$DL"))"
    mv -f "$DL/$SDIST_NAME" "$SDIST"
    rm -rf "$DL"
fi

# 2. Extract (once; a marker file records a complete extraction).
SRC_ROOT="$WORK/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION"
LLAMA_SRC="$SRC_ROOT/vendor/llama.cpp"
if [[ ! -f "$WORK/.extracted" ]]; then
    rm -rf "$SRC_ROOT"
    log "extracting $SDIST"
    tar xzf "$SDIST" -C "$WORK"
    touch "$WORK/.extracted"
fi
[[ -f "$LLAMA_SRC/CMakeLists.txt" ]] || die "no vendored llama.cpp in $SRC_ROOT"

# 3. Configure and build only the server.
#    LLAMA_CURL is gone from this llama.cpp (deprecated, ignored); model download there uses
#    cpp-httplib, and OpenSSL is turned off so nothing HTTPS is linked.  The web UI is neither
#    built with npm nor downloaded from Hugging Face (the server then serves no UI; the API works).
BUILD="$WORK/build"
GEN=()
if command -v ninja >/dev/null 2>&1 && [[ ! -f "$BUILD/Makefile" ]]; then
    GEN=(-G Ninja)
fi
log "configuring in $BUILD"
cmake -S "$LLAMA_SRC" -B "$BUILD" "${GEN[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE="$NATIVE" \
    -DLLAMA_BUILD_COMMON=ON \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_TOOLS_INSTALL=OFF >&2
log "building llama-server with -j $JOBS (10-30 min on 2 cores)"
start=$(date +%s)
cmake --build "$BUILD" --target llama-server -j "$JOBS" >&2
log "compiled in $(( $(date +%s) - start )) s"

BUILT="$BUILD/bin/llama-server"
[[ -x "$BUILT" ]] || die "build finished but $BUILT is missing"
"$BUILT" --version >&2 || die "$BUILT --version failed"

# 4. Install atomically: copy to a temporary name in the same directory, then rename.
mkdir -p "$BIN_DIR"
TMP_BIN="$(mktemp "$BIN_DIR/.llama-server.XXXXXX")"
cp -f "$BUILT" "$TMP_BIN"
chmod 755 "$TMP_BIN"
mv -f "$TMP_BIN" "$BIN"
binary_works || die "installed $BIN does not run"

if [[ "${CNA_KEEP_BUILD_DIR:-0}" != 1 ]]; then
    rm -rf "$WORK"
fi
log "installed $BIN"
echo "$BIN"
