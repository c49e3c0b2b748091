"""Builds lasp through CMake (CMakeLists.txt is the one description of the build).

`pip install .` or `pip install -e . --no-build-isolation` (torch must already be installed: the
extension is built against it). Environment:
  LASP_CUDA_ARCHS   CUDA archs to build for, e.g. "80;90a" (default); ignored without nvcc
  LASP_WITH_CUDA    0 to build the CPU path only even where nvcc exists
  LASP_BUILD_DIR    CMake build folder (default build/cmake)
  MAX_JOBS          parallel compile jobs (default: all cores)
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
TORCH_VERSION = "2.11.0"  # the one place the supported torch version is pinned (GPU machines run it)


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import torch

        build_dir = Path(os.environ.get("LASP_BUILD_DIR", ROOT / "build" / "cmake"))
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DLASP_BUILD_TESTS={os.environ.get('LASP_BUILD_TESTS', 'ON')}",
        ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        if os.environ.get("LASP_WITH_CUDA") == "0":
            args.append("-DLASP_WITH_CUDA=OFF")
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args])
        subprocess.check_call(["cmake", "--build", str(build_dir), "--parallel", jobs])

        # The CMake-built library becomes the package's extension file (lasp/liblasp.<abi>.so);
        # setuptools copies it next to the sources for editable installs.
        dest = Path(self.get_ext_fullpath(ext.name))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(build_dir / "liblasp.so", dest)


setup(
    name="lasp",
    version="0.1.0",
    description="Linear Attention Sequence Parallel: fused kernels and a state ring for linear attention",
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=[CMakeExtension("lasp.liblasp")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.10",
    install_requires=[f"torch=={TORCH_VERSION}"],
    extras_require={"test": ["pytest", "hypothesis", "numpy"], "hf": ["transformers"]},
    zip_safe=False,
)
