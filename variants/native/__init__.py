"""Small C kernels for the variants' hot loops that eager PyTorch runs as hundreds of tiny ops,
built on first use with the machine's C compiler and loaded with ctypes.

Sinkhorn's kernel computes bit for bit what its PyTorch fallback computes (same operations, same
order, no fused multiply-add, no fast-math), so whether it loaded changes a run's speed and never
its numbers; HC's (hyper_connection.c), mHC's mappings (mhc_mappings.c) and AttnRes's depth
attention (depth_attention.c) compute the same formula in another order of additions (the
latter two with an exp of their own, mHC's with a log too), so those variants' numbers differ
at float rounding with and without them (a record names the builds that ran in its cell).
Where a kernel cannot load (no compiler, a read-only cache, ``SUITE_NATIVE=0``) the caller
runs PyTorch's path, after one warning that says why. HC's, mHC's and AttnRes's kernels split
their blocks of rows among PyTorch's threads (OpenMP, where PyTorch's runtime is the
``libgomp.so.1`` its Linux wheels load, sized by ``torch.set_num_threads``; elsewhere one
thread): each block's results and parameter sums are its own and the sums are added in block
order, so their bits do not depend on the number of threads.

Built libraries are cached under ``$SUITE_NATIVE_CACHE`` (default
``$XDG_CACHE_HOME/stability-suite/native``, else ``~/.cache/...``), named by a hash of the source,
the headers beside it that it includes, the flags, the compiler's command and version, the
machine's architecture and its C library, so a change to any of them builds anew and workers
sharing a home directory on different machines never load a stranger's build (the build
targets the architecture's baseline; with GCC on x86-64, AVX2 clones are picked at load time).
docs/operations.md says more.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import re
import shlex
import shutil
import struct
import subprocess
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import torch

from variants.functions import functorch_transforms_active

# -ffp-contract=off: no fused multiply-add, so that the kernels round as PyTorch's loops do;
# -fno-fast-math after whatever $CC carries: -ffast-math reorders arithmetic and (GCC 12) links
# code that flushes denormals in every thread that loads the library.
FLAGS = ("-O3", "-shared", "-fPIC", "-fno-fast-math", "-ffp-contract=off", "-fno-trapping-math")
LIBRARIES = ("-lm",)  # after the source, as linkers resolve left to right
# For the kernels that split their rows among threads (parallel.h): GCC links libgomp.so.1,
# which the loader resolves to the copy PyTorch's CPU wheel already loaded (one pool of
# threads, sized by torch.set_num_threads).
OPENMP = ("-fopenmp",)


def cache_dir() -> Path:
    if "SUITE_NATIVE_CACHE" in os.environ:
        return Path(os.environ["SUITE_NATIVE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "stability-suite" / "native"


def _compiler() -> list[str] | None:
    """The compiler command: ``$CC`` as the shell would split it (``ccache gcc``, ``gcc
    -m64``), else the one Python was built with, else ``cc``; None where none is found. A
    ``$CC`` that names no program is an error, not a silent fallback to another compiler."""
    if os.environ.get("CC"):
        try:
            command = shlex.split(os.environ["CC"])
        except ValueError as error:  # an unbalanced quote
            raise RuntimeError(f"CC={os.environ['CC']!r} cannot be split: {error}") from None
        if not command or shutil.which(command[0]) is None:
            raise RuntimeError(f"CC={os.environ['CC']!r} names no program on PATH")
        return [shutil.which(command[0]), *command[1:]]
    for name in ((sysconfig.get_config_var("CC") or "").split(" ")[0], "cc"):
        if name and (path := shutil.which(name)):
            return [path]
    return None


@cache
def library(name: str) -> ctypes.CDLL | None:
    """The kernels of ``variants/native/<name>.c``, built here on first use; None (after a
    warning saying why) where they cannot be, or where ``SUITE_NATIVE=0`` turns them off."""
    if os.environ.get("SUITE_NATIVE", "1") == "0":
        return None
    try:
        built = _build(name)
        loaded = ctypes.CDLL(str(built))  # whole (``_build`` rebuilt a damaged one)
        _builds[name] = built.stem
        return loaded
    except (OSError, subprocess.SubprocessError, RuntimeError, ValueError) as error:
        warnings.warn(
            f"variants.native: the {name} kernel is not built ({error}); running PyTorch's "
            "path instead, slower (docs/operations.md says whether its numbers differ; set "
            "SUITE_NATIVE=0 to silence this)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


# Mach-O (32/64-bit, either byte order, and universal): whole or not, its magic is all we read.
_MACH_O_MAGIC = (b"\xfe\xed\xfa\xce", b"\xfe\xed\xfa\xcf", b"\xce\xfa\xed\xfe",
                 b"\xcf\xfa\xed\xfe", b"\xca\xfe\xba\xbe")  # fmt: skip


def _is_whole_library(path: Path) -> bool:
    """Whether ``path`` holds a whole library (False where it is missing). For ELF: every
    loadable segment and the section header table end inside the file. A library cut short (a
    full disk, a crashed copy) must never reach ``dlopen``, which maps a segment past the
    file's end and dies of SIGBUS when it touches it (a crash of the worker, not an error to
    catch)."""
    try:
        with path.open("rb") as file:
            data, size = file.read(1 << 16), os.fstat(file.fileno()).st_size
    except FileNotFoundError:
        return False
    if data[:4] in _MACH_O_MAGIC:
        return True
    if len(data) < 52 or data[:4] != b"\x7fELF" or data[4] not in (1, 2) or data[5] not in (1, 2):
        return False
    order = "<" if data[5] == 1 else ">"
    if data[4] == 2:  # 64-bit
        header, segment = order + "32xQQ6xHHHH", order + "I4xQ16xQ"
    else:
        header, segment = order + "28xII6xHHHH", order + "II8xI"
    if len(data) < struct.calcsize(header):
        return False
    programs, sections, program_size, programs_count, section_size, sections_count = (
        struct.unpack_from(header, data)
    )
    if program_size < struct.calcsize(segment) or programs + program_size * programs_count > len(
        data
    ):
        return False
    for index in range(programs_count):
        kind, offset, file_size = struct.unpack_from(segment, data, programs + index * program_size)
        if kind == 1 and offset + file_size > size:  # PT_LOAD
            return False
    return sections + section_size * sections_count <= size


def _build(name: str) -> Path:
    """The cached library of ``<name>.c``, built here where it is missing or not whole. A
    source that includes ``parallel.h`` is built with OpenMP where PyTorch runs on libgomp
    (``_openmp_is_pytorchs``); where the compiler refuses ``-fopenmp`` (Apple's clang without
    libomp), without it, its kernels then on one thread, and a marker beside the cache says so
    to later processes (a read-only cache that holds both works without a compiler run)."""
    source = Path(__file__).with_name(f"{name}.c")
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC)")
    version = subprocess.run(
        [*compiler, "--version"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    machine = [platform.machine(), *platform.libc_ver()]  # nodes sharing a home may differ
    included = _local_headers(source)
    texts = [source.read_text(), *(header.read_text() for header in included)]
    parallel = source.with_name("parallel.h") in included and _openmp_is_pytorchs()
    choices = [FLAGS + OPENMP, FLAGS] if parallel else [FLAGS]
    for flags in choices:
        identity = [*texts, *flags, *LIBRARIES, *compiler, version, *machine]
        key = hashlib.sha256("\0".join(identity).encode()).hexdigest()[:16]
        built = cache_dir() / f"{name}-{key}.so"
        refused = built.with_suffix(".refused")  # this compiler has no -fopenmp
        if _is_whole_library(built):
            return built
        if flags is not choices[-1] and refused.exists():
            continue
        # A damaged file under the name is replaced by the rename, never unlinked: another
        # process may have just renamed a whole build into place.
        try:
            return _compile(compiler, flags, source, built)
        except OSError:  # the cache's (read-only, full): a one-thread build may be there
            if flags is choices[-1]:
                raise
        except CompilerFailed as error:
            words = ("openmp", "gomp", "omp.h")
            if flags is choices[-1] or not any(word in error.stderr.lower() for word in words):
                raise  # not a refusal of OpenMP (a killed compiler, ...): the next process retries
            with contextlib.suppress(OSError):
                refused.touch()
    raise AssertionError("unreachable")


@cache
def _openmp_is_pytorchs() -> bool:
    """Whether a library built with GCC's -fopenmp would share PyTorch's OpenMP runtime: the
    process has loaded a ``libgomp.so.1`` (PyTorch's Linux wheels ship one under that name,
    which the loader then gives this library too). Elsewhere (a wheel whose copy is renamed
    ``libgomp-<hash>.so.1``, Intel's or LLVM's runtime, macOS) the kernels would start a second
    runtime whose threads ``torch.set_num_threads`` does not size: built for one thread."""
    try:
        with open("/proc/self/maps") as maps:
            return any(line.rstrip().endswith("/libgomp.so.1") for line in maps)
    except OSError:
        return False


class CompilerFailed(RuntimeError):
    """The compiler's exit status was not 0; ``stderr`` is what it said."""

    def __init__(self, compiler: list[str], stderr: str) -> None:
        super().__init__(f"{' '.join(compiler)} failed: {stderr.strip()[-500:]}")
        self.stderr = stderr


