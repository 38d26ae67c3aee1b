#!/usr/bin/env bash
# Build llama.cpp's C++ llama-server from the source that the installed llama-cpp-python
# vendors, so the benchmarks compare against the very same llama.cpp. Cached: the binary
# lands in ${XDG_CACHE_HOME:-~/.cache}/ensemble-ops/bench/llama-server-VERSION and later calls
# only print its path. Needs cmake, ninja and g++ (Debian: cmake ninja-build g++); about
# 6 minutes on 2 cores the first time.
set -euo pipefail
python="${PYTHON:-python3}"
version="$("$python" -c 'import llama_cpp; print(llama_cpp.__version__)')"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/ensemble-ops/bench"
binary="$cache/llama-server-$version"
if [[ -x "$binary" ]]; then
    echo "$binary"
    exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$python" -m pip download -q --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$version" >&2
tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
src="$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)"
cmake -S "$src" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
    -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$work/build" --target llama-server >&2
mkdir -p "$cache"
install -m 0755 "$work/build/bin/llama-server" "$binary"
echo "$binary"
