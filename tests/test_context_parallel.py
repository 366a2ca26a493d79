"""Context parallel on the CPU: 2 and 4 gloo processes must give a single process's latents.

Each world size is spawned once (a module fixture) and runs every case in turn through
`load_context_parallel`, a plain Engine whose sessions allocate this rank's KV-ring shard
from the sharded plan: Ulysses and ring attention (queries or K/V passed around), sliced
and masked ring reads, batch 2, the isend/irecv all-to-all fallback, process subgroups, the
decoder on rank 0 only, and a rolling cache that wraps (the tiny preset keeps sink 1 +
window 8 frames; 7 blocks of 3 frames wrap it twice). Shape errors must come as named
InvalidArgumentErrors on every rank. The single-process tests check the hook seam itself.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

import flashdreams
from flashdreams.errors import InvalidArgumentError
from flashdreams.models.families.causal_wan.presets import TINY_WAN
from flashdreams.numerics import rel_l2
from flashdreams.parallel import (
    TokenShard,
    attention_lse,
    check_head_shardable,
    check_token_shardable,
    context_parallel_engine,
    merge_partials,
    shard_plan,
)
from flashdreams.presets import get_preset

REPO = Path(__file__).resolve().parents[1]
BLOCKS = 7  # 21 frames through a ring of 1 + 8 frames: the window wraps
TOL = 1e-5  # rel. L2 in float32
TINY = get_preset("tiny")
TINY_4H = TINY.replace(name="tiny-4heads", model=TINY_WAN.replace(num_heads=4))
LINGBOT = get_preset("lingbot-world-fast-tiny")  # 6 tokens a frame, 2 heads
WAN22 = get_preset("wan2.2-tiny")  # two experts, each with its own KV ring; block 0 is one frame
OMNI = get_preset("omnidreams-sv-tiny-latent")  # Cosmos DiT: 24 tokens a frame, 2 heads, window of 6 frames

# name -> (preset, world size of the group or None for all, options)
CASES_2 = {
    "ulysses": (TINY, None, dict(mode="ulysses")),
    "ring-q": (TINY, None, dict(mode="ring", ring_pass="q")),
    "ring-kv": (TINY, None, dict(mode="ring", ring_pass="kv")),
    "ulysses-p2p-masked-b2": (TINY, None, dict(mode="ulysses", all_to_all="p2p", slice_ring=False, batch=2)),
    "ring-q-masked-b2": (TINY, None, dict(mode="ring", ring_pass="q", slice_ring=False, batch=2)),
    "ring-kv-masked": (TINY, None, dict(mode="ring", ring_pass="kv", slice_ring=False)),
    "ring-q-group-of-1": (TINY, 1, dict(mode="ring", ring_pass="q")),
    "ulysses-decoder-on-rank-0": (TINY, None, dict(mode="ulysses", decoder="taehv")),
    # LingBot-World Fast on an orbiting camera: its per-token scale/shift is taken per rank like the tokens.
    "lingbot-ulysses": (LINGBOT, None, dict(mode="ulysses", camera=True)),
    "lingbot-ring-kv": (LINGBOT, None, dict(mode="ring", ring_pass="kv", camera=True)),
    # Causal Wan2.2: both experts' graphs hooked, both rings sharded, the length always masked on the device.
    "wan22-ulysses": (WAN22, None, dict(mode="ulysses")),
    "wan22-ring-q": (WAN22, None, dict(mode="ring", ring_pass="q")),
    # OmniDreams: the Cosmos DiT's chunks (first with the image frame, then steady) and its finalize pass.
    "omnidreams-ulysses": (OMNI, None, dict(mode="ulysses")),
    "omnidreams-ring-kv": (OMNI, None, dict(mode="ring", ring_pass="kv")),
    # ... and with HD-map pixels: each rank runs the (replicated) streaming HD-map encoder itself.
    "omnidreams-pixels-ring-q": (get_preset("omnidreams-sv-tiny"), None, dict(mode="ring", ring_pass="q")),
}
CASES_4 = {
    "ulysses": (TINY_4H, None, dict(mode="ulysses")),
    "ring-q": (TINY_4H, None, dict(mode="ring", ring_pass="q")),
    "ring-kv-masked": (TINY_4H, None, dict(mode="ring", ring_pass="kv", slice_ring=False)),
    "ring-q-2-heads": (TINY, None, dict(mode="ring", ring_pass="q")),  # ring mode has no head constraint
    "ulysses-groups-of-2": (TINY, 2, dict(mode="ulysses", all_to_all="p2p")),
    "ring-kv-groups-of-2": (TINY, 2, dict(mode="ring", ring_pass="kv")),
}
try:  # the Triton kernels (ring attention with its LSE, the merge) run here under Triton's interpreter
    from flashdreams.kernels import triton_available

    _TRITON = os.environ.get("TRITON_INTERPRET") == "1" and triton_available("cpu")
except ImportError:
    _TRITON = False
if _TRITON:
    # Interpreted kernels are slow on a CPU: fewer blocks (4 still wrap the ring once).
    CASES_2["ulysses-triton"] = (TINY, None, dict(mode="ulysses", attention="triton", blocks=2))
    CASES_2["ring-q-triton"] = (TINY, None, dict(mode="ring", ring_pass="q", attention="triton", blocks=4))
# name -> (preset, options): each must raise InvalidArgumentError on every rank.
ERRORS_2 = {"odd-frame-tokens": (TINY, dict(mode="ring", height=48, width=80))}  # 3x5 = 15 tokens a frame
ERRORS_4 = {
    "heads-not-divisible": (TINY, dict(mode="ulysses")),  # 2 heads over 4 ranks
    "frame-tokens-not-divisible": (TINY_4H, dict(mode="ring", height=48, width=96)),  # 3x6 = 18 tokens
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rollout(engine, batch: int, blocks: int = BLOCKS, seed: int = 5, camera: bool = False):
    """`blocks` steps of one session: (each block's latents, whether each step had frames, the session).
    A list, not a stack: Wan2.2's block 0 has one latent frame, the others three. `camera`: a moving
    camera path for LingBot (its default is a still camera, the same for every token)."""
    inputs = {"prompt_embeds": engine.default_prompt(batch=batch, seed=1)}
    if camera:
        from flashdreams.models.families.lingbot import example_camera

        frames, (h, w) = engine.plan.inputs["poses"].shape[1], engine.plan.inputs["image"].shape[-2:]
        inputs |= example_camera(batch, frames, h, w)
    s = engine.session(inputs=inputs, seed=seed)
    steps = [s.step() for _ in range(blocks)]
    return [r.latents for r in steps], [r.frames is not None for r in steps], s


def _worker(rank: int, world: int, port: int, cases: dict, errors: dict, out: str) -> None:
    """One rank: run every case and error probe, save what it saw."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    from flashdreams.parallel import init_from_env, load_context_parallel, shutdown

    init_from_env(backend="gloo", timeout_s=120)
    results: dict = {"latents": {}, "frames": {}, "ring_shape": {}, "errors": {}, "failure": None}
    try:
        for name, (preset, group_size, opts) in cases.items():
            opts = dict(opts)
            batch, blocks, camera = opts.pop("batch", 1), opts.pop("blocks", BLOCKS), opts.pop("camera", False)
            opts.setdefault("decoder", None)
            group = None
            if group_size is not None:  # every rank creates every subgroup, in the same order
                groups = [dist.new_group(list(range(g, g + group_size))) for g in range(0, world, group_size)]
                group = groups[rank // group_size]
            eng = load_context_parallel(preset=preset, group=group, dtype="float32", batch=batch, **opts)
            assert isinstance(eng, flashdreams.Engine)
            lat, frames, s = _rollout(eng, batch, blocks, camera=camera)
            results["latents"][name] = lat
            results["frames"][name] = frames
            results["ring_shape"][name] = tuple(s.buffers[eng.model.parallel.kv_rings[0]].shape)
        for name, (preset, opts) in errors.items():
            try:
                load_context_parallel(preset=preset, decoder=None, dtype="float32", **opts)
                results["errors"][name] = None
            except Exception as exc:  # recorded, checked by the test
                results["errors"][name] = (type(exc).__name__, str(exc))
    except Exception:
        results["failure"] = traceback.format_exc()
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    shutdown()


def _spawn(world: int, cases: dict, errors: dict, out: Path) -> list[dict]:
    torch.multiprocessing.spawn(_worker, args=(world, _free_port(), cases, errors, str(out)), nprocs=world, join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for r, res in enumerate(ranks):
        assert res["failure"] is None, f"rank {r} failed:\n{res['failure']}"
    return ranks


@pytest.fixture(scope="module")
def world2(tmp_path_factory) -> list[dict]:
    return _spawn(2, CASES_2, ERRORS_2, tmp_path_factory.mktemp("cp2"))


@pytest.fixture(scope="module")
def world4(tmp_path_factory) -> list[dict]:
    return _spawn(4, CASES_4, ERRORS_4, tmp_path_factory.mktemp("cp4"))


_REFERENCE: dict = {}


def _reference(preset, batch: int, camera: bool = False):
    """The same session in one process, through the family's plain eager backend: (latents, session)."""
    key = (preset.name, batch, camera)
    if key not in _REFERENCE:
        eng = flashdreams.load(preset=preset, decoder=None, device="cpu", dtype="float32", batch=batch)
        lat, _, s = _rollout(eng, batch, camera=camera)
        _REFERENCE[key] = lat, tuple(s.buffers[eng.model.parallel.kv_rings[0]].shape)
    return _REFERENCE[key]


def _check_case(ranks: list[dict], name: str, case) -> None:
    preset, group_size, opts = case
    ref, full = _reference(preset, opts.get("batch", 1), opts.get("camera", False))
    got = [res["latents"][name] for res in ranks]
    blocks = len(got[0])
    assert [x.shape for x in got[0]] == [x.shape for x in ref[:blocks]]
    assert torch.cat([x.flatten() for x in ref]).abs().mean() > 0.1 and not torch.equal(ref[-2], ref[-1])  # it moves
    # The session allocated 1/P of the single-process ring: all tokens of N/P heads, or S/P tokens of all heads.
    p = len(ranks) if group_size is None else group_size
    shard = list(full)
    shard[3 if opts["mode"] == "ulysses" else 2] //= p
    assert ranks[0]["ring_shape"][name] == tuple(shard)
    err = [rel_l2(got[0][b], ref[b]) for b in range(blocks)]
    print(f"{name}: max rel. L2 over {blocks} blocks = {max(err):.3e}")
    assert max(err) <= TOL, f"{name}: rel. L2 per block {err}"
    # Every rank returns the same latents, so the sampler stays in lock step.
    for r, g in enumerate(got[1:], 1):
        assert all(torch.equal(a, b) for a, b in zip(g, got[0])), f"{name}: rank {r} diverged from rank 0"
    # Group rank 0 alone decodes (and only when a decoder was asked for).
    decodes = opts.get("decoder") is not None
    for r, res in enumerate(ranks):
        assert all(res["frames"][name]) == (decodes and r % p == 0), f"{name}: rank {r} frames {res['frames'][name]}"


def _check_errors(ranks: list[dict], errors: dict, needle: dict) -> None:
    for name in errors:
        for r, res in enumerate(ranks):
            found = res["errors"][name]
            assert found is not None, f"{name}: rank {r} raised nothing"
            assert found[0] == "InvalidArgumentError", f"{name}: rank {r} raised {found}"
            assert needle[name] in found[1], found[1]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES_2))
def test_two_ranks_match_one_process(world2, name):
    _check_case(world2, name, CASES_2[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES_4))
def test_four_ranks_match_one_process(world4, name):
    _check_case(world4, name, CASES_4[name])


@pytest.mark.slow
def test_indivisible_shapes_raise_named_errors(world2, world4):
    _check_errors(world2, ERRORS_2, {"odd-frame-tokens": "15 tokens"})
    _check_errors(world4, ERRORS_4, {"heads-not-divisible": "2 attention heads", "frame-tokens-not-divisible": "18"})


@pytest.mark.slow
def test_bench_smoke_under_torchrun(tmp_path):
    """The GPU benchmark script runs end to end on the CPU with gloo (tiny preset)."""
    out = tmp_path / "cp.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
        str(REPO / "bench" / "context_parallel_bench.py"), "--preset", "tiny", "--device", "cpu",
        "--mode", "ring", "--blocks", "4", "--with-cp1", "--profile", "--out", str(out),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json

    res = json.loads(out.read_text())
    runs = {r["gpus"]: r for r in res["runs"] if r["backend"].startswith("cp-")}
    assert set(runs) == {1, 2}
    assert runs[2]["rel_l2_vs_single"] <= TOL and len(runs[2]["rel_l2_vs_single_per_block"]) == 4
    assert runs[2]["per_block_ms"] and all(t > 0 for t in runs[2]["per_block_ms"])
    assert runs[2]["steady_p99_ms"] >= runs[2]["steady_p50_ms"] > 0
    # the profiled steady block: 2 ranks exchange tokens (gloo ops on a CPU), 1 rank does not
    assert runs[2]["comm_ms"] > 0 and runs[2]["profile"]["categories"]["communication"]["count"] > 0
    assert runs[1]["comm_ms"] == 0.0 and not res["failed"]


# ----------------------------------------------------------------------------- single-process pieces


def _tiny_engine():
    return flashdreams.load(device="cpu", dtype="float32", decoder=None)


def test_a_family_without_hooks_is_refused_by_name():
    eng = _tiny_engine()
    eng.model = dataclasses.replace(eng.model, parallel=None)
    with pytest.raises(InvalidArgumentError, match="model family 'causal_wan' .*no context-parallel hooks"):
        context_parallel_engine(eng, "ulysses")
    eng.model = None  # a built engine directory: no eager graphs to hook
    with pytest.raises(InvalidArgumentError, match="built engine directories are not supported"):
        context_parallel_engine(eng, "ring")


def test_shard_plan_sizes_this_ranks_kv_ring():
    eng = _tiny_engine()
    hooks, plan = eng.model.parallel, eng.plan
    full = plan.state["ring_k"].shape  # [layers, B, S, N, d]
    uly, ring = shard_plan(plan, hooks, "ulysses", 2), shard_plan(plan, hooks, "ring", 2)
    for name in hooks.kv_rings:
        assert uly.state[name].shape == (*full[:3], full[3] // 2, full[4])
        assert ring.state[name].shape == (*full[:2], full[2] // 2, *full[3:])
    assert uly.state["cross_k"] == plan.state["cross_k"] and uly.programs == plan.programs
    with pytest.raises(InvalidArgumentError, match="2 attention heads"):
        shard_plan(plan, hooks, "ulysses", 4)
    with pytest.raises(InvalidArgumentError, match="24 tokens .* 5 ranks"):
        shard_plan(plan, hooks, "ring", 5)
    with pytest.raises(InvalidArgumentError, match="mode 'pipeline' is unknown"):
        shard_plan(plan, hooks, "pipeline", 2)


def test_shard_plan_shards_both_experts_rings_of_wan22():
    eng = flashdreams.load(preset=WAN22, device="cpu", dtype="float32", decoder=None)
    hooks, plan = eng.model.parallel, eng.plan
    assert set(hooks.steps) == {"dit_high", "dit_high_first", "dit_low", "dit_low_first"}
    assert set(hooks.kv_rings) == {"ring_k_high", "ring_v_high", "ring_k_low", "ring_v_low"}
    ring = shard_plan(plan, hooks, "ring", 2)
    for name in hooks.kv_rings:
        full = plan.state[name].shape
        assert ring.state[name].shape == (*full[:2], full[2] // 2, *full[3:])
    assert {n: d for n, d in ring.state.items() if n not in hooks.kv_rings} == {
        n: d for n, d in plan.state.items() if n not in hooks.kv_rings
    }


def test_cosmos_chunk_refuses_context_parallel_with_debug_records():
    """The Cosmos DiT's hooked chunk runs unquantized and unrecorded: FP8's ring shadow or a debug dict
    with the hooks is a named error, not a silent mix."""
    eng = flashdreams.load(preset=OMNI, device="cpu", dtype="float32", decoder=None)
    x, t, ck, cv, hdmap, rk, rv, fp, slots, vl = eng.model.examples("dit")
    mask = torch.zeros_like(x[:, :1])
    shard = TokenShard(0, 1, lambda y: y[None])
    with pytest.raises(InvalidArgumentError, match="context parallel runs the ring attention unquantized"):
        eng.model.weights.forward_chunk(x, t, ck, cv, mask, hdmap, rk, rv, fp, slots, vl, debug={}, shard=shard)


def test_token_shards_take_and_gather_back_every_frame():
    x = torch.randn(2, 3 * 12, 5)  # 3 frames of 12 tokens
    p = 4
    takes = [TokenShard(r, p, None).take(x, 12) for r in range(p)]
    assert takes[1].shape == (2, 3 * 3, 5) and torch.equal(takes[1][:, :3], x[:, 3:6])
    shard = TokenShard(0, p, lambda y: torch.stack(takes))
    assert torch.equal(shard.gather(takes[0], 12), x)


def test_hooked_forward_on_one_rank_equals_the_plain_forward():
    """The family's hook seam alone: shard 0 of 1 and an attend that writes the ring and attends."""
    from flashdreams.models import dit_ops

    eng = _tiny_engine()
    hooks = eng.model.parallel
    s = eng.session(seed=3)
    s.step()  # a ring with one block in it
    args = {n: s.buffers[n].clone() for n in eng.plan.graphs["dit"].args if n in s.buffers}
    args["x"] = torch.randn(eng.plan.latents.shape, generator=torch.Generator().manual_seed(0))
    args["t"] = s.buffers["t_steady_0"]
    values = eng.plan.ring.values(1)
    for name, vals in values.items():
        args[name] = torch.tensor(vals)
    ring_k, ring_v = args["ring_k"].clone(), args["ring_v"].clone()
    fs = hooks.frame_tokens
    rows = (args["slots"][:, None] * fs + torch.arange(fs)).reshape(-1)

    def attend(layer, q, k, v):
        ring_k[layer].index_copy_(1, rows, k)
        ring_v[layer].index_copy_(1, rows, v)
        return dit_ops.ring_attention(q, ring_k[layer], ring_v[layer], args["valid_len"])

    plain = hooks.steps["dit"](*[args[a] for a in eng.plan.graphs["dit"].args])
    hooked = hooks.steps["dit"](
        *[args[a] for a in eng.plan.graphs["dit"].args], attend=attend, shard=TokenShard(0, 1, lambda y: y[None])
    )
    assert rel_l2(hooked, plain) < 1e-6
    assert torch.allclose(ring_k, args["ring_k"], atol=1e-6) and torch.allclose(ring_v, args["ring_v"], atol=1e-6)


def test_shape_checks_name_the_numbers():
    assert check_token_shardable(1560, 8) == 195
    assert check_head_shardable(40, 8) == 5
    with pytest.raises(InvalidArgumentError, match="1560 tokens .* 7 ranks"):
        check_token_shardable(1560, 7)
    with pytest.raises(InvalidArgumentError, match="12 attention heads .* 8 ranks"):
        check_head_shardable(12, 8)


@pytest.mark.parametrize("sliced", [False, True])
def test_attention_lse_matches_the_kernel_reference(sliced):
    from flashdreams.kernels import ring_attention_reference

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 7, 3, 16, generator=g)
    k, v = torch.randn(2, 40, 3, 16, generator=g), torch.randn(2, 40, 3, 16, generator=g)
    k[:, 29:] = float("nan")  # rows past the valid prefix must never count
    v[:, 29:] = float("nan")
    valid = torch.tensor([29])
    out, lse = attention_lse(q, k, v, valid, 29 if sliced else None)
    ref_out, ref_lse = ring_attention_reference(q, k.nan_to_num(0.0), v.nan_to_num(0.0), valid, return_lse=True)
    torch.testing.assert_close(out.float(), ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-6)


def test_merged_partials_equal_attention_over_all_keys():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 5, 2, 8, generator=g)
    k, v = torch.randn(1, 24, 2, 8, generator=g), torch.randn(1, 24, 2, 8, generator=g)
    full, _ = attention_lse(q, k, v, torch.tensor([24]), 24)
    parts = [attention_lse(q, k[:, i : i + 6], v[:, i : i + 6], torch.tensor([6]), 6) for i in range(0, 24, 6)]
    merged = merge_partials(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
    torch.testing.assert_close(merged, full, rtol=1e-5, atol=1e-6)
