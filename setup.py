"""Build script. Metadata lives in pyproject.toml; this file only decides, once, which extensions to build.

    fastat._C_cuda   CUDA kernels (csrc/cuda/*.cu + bindings.cpp), built when FASTAT_BUILD_CUDA != "0", torch is
                     importable in the build environment, torch.version.cuda is set and a CUDA toolkit (nvcc) is
                     found. Needs `pip install --no-build-isolation -e .` with a CUDA torch already installed.
    fastat._C        CPU kernels (csrc/cpu/*.cpp), prebuilt only when FASTAT_BUILD_CPP=1 (otherwise fastat._ext
                     builds them just in time on first use).

Environment: FASTAT_BUILD_CUDA=0 skips the CUDA build; TORCH_CUDA_ARCH_LIST (default "9.0" when no GPU is
visible, else torch's choice for the visible GPU); CUDA_HOME (default /usr/local/cuda when it holds nvcc);
MAX_JOBS (parallel compile jobs, read by torch's ninja build); NVCC_THREADS (nvcc --threads, default 4).
A skipped extension prints one line "fastat: skipping the ... extension: <reason>" and the install goes on
as pure Python: plain `pip install -e .` (build isolation, no torch in the build environment) always works.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern: str) -> List[str]:
    """Sources matching `pattern`, relative to the repository root (setuptools wants relative paths)."""
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


DEFAULT_CUDA_HOMES = ("/usr/local/cuda",)


def find_cuda_home(env: Mapping[str, str], defaults: Sequence[str] = DEFAULT_CUDA_HOMES) -> Optional[str]:
    """The CUDA toolkit root: $CUDA_HOME / $CUDA_PATH, else /usr/local/cuda, else the parent of `nvcc` on PATH.

    /usr/local/cuda comes before PATH on purpose: a /usr/local/bin/nvcc wrapper makes torch guess
    CUDA_HOME=/usr/local, which then fails to link -lcudart.
    """
    for key in ("CUDA_HOME", "CUDA_PATH"):
        home = env.get(key)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    for home in defaults:
        if os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    nvcc = shutil.which("nvcc", path=env.get("PATH", ""))
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def cuda_build_plan(
    env: Mapping[str, str] = os.environ, defaults: Sequence[str] = DEFAULT_CUDA_HOMES
) -> Tuple[str, str, Dict[str, str]]:
    """("build" | "skip", reason, environment to set before building) for fastat._C_cuda. Never raises."""
    if env.get("FASTAT_BUILD_CUDA", "").strip() == "0":
        return "skip", "FASTAT_BUILD_CUDA=0", {}
    try:
        import torch
    except Exception as exc:  # build isolation gives a build environment without torch: that is fine
        return "skip", (
            f"torch is not importable in the build environment ({type(exc).__name__}); "
            "to build it, install a CUDA torch first and run pip install --no-build-isolation -e ."
        ), {}
    if not getattr(torch.version, "cuda", None):
        return "skip", f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)", {}
    home = find_cuda_home(env, defaults)
    if home is None:
        return "skip", "no CUDA toolkit found (set CUDA_HOME to the directory holding bin/nvcc)", {}
    extra = {"CUDA_HOME": home}
    if not env.get("TORCH_CUDA_ARCH_LIST"):
        try:
            gpu = torch.cuda.is_available()
        except Exception:
            gpu = False
        if not gpu:
            # torch's arch detection indexes an empty list without a visible GPU (IndexError).
            extra["TORCH_CUDA_ARCH_LIST"] = "9.0"
    arch = env.get("TORCH_CUDA_ARCH_LIST") or extra.get("TORCH_CUDA_ARCH_LIST", "the visible GPU's")
    return "build", f"torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA_HOME={home}, arch {arch}", extra


def cpp_build_plan(env: Mapping[str, str] = os.environ) -> Tuple[str, str]:
    """("build" | "skip", reason) for the prebuilt CPU extension fastat._C (opt-in: FASTAT_BUILD_CPP=1)."""
    if env.get("FASTAT_BUILD_CPP", "").strip() != "1":
        return "skip", "FASTAT_BUILD_CPP is not 1 (the CPU kernels are built just in time on first use)"
    if not _rel(os.path.join("csrc", "cpu", "*.cpp")):
        return "skip", "no sources in csrc/cpu/"
    try:
        import torch  # noqa: F401
    except Exception as exc:
        return "skip", f"torch is not importable in the build environment ({type(exc).__name__}); use --no-build-isolation"
    return "build", "FASTAT_BUILD_CPP=1"


# setup.py runs once per build hook (requirements, metadata, wheel); speak only in the one that builds.
_BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}


def _say(line: str) -> None:
    if _BUILD_COMMANDS.intersection(sys.argv[1:]):
        print(line, flush=True)


def extensions() -> Tuple[list, dict]:
    """The ext_modules and cmdclass for setup(), printing one line per decision."""
    ext_modules = []
    cpp, cpp_reason = cpp_build_plan()
    cuda, cuda_reason, cuda_env = cuda_build_plan()
    if cpp == "build":
        from torch.utils.cpp_extension import CppExtension

        _say(f"fastat: building the CPU extension fastat._C ({cpp_reason})")
        ext_modules.append(
            CppExtension(
                "fastat._C",
                _rel(os.path.join("csrc", "cpu", "*.cpp")),
                include_dirs=[os.path.join(ROOT, "csrc", "cuda")],  # the per-element functors shared with CUDA
                extra_compile_args={"cxx": ["-O3", "-fopenmp"]},
                extra_link_args=["-fopenmp"],
            )
        )
    elif os.environ.get("FASTAT_BUILD_CPP"):
        _say(f"fastat: skipping the CPU extension: {cpp_reason}")
    if cuda == "build":
        os.environ.update(cuda_env)
        from torch.utils import cpp_extension

        cpp_extension.CUDA_HOME = cuda_env["CUDA_HOME"]  # torch fixed it at import; make it agree with ours
        _say(f"fastat: building the CUDA extension fastat._C_cuda ({cuda_reason})")
        nvcc_threads = os.environ.get("NVCC_THREADS", "4")
        ext_modules.append(
            cpp_extension.CUDAExtension(
                "fastat._C_cuda",
                _rel(os.path.join("csrc", "cuda", "*.cu")) + _rel(os.path.join("csrc", "cuda", "bindings.cpp")),
                extra_compile_args={
                    "cxx": ["-O3", "-std=c++17"],
                    "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", "--threads", nvcc_threads],
                },
            )
        )
    else:
        _say(f"fastat: skipping the CUDA extension: {cuda_reason}")
    if not ext_modules:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension

    return ext_modules, {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":
    ext_modules, cmdclass = extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
