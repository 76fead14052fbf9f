#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler (nvcc, ptxas, cicc, headers) from PyPI wheels into
# <repo>/.toolchains/cuda and prints the `export` lines to eval. Idempotent; needs only python3
# with pip and a route to PyPI. 13.0 matches the 580-series drivers of current H100/H200 machines:
# code built by a newer compiler may not load there (DESIGN.md section 2).
# It also installs cuobjdump and nvdisasm (for ci/sass-census) into the same tree. PyPI has no
# 13.0 wheel of them, so they are pinned to 13.2.51: they only read and disassemble the cubins,
# they play no part in compiling, so the code the 13.0 compiler emits is unchanged.
#   eval "$(bash ci/setup-cuda.sh)"
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest="$repo/.toolchains/cuda"
root="$dest/nvidia/cu13"
wheels=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.88 nvidia-cuda-crt==13.0.88
        nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.50
        nvidia-cuda-cuobjdump==13.2.51 nvidia-cuda-nvdisasm==13.2.51)
stamp_name=".installed-$(echo "${wheels[*]}" | cksum | cut -d' ' -f1)"

if [ ! -f "$dest/$stamp_name" ]; then
  echo "setup-cuda: installing ${wheels[*]} into $dest" >&2
  # Built beside the old tree and swapped in at the end, so a build still using the old one
  # (or an interrupted install) never sees a half-filled folder.
  mkdir -p "$repo/.toolchains"
  tmp=$(mktemp -d "$repo/.toolchains/.cuda.tmp.XXXXXX")
  trap 'rm -rf -- "$tmp"' EXIT
  mkdir -p "$tmp/wheels"
  python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2010_x86_64 --platform manylinux_2_12_x86_64 \
    -d "$tmp/wheels" "${wheels[@]}" >&2
  for w in "$tmp"/wheels/*.whl; do python3 -m zipfile -e "$w" "$tmp" >&2; done
  rm -rf "$tmp/wheels"
  chmod +x "$tmp"/nvidia/cu13/bin/* "$tmp"/nvidia/cu13/nvvm/bin/*
  chmod 755 "$tmp"
  touch "$tmp/$stamp_name"
  rm -rf "$dest.old"
  if [ -e "$dest" ]; then mv "$dest" "$dest.old"; fi
  mv "$tmp" "$dest"
  trap - EXIT
  rm -rf "$dest.old"
fi
"$root/bin/nvcc" --version >&2
"$root/bin/cuobjdump" --version >/dev/null
"$root/bin/nvdisasm" --version >/dev/null
echo "export NVCC=$root/bin/nvcc"
echo "export CUDA_PATH=$root"
