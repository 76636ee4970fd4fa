#!/usr/bin/env bash
# Builds the CUDA binary on a machine without a GPU or a CUDA toolkit, from PyPI's CUDA 13.0
# wheels (the issue's tried recipe, candle 0.11.1). Idempotent: reruns reuse the venv and the
# target folder. Output: target-cuda/release/sdfix (and target-cudnn/ with --cudnn).
#
#   bash scripts/build_cuda.sh                    # --features cuda
#   bash scripts/build_cuda.sh --cudnn            # --features cudnn
#   bash scripts/build_cuda.sh [--cudnn] --clippy # clippy --all-targets -D warnings, same setup
#
# The cuda feature also compiles our kernels (src/kernels/cuda/*.cu) to PTX with this nvcc
# (build.rs, compute_80 embedded and compute_90 checked).
#
# Why these pins: CUDA 12 wheels carry no nvcc; 13.0 matches the GPU machines' driver 580 (newer
# nvcc emits PTX driver 580 may reject, and cudarc refuses nvcc >= 13.5). cudarc links -lcuda at
# build time: libcuda.so here is a stub made from cudarc's own symbol list, every function
# returning CUDA_ERROR_UNKNOWN, for linking only; at run time the driver's libcuda.so.1 is used.
set -euo pipefail
cd "$(dirname "$0")/.."
features=cuda; target=target-cuda; clippy=
for arg in "$@"; do
  case $arg in
    --cudnn) features=cudnn; target=target-cudnn ;;
    --clippy) clippy=1 ;;
    *) echo "error: unknown argument $arg (expected --cudnn, --clippy)" >&2; exit 2 ;;
  esac
done
venv=${CUDA_VENV:-.venv-cuda}
[ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q \
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.88 \
  nvidia-cuda-nvrtc==13.0.88 nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-cccl==13.0.85 \
  $([ "$features" = cudnn ] && echo nvidia-cudnn-cu13==9.13.0.50)
site=$("$venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')
cuda=$site/nvidia/cu13
[ -d "$cuda/lib" ] || { echo "error: $cuda/lib missing; the CUDA 13 wheels did not install as expected" >&2; exit 2; }

# Unversioned names for the linker (libcublas.so -> libcublas.so.13, ...).
for lib in "$cuda"/lib/lib*.so.*; do
  base=${lib%%.so.*}.so
  [ -e "$base" ] || ln -s "$(basename "$lib")" "$base"
done

# The stub libcuda.so, from the driver functions cudarc declares.
stubs=$cuda/stubs
if [ ! -e "$stubs/libcuda.so" ]; then
  cargo fetch --quiet
  cudarc=$(ls -d "$HOME"/.cargo/registry/src/*/cudarc-0.19.* | tail -n 1)
  mkdir -p "$stubs"
  grep -ohE '^\s+fn (cu[A-Za-z0-9_]+)\(' "$cudarc/src/driver/sys/mod.rs" | sed -E 's/^\s+fn (cu[A-Za-z0-9_]+)\(/\1/' | sort -u |
    awk '{ printf "int %s(void) { return 999; }\n", $1 }' >"$stubs/libcuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stubs/libcuda.so" "$stubs/libcuda_stub.c"
  echo "stub libcuda.so: $(wc -l <"$stubs/libcuda_stub.c") symbols"
fi

export CUDA_HOME=$cuda CUDA_PATH=$cuda CUDA_ROOT=$cuda PATH=$cuda/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} CUDARC_CUDA_VERSION=13000 CUDAFORGE_THREADS=$(nproc)
export LIBRARY_PATH=$stubs:$cuda/lib${LIBRARY_PATH:+:$LIBRARY_PATH}
export RUSTFLAGS="${RUSTFLAGS:-} -L $stubs -L $cuda/lib"
if [ "$features" = cudnn ]; then
  # The cuDNN wheel ships libcudnn.so.9 only: the linker wants libcudnn.so.
  export CUDNN_LIB=$site/nvidia/cudnn/lib
  for lib in "$CUDNN_LIB"/lib*.so.*; do
    base=${lib%%.so.*}.so
    [ -e "$base" ] || ln -s "$(basename "$lib")" "$base"
  done
  export LIBRARY_PATH=$CUDNN_LIB:$LIBRARY_PATH
fi
nvcc --version | tail -n 2
if [ -n "$clippy" ]; then
  CARGO_TARGET_DIR=$target cargo clippy --release --all-targets --features "$features" -- -D warnings
  exit
fi
CARGO_TARGET_DIR=$target cargo build --release --features "$features"
ls -la "$target/release/sdfix"
echo "needs on the GPU machine: libcuda.so.1 (driver), libcudart.so.13, libcublas.so.13, libcublasLt.so.13, libcurand.so.10$([ "$features" = cudnn ] && echo ', libcudnn.so.9'), glibc >= 2.34"
