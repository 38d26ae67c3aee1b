#!/usr/bin/env bash
# CUDA verification of ensemble-ops on an NVIDIA GPU machine without network access.
#
# Run from the repository root on the GPU machine (x86-64, nvcc + CMake + ninja, NVIDIA
# driver, Python 3.11+):
#
#     bash benchmarks/gpu_check.sh                  # arguments go to benchmarks.gpu_check
#     bash benchmarks/gpu_check.sh --reloads 10
#
# It creates a virtual environment ($GPU_CHECK_VENV, default build/gpu-check-venv), installs
# llama-cpp-python with CUDA and the project (`pip install --no-index --find-links .whl
# -e '.[gpu]'`, plus httpx for the load generator), runs `python -m benchmarks.gpu_check
# "$@"` and tees everything to benchmarks/results/gpu_check.log (and to $OUT/gpu_check.log,
# with a copy of gpu_check.json, when OUT is set). The check writes
# benchmarks/results/gpu_check.json. A second run reuses the venv when its llama_cpp
# already offloads to the GPU (GPU_CHECK_REINSTALL=1 forces a new install), so the build
# and the check can be two commands on the same machine:
#
#     GPU_CHECK_BUILD_ONLY=1 bash benchmarks/gpu_check.sh   # install or build, then stop
#     bash benchmarks/gpu_check.sh                          # the check, a minute or three
#
# Nothing is fetched: every package comes from .whl/ ($WHL_DIR). Two ways to get a CUDA
# llama-cpp-python, tried in this order:
#
#   A. A pre-built CUDA wheel .whl/llama_cpp_python-*.whl: installed as it is.
#   B. Otherwise the sdist llama_cpp_python-*.tar.gz, from .whl/ or else found by name
#      under pip's cache directory, is built here with
#          CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90" FORCE_CMAKE=1
#      (sm_90: H100 and H200; override with CMAKE_ARGS=...). It compiles llama.cpp's CUDA
#      kernels (144 nvcc units for 0.3.36): several minutes on 16 cores. Adding
#      -DGGML_CUDA_FA=OFF skips the 37 FlashAttention units, which ensemble-ops never uses
#      (llama-cpp-python's flash_attn defaults to False). The wheel is kept in
#      build/gpu-check-wheel/. Where the toolkit lacks cuBLAS or libcuda.so (cuBLAS from
#      pip's nvidia-cublas wheel, as in PyTorch images), the script points CMake at them.
#
# Filling .whl/ beforehand, on a machine WITH network, from the repository root. Match the
# GPU machine's Python (3.12 below; `python3 -V` there) and x86-64 Linux:
#
#   mkdir -p .whl
#   # 1. quantile-python (needed by aioprometheus) exists only as an sdist: make its
#   #    pure-Python wheel.
#   python3 -m pip wheel --no-deps -w .whl quantile-python==1.1
#   # 2. binary wheels of the project's dependencies (except llama-cpp-python), nvidia-ml-py,
#   #    httpx, llama-cpp-python's own dependencies and the two build backends:
#   python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]
#   print("\n".join(d for d in p["dependencies"] + p["optional-dependencies"]["gpu"]
#                   if not d.startswith("llama-cpp-python")))' > /tmp/gpu-check-reqs.txt
#   python3 -m pip download -d .whl --find-links .whl --only-binary=:all: \
#       --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 \
#       -r /tmp/gpu-check-reqs.txt 'httpx>=0.27' 'hatchling>=1.25' 'editables>=0.3' \
#       'scikit-build-core>=0.9.2' 'typing-extensions>=4.5.0' 'diskcache>=5.6.1' \
#       'jinja2>=2.11.3'
#   # 3a. way A: build the CUDA wheel where nvcc is (same CUDA major version as the GPU
#   #     machine's toolkit and driver):
#   CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90" FORCE_CMAKE=1 \
#       python3 -m pip wheel --no-deps --no-cache-dir -w .whl 'llama-cpp-python==0.3.36'
#   # 3b. way B: the sdist only (built on the GPU machine by this script):
#   python3 -m pip download -d .whl --no-deps --no-binary=:all: 'llama-cpp-python==0.3.36'
#
# The 0.3.36 sdist is 73 MiB, mostly a .git pack and llama.cpp's vocabulary test files,
# none needed to build; where .whl/ must travel under a size limit, slim it to about 13 MB:
#
#   tmp=$(mktemp -d) && tar -xzf .whl/llama_cpp_python-0.3.36.tar.gz -C "$tmp" &&
#   tar -czf .whl/llama_cpp_python-0.3.36.tar.gz -C "$tmp" \
#       --exclude=llama_cpp_python-0.3.36/.git \
#       --exclude='llama_cpp_python-0.3.36/vendor/llama.cpp/models/*.gguf' \
#       --exclude=llama_cpp_python-0.3.36/vendor/llama.cpp/docs llama_cpp_python-0.3.36
#
# By default (GPU_CHECK_INHERIT_SITE=1) the venv also sees, after its own packages, the
# site-packages of the python3 that creates it (a .pth file): on an image that already holds
# numpy, psutil, httpx, jinja2, nvidia-ml-py or scikit-build-core they need not be in .whl/.
# GPU_CHECK_INHERIT_SITE=0 makes a plain, isolated venv.
#
# Environment: PYTHON (python3), GPU_CHECK_VENV (build/gpu-check-venv), WHL_DIR (.whl),
# CMAKE_ARGS, CUDA_HOME (/usr/local/cuda, else where nvcc is), GPU_CHECK_REINSTALL (0),
# GPU_CHECK_BUILD_ONLY (0), GPU_CHECK_INHERIT_SITE (1), OUT (unset).

