#!/usr/bin/env bash
# Sets up the ROCm (HIP) device-code toolchain used by build.rs on Debian 12:
#   - installs clang-19, clang-tools-19 (clang-offload-bundler), lld-19, llvm-19 (llvm-objdump-19,
#     llvm-readelf-19), libamdhip64-dev and rocm-device-libs from Debian (as root) when any of
#     them is missing;
#   - copies Debian's device bitcode libraries (ROCm 5.2) into <repo>/.toolchains/rocm-device-libs/
#     and adds oclc_isa_version_942.bc (gfx942 / MI300), made from the gfx940 one with the ISA
#     version constant 9400 changed to 9402;
#   - prints, on stdout, only `export` lines for the caller to eval:
#       eval "$(bash ci/setup-rocm.sh)"
# Everything else goes to stderr. Safe to run again: it does nothing when all is in place.
# Options: --check  also compile a tiny kernel for gfx942 and gfx90a as a smoke test.
# On a real ROCm 6.x install (an MI300X machine) none of this is needed: set ROCM_PATH instead.
# See ci/ROCM-NOTES.md for the compiler command line this toolchain is meant for.
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_ROOT="$(cd -- "${SCRIPT_DIR}/.." && pwd -P)"
DEST="${REPO_ROOT}/.toolchains/rocm-device-libs"

PACKAGES=(clang-19 clang-tools-19 lld-19 llvm-19 libamdhip64-dev rocm-device-libs)
HIP_CLANG_BIN=/usr/bin/clang-19
LLVM_DIS=/usr/bin/llvm-dis-19
LLVM_AS=/usr/bin/llvm-as-19
HIP_PREFIX=/usr
# Bump when the way DEST is built changes, so that old copies get rebuilt.
LAYOUT_VERSION=2

CHECK=0
for arg in "$@"; do
    case "$arg" in
        --check) CHECK=1 ;;
        -h|--help) sed -n '2,13p' "${BASH_SOURCE[0]}" >&2; exit 0 ;;
        *) echo "setup-rocm: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

log() { echo "setup-rocm: $*" >&2; }
die() { echo "setup-rocm: error: $*" >&2; exit 1; }

# --- 1. Debian packages -------------------------------------------------------------------------
is_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

command -v dpkg-query >/dev/null 2>&1 || die "dpkg-query not found; this script expects Debian 12 (bookworm)"

missing=()
for pkg in "${PACKAGES[@]}"; do
    is_installed "$pkg" || missing+=("$pkg")
done

