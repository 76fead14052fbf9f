"""Builds the fep-kernels cdylib with cargo while the package is built and bundles it in
fep_kernels/, so `pip install ./bindings/python` from a checkout gives a package that works
without FEP_KERNELS_LIB. The metadata is in pyproject.toml.

Environment:
- FEP_KERNELS_FEATURES: cargo features for the library ("cuda", "rocm"; default: none, CPU only);
- FEP_KERNELS_NO_CARGO=1: do not run cargo; bundle target/release's library if it is there,
  else install the pure-Python package (the library is then found through FEP_KERNELS_LIB);
- CARGO_TARGET_DIR: honoured, as cargo does.
"""

import os
import shutil
import subprocess
import sys

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))  # bindings/python -> the repository root
LIB = "libfep_kernels.dylib" if sys.platform == "darwin" else "libfep_kernels.so"


def _target_dir():
    return os.environ.get("CARGO_TARGET_DIR") or os.path.join(REPO, "target")


def _build_library():
    """The path of a freshly built (or, without cargo, an existing) release library, or None."""
    if not os.path.exists(os.path.join(REPO, "Cargo.toml")):
        return None  # an sdist outside the repository: nothing to build from
    built = os.path.join(_target_dir(), "release", LIB)
    cargo = shutil.which("cargo")
    if cargo and os.environ.get("FEP_KERNELS_NO_CARGO") != "1":
        cmd = [cargo, "build", "--release", "--lib"]
        features = os.environ.get("FEP_KERNELS_FEATURES", "").strip()
        if features:
            cmd += ["--features", features]
        print("fep-kernels: " + " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, cwd=REPO, check=True)
    return built if os.path.exists(built) else None


class BuildPyWithLibrary(build_py):
    def run(self):
        super().run()
        lib = _build_library()
        if lib is None:
            print("fep-kernels: no library bundled; set FEP_KERNELS_LIB to a built "
                  f"{LIB} (cargo build --release --lib)", file=sys.stderr)
            return
        dest = os.path.join(self.build_lib, "fep_kernels", LIB)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy2(lib, dest)


class BinaryDistribution(Distribution):
    """A wheel that carries a native library is platform specific."""

    def has_ext_modules(self):
        return True


setup(cmdclass={"build_py": BuildPyWithLibrary}, distclass=BinaryDistribution)