set -euo pipefail

PYTHON=${PYTHON:-python3}
VENV=${GPU_CHECK_VENV:-build/gpu-check-venv}
WHL_DIR=${WHL_DIR:-.whl}
RESULTS_DIR=benchmarks/results
CUDA_CMAKE_ARGS=${CMAKE_ARGS:-"-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90"}

log() {
    printf '\n[gpu_check.sh %s] %s\n' "$(date -u +%H:%M:%S)" "$*"
}

die() {
    printf '\n[gpu_check.sh] ERROR: %s\n' "$*" >&2
    exit 3
}

vpython() {
    "$VENV/bin/python" "$@"
}

# pip, offline: only what .whl/ (and the inherited site-packages) hold.
vpip() {
    vpython -m pip --disable-pip-version-check "$@"
}

# The site-packages folders of the interpreter $1, one a line.
site_packages() {
    "$1" -c 'import site; print("\n".join(site.getsitepackages()))' 2>/dev/null || true
}

add_library_path() {
    case ":${LD_LIBRARY_PATH:-}:" in
    *":$1:"*) ;;
    *) export LD_LIBRARY_PATH="$1${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
    esac
}

# The first file named $1 (a pattern) under the NVIDIA wheels (nvidia/...) of $PYTHON's
# site-packages, where images built around PyTorch keep cuBLAS.
find_in_nvidia_wheels() {
    local root found
    while read -r root; do
        [[ -d "$root/nvidia" ]] || continue
        found=$(find "$root/nvidia" -name "$1" -print -quit 2>/dev/null || true)
        if [[ -n "$found" ]]; then
            printf '%s\n' "$found"
            return 0
        fi
    done < <(site_packages "$PYTHON")
    return 0
}

