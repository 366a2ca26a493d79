"""Shared test helpers: where the parity fixtures are, and the GPU marker's skip."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _unshadow_repo_root() -> None:
    """Move the repo root to the end of sys.path so its top-level folders shadow no PyPI package.

    `python -m pytest` puts the working directory (the repo root) first on sys.path, where the
    repo's `kernels/` folder (installed as `flashdreams.kernels`) hides the PyPI package `kernels`
    that transformers imports. The root stays on the path, last, so `flashdreams` still imports
    from a checkout that is not pip-installed. A repo `kernels` imported already is dropped.
    """
    root = Path(__file__).resolve().parents[1]

    def is_root(entry: str) -> bool:
        try:
            return Path(entry or os.curdir).resolve() == root
        except OSError:
            return False

    kept = [e for e in sys.path if not is_root(e)]
    if len(kept) != len(sys.path):
        sys.path[:] = [*kept, str(root)]
    shadow = sys.modules.get("kernels")
    if shadow is not None and Path(getattr(shadow, "__file__", None) or "").resolve().parent == root / "kernels":
        for name in [m for m in sys.modules if m == "kernels" or m.startswith("kernels.")]:
            del sys.modules[name]


# Before anything below (torch, flashdreams, transformers) can import `kernels`.
_unshadow_repo_root()

# Triton kernels run on the CPU under the interpreter; it must be chosen before triton is
# imported anywhere. On a CUDA machine the kernels run natively.
if os.environ.get("FD_TEST_DEVICE", "cpu") == "cpu" and "TRITON_INTERPRET" not in os.environ:
    try:
        import torch as _torch

        if not _torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:
        pass

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from flashdreams.parity.common import fixtures_root  # noqa: E402

# Under pytest-xdist (the README's `-n 2`) the workers share the cores: each takes its share of torch's
# threads, and Inductor compiles in the worker itself rather than in a pool of one process per core
# (two such pools thrashed two cores: an engine test took 5x its serial time).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT", "").isdigit():
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(_share)
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(_share))


def _deep_frame_caller(slots: int = 65000):
    """A function whose frame holds `slots` locals: calling it starts a 1 MiB data-stack chunk.

    CPython 3.11 keeps frames on 16 KiB data-stack chunks and frees a chunk when the frame at its base
    returns, so a call made in a loop exactly at a chunk boundary maps and unmaps 16 KiB each time. Under
    pytest's deep call stack the Triton interpreter's inner calls sat on such a boundary: 850k mmap/munmap
    pairs in four tiny-model FP8 blocks, and every interpreted kernel ran at half speed (3.5 s against
    1.7 s a block, half of it system time). A frame this large gets a chunk of its own of twice its size
    rounded up (1 MiB here), and the ~500 KiB after it is headroom for thousands of nested frames."""
    names = " = ".join(f"v{i}" for i in range(slots))
    src = f"def call(fn, *args):\n    if fn is None:\n        {names} = None\n    return fn(*args)\n"
    scope: dict = {}
    exec(compile(src, "<conftest deep frame>", "exec"), scope)
    return scope["call"]


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session):
    """The test loop that would run (pytest's own, or an xdist worker's), run from inside a frame that starts
    a large data-stack chunk (above). Wrappers already wrap this call; the plain implementations are run in
    pytest's order until one answers, as pytest would run them."""
    hook = session.config.hook.pytest_runtestloop
    impls = [
        impl
        for impl in reversed(hook.get_hookimpls())  # pytest calls the last registered first
        if impl.function is not pytest_runtestloop and not (impl.hookwrapper or getattr(impl, "wrapper", False))
    ]

    def run_loop():
        for impl in impls:
            result = impl.function(*[{"session": session}[name] for name in impl.argnames])
            if result is not None:
                return result
        return None

    return _deep_frame_caller()(run_loop)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def fixture_dirs(*kinds: str) -> list[Path]:
    """Fixture directories of the given kinds (empty if the fixture set is absent)."""
    root = fixtures_root()
    if root is None or not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir()):
        meta = d / "fixture.json"
        if meta.is_file() and json.loads(meta.read_text()).get("kind") in kinds:
            out.append(d)
    return out


def require_fixtures() -> Path:
    root = fixtures_root()
    if root is None or not root.is_dir():
        where = os.environ.get("FD_FIXTURES") or Path(__file__).resolve().parents[2] / "shared" / "fixtures"
        pytest.skip(f"parity fixtures not found in {where}; set FD_FIXTURES to the directory that holds them")
    return root


def params_or_skip(kinds: tuple[str, ...]):
    """pytest params over fixture dirs; one skipped param when the fixture set is absent."""
    dirs = fixture_dirs(*kinds)
    if not dirs:
        where = os.environ.get("FD_FIXTURES") or Path(__file__).resolve().parents[2] / "shared" / "fixtures"
        reason = f"parity fixtures of kinds {', '.join(kinds)} not found in {where}; set FD_FIXTURES"
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason))]
    return [pytest.param(d, id=d.name) for d in dirs]


@pytest.fixture
def count_calls(monkeypatch):
    """count_calls(owner, name) -> a list that gains an entry (args, kwargs) per call of `owner.name` (a
    function of a module, or a method of a class), which still runs as before; undone with the test."""

    def wrap(owner, name: str) -> list:
        calls, real = [], getattr(owner, name)

        def counted(*args, **kwargs):
            calls.append((args, kwargs))
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)
        return calls

    return wrap


@pytest.fixture
def taehv_switch_streams(monkeypatch):
    """taehv_switch_streams(switch, device) -> (model, {False: frames, True: frames}): a tiny NHWC TAEHV's
    stream of two 2-latent blocks with `models.taehv.<switch>` off, then on, each from a fresh copy of the
    model and a fresh state (the switch is restored with the test)."""
    import copy

    def run(switch: str, device: torch.device):
        from flashdreams.models import taehv
        from flashdreams.models.decoders import TINY_CONFIGS, init_random_

        model = taehv.TAEHV(TINY_CONFIGS["taehv"])
        init_random_(model, torch.Generator().manual_seed(3))
        model = model.eval().to(device).to(memory_format=torch.channels_last)
        latents = torch.randn(1, 4, 16, 3, 5, generator=torch.Generator().manual_seed(4)).to(device)
        outs = {}
        for on in (False, True):
            monkeypatch.setattr(taehv, switch, on)
            m = copy.deepcopy(model)
            state = m.new_decode_state(1, 3, 5)
            with torch.no_grad():
                outs[on] = torch.cat([m.decode_stream(latents[:, i : i + 2], state) for i in (0, 2)], 1)
        return model, outs

    return run
