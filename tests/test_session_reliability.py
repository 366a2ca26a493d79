"""A step is all or nothing: a failed step leaves the session exactly as before it; replays are bit exact."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import flashdreams
from flashdreams.errors import InvalidArgumentError, OutOfMemoryError, SessionFailedError
from flashdreams.session import _Marks

BLOCKS = 3
FAIL_BLOCK = 1


class _Boom(Exception):
    pass


class _FailingBackend:
    """The engine's backend, raising `exc` at the `at`-th graph call from now on (once)."""

    def __init__(self, inner, at: int, exc: BaseException, graph: str | None = None) -> None:
        self.inner, self.at, self.exc, self.graph = inner, at, exc, graph
        self.name, self.device, self.dtype = inner.name, inner.device, inner.dtype
        self.shape_specialized = inner.shape_specialized
        self.calls = 0

    def call(self, graph, args, block):
        if self.graph is None or graph == self.graph:
            self.calls += 1
            if self.calls == self.at:
                raise self.exc
        return self.inner.call(graph, args, block)


@pytest.fixture(scope="module")
def engine():
    return flashdreams.load(device="cpu")  # built-in model with its tiny decoder: decoder state matters


@pytest.fixture(scope="module")
def reference(engine):
    s = engine.session(seed=4)
    return [(r.latents.clone(), r.frames.clone()) for r in (s.step() for _ in range(BLOCKS))]


def _finish_and_compare(session, reference, start: int) -> None:
    assert session.block == start
    for b in range(start, BLOCKS):
        r = session.step()
        assert torch.equal(r.latents, reference[b][0]), f"block {b}: latents differ from the uninterrupted run"
        assert torch.equal(r.frames, reference[b][1]), f"block {b}: frames differ from the uninterrupted run"


# Failure points: a denoise call, the decoder, the commit (the last DiT call of a block).
@pytest.mark.parametrize(
    ("graph", "at", "exc"),
    [("dit", 2, _Boom("injected")), ("decode", 1, KeyboardInterrupt()), ("dit", 5, _Boom("injected"))],
    ids=["during-denoise", "interrupt-in-decoder", "in-commit"],
)
def test_a_failed_step_changes_nothing(engine, reference, graph, at, exc):
    s = engine.session(seed=4)
    for _ in range(FAIL_BLOCK):
        s.step()
    inner = s.backend
    s.backend = _FailingBackend(inner, at, exc, graph)
    with pytest.raises(type(exc)):
        s.step()
    s.backend = inner
    _finish_and_compare(s, reference, FAIL_BLOCK)


def test_a_failure_after_the_commit_changes_nothing(engine, reference, monkeypatch):
    s = engine.session(seed=4)
    s.step()
    s.timing = True
    real = _Marks.mark

    def failing_mark(self, name, always=False):
        if name == "commit":
            raise _Boom("after the commit")
        return real(self, name, always)

    monkeypatch.setattr(_Marks, "mark", failing_mark)
    with pytest.raises(_Boom):
        s.step()
    monkeypatch.setattr(_Marks, "mark", real)
    _finish_and_compare(s, reference, FAIL_BLOCK)


def test_out_of_memory_is_named_and_undone(engine, reference):
    s = engine.session(seed=4)
    s.step()
    inner = s.backend
    s.backend = _FailingBackend(inner, 3, torch.OutOfMemoryError("CUDA out of memory (injected)"))
    with pytest.raises(OutOfMemoryError, match="session is unchanged"):
        s.step()
    s.backend = inner
    _finish_and_compare(s, reference, FAIL_BLOCK)


def test_bad_draws_are_refused_before_anything_is_written(engine, reference):
    s = engine.session(seed=4)
    s.step()
    before = {n: t.clone() for n, t in s.buffers.items()}
    bad = torch.full(s.plan.draws["noise"].shape, float("nan"))
    for draws, msg in (
        ({"noise": bad}, "finite"),
        ({"noise": torch.zeros(2)}, "must have shape"),
        ({"nothing": torch.zeros(2)}, "unknown draws"),
        ([1, 2], "must be a dict"),
    ):
        with pytest.raises(InvalidArgumentError, match=msg):
            s.step(draws)
    assert all(torch.equal(before[n], t) for n, t in s.buffers.items())
    _finish_and_compare(s, reference, FAIL_BLOCK)