def _compile(compiler: list[str], flags: tuple[str, ...], source: Path, built: Path) -> Path:
    name = source.stem
    built.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(built.parent, name)
    # Built beside its final name and renamed into place: workers that build at once each
    # rename a whole library, and none loads a half-written one.
    handle, partial = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=built.parent)
    os.close(handle)
    try:
        result = subprocess.run(
            [*compiler, *flags, "-o", partial, str(source), *LIBRARIES],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            raise CompilerFailed(compiler, result.stderr)
        os.chmod(partial, 0o755)  # mkstemp's file is private; a shared cache's users load it
        with open(partial, "rb") as file:  # on disk before its name: after a crash, a file
            os.fsync(file.fileno())  # renamed but never written could pass as whole
        os.replace(partial, built)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return built


def _local_headers(source: Path) -> list[Path]:
    """The headers beside ``source`` that it includes (``#include "name.h"``), and theirs, in
    name order: part of its build's key, so that a change to a header rebuilds the libraries
    that include it, and only those (a record names the build, and a key that changed for
    nothing would tell of a rounding change that did not happen)."""
    found: set[Path] = set()
    pending = [source]
    while pending:
        text = pending.pop().read_text()
        for name in re.findall(r'^\s*#\s*include\s+"([^"]+)"', text, flags=re.MULTILINE):
            header = source.parent / name
            if header not in found and header.is_file():
                found.add(header)
                pending.append(header)
    return sorted(found)


def _remove_stale_partials(folder: Path, name: str, older_than_s: float = 3600) -> None:
    """Partial builds a killed worker left behind (a build takes about a second)."""
    for partial in folder.glob(f".{name}-*.so"):
        try:
            if time.time() - partial.stat().st_mtime > older_than_s:
                partial.unlink()
        except OSError:  # another worker removed it first
            pass


_used: set[str] = set()
_builds: dict[str, str] = {}  # a loaded library's name -> its build, "<name>-<key>"


def note_used(name: str) -> None:
    """Notes that a kernel of ``<name>.c`` ran (called by the modules that run them)."""
    _used.add(_builds.get(name, name))


def used_since_reset() -> str:
    """The builds whose kernels ran since ``reset_used()``, as ``<name>-<key>`` (the cached
    library's name, whose key hashes the source, flags, compiler and machine), comma-separated,
    empty when none: a record says which ran in its cell, as HC's change a result's float
    rounding, and a change to a kernel's source changes the key, so that a store resumed across
    such a change tells its two roundings apart."""
    return ",".join(sorted(_used))


def reset_used() -> None:
    _used.clear()


def runs_natively(*tensors: torch.Tensor) -> bool:
    """Whether these tensors can go to a kernel here: plain contiguous CPU float32 or float64
    tensors (or parameters) of one dtype, outside vmap and other function transforms (their
    tensors wrap others) and outside torch.compile's tracing (inductor fuses the fallback)."""
    dtype = tensors[0].dtype
    return (
        not torch.compiler.is_compiling()
        and dtype in (torch.float32, torch.float64)
        and all(
            type(tensor) in (torch.Tensor, torch.nn.Parameter)  # no other subclass
            and tensor.device.type == "cpu"
            and tensor.dtype == dtype
            and tensor.is_contiguous()
            and not torch._C._functorch.is_functorch_wrapped_tensor(tensor)
            for tensor in tensors
        )
    )


def kernels_run(kernels: Callable[[torch.dtype], object | None], *tensors: torch.Tensor) -> bool:
    """Whether a library's kernels run these tensors from an autograd Function without a vmap
    rule: they are plain contiguous CPU tensors of one float dtype outside torch.compile
    (``runs_natively``), no torch.func transform is running (even unbatched tensors: under vmap
    PyTorch's path batches), and the library loads (``kernels``, the module's lookup by dtype,
    gives them)."""
    return (
        runs_natively(*tensors)
        and not functorch_transforms_active()
        and kernels(tensors[0].dtype) is not None
    )


def checked(status: int, name: str) -> None:
    """A kernel's status: 0, or -1 where its workspace could not be had."""
    if status != 0:
        raise MemoryError(f"{name}: no memory for the kernel's workspace")


def declared(
    kernels: ctypes.CDLL, name: str, dtype: torch.dtype, argtypes: list, restype: type | None
) -> Callable[..., Any]:
    """The kernel ``<name>_f32`` or ``<name>_f64`` for this dtype, its C signature declared
    (ctypes would pass Python ints as 32-bit ints)."""
    function = getattr(kernels, f"{name}_{'f32' if dtype == torch.float32 else 'f64'}")
    function.argtypes, function.restype = argtypes, restype
    return function


def pointer(tensor: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(tensor.data_ptr())