if ((${#missing[@]} > 0)); then
    log "installing missing packages: ${missing[*]}"
    if [[ "$(id -u)" -eq 0 ]]; then
        SUDO=()
    elif command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        die "packages missing (${missing[*]}) and not running as root; run this script as root"
    fi
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update >&2
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${PACKAGES[@]}" >&2
    for pkg in "${PACKAGES[@]}"; do
        is_installed "$pkg" || die "package $pkg is still not installed after apt-get install"
    done
else
    log "packages already installed: ${PACKAGES[*]}"
fi

# clang-offload-bundler, llvm-objdump and llvm-readelf: ci/sass-census reads the bundles with them.
for tool in "$HIP_CLANG_BIN" "$LLVM_DIS" "$LLVM_AS" /usr/lib/llvm-19/bin/lld /usr/lib/llvm-19/bin/clang-offload-bundler \
            /usr/lib/llvm-19/bin/llvm-objdump /usr/lib/llvm-19/bin/llvm-readelf; do
    [[ -x "$tool" ]] || die "$tool not found although its package is installed"
done
[[ -f "${HIP_PREFIX}/include/hip/hip_runtime_api.h" ]] || die "${HIP_PREFIX}/include/hip/hip_runtime_api.h not found (libamdhip64-dev)"
[[ -f "${HIP_PREFIX}/include/hip/hip_version.h" ]] || die "${HIP_PREFIX}/include/hip/hip_version.h not found (libamdhip64-dev)"

# --- 2. Device bitcode libraries ----------------------------------------------------------------
# Debian installs them under /usr/lib/<multiarch>/amdgcn/bitcode; ask dpkg rather than guess.
ocml_path="$(dpkg -L rocm-device-libs | grep -E '/amdgcn/bitcode/ocml\.bc$' | head -n 1 || true)"
[[ -n "$ocml_path" && -f "$ocml_path" ]] || die "ocml.bc not found in package rocm-device-libs (dpkg -L rocm-device-libs)"
SRC="$(dirname -- "$ocml_path")"
for f in ocml.bc ockl.bc hip.bc oclc_isa_version_940.bc oclc_isa_version_90a.bc oclc_abi_version_500.bc; do
    [[ -f "${SRC}/${f}" ]] || die "${SRC}/${f} missing (package rocm-device-libs)"
done

pkg_version="$(dpkg-query -W -f='${Version}' rocm-device-libs)"
llvm_version="$(dpkg-query -W -f='${Version}' llvm-19)"
stamp_want="layout=${LAYOUT_VERSION} rocm-device-libs=${pkg_version} llvm-19=${llvm_version} src=${SRC}"

dest_is_complete() {
    [[ -f "${DEST}/.stamp" ]] && [[ "$(cat "${DEST}/.stamp")" == "$stamp_want" ]] || return 1
    local f
    for f in "${SRC}"/*.bc; do
        cmp -s "$f" "${DEST}/$(basename -- "$f")" || return 1
    done
    [[ -f "${DEST}/oclc_isa_version_942.bc" ]] || return 1
}

# Print the i32 value of @__oclc_ISA_version in a bitcode file.
isa_version_of() {
    "$LLVM_DIS" "$1" -o - \
        | sed -n -E 's/^@__oclc_ISA_version = .* constant i32 ([0-9]+),.*$/\1/p'
}

if dest_is_complete; then
    log "device libraries already in place: ${DEST}"
else
    log "building device libraries in ${DEST} from ${SRC}"
    mkdir -p "${REPO_ROOT}/.toolchains"
    tmp="$(mktemp -d "${REPO_ROOT}/.toolchains/.rocm-device-libs.tmp.XXXXXX")"
    trap 'rm -rf -- "$tmp"' EXIT
    chmod 755 "$tmp"
    cp -p -- "${SRC}"/*.bc "$tmp"/

    # gfx942: Debian's ROCm 5.2 device libs stop at gfx940. The gfx940 library holds one constant,
    #   @__oclc_ISA_version = linkonce_odr protected local_unnamed_addr addrspace(4) constant i32 9400
    # gfx942's is 9402 (major*1000 + minor*100 + stepping). Change exactly that line.
    ll="$tmp/oclc_isa_version_942.ll"
    "$LLVM_DIS" "${SRC}/oclc_isa_version_940.bc" -o "$tmp/oclc_isa_version_940.ll"
    n="$(grep -c -E '^@__oclc_ISA_version = .* constant i32 9400,' "$tmp/oclc_isa_version_940.ll" || true)"
    [[ "$n" == 1 ]] || die "expected one '@__oclc_ISA_version = ... constant i32 9400' line in the gfx940 library, found ${n}"
    sed -E 's/^(@__oclc_ISA_version = .* constant i32 )9400,/\19402,/' "$tmp/oclc_isa_version_940.ll" > "$ll"
    "$LLVM_AS" "$ll" -o "$tmp/oclc_isa_version_942.bc"
    rm -f -- "$ll" "$tmp/oclc_isa_version_940.ll"

    v942="$(isa_version_of "$tmp/oclc_isa_version_942.bc")"
    [[ "$v942" == 9402 ]] || die "oclc_isa_version_942.bc holds ISA version '${v942}', expected 9402"
    v90a="$(isa_version_of "$tmp/oclc_isa_version_90a.bc")"
    [[ "$v90a" == 9010 ]] || die "oclc_isa_version_90a.bc holds ISA version '${v90a}', expected 9010"

    printf '%s\n' "$stamp_want" > "$tmp/.stamp"
    rm -rf -- "$DEST"
    mv -- "$tmp" "$DEST"
    trap - EXIT
    log "device libraries ready: ${DEST} (gfx942 isa version ${v942}, gfx90a ${v90a})"
fi

# --- 3. Optional smoke test ---------------------------------------------------------------------
if ((CHECK)); then
    work="$(mktemp -d)"
    trap 'rm -rf -- "$work"' EXIT
    cat > "$work/smoke.cu" <<'EOF'
#include <hip/hip_runtime.h>
#include <hip/hip_fp16.h>
#if !defined(__GFX9__)
#error "__GFX9__ not defined"
#endif
extern "C" __global__ void __launch_bounds__(256) smoke(const __half* x, float* y) {
    extern __shared__ float smem[];
    float v = __expf(__half2float(x[threadIdx.x]));
    for (int lane = 32; lane > 0; lane >>= 1) v += __shfl_xor(v, lane, 64);
    smem[threadIdx.x] = v;
    __syncthreads();
    if (threadIdx.x == 0) atomicAdd(y, fmaxf(smem[0], 0.f));
}
EOF
    "$HIP_CLANG_BIN" -x hip --cuda-device-only --offload-arch=gfx942 --offload-arch=gfx90a \
        -O3 -std=c++17 -mcode-object-version=5 --hip-path="$HIP_PREFIX" \
        --rocm-device-lib-path="$DEST" "$work/smoke.cu" -o "$work/smoke.hipfb" >&2
    magic="$(head -c 24 "$work/smoke.hipfb")"
    [[ "$magic" == "__CLANG_OFFLOAD_BUNDLE__" ]] || die "smoke test: output is not a clang offload bundle"
    rm -rf -- "$work"
    trap - EXIT
    log "smoke test passed (gfx942 + gfx90a bundle)"
fi

# --- 4. Exports (the only thing on stdout) ------------------------------------------------------
printf 'export HIP_CLANG=%q\n' "$HIP_CLANG_BIN"
printf 'export FEP_ROCM_DEVICE_LIB_PATH=%q\n' "$DEST"
printf 'export HIP_PATH=%q\n' "$HIP_PREFIX"
