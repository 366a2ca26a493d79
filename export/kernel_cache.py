"""Compiled kernels and autotuning results that an engine carries, so a cold start compiles nothing.

Two things Inductor's artifacts leave out, both measured on the H100 cold start:

* FlashDreams' own Triton kernels (ring attention, fused RoPE + cache write, adaLN, ...):
  the graphs call them as opaque custom ops, so on a machine with an empty Triton cache
  each would be JIT-compiled at the first call; and Triton's compiled launcher stubs
  (small C modules it builds with gcc, one per kernel signature).
* Inductor's runtime autotuning results (`*.best_config`): a generated kernel with
  several candidate configs benchmarks them at its first call unless its result is
  cached beside its source.

Inductor's own Triton kernels are meant to travel in its artifacts, but a cold load on
the H100 still compiled some (ptxas for 8 kernels, next33-h100), so they are bundled too.

The build runs with Triton's cache (and, on CUDA, Inductor's) pointed at scratch
directories (`capture_compile_caches`); `bundle_kernels` packs every Triton cache
entry (`triton/...`) and the autotuning results (`inductor/...`) into
`kernels.tar`. At load, `install_kernels` unpacks what this machine's caches lack, at
the paths Triton and Inductor look them up by (content hashes, so an entry either fits
exactly or is never looked up), and points each Triton entry's group file at the files'
new place. The fingerprint already guarantees the versions match. Of a Triton entry it
writes only what loading the kernel reads (metadata, binary, group file); the IR text the
bundle also keeps is 60% of its files and 81% of its bytes (the full-size Self-Forcing
engine), and writing it on one thread cost 0.5-0.7 s of an H100's cold start (next95/96).

* On CPU, Inductor's compiled C++ kernels (one shared object per kernel, built with the
  system compiler): a cold load of the tiny engine spent 28.5 of its 30.2 s compiling
  them. CPU builds keep the local Inductor cache (redirecting it would recompile every
  kernel a previous build already has), so the build records which kernels
  it loads (`record_cpp_kernels`) and `bundle_kernels` copies their compiled files from
  that cache.

A Triton kernel the building process had compiled before the build started (fd-bench
builds after an eager run in the same process) is in Triton's in-memory cache and is
not written again, so it is missing from the bundle: only that kernel compiles at load.
Inductor's compiler checks of this machine's CPU (one small program per vector ISA,
about 0.7 s each on our CI machine) are not bundled: they test this machine.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from flashdreams.errors import EngineIncompatibleError, InvalidArgumentError

log = logging.getLogger(__name__)

BUNDLE_FILE = "kernels.tar"
TRITON_ENV = "TRITON_CACHE_DIR"
INDUCTOR_ENV = "TORCHINDUCTOR_CACHE_DIR"
# FD_BUNDLE_KEEP_GROUPS=1 installs Triton's group files as built (pointing at the build's scratch cache),
# the behaviour before `_repoint_groups`: for the GPU suite's same-machine comparison of cold starts only.
KEEP_GROUPS_ENV = "FD_BUNDLE_KEEP_GROUPS"
# FD_BUNDLE_IR=1 installs each Triton entry's IR text too (TTIR, TTGIR, LLVM IR, PTX), as the build wrote it.
IR_ENV = "FD_BUNDLE_IR"
IR_SUFFIXES = frozenset({".ttir", ".ttgir", ".llir", ".ptx", ".amdgcn", ".source"})
THREADS_ENV = "FD_INSTALL_THREADS"


def triton_cache_dir() -> Path:
    """Where this process's Triton looks up compiled kernels."""
    try:
        from triton import knobs

        return Path(knobs.cache.dir)
    except (ImportError, AttributeError):  # pragma: no cover - older triton
        return Path(os.environ.get(TRITON_ENV, Path.home() / ".triton" / "cache"))


def inductor_cache_dir() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir())


