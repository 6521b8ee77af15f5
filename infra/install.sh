#!/usr/bin/env bash
# Set up gleaner in ./.venv from the lock, with a llama.cpp build that runs on any CPU.
#
#   infra/install.sh            # the README's set-up command; .ci/run runs it too
#
# 1. A virtual environment (.venv, or $GLEANER_VENV) with pip/setuptools/wheel from the lock.
# 2. llama-cpp-python (the offline rater and judge) compiled once, portably: no -march=native.
#    On Linux x86-64 and arm64 it is upstream's runtime-dispatch build (GGML_BACKEND_DL with
#    GGML_CPU_ALL_VARIANTS): every CPU variant of ggml is built (x86: SSE4.2 ... AVX-512, AMX),
#    and gleaner picks, on each machine, the best one that passes a real decode
#    (gleaner/llm/llama_build.py). The wheel is kept in a wheelhouse keyed by version and
#    build flags ($GLEANER_WHEELHOUSE, default ~/.cache/gleaner/wheels) and installed with
#    --only-binary, so pip can never fall back to a natively built wheel from its own cache.
# 3. gleaner itself, editable, with the dev and local-llm extras, every version from
#    infra/lock/constraints.txt (refresh: python3 infra/lock/refresh.py).
# 4. A check that the installed llama.cpp build is the portable one and that a variant runs.
#
# The first run compiles llama.cpp (about 8 minutes on 2 cores); later runs reuse the wheel.
# Settings (env): PYTHON (python3), GLEANER_VENV (.venv), GLEANER_EXTRAS (dev,local-llm),
# GLEANER_WHEELHOUSE, GLEANER_LLAMA_CMAKE_ARGS (replace the build flags, e.g. for CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1

PYTHON="${PYTHON:-python3}"
VENV="${GLEANER_VENV:-.venv}"
EXTRAS="${GLEANER_EXTRAS:-dev,local-llm}"
LOCK="infra/lock/constraints.txt"
WHEELHOUSE="${GLEANER_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/gleaner/wheels}"

say() { echo "install: $*" >&2; }
pinned() { sed -n "s/^$1==\(.*\)$/\1/p" "$LOCK"; }

LLAMA_VERSION="$(pinned llama-cpp-python)"
[ -n "$LLAMA_VERSION" ] || { say "no llama-cpp-python pin in $LOCK"; exit 1; }

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64|Linux-aarch64|Linux-arm64)
    # Every CPU variant, chosen at run time; installed beside libggml so gleaner finds them.
    DEFAULT_FLAGS="-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DLLAVA_BUILD=OFF -DCMAKE_INSTALL_BINDIR=llama_cpp/lib" ;;
  *)
    # Elsewhere (macOS: Metal), upstream's defaults minus the native CPU flags.
    DEFAULT_FLAGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" ;;
esac
FLAGS="${GLEANER_LLAMA_CMAKE_ARGS:-$DEFAULT_FLAGS}"
FLAGS_ID="$(printf '%s|%s' "$(uname -sm)" "$FLAGS" | sha256sum | cut -c1-12)"
WHEEL_DIR="$WHEELHOUSE/llama-cpp-python-$LLAMA_VERSION-$FLAGS_ID"

say "virtual environment $VENV"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q -c "$LOCK" --upgrade pip setuptools wheel

if ! ls "$WHEEL_DIR"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  say "compiling llama-cpp-python $LLAMA_VERSION once (about 8 minutes on 2 cores): $FLAGS"
  mkdir -p "$WHEELHOUSE"
  BUILD_DIR="$(mktemp -d "$WHEELHOUSE/.build-XXXXXX")"
  trap 'rm -rf "$BUILD_DIR"' EXIT
  CMAKE_ARGS="$FLAGS" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}" \
    "$VENV/bin/python" -m pip wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python \
    -c "$LOCK" "llama-cpp-python==$LLAMA_VERSION" -w "$BUILD_DIR" >"$BUILD_DIR/build.log" 2>&1 || {
      tail -n 40 "$BUILD_DIR/build.log" >&2; say "the llama-cpp-python build failed"; exit 1; }
  printf '%s\n' "$FLAGS" >"$BUILD_DIR/cmake-args.txt"
  rm -f "$BUILD_DIR/build.log"
  mkdir -p "$(dirname "$WHEEL_DIR")" && rm -rf "$WHEEL_DIR" && mv "$BUILD_DIR" "$WHEEL_DIR"
  trap - EXIT
else
  say "reusing the portable llama-cpp-python wheel in $WHEEL_DIR"
fi

case ",$EXTRAS," in
  *,local-llm,*)
    # Always this wheel, even over an installed llama-cpp-python of the same version (which
    # may be a native build from an earlier plain `pip install`).
    "$VENV/bin/python" -m pip install -q --force-reinstall --no-deps "$WHEEL_DIR"/llama_cpp_python-*.whl ;;
esac
say "gleaner[$EXTRAS] from $LOCK"
"$VENV/bin/python" -m pip install -q -c "$LOCK" --find-links "$WHEEL_DIR" \
  --only-binary llama-cpp-python -e ".[$EXTRAS]"

case ",$EXTRAS," in
  *,local-llm,*)
    say "checking the llama.cpp build (a real decode on this CPU)"
    "$VENV/bin/python" -m gleaner.llm.llama_build --check ;;
esac
say "done: $VENV/bin/gleaner --help"
