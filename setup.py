"""Builds lasp through CMake (CMakeLists.txt is the one description of the build).

The extension is compiled against the torch that is installed in the environment running the build, and
it only loads under that same torch version. So install torch first, then build without build isolation
(an isolated build would compile against a fresh torch from the package index, which may not be yours):
  pip install torch==2.11.0 wheel ninja     # or another torch in the supported range (TORCH_MIN below)
  pip install -e . --no-build-isolation      # or: pip install . --no-build-isolation
Supported torch: TORCH_MIN <= version < TORCH_END below, the range install_requires states (CI tests 2.10.0
and 2.11.0; the GPU machines run 2.11.0). After changing torch, rebuild lasp.
Environment:
  LASP_CUDA_ARCHS   CUDA archs to build for, e.g. "80;90a" (default); ignored without nvcc
  LASP_WITH_CUDA    0 to build the CPU path only even where nvcc exists
  LASP_BUILD_DIR    CMake build folder (default build/cmake)
  LASP_BUILD_TESTS  OFF to skip the GoogleTest tests and the C++ example (default ON)
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
# The one place the supported torch versions are stated: TORCH_MIN <= (major, minor) < TORCH_END.
TORCH_MIN = (2, 10)
TORCH_END = (2, 12)
TORCH_REQUIREMENT = f"torch>={TORCH_MIN[0]}.{TORCH_MIN[1]},<{TORCH_END[0]}.{TORCH_END[1]}"
# Written next to the built library: the torch version it was built against (python/lasp/_ops.py checks it).
BUILD_INFO = "_build_info.py"

INSTALL_HINT = (
    f'install torch first (pip install "{TORCH_REQUIREMENT}"), then build lasp in that same environment '
    "without build isolation: pip install --no-build-isolation -e .  (or: pip install --no-build-isolation .)"
)


def _torch():
    """The installed torch, which the extension is built against; a clear error where it is missing or unsupported."""
    try:
        import torch
    except ImportError as e:
        raise RuntimeError(
            f"lasp: torch is not importable in the build environment ({e}). lasp is compiled against the torch "
            f"it will run with, so it does not let pip fetch one into an isolated build environment: {INSTALL_HINT}"
        ) from None
    version = torch.__version__.split("+")[0]
    try:
        major_minor = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        major_minor = None  # a development build: let it through
    if major_minor is not None and not (TORCH_MIN <= major_minor < TORCH_END):
        raise RuntimeError(
            f"lasp: the installed torch is {torch.__version__}, outside the supported range {TORCH_REQUIREMENT}; "
            f"{INSTALL_HINT}"
        )
    return torch


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self):
        torch = _torch()
        super().run()
        if self.inplace:  # editable install / build_ext --inplace: the library was copied next to the sources
            _write_build_info(ROOT / "python" / "lasp", torch)

    def build_extension(self, ext):
        torch = _torch()
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
        # setuptools copies it next to the sources for editable installs (run() adds the build info there).
        dest = Path(self.get_ext_fullpath(ext.name))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(build_dir / "liblasp.so", dest)
        _write_build_info(dest.parent, torch)


def _write_build_info(pkg_dir: Path, torch) -> None:
    (pkg_dir / BUILD_INFO).write_text(
        "# Written by setup.py when the library was built; lasp refuses to load under another torch.\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
    )


setup(
    name="lasp",
    version="0.1.0",
    description="Linear Attention Sequence Parallel: fused kernels and a state ring for linear attention",
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=[CMakeExtension("lasp.liblasp")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.10",
    install_requires=[TORCH_REQUIREMENT],
    extras_require={"test": ["pytest", "hypothesis", "numpy"], "hf": ["transformers"]},
    zip_safe=False,
)
