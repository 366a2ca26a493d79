"""Sessions on a CUDA device under captured graphs: frames leave before the commit, and they are right."""

from __future__ import annotations

import pytest
import torch

import flashdreams

pytestmark = pytest.mark.gpu

SLEEP_CYCLES = 400_000_000  # ~0.2 s at ~2 GHz: a commit far slower than the denoise and decode


class _SlowCommit:
    """The engine's backend with a GPU sleep queued before every commit call (the call at t_commit)."""

    def __init__(self, inner, session_buffers) -> None:
        self.inner, self.buffers = inner, session_buffers
        self.name, self.device, self.dtype = inner.name, inner.device, inner.dtype
        self.shape_specialized = inner.shape_specialized

    def call(self, graph, args, block):
        if graph == "dit" and args["t"].data_ptr() == self.buffers["t_commit"].data_ptr():
            torch.cuda._sleep(SLEEP_CYCLES)
        return self.inner.call(graph, args, block)


def _session(engine, graphs: bool):
    s = engine.session(seed=3, cuda_graphs=graphs)
    s.backend = _SlowCommit(engine.backend, s.buffers)
    s.timing = True
    return s


def test_frames_are_ready_before_a_slow_commit_ends_and_match_eager():
    engine = flashdreams.load(device="cuda", dtype="float32")
    eager = _session(engine, graphs=False)
    graphed = _session(engine, graphs=True)
    blocks = 5  # block 0 and 1 run eagerly as warm-up, 2 is captured, 3-4 replay
    for b in range(blocks):
        want = eager.step()
        got = graphed.step()
        torch.cuda.synchronize()
        host = got.frames_cpu()
        assert host.shape == want.frames.shape
        assert (host.int() - want.frames.cpu().int()).abs().max() <= 1, f"block {b}: frames differ"
        assert torch.allclose(got.latents, want.latents, rtol=0, atol=1e-5), f"block {b}: latents differ"
    # Now a replayed block, without syncing: the frames must be readable while the commit still sleeps.
    expected = eager.step().frames.cpu()
    r = graphed.step()
    commit_end = r.marks.points[-1][1]
    host = r.frames_cpu()  # waits for frames_ready only, copies on a side stream
    assert not commit_end.query(), "the commit had already finished: the frames did not leave before it"
    assert (host.int() - expected.int()).abs().max() <= 1, "frames read before the commit are stale or wrong"
    ms = r.stage_ms()
    assert ms["commit"] > 50 and ms["denoise"] + ms["decode"] < ms["commit"], ms
    # After a reset the first block's kind is captured after the steady one: both replay correctly
    # (a buffer of another shape, such as the first block's 9 frames, is never freed under a graph).
    eager.reset()
    graphed.reset()
    for b in range(4):
        want, got = eager.step(), graphed.step()
        torch.cuda.synchronize()
        assert (got.frames.cpu().int() - want.frames.cpu().int()).abs().max() <= 1, f"after reset, block {b}"


_RECORD = """
import torch, flashdreams
from safetensors.torch import save_file
engine = flashdreams.load(device="cuda", attention="triton")
s = engine.session(seed=5)
s.start_recording()
out = {}
for b in range(4):
    out[f"a{b}"] = s.step().frames.cpu()
s.set_input("prompt_embeds", engine.default_prompt(seed=3))
for b in range(3):
    out[f"b{b}"] = s.step().frames.cpu()
s.save_recording(r"{log}")
save_file(out, r"{frames}")
"""

_REPLAY = """
import torch, flashdreams
from safetensors.torch import load_file
want = load_file(r"{frames}")
got = [r.frames.cpu() for r in flashdreams.replay(r"{log}", flashdreams.load(device="cuda", attention="triton"))]
keys = [f"a{b}" for b in range(4)] + [f"b{b}" for b in range(3)]
diff = [int((g.int() - want[k].int()).abs().max()) for g, k in zip(got, keys)]
print("max frame difference per block:", diff)
assert len(got) == len(keys) and max(diff) == 0, diff
"""


def test_a_recording_replays_bit_for_bit_under_cuda_graphs(tmp_path):
    """Record with captured graphs (bf16, Triton kernels) in one process, replay in another."""
    import subprocess
    import sys
    import textwrap

    log, frames = tmp_path / "s.fdrec", tmp_path / "f.safetensors"
    for code in (_RECORD, _REPLAY):
        src = textwrap.dedent(code).replace("{log}", str(log)).replace("{frames}", str(frames))
        done = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    print(done.stdout)