@contextlib.contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    """Set an environment variable for the block and restore it after; None leaves it alone."""
    if value is None:
        yield
        return
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@contextlib.contextmanager
def capture_compile_caches(redirect_inductor: bool) -> Iterator[Path]:
    """Point Triton's cache (and with `redirect_inductor` Inductor's) at fresh scratch directories
    for this process and Inductor's compile workers; yields the scratch root."""
    scratch = Path(tempfile.mkdtemp(prefix="fd-build-caches-"))
    try:
        with (
            _env(TRITON_ENV, str(scratch / "triton")),
            _env(INDUCTOR_ENV, str(scratch / "inductor") if redirect_inductor else None),
        ):
            yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _cpp_code_caches() -> list:
    """Inductor's in-memory tables of loaded C++ kernels (class attributes keyed by the kernel's
    content hash); empty where this torch has none, so the bundle just goes without them."""
    try:
        from torch._inductor import codecache
    except ImportError:  # pragma: no cover - torch without Inductor
        return []
    names = ("CppCodeCache", "CppPythonBindingsCodeCache", "CppWrapperCodeCache")
    found = (getattr(codecache, n, None) for n in names)
    return [c for c in found if isinstance(getattr(c, "cache", None), dict) and hasattr(c, "cache_clear")]


def _loaded_cpp_keys() -> set[str]:
    return {k for c in _cpp_code_caches() for k in c.cache}


def record_cpp_kernels() -> Callable[[], list[str]]:
    """Start recording the C++ kernels Inductor loads; returns a function that lists their keys.

    Inductor's in-memory tables are cleared first (as `torch._inductor.utils.fresh_cache`
    does), so a kernel this process loaded earlier (another build, a test) is looked up
    again and recorded: found in the local cache, not compiled."""
    for c in _cpp_code_caches():
        c.cache_clear()
    return lambda: sorted(_loaded_cpp_keys())


def _cpp_kernel_files(keys: Iterable[str]) -> list[tuple[Path, str]]:
    """The compiled files of these C++ kernels in the local Inductor cache, beside the archive
    name each installs under. Inductor keeps kernel `key` in `<cache>/<key[1:3]>/<key>.*` and
    compiles only what is missing there; the source (.cpp) it rewrites from memory anyway,
    and the lock files are its own."""
    root = inductor_cache_dir()
    members = []
    for key in keys:
        for f in sorted((root / key[1:3]).glob(f"{key}.*")):
            if f.is_file() and f.suffix not in (".cpp", ".lock"):
                members.append((f, f"inductor/{f.relative_to(root).as_posix()}"))
    return members


def bundle_kernels(scratch: Path, engine_dir: Path, cpp_keys: Iterable[str] = ()) -> str | None:
    """Pack the build's Triton kernels (ours and Inductor's) and Inductor's
    autotuning results from the build's scratch caches, and the compiled C++ kernels named by
    `cpp_keys` from the local Inductor cache, into the engine; the file name, or None."""
    members: list[tuple[Path, str]] = []
    triton = scratch / "triton"
    if triton.is_dir():
        for e in sorted(triton.iterdir()):
            if not e.is_dir():
                continue
            # Every entry: ours, the compiled launcher stubs (no kernel metadata: gcc builds them,
            # ~0.35 s each on the H100), and Inductor's own kernels. Its artifacts were meant to
            # carry those, yet a cold load on the H100 still ran ptxas for 8 kernels
            # (bench/results/next33-h100/cold-profile.txt); entries a machine has are skipped.
            members.append((e, f"triton/{e.name}"))
    inductor = scratch / "inductor"
    if inductor.is_dir():
        for f in sorted(inductor.rglob("*.best_config")):
            members.append((f, f"inductor/{f.relative_to(inductor).as_posix()}"))
    members += _cpp_kernel_files(cpp_keys)
    if not members:
        return None
    with tarfile.open(engine_dir / BUNDLE_FILE, "w") as tar:
        for path, arcname in members:
            tar.add(path, arcname=arcname)
    log.info("bundled %d kernel cache entries into %s", len(members), BUNDLE_FILE)
    return BUNDLE_FILE


def install_threads() -> int:
    """How many threads write an install's files (FD_INSTALL_THREADS; 1 writes them one by one)."""
    raw = os.environ.get(THREADS_ENV)
    if raw is None:
        return min(8, os.cpu_count() or 1)
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise InvalidArgumentError(f"{THREADS_ENV}={raw!r}: give a whole number of threads, 1 or more")
    return n


