#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler (nvcc, ptxas, cicc, headers) from PyPI wheels into
# <repo>/.toolchains/cuda and prints the `export` lines to eval. Idempotent; needs only python3
# with pip and a route to PyPI. 13.0 matches the 580-series drivers of current H100/H200 machines:
# code built by a newer compiler may not load there (DESIGN.md section 2).
#   eval "$(bash ci/setup-cuda.sh)"
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest="$repo/.toolchains/cuda"
root="$dest/nvidia/cu13"
wheels=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.88 nvidia-cuda-crt==13.0.88
        nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.50)
stamp="$dest/.installed-$(echo "${wheels[*]}" | cksum | cut -d' ' -f1)"

if [ ! -f "$stamp" ]; then
  echo "setup-cuda: installing ${wheels[*]} into $dest" >&2
  rm -rf "$dest"
  mkdir -p "$dest/wheels"
  python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2010_x86_64 --platform manylinux_2_12_x86_64 \
    -d "$dest/wheels" "${wheels[@]}" >&2
  for w in "$dest"/wheels/*.whl; do python3 -m zipfile -e "$w" "$dest" >&2; done
  rm -rf "$dest/wheels"
  chmod +x "$root"/bin/* "$root"/nvvm/bin/*
  touch "$stamp"
fi
"$root/bin/nvcc" --version >&2
echo "export NVCC=$root/bin/nvcc"
echo "export CUDA_PATH=$root"