def test_host_frames_come_back_pinned_and_equal_to_the_device_frames():
    """frames_cpu copies through page-locked memory (to_host): the same bytes, a tensor the caller
    keeps (the next step does not overwrite it)."""
    engine = flashdreams.load(preset="arena", device="cuda")
    worlds = engine.worlds(4, seeds=[0, 1, 2, 3])
    first = worlds.step()
    host = first.frames_cpu()
    assert host.is_pinned() and host.dtype == torch.uint8
    assert torch.equal(host, first.frames.to("cpu"))
    kept = host.clone()
    second = worlds.step()
    assert torch.equal(host, kept)  # a copy of its own
    assert torch.equal(second.frames_cpu(), second.frames.to("cpu"))
    session = engine.session(seed=5)
    for _ in range(3):  # past capture: the frames leave from the graphs' output buffer
        result = session.step()
        frames = result.frames_cpu()
        assert frames.is_pinned() and torch.equal(frames, result.frames.to("cpu"))


def test_warm_up_captures_every_kind_so_the_first_blocks_replay():
    """After warm_up() the first blocks replay captured graphs (nothing is captured during them) and equal
    a fresh session's blocks."""
    engine = flashdreams.load(device="cuda", dtype="float32", decoder="taehv", attention="triton")
    fresh = engine.session(seed=4)
    want = [fresh.step().latents.clone() for _ in range(4)]
    warmed = engine.session(seed=4)
    warmed.warm_up()
    captured, capture_s = set(warmed._captured), warmed.capture_s
    assert captured == {engine.plan.kind_of(b) for b in range(4)}
    got = [warmed.step().latents.clone() for _ in range(4)]
    assert warmed.capture_s == capture_s  # no capture inside the real blocks
    for a, b in zip(got, want):
        assert (a - b).norm() <= 1e-5 * b.norm()


def test_warm_up_returns_once_its_gpu_work_is_done():
    """warm_up() waits for the device: the next block's time is its own, not the warm-up's tail (a
    GPU sleep queued after every warm-up step must be over when it returns)."""
    engine = flashdreams.load(device="cuda")
    s = engine.session(seed=2)
    plain_step = s.step

    def step_then_sleep(*args, **kwargs):
        out = plain_step(*args, **kwargs)
        torch.cuda._sleep(SLEEP_CYCLES)  # enqueued behind the block: only a device sync waits for it
        return out

    s.step = step_then_sleep  # warm_up calls self.step
    s.warm_up()
    assert torch.cuda.current_stream(s.device).query(), "warm_up() returned with GPU work still queued"
    del s.step
    assert s.block == 0 and len(s._captured) > 0


def test_a_restored_session_replays_its_captured_graphs_and_continues_bit_for_bit():
    """restore() copies into the buffers the captured graphs read, so after it the graphs replay the
    snapshot's world: the same frames as the uninterrupted run, bit for bit, with CUDA graphs."""
    engine = flashdreams.load(device="cuda")
    s = engine.session(seed=6, cuda_graphs=True)
    for _ in range(4):  # blocks 0-1 eager, then captured and replayed
        s.step()
    snap = s.snapshot()
    host = s.snapshot(device="cpu")
    assert host.tensors["ring_k"].device.type == "cpu"
    pinned = s.snapshot(device="cpu", pinned=True)
    assert all(t.is_pinned() for t in pinned.tensors.values())
    reused = s.snapshot(into=s.snapshot(device="cpu", pinned=True))  # page-locked memory written again
    assert all(torch.equal(reused.tensors[n], t) for n, t in host.tensors.items())
    ahead = [(r.latents.clone(), r.frames.clone()) for r in (s.step() for _ in range(3))]
    for source in (snap, host, pinned, reused):
        s.restore(source)
        again = [(r.latents.clone(), r.frames.clone()) for r in (s.step() for _ in range(3))]
        for (a, fa), (b, fb) in zip(ahead, again, strict=True):
            assert torch.equal(a, b) and torch.equal(fa, fb)


def test_a_renewed_session_replays_the_graphs_it_captured_and_rolls_out_as_a_new_one():
    """renew() after another rollout (another seed and prompt) keeps the captured graphs: the new rollout's
    blocks replay them (nothing is captured) and equal a fresh session's."""
    engine = flashdreams.load(device="cuda", dtype="float32", decoder="taehv", attention="triton")
    fresh = engine.session(seed=4)
    want = [fresh.step().latents.clone() for _ in range(4)]
    used = engine.session(seed=9, inputs={"prompt_embeds": engine.default_inputs(seed=3)["prompt_embeds"]})
    used.warm_up()  # each block kind runs eager once, then is captured (a plain rollout leaves "first" eager)
    for _ in range(4):
        used.step()
    captured, capture_s = set(used._captured), used.capture_s
    assert captured == {engine.plan.kind_of(b) for b in range(4)}
    used.renew(seed=4)
    got = [used.step().latents.clone() for _ in range(4)]
    assert used.capture_s == capture_s and set(used._captured) == captured
    for a, b in zip(got, want, strict=True):
        assert (a - b).norm() <= 1e-5 * b.norm()
