"""Our Triton kernels and Inductor's autotuning results travel in the engine and are installed
where Triton and Inductor look them up."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from flashdreams.errors import EngineIncompatibleError, InvalidArgumentError
from flashdreams.export import kernel_cache
from flashdreams.export.kernel_cache import (
    bundle_kernels,
    capture_compile_caches,
    inductor_cache_dir,
    install_kernels,
    triton_cache_dir,
)

IR = ("ttir", "ttgir", "llir", "ptx", "source")


def _entry(cache: Path, key: str, name: str) -> None:
    """A Triton cache entry as Triton writes one: metadata, binary, IR text, and a group file that
    names every file by absolute path."""
    d = cache / key
    d.mkdir(parents=True)
    (d / f"{name}.json").write_text(json.dumps({"name": name}))
    (d / f"{name}.cubin").write_bytes(b"\x7fELF" + key.encode())
    for ext in IR:
        (d / f"{name}.{ext}").write_text(f"{ext} of {name}")
    children = {f"{name}.{ext}": str(d / f"{name}.{ext}") for ext in ("json", "cubin", *IR)}
    (d / f"__grp__{name}.json").write_text(json.dumps({"child_paths": children}))


def _best_config(cache: Path, rel: str, value: str) -> None:
    p = cache / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(value)


def test_bundle_and_install(tmp_path, monkeypatch):
    scratch, engine = tmp_path / "scratch", tmp_path / "engine"
    engine.mkdir()
    _entry(scratch / "triton", "AAA", "_ring_attention_kernel")
    _entry(scratch / "triton", "BBB", "triton_poi_fused_add_0")  # Inductor's: travels too
    _entry(scratch / "triton", "CCC", "_adaln_modulate_kernel")
    (scratch / "triton" / "DDD").mkdir()
    (scratch / "triton" / "DDD" / "__triton_launcher.so").write_bytes(b"\x7fELF")  # a launcher stub: no metadata
    _best_config(scratch / "inductor", "ab/cabc.best_config", '{"XBLOCK": 64}')
    _best_config(scratch / "inductor", "cd/ccd.best_config", '{"XBLOCK": 128}')
    (scratch / "inductor" / "ab" / "cabc.py").write_text("# kernel source: not bundled")
    assert bundle_kernels(scratch, engine) == kernel_cache.BUNDLE_FILE
    with tarfile.open(engine / kernel_cache.BUNDLE_FILE) as tar:
        names = {m.name for m in tar.getmembers() if m.isfile()}
    assert {n.split("/")[1] for n in names if n.startswith("triton/")} == {"AAA", "BBB", "CCC", "DDD"}
    assert {n for n in names if n.startswith("inductor/")} == {
        "inductor/ab/cabc.best_config",
        "inductor/cd/ccd.best_config",
    }

    here_t, here_i = tmp_path / "here-triton", tmp_path / "here-inductor"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(here_t))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(here_i))
    assert triton_cache_dir() == here_t and inductor_cache_dir() == here_i
    _entry(here_t, "CCC", "_adaln_modulate_kernel")
    (here_t / "CCC" / "_adaln_modulate_kernel.cubin").write_bytes(b"mine")  # present entries stay as they are
    _best_config(here_i, "cd/ccd.best_config", "mine")
    assert install_kernels(engine / kernel_cache.BUNDLE_FILE) == 4
    assert (here_t / "AAA" / "_ring_attention_kernel.cubin").read_bytes() == b"\x7fELFAAA"
    assert (here_t / "CCC" / "_adaln_modulate_kernel.cubin").read_bytes() == b"mine"
    assert (here_i / "ab" / "cabc.best_config").read_text() == '{"XBLOCK": 64}'
    assert (here_i / "cd" / "ccd.best_config").read_text() == "mine"
    assert (here_t / "DDD" / "__triton_launcher.so").is_file()
    assert sorted(p.name for p in here_t.iterdir()) == ["AAA", "BBB", "CCC", "DDD"]  # no temp dirs left behind
    # only what loading reads: no IR text, and the group names just the installed files, where they are now
    name = "_ring_attention_kernel"
    installed = sorted(p.name for p in (here_t / "AAA").iterdir())
    assert installed == [f"__grp__{name}.json", f"{name}.cubin", f"{name}.json"]
    grp = json.loads((here_t / "AAA" / f"__grp__{name}.json").read_text())["child_paths"]
    assert grp == {f"{name}.{ext}": str(here_t / "AAA" / f"{name}.{ext}") for ext in ("json", "cubin")}
    assert sorted(p.name for p in (here_i / "ab").iterdir()) == ["cabc.best_config"]
    assert install_kernels(engine / kernel_cache.BUNDLE_FILE) == 0


def _bundle_of(tmp_path: Path, n: int) -> Path:
    scratch, engine = tmp_path / "scratch", tmp_path / "engine"
    engine.mkdir()
    for i in range(n):
        _entry(scratch / "triton", f"K{i:03d}", f"kernel_{i}")
    _best_config(scratch / "inductor", "ab/cabc.best_config", '{"XBLOCK": 64}')
    assert bundle_kernels(scratch, engine) == kernel_cache.BUNDLE_FILE
    return engine / kernel_cache.BUNDLE_FILE


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("ir", [False, True])
def test_threads_install_what_one_thread_installs(tmp_path, monkeypatch, ir):
    """Written by 8 threads or by one, the caches end up byte for byte the same (group files included);
    FD_BUNDLE_IR=1 installs the IR text too."""
    bundle = _bundle_of(tmp_path, 24)
    if ir:
        monkeypatch.setenv(kernel_cache.IR_ENV, "1")
    trees = []
    for threads in (1, 8):
        here = tmp_path / f"t{threads}"
        monkeypatch.setenv("TRITON_CACHE_DIR", str(here / "triton"))
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(here / "inductor"))
        assert install_kernels(bundle, threads=threads) == 25
        tree = _tree(here)
        # the groups name this cache's own paths: compare them relative to it
        trees.append({k: v.replace(str(here).encode(), b"<cache>") for k, v in tree.items()})
    assert trees[0] == trees[1]
    files = [k for k in trees[0] if k.startswith("triton/")]
    assert len(files) == 24 * (3 + (len(IR) if ir else 0))
    grp = json.loads(trees[0]["triton/K007/__grp__kernel_7.json"])["child_paths"]
    assert len(grp) == 2 + (len(IR) if ir else 0)
    assert all(p.startswith("<cache>/triton/K007/") for p in grp.values())


def test_install_threads_setting(monkeypatch):
    monkeypatch.delenv(kernel_cache.THREADS_ENV, raising=False)
    assert 1 <= kernel_cache.install_threads() <= 8
    monkeypatch.setenv(kernel_cache.THREADS_ENV, "3")
    assert kernel_cache.install_threads() == 3
    for bad in ("0", "-2", "many"):
        monkeypatch.setenv(kernel_cache.THREADS_ENV, bad)
        with pytest.raises(InvalidArgumentError, match=kernel_cache.THREADS_ENV):
            kernel_cache.install_threads()


@pytest.mark.parametrize("name", ["triton/../../escape.so", "triton/K1/sub/deep.cubin", "inductor/../x.best_config"])
def test_a_bundle_member_outside_the_caches_is_refused_before_any_write(tmp_path, monkeypatch, name):
    bundle = _bundle_of(tmp_path, 2)
    with tarfile.open(bundle, "a") as tar:
        info = tarfile.TarInfo(name)
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    here = tmp_path / "here"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(here / "triton"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(here / "inductor"))
    with pytest.raises(EngineIncompatibleError, match="rebuild the engine"):
        install_kernels(bundle)
    assert not [f for f in here.rglob("*") if f.is_file()]  # nothing half-installed (Inductor makes its empty dir)


def test_nothing_to_bundle_writes_nothing(tmp_path):
    (tmp_path / "s" / "triton").mkdir(parents=True)
    (tmp_path / "e").mkdir()
    assert bundle_kernels(tmp_path / "s", tmp_path / "e") is None
    assert not list((tmp_path / "e").iterdir())


def test_capture_redirects_and_restores(monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", "/somewhere/else")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    with capture_compile_caches(redirect_inductor=True) as scratch:
        assert os.environ["TRITON_CACHE_DIR"] == str(scratch / "triton")
        assert triton_cache_dir() == scratch / "triton"
        assert inductor_cache_dir() == scratch / "inductor"
    assert os.environ["TRITON_CACHE_DIR"] == "/somewhere/else"
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    assert not scratch.exists()
    with capture_compile_caches(redirect_inductor=False):
        assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ


def test_compiled_cpp_kernels_travel_and_install(tmp_path, monkeypatch):
    """The C++ kernels a CPU build loaded are copied from the local Inductor cache (their shared
    objects and object files; not their source, which Inductor rewrites, nor its lock files)."""
    local = tmp_path / "local-inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(local))
    for name in ("cabc1.main.so", "cabc1.main.cpp", "cabc1.main.o", "cabc1.main.lock", "cabc2.main.so"):
        _best_config(local, f"ab/{name}", name)
    _best_config(local, "xy/cxyz.main.so", "not this build's")
    scratch, engine = tmp_path / "scratch", tmp_path / "engine"
    engine.mkdir()
    assert bundle_kernels(scratch, engine, cpp_keys=["cabc1", "cdead"]) == kernel_cache.BUNDLE_FILE
    with tarfile.open(engine / kernel_cache.BUNDLE_FILE) as tar:
        assert sorted(tar.getnames()) == ["inductor/ab/cabc1.main.o", "inductor/ab/cabc1.main.so"]

    elsewhere = tmp_path / "fresh-inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(elsewhere))
    assert install_kernels(engine / kernel_cache.BUNDLE_FILE) == 2
    assert (elsewhere / "ab" / "cabc1.main.so").read_text() == "cabc1.main.so"
    assert sorted(p.name for p in (elsewhere / "ab").iterdir()) == ["cabc1.main.o", "cabc1.main.so"]


def test_recording_cpp_kernels_sees_ones_loaded_before(monkeypatch):
    """A kernel this process loaded before the build is recorded when the build loads it again."""

    class FakeTable:
        cache = {"cold": None}

        @staticmethod
        def cache_clear():
            FakeTable.cache.clear()

    monkeypatch.setattr(kernel_cache, "_cpp_code_caches", lambda: [FakeTable])
    loaded = kernel_cache.record_cpp_kernels()
    assert loaded() == []
    FakeTable.cache.update({"cold": None, "cnew": None})
    assert loaded() == ["cnew", "cold"]


# A real Triton kernel compiled (not interpreted) for sm_90, in a fresh process: in the test process the
# interpreter's patches of triton.language (TRITON_INTERPRET, set for the CPU tests) can be left behind by
# earlier tests and break the compiler's frontend ("'block_argument' object has no attribute 'dtype'"),
# which made this test skip in the full run while it passed alone.
COMPILE_DOUBLE = """
import json, sys
import triton
import triton.language as tl
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