def _units(tar: tarfile.TarFile, roots: dict[str, Path], keep_ir: bool) -> dict[tuple[str, str], list]:
    """The bundle's regular files grouped by what installs atomically: a Triton cache entry (a
    directory) or one Inductor file. Names are checked here, before anything is written."""
    units: dict[tuple[str, str], list[tarfile.TarInfo]] = {}
    for m in tar.getmembers():
        kind, _, rest = m.name.partition("/")
        if kind not in roots or not m.isfile():
            continue
        parts = PurePosixPath(rest).parts
        bad = not parts or any(p in ("", ".", "..") for p in parts) or rest.startswith("/")
        if bad or (kind == "triton" and len(parts) != 2):
            raise EngineIncompatibleError(
                f"kernel bundle member '{m.name}' is not a cache entry's file; rebuild the engine with fd-build"
            )
        if kind == "triton" and not keep_ir and PurePosixPath(parts[1]).suffix in IR_SUFFIXES:
            continue
        key = parts[0] if kind == "triton" else rest
        units.setdefault((kind, key), []).append(m)
    return units


def _write_unit(data: bytes, kind: str, dest: Path, members: list[tarfile.TarInfo], repoint: bool) -> bool:
    """Write one unit into a private directory beside `dest`, then rename it into place (atomic:
    a concurrent reader never sees half an entry); False where another process installed it first."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".fd-install-{os.getpid()}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        for m in members:
            path = tmp / PurePosixPath(m.name).name
            with open(path, "wb") as f:
                f.write(data[m.offset_data : m.offset_data + m.size])
            os.chmod(path, 0o644 | (m.mode & 0o111))
            os.utime(path, (m.mtime, m.mtime))  # the build's time, as unpacking keeps it: nothing looks new
        src = tmp if kind == "triton" else tmp / dest.name
        if kind == "triton" and repoint:
            _repoint_groups(tmp, dest)
        try:
            os.replace(src, dest)
        except OSError:
            return False
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def install_kernels(bundle: Path, threads: int | None = None) -> int:
    """Unpack the bundle's entries that this machine's caches lack; how many were added.

    Of each Triton entry only what loading a kernel reads is written: its metadata, binary and
    group file, and the launcher stubs (`.so`). The IR text Triton keeps beside them (TTIR, TTGIR,
    LLVM IR, PTX: most of an entry's files and bytes) stays in the bundle, unless FD_BUNDLE_IR=1
    (to read a kernel's PTX). Triton reads every file of a group when it loads a kernel, so the
    slim entries are also less to read. The units are written by `threads` threads (default
    `install_threads()`): the writes wait on the file system, not on Python."""
    roots = {"triton": triton_cache_dir(), "inductor": inductor_cache_dir()}
    keep_ir = os.environ.get(IR_ENV) == "1"
    repoint = os.environ.get(KEEP_GROUPS_ENV) != "1"
    data = bundle.read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        units = _units(tar, roots, keep_ir)
    todo = [(kind, roots[kind] / key, mine) for (kind, key), mine in sorted(units.items())]
    todo = [t for t in todo if not t[1].exists()]
    n = threads if threads is not None else install_threads()
    if n == 1 or len(todo) < 2:
        return sum(_write_unit(data, kind, dest, mine, repoint) for kind, dest, mine in todo)
    with ThreadPoolExecutor(min(n, len(todo)), thread_name_prefix="fd-install") as pool:
        return sum(pool.map(lambda t: _write_unit(data, t[0], t[1], t[2], repoint), todo))


def _repoint_groups(entry: Path, dest: Path) -> None:
    """Point a Triton cache entry's group files at the entry's final place, listing only the files
    the entry holds.

    Triton finds a compiled kernel through `__grp__<name>.json`, whose `child_paths` are absolute
    paths of the entry's files where they were written: in the build's scratch cache, gone after the
    build. Triton treats a group with a missing child as a miss and compiles the kernel again, into
    the same entry: without this, 9 bundled kernels compiled again at every cold load (next41/next44-h100:
    none with it, and the cold start 8.25 / 8.43 s against 10.33 / 12.39 s on the same machines)."""
    here = {p.name for p in entry.iterdir()}
    for grp in entry.glob("__grp__*.json"):
        try:
            data = json.loads(grp.read_text())
            children = data["child_paths"]
        except (ValueError, KeyError, TypeError):
            continue  # not a group Triton would read either
        data["child_paths"] = {name: str(dest / Path(p).name) for name, p in children.items() if Path(p).name in here}
        grp.write_text(json.dumps(data))