def test_a_failed_input_program_restores_the_input_and_its_state(engine):
    s = engine.session(seed=4)
    before = {n: s.buffers[n].clone() for n in ("prompt_embeds", "cross_k", "cross_v")}
    inner = s.backend
    s.backend = _FailingBackend(inner, 1, _Boom("encoder failed"), "encode_prompt")
    with pytest.raises(_Boom):
        s.set_input("prompt_embeds", engine.default_prompt(seed=9))
    s.backend = inner
    assert all(torch.equal(before[n], s.buffers[n]) for n in before)


def test_a_failure_inside_a_replayed_graph_marks_the_session_failed(engine, reference):
    """What cannot be undone (work inside a replayed CUDA graph) makes every call refuse until reset."""
    s = engine.session(seed=4)
    run = s._run_block

    def failing_replay(given):
        s._replaying = True
        raise _Boom("inside a graph")

    s._run_block = failing_replay
    with pytest.raises(_Boom):
        s.step()
    s._run_block = run
    with pytest.raises(SessionFailedError, match="reset"):
        s.step()
    with pytest.raises(SessionFailedError):
        s.set_input("prompt_embeds", engine.default_prompt())
    s.reset()
    _finish_and_compare(s, reference, 0)


_RECORD = """
import torch, flashdreams
from safetensors.torch import save_file
engine = flashdreams.load(device="cpu")
s = engine.session(seed=5)
s.start_recording()
out = {}
for b in range(2):
    out[f"a{b}"] = s.step().frames.clone()
s.set_input("prompt_embeds", engine.default_prompt(seed=3))
for b in range(2):
    out[f"b{b}"] = s.step().frames.clone()
s.reset(seed=9)
out["c0"] = s.step().frames.clone()
s.save_recording(r"{log}")
save_file(out, r"{frames}")
"""

_REPLAY = """
import torch, flashdreams
from safetensors.torch import load_file
want = load_file(r"{frames}")
got = [r.frames.clone() for r in flashdreams.replay(r"{log}", flashdreams.load(device="cpu"))]
assert len(got) == len(want) == 5, (len(got), len(want))
for g, key in zip(got, ["a0", "a1", "b0", "b1", "c0"]):
    assert torch.equal(g, want[key]), key
print("replayed", len(got), "blocks bit for bit")
"""


def test_a_recording_replays_bit_for_bit_in_another_process(tmp_path):
    log, frames = tmp_path / "session.fdrec", tmp_path / "frames.safetensors"
    for code in (_RECORD, _REPLAY):
        src = textwrap.dedent(code).replace("{log}", str(log)).replace("{frames}", str(frames))
        done = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    assert "bit for bit" in done.stdout


def test_a_file_that_is_not_a_recording_is_refused_by_name(tmp_path):
    from flashdreams.recording import Recording

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")  # the safetensors reader's own error, mapped
    with pytest.raises(InvalidArgumentError, match="not a FlashDreams recording"):
        Recording.load(junk)


def test_a_recording_refuses_another_engine(tmp_path):
    s = flashdreams.load(device="cpu", decoder=None).session(seed=1)
    s.start_recording()
    s.step()
    s.save_recording(tmp_path / "r.fdrec")
    other = flashdreams.load(device="cpu")  # with a decoder: another plan
    with pytest.raises(InvalidArgumentError, match="another engine"):
        list(flashdreams.replay(tmp_path / "r.fdrec", other))


def test_fd_run_record_then_replay_in_another_process(tmp_path):
    """fd-run --record LOG, then fd-run --replay LOG in a fresh process: the same latents, bit for bit."""
    from safetensors.torch import load_file

    log, a, b = tmp_path / "run.safetensors", tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    common = ["--decoder", "none", "--device", "cpu", "--no-progress"]
    runs = [
        ["--blocks", "3", "--seed", "11", "--record", str(log), "--save-latents", str(a)],
        ["--replay", str(log), "--save-latents", str(b)],
    ]
    for extra in runs:
        cmd = [sys.executable, "-m", "flashdreams.cli.run", *common, *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    want, got = load_file(str(a)), load_file(str(b))
    assert sorted(want) == sorted(got) == ["block_0", "block_1", "block_2"]
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_draws_do_not_depend_on_the_order_the_plan_lists_them():
    """A built engine's manifest may list the draws in another order: the noise must not change."""
    import dataclasses

    from flashdreams.engine import Engine

    engine = flashdreams.load()
    plan = engine.plan
    reordered = dataclasses.replace(plan, draws=dict(reversed(list(plan.draws.items()))))
    assert list(reordered.draws) != list(plan.draws)
    other = Engine(engine.backend, reordered, engine.spec.preset, engine.source, engine.decoder, True, engine.model)
    a = engine.session(seed=3).step().latents
    b = other.session(seed=3).step().latents
    assert torch.equal(a, b)