@triton.jit
def _double(X, Y, N: tl.constexpr):
    r = tl.arange(0, N)
    tl.store(Y + r, tl.load(X + r) * 2.0)


hits = []
knobs.compilation.listener = lambda **kw: hits.append(kw["cache_hit"])
try:
    src = ASTSource(fn=_double, signature={"X": "*fp32", "Y": "*fp32", "N": "constexpr"}, constexprs={"N": 64})
    triton.compile(src, target=GPUTarget("cuda", 90, 32))
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
    sys.exit(0)
print(json.dumps({"hits": hits}))
"""


def test_installed_triton_entry_is_a_cache_hit_where_the_build_cache_is_gone(tmp_path, monkeypatch):
    """End to end with Triton's own cache lookup: a kernel compiled (for sm_90, by ptxas from the
    triton wheel) into a scratch cache, bundled, the scratch removed, installed into a fresh cache
    without its IR text: compiling it again there must be a hit. Triton's group files name their
    files by absolute path, so without the install repointing them the second compile is a miss."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    script = tmp_path / "double_kernel.py"  # @triton.jit needs its source in a file
    script.write_text(COMPILE_DOUBLE)

    def compile_once() -> bool:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        if "error" in got:
            if "ptxas" in got["error"] or "backend" in got["error"].lower():  # a triton wheel that cannot target CUDA
                pytest.skip(f"cannot cross-compile for sm_90 here: {got['error']}")
            raise AssertionError(f"compiling the test kernel failed: {got['error']}")
        return got["hits"] == [True]

    scratch, engine = tmp_path / "scratch", tmp_path / "engine"
    engine.mkdir()
    monkeypatch.setenv("TRITON_CACHE_DIR", str(scratch / "triton"))
    assert not compile_once()  # compiled into the scratch cache
    assert compile_once()  # found there
    assert bundle_kernels(scratch, engine) == kernel_cache.BUNDLE_FILE
    shutil.rmtree(scratch)

    fresh = tmp_path / "fresh"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(fresh))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "ind"))
    assert install_kernels(engine / kernel_cache.BUNDLE_FILE) >= 1
    grp = json.loads(next(fresh.rglob("__grp__*.json")).read_text())
    assert all(Path(p).parent.parent == fresh and Path(p).exists() for p in grp["child_paths"].values())
    # the slim entry (metadata and binary, no IR text) is what Triton finds
    assert {Path(c).suffix for c in grp["child_paths"]} == {".json", ".cubin"}
    assert not [f for f in fresh.rglob("*") if f.suffix in kernel_cache.IR_SUFFIXES]
    assert compile_once()
    # the bench's switch back to the old install (groups as built): a miss again
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "as-built"))
    monkeypatch.setenv(kernel_cache.KEEP_GROUPS_ENV, "1")
    assert install_kernels(engine / kernel_cache.BUNDLE_FILE) >= 1
    assert not compile_once()