# The first file named $1 (a pattern) directly in (or, for stubs/, below) the folders $2...
first_file_in() {
    local pattern=$1
    shift
    (($#)) || return 0
    find "$@" -maxdepth 2 -name "$pattern" -print -quit 2>/dev/null || true
}

# nvcc on PATH, the toolkit's libraries on LD_LIBRARY_PATH, and EXTRA_CMAKE_ARGS for what a
# partial toolkit lacks: cuBLAS (taken from the nvidia-cublas wheel) or libcuda.so (taken
# from the driver).
setup_cuda_env() {
    local cuda_home=${CUDA_HOME:-/usr/local/cuda}
    if [[ ! -x "$cuda_home/bin/nvcc" ]] && command -v nvcc >/dev/null 2>&1; then
        # nvcc may be a wrapper script elsewhere; a link resolves to the toolkit.
        cuda_home=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    fi
    if [[ -x "$cuda_home/bin/nvcc" ]]; then
        export PATH="$cuda_home/bin:$PATH" CUDACXX="$cuda_home/bin/nvcc"
    fi
    local dir lib_dirs=()
    for dir in "$cuda_home/lib64" "$cuda_home/targets/x86_64-linux/lib"; do
        if [[ -d "$dir" ]]; then
            lib_dirs+=("$dir")
            add_library_path "$dir"
        fi
    done
    EXTRA_CMAKE_ARGS=()
    if [[ -z "$(first_file_in 'libcublas.so*' "${lib_dirs[@]}")" ]]; then
        local cublas cublas_lt header
        cublas=$(find_in_nvidia_wheels 'libcublas.so.*')
        cublas_lt=$(find_in_nvidia_wheels 'libcublasLt.so.*')
        header=$(find_in_nvidia_wheels 'cublas_v2.h')
        if [[ -n "$cublas" && -n "$cublas_lt" ]]; then
            echo "cuBLAS: not in $cuda_home; using $cublas (header: ${header:-none})"
            EXTRA_CMAKE_ARGS+=("-DCUDA_cublas_LIBRARY=$cublas" "-DCUDA_cublasLt_LIBRARY=$cublas_lt")
            if [[ -n "$header" ]]; then
                EXTRA_CMAKE_ARGS+=("-DCMAKE_CUDA_FLAGS=-I$(dirname "$header")")
                EXTRA_CMAKE_ARGS+=("-DCMAKE_CXX_FLAGS=-I$(dirname "$header")")
            fi
            add_library_path "$(dirname "$cublas")"
        else
            echo "WARNING: no cuBLAS in $cuda_home nor in $PYTHON's nvidia wheels" >&2
        fi
    fi
    if [[ -z "$(first_file_in 'libcuda.so' "${lib_dirs[@]}")" ]]; then
        local driver
        driver=$({ ldconfig -p 2>/dev/null || true; } |
            awk '$1 ~ /^libcuda\.so(\.1)?$/ {print $NF}' | head -n 1 || true)
        for dir in /usr/local/nvidia/lib64 /usr/lib/x86_64-linux-gnu /usr/lib64; do
            if [[ -z "$driver" && -e "$dir/libcuda.so.1" ]]; then
                driver="$dir/libcuda.so.1"
            fi
        done
        if [[ -n "$driver" ]]; then
            echo "libcuda.so: not in $cuda_home; using the driver's $driver"
            EXTRA_CMAKE_ARGS+=("-DCUDA_cuda_driver_LIBRARY=$driver")
        fi
    fi
}

print_machine() {
    log "machine"
    uname -srm
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv || true
    else
        echo "nvidia-smi: not found"
    fi
    nvcc --version 2>/dev/null | tail -n 2 || echo "nvcc: not found"
    cmake --version 2>/dev/null | head -n 1 || echo "cmake: not found"
    ninja --version 2>/dev/null || echo "ninja: not found"
    "$PYTHON" -VV
    echo "nproc: $(nproc)"
    if [[ -d "$WHL_DIR" ]]; then
        echo "$WHL_DIR/: $(find "$WHL_DIR" -maxdepth 1 -type f | wc -l) files," \
            "$(du -sh "$WHL_DIR" | cut -f1)"
    else
        echo "$WHL_DIR/: missing"
    fi
}

make_venv() {
    if [[ -x "$VENV/bin/python" ]]; then
        log "reusing $VENV"
        return
    fi
    log "creating $VENV with $("$PYTHON" -c 'import sys; print(sys.executable)')"
    "$PYTHON" -m venv "$VENV"
    if [[ "${GPU_CHECK_INHERIT_SITE:-1}" == 1 ]]; then
        local site_dir
        site_dir=$(vpython -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
        site_packages "$PYTHON" >"$site_dir/zz_gpu_check_inherit.pth"
        echo "inherits: $(tr '\n' ' ' <"$site_dir/zz_gpu_check_inherit.pth")"
    fi
}

gpu_offload_ok() {
    vpython -c 'import sys, llama_cpp
sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)' >/dev/null 2>&1
}

first_match() {
    # The last (by name, so the newest version) of the files matching a glob, or nothing.
    local matches=()
    shopt -s nullglob
    # shellcheck disable=SC2206  # the glob is meant to expand here
    matches=($1)
    shopt -u nullglob
    if ((${#matches[@]})); then
        printf '%s\n' "${matches[-1]}"
    fi
}

find_sdist() {
    local found
    found=$(first_match "$WHL_DIR/llama_cpp_python-*.tar.gz")
    if [[ -z "$found" ]]; then
        local cache
        cache=$("$PYTHON" -m pip cache dir 2>/dev/null || true)
        if [[ -n "$cache" && -d "$cache" ]]; then
            found=$({ find "$cache" -type f -name 'llama_cpp_python-*.tar.gz' 2>/dev/null ||
                true; } | sort | tail -n 1)
        fi
    fi
    printf '%s' "$found"
}

install_llama_cpp() {
    if [[ "${GPU_CHECK_REINSTALL:-0}" != 1 ]] && gpu_offload_ok; then
        log "llama_cpp in $VENV already offloads to the GPU: not reinstalled"
        return
    fi
    local wheel sdist
    wheel=$(first_match "$WHL_DIR/llama_cpp_python-*.whl")
    if [[ -n "$wheel" ]]; then
        log "way A: pre-built wheel $wheel"
        if ! vpython -c 'import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
sys.exit(0 if any("libggml-cuda" in n for n in names) else 1)' "$wheel"; then
            echo "WARNING: $wheel holds no libggml-cuda: probably a CPU build" >&2
        fi
        vpip install --no-index --find-links "$WHL_DIR" --force-reinstall --no-deps "$wheel"
        vpip install --no-index --find-links "$WHL_DIR" "$wheel"
        return
    fi
    sdist=$(find_sdist)
    if [[ -z "$sdist" ]]; then
        die "no llama_cpp_python-*.whl or llama_cpp_python-*.tar.gz in $WHL_DIR/ (nor an sdist" \
            "in pip's cache): fill $WHL_DIR/ as the header of $0 says"
    fi
    local cmake_args="$CUDA_CMAKE_ARGS${EXTRA_CMAKE_ARGS[*]:+ ${EXTRA_CMAKE_ARGS[*]}}"
    log "way B: building $sdist with CMAKE_ARGS=\"$cmake_args\""
    command -v nvcc >/dev/null 2>&1 || die "nvcc not found (set CUDA_HOME)"
    # The build backend comes from .whl/ or the inherited site-packages: no isolation, so
    # CMake and ninja are the machine's own.
    vpip install --no-index --find-links "$WHL_DIR" 'scikit-build-core>=0.9.2'
    local out=build/gpu-check-wheel
    rm -rf "$out"
    mkdir -p "$out"
    local started=$SECONDS
    CMAKE_ARGS="$cmake_args" FORCE_CMAKE=1 CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        vpip wheel -v --no-index --find-links "$WHL_DIR" --no-deps --no-build-isolation \
        --no-cache-dir -w "$out" "$sdist"
    log "built in $((SECONDS - started)) s: $(ls "$out")"
    wheel=$(first_match "$out/llama_cpp_python-*.whl")
    [[ -n "$wheel" ]] || die "the build left no wheel in $out"
    vpip install --no-index --find-links "$WHL_DIR" --no-cache-dir --force-reinstall --no-deps \
        "$wheel"
    vpip install --no-index --find-links "$WHL_DIR" "$wheel"
}

install_project() {
    log "installing the project: -e '.[gpu]' httpx"
    # hatchling (with editables) builds the editable install: from .whl/ (or inherited),
    # without build isolation.
    vpip install --no-index --find-links "$WHL_DIR" 'hatchling>=1.25' 'editables>=0.3'
    vpip install --no-index --find-links "$WHL_DIR" --no-build-isolation -e '.[gpu]' 'httpx>=0.27'
    vpython -c 'import llama_cpp
print("llama_cpp", llama_cpp.__version__, "gpu offload:", llama_cpp.llama_supports_gpu_offload())'
}

main() {
    [[ -f pyproject.toml && -d benchmarks ]] || die "run this from the repository root"
    mkdir -p "$RESULTS_DIR"
    export PYTHONUNBUFFERED=1
    setup_cuda_env
    print_machine
    make_venv
    install_llama_cpp
    install_project
    if [[ "${GPU_CHECK_BUILD_ONLY:-0}" == 1 ]]; then
        log "GPU_CHECK_BUILD_ONLY=1: installed in $VENV; the check is not run"
        return 0
    fi
    log "python -m benchmarks.gpu_check $*"
    local status=0
    vpython -m benchmarks.gpu_check "$@" || status=$?
    if [[ -n "${OUT:-}" && -f "$RESULTS_DIR/gpu_check.json" ]]; then
        cp "$RESULTS_DIR/gpu_check.json" "$OUT/"
    fi
    log "benchmarks.gpu_check exited with $status"
    return "$status"
}

# Sourcing the file (bash -c '. benchmarks/gpu_check.sh; setup_cuda_env') defines the
# functions without running anything.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    logs=("$RESULTS_DIR/gpu_check.log")
    if [[ -n "${OUT:-}" ]]; then
        mkdir -p "$OUT"
        logs+=("$OUT/gpu_check.log")
    fi
    mkdir -p "$RESULTS_DIR"
    main "$@" 2>&1 | tee "${logs[@]}"
fi
