"""Building and loading fastat's compiled extensions; the one place that knows whether they exist.

Two kinds:
    "cpp"   the CPU kernels (torch.ops.fastat_cpp.*), sources csrc/cpu/*.cpp plus the per-element functors they
            share with the CUDA kernels (csrc/cuda/*_ops.cuh and the ATen-free headers they include). Loaded from, in
            order: a prebuilt `fastat._C` (setup.py, if it built one), this machine's cache of an earlier
            just-in-time build, else built now with torch.utils.cpp_extension.load (needs a C++ compiler
            and ninja; ~30-60 s once, cached under $TORCH_EXTENSIONS_DIR or torch's default
            ~/.cache/torch_extensions/<py>_cpu/fastat_cpu_ops_<isa level>).
    "cuda"  the CUDA kernels (torch.ops.fastat_cuda.*), the module `fastat._C_cuda`, built ahead of time by
            setup.py on a machine with a CUDA torch and nvcc; never built here.

Both libraries only register kernels (TORCH_LIBRARY_IMPL) for operators whose schemas fastat._dispatch defines,
once, in Python. Policy (fastat._dispatch): an explicit `set_backend("cpp")` builds on demand; "auto" uses a
compiled backend only once it is built (`is_built`), so no user call ever waits for a compiler. Whoever caches
decisions that depend on what is built registers with `add_listener` (fastat._backend does).

Which ops "auto" runs on cpp (benchmarks/cpu_chain.py on the shared 2-core box, 1 thread, load average
~3, medians of 200-300 interleaved reps, eager torch / cpp, AVX2 build): at 128x3x32x32 fp32 every op is
faster on cpp (noisy_input 0.27/0.16 ms, equivariant_mse fwd+bwd 1.46/0.66, equivariance_regularizer
fwd+bwd 0.59/0.35, pseudo-Huber fwd+bwd 0.42/0.29, pgd_step L2 1.67/0.14, Linf 1.51/0.16; the inner-step
chain 6.56/1.58 ms = 4.2x); at 8x3x8x8 the losses cost 3-9 us more per call (equivariant_mse fwd+bwd
0.196/0.203 ms), noisy_input ties and pgd_step stays 2-3x faster, the chain 1.2x. So auto keeps cpp for
every op it has a kernel for (no per-op skip).

Compiler flags. The cache may be shared between machines (a home directory on NFS, a container image),
so no -march=native: -O3, plus -mavx2 -mfma -mf16c where this CPU has them, built into a cache folder
named after that ISA level (fastat_cpu_ops_avx2 / fastat_cpu_ops_base), so another CPU sharing the cache
builds or loads its own. The reductions keep 16 independent accumulators, so they vectorise without
-ffast-math and stay deterministic. A prebuilt fastat._C (setup.py, FASTAT_BUILD_CPP=1) uses the portable
-O3 only.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import os
import shutil
import sys
import sysconfig
import threading
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from ._errors import BackendUnavailableError

KINDS = ("cpp", "cuda")
CPU_LIBRARY = "fastat_cpu_ops"  # JIT build name; the cache folder and .so add the ISA tag (cpu_library())
CPU_NAMESPACE = "fastat_cpp"  # torch.ops.fastat_cpp
CUDA_MODULE = "fastat._C_cuda"
CUDA_NAMESPACE = "fastat_cuda"  # torch.ops.fastat_cuda
PREBUILT_CPU_MODULE = "fastat._C"
# Portable flags: setup.py's prebuilt fastat._C uses these (a wheel moves between machines).
CPU_CFLAGS = ("-O3", "-fopenmp")
CPU_LDFLAGS = ("-fopenmp",)
# The JIT build targets this machine's ISA level, in a cache folder named after it, so a cache shared
# with an older CPU never hands it instructions it lacks. Measured on the 2-core EPYC box, 128x3x32x32,
# 1 thread, baseline -O3 / +AVX2,FMA,F16C (us): fp32 pgd_step L2 126/74, noisy_input 87/77, loss forward
# 82/84, loss backward 76/68; bf16 noisy_input 228/111, loss forward 126/64, pgd_step L2 311/142.
ISA_CFLAGS = {"avx2": ("-mavx2", "-mfma", "-mf16c"), "base": ()}
BUILD_SECONDS = "~40 s"  # measured cold JIT build on a 2-core box: 25-60 s

NAMESPACES = {"cpp": CPU_NAMESPACE, "cuda": CUDA_NAMESPACE}

_lock = threading.RLock()
_loaded: dict = {}  # kind -> description of what was loaded (a loaded library stays loaded)
_modules: dict = {}  # kind -> the loaded library as a Python module (its direct kernel entries)
_failed: dict = {}  # kind -> one-line reason a build or load failed (not retried in this process)
_listeners: list = []  # called after a library was loaded or failed to load


def add_listener(callback) -> None:
    """Call `callback()` whenever a library gets loaded (or fails to): what auto may use has changed."""
    _listeners.append(callback)


def _changed() -> None:
    for callback in _listeners:
        callback()


# ----------------------------------------------------------------------------------------- sources

def _source_dirs() -> List[Path]:
    """Where csrc/cpu may be: the source tree (editable install, checkout), inside the package, or the
    data files of a regular install (pyproject's [tool.setuptools.data-files])."""
    package = Path(__file__).resolve().parent
    return [
        package.parent / "csrc" / "cpu",
        package / "csrc" / "cpu",
        Path(sysconfig.get_path("data")) / "share" / "fastat" / "csrc" / "cpu",
    ]


def cpu_sources() -> List[Path]:
    """The CPU extension's .cpp files (the first folder that has them), or [] if none is found."""
    for folder in _source_dirs():
        if (folder / "ops.cpp").is_file():
            return sorted(folder.glob("*.cpp"))
    return []


def shared_include_dir(sources: List[Path]) -> Path:
    """csrc/cuda next to csrc/cpu: the per-element functors and ATen-free headers both libraries compile."""
    return sources[0].parent.parent / "cuda"


def _headers(sources: List[Path]) -> List[Path]:
    if not sources:
        return []
    shared = shared_include_dir(sources)
    return sorted(sources[0].parent.glob("*.h")) + sorted(shared.glob("*.cuh")) + sorted(shared.glob("*.h"))


def _fingerprint(sources: List[Path]) -> str:
    """Changes whenever a source, a header, a flag, torch or Python changes: a cache with another one is stale."""
    digest = hashlib.sha256()
    for part in (cpu_library(), torch.__version__, sys.version, *cpu_cflags(), *CPU_LDFLAGS):
        digest.update(part.encode() + b"\0")
    for path in sources + _headers(sources):
        digest.update(path.parent.name.encode() + b"/" + path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@functools.lru_cache(maxsize=None)
def isa_level() -> str:
    """"avx2" on x86-64 CPUs that torch runs at AVX2 or AVX-512 (so AVX2, FMA and F16C exist; honours
    ATEN_CPU_CAPABILITY), else "base" (portable -O3: SSE2 on x86-64, NEON on aarch64)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "base"
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:
        return "base"
    return "avx2" if capability in ("AVX2", "AVX512") else "base"


def cpu_library() -> str:
    """The JIT library's name: fastat_cpu_ops_<isa level> (its cache folder and .so)."""
    return f"{CPU_LIBRARY}_{isa_level()}"


def cpu_cflags() -> Tuple[str, ...]:
    return CPU_CFLAGS + ISA_CFLAGS[isa_level()]


def cpu_build_dir() -> Path:
    """torch's JIT build folder for the CPU extension (honours TORCH_EXTENSIONS_DIR)."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        tag = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        accelerator = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
        if torch.version.hip is not None:
            accelerator = f"rocm{torch.version.hip.replace('.', '')}"
        root = os.path.join(cpp_extension.get_default_build_root(), f"{tag}_{accelerator}")
    return Path(root) / cpu_library()


def _cached_library() -> Optional[Path]:
    """The cached .so of an earlier build of exactly these sources and flags, or None."""
    sources = cpu_sources()
    if not sources:
        return None
    folder = cpu_build_dir()
    library, stamp = folder / f"{cpu_library()}.so", folder / "fastat_fingerprint.txt"
    try:
        if library.is_file() and stamp.read_text().strip() == _fingerprint(sources):
            return library
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------------------- toolchain

def _toolchain_problem() -> Optional[str]:
    """Why a JIT build cannot start here (no compiler, no ninja), or None."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler: {compiler!r} is not on PATH (install g++ or clang, or set CXX)"
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "ninja not found on PATH (pip install ninja; with a venv, activate it so venv/bin is on PATH)"
    return None


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    text = (errors or lines or [type(exc).__name__])[0]
    return text if len(text) <= 300 else text[:297] + "..."


# ------------------------------------------------------------------------------------------ loading

def _load_prebuilt() -> bool:
    """Load setup.py's prebuilt fastat._C if there is one that works with this torch (tried once)."""
    if "cpp" in _loaded:
        return True
    if "prebuilt" in _failed or importlib.util.find_spec(PREBUILT_CPU_MODULE) is None:
        return False
    try:
        module = importlib.import_module(PREBUILT_CPU_MODULE)
    except ImportError as exc:  # built against another torch: the JIT build takes over
        _failed["prebuilt"] = f"prebuilt {PREBUILT_CPU_MODULE} does not load ({_one_line(exc)})"
        return False
    _modules["cpp"] = module
    _loaded["cpp"] = f"built (prebuilt {PREBUILT_CPU_MODULE} at {module.__file__})"
    return True


def _import_library(name: str, path: Path):
    """Import a built library file as the Python module `name` (it registers its kernels as it loads)."""
    spec = importlib.util.spec_from_file_location(name, str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_cpp() -> None:
    # 1. A prebuilt library from setup.py.
    if _load_prebuilt():
        return
    # 2. This machine's cache of an earlier JIT build: no compiler, no ninja needed.
    cached = _cached_library()
    if cached is not None:
        try:
            _modules["cpp"] = _import_library(cpu_library(), cached)
            _loaded["cpp"] = f"built (cached at {cached.parent})"
            return
        except (OSError, ImportError):
            pass  # unreadable, truncated or from an older fastat: rebuild
    # 3. Build now.
    sources = cpu_sources()
    if not sources:
        raise BackendUnavailableError(
            "fastat's C++ sources (csrc/cpu) were not found; looked in " + ", ".join(map(str, _source_dirs()))
        )
    problem = _toolchain_problem()
    if problem is not None:
        raise BackendUnavailableError(f"cannot build the fastat C++ extension: {problem}")
    from torch.utils import cpp_extension

    folder = cpu_build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        module = cpp_extension.load(
            name=cpu_library(),
            sources=[str(s) for s in sources],
            extra_cflags=list(cpu_cflags()),
            extra_ldflags=list(CPU_LDFLAGS),
            extra_include_paths=[str(shared_include_dir(sources))],
            build_directory=str(folder),
            is_python_module=True,
            verbose=os.environ.get("FASTAT_VERBOSE_BUILD", "0") not in ("", "0"),
        )
    except Exception as exc:
        raise BackendUnavailableError(
            f"building the fastat C++ extension failed: {_one_line(exc)} "
            f"(rerun with FASTAT_VERBOSE_BUILD=1 for the compiler output; build folder {folder})"
        ) from exc
    (folder / "fastat_fingerprint.txt").write_text(_fingerprint(sources) + "\n")
    _modules["cpp"] = module
    _loaded["cpp"] = f"built (cached at {Path(module.__file__).parent})"


def _load_cuda() -> None:
    if not torch.cuda.is_available():
        raise BackendUnavailableError("no CUDA GPU visible to torch")
    if importlib.util.find_spec(CUDA_MODULE) is None:
        raise BackendUnavailableError(_CUDA_NOT_BUILT)
    try:
        module = importlib.import_module(CUDA_MODULE)
    except ImportError as exc:
        raise BackendUnavailableError(f"{CUDA_MODULE} does not load: {_one_line(exc)}") from exc
    _modules["cuda"] = module
    _loaded["cuda"] = f"built ({CUDA_MODULE} at {module.__file__})"


_CUDA_NOT_BUILT = (
    f"not built: {CUDA_MODULE} is built by setup.py on a machine with a CUDA torch and nvcc "
    "(CUDA_HOME=/usr/local/cuda TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation -e .)"
)


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind


def load(kind: str):
    """Load (building the CPU library if needed) and return the op namespace: torch.ops.fastat_cpp for
    "cpp", torch.ops.fastat_cuda for "cuda". Raises BackendUnavailableError with the reason; a failed
    build is not retried in the same process (the same error is raised again)."""
    _check_kind(kind)
    namespace = getattr(torch.ops, NAMESPACES[kind])
    if kind in _loaded:
        return namespace
    with _lock:
        if kind in _failed:
            raise BackendUnavailableError(_failed[kind])
        if kind not in _loaded:
            try:
                _load_cpp() if kind == "cpp" else _load_cuda()
            except BackendUnavailableError as exc:
                _failed[kind] = str(exc)  # not retried: status() answers from here on every later call
                _changed()
                raise
            _changed()
    return namespace


def module(kind: str):
    """The loaded library as a Python module: one direct entry per kernel (csrc/cuda/python_entry.h), what
    fastat's eager route calls. Loads it first (see `load`)."""
    load(kind)
    return _modules[kind]


def is_built(kind: str) -> bool:
    """True when `load(kind)` needs no compiler: already loaded, prebuilt, or cached from an earlier build."""
    _check_kind(kind)
    if kind in _loaded:
        return True
    if kind in _failed:
        return False
    if kind == "cuda":
        return importlib.util.find_spec(CUDA_MODULE) is not None
    return status("cpp")[1].startswith("built")


def status(kind: str) -> Tuple[bool, str]:
    """(available, reason). "cpp" is available when built or buildable here (a C++ compiler and ninja);
    the reason says which: "built (cached at ...)", "not built yet: builds on first use (~40 s) ...",
    or why not. "cuda" is available when fastat._C_cuda loads and a GPU is visible. Reads the disk: callers
    that ask often cache the answer (fastat._backend.backend_status does)."""
    _check_kind(kind)
    if kind in _loaded:
        return True, _loaded[kind]
    if kind in _failed:
        return False, _failed[kind]
    if kind == "cuda":
        try:
            load("cuda")
        except BackendUnavailableError as exc:
            return False, str(exc)
        return True, _loaded["cuda"]
    return _cpu_status()


def _cpu_status() -> Tuple[bool, str]:
    if _load_prebuilt():  # importing it is cheap, and only a prebuilt library that loads counts as built
        return True, _loaded["cpp"]
    cached = _cached_library()
    if cached is not None:
        return True, f"built (cached at {cached.parent}), loads on first use"
    if not cpu_sources():
        return False, "C++ sources (csrc/cpu) not found in this install"
    note = f"; {_failed['prebuilt']}" if "prebuilt" in _failed else ""
    problem = _toolchain_problem()
    if problem is not None:
        return False, f"not built, and cannot build here: {problem}{note}"
    return True, f"not built yet: builds on first use ({BUILD_SECONDS}) into {cpu_build_dir()}{note}"
