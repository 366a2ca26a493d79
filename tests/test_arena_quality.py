"""The trained arena world follows the keys, looks like the renderer, stays stable, and is deterministic.

Ground truth: each held-out arena (world seeds >= 10**9, never drawn in training) is rendered
at its start; that frame is the session's `start_frame` input, so the model and the renderer
start from the same state, then both play the same key script. The agent's place is read
from both by its color (world.detect_agent, tested in test_arena_world.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

import flashdreams
from flashdreams.models.families.arena import quality, world

SEEDS = [10**9 + 10, 10**9 + 11, 10**9 + 12, 10**9 + 13, 10**9 + 14, 10**9 + 15]
BLOCKS = 20
F = 4


def _float(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float [..., 3, H, W] in [0, 1]."""
    return frames.movedim(-1, -3).float() / 255


@pytest.fixture(scope="module")
def rollouts():
    """Model and renderer over BLOCKS blocks for every held-out seed (one batched session, a row per seed)."""
    n = len(SEEDS)
    engine = flashdreams.load(preset="arena", device="cpu", batch=n)
    state = world.new_worlds(SEEDS)
    keys = torch.stack([world.random_actions(1, BLOCKS * F, seed=s % 1000 + 7)[0] for s in SEEDS])
    start = world.render(state)
    rendered, _ = world.rollout(state, keys)
    session = engine.session(seed=0, inputs={"start_frame": start})
    generated = []
    for k in range(BLOCKS):
        session.set_input("keyboard", keys[:, k * F : (k + 1) * F])
        generated.append(_float(session.step().frames))
    return torch.cat(generated, dim=1), rendered, start


def test_follows_the_keys(rollouts):
    generated, rendered, start = rollouts
    per_seed = [quality.measure(generated[i], rendered[i], start[i], F) for i in range(len(SEEDS))]
    print("\narena quality per held-out seed:", [q.to_dict() for q in per_seed])
    moving = sum(q.moving_blocks for q in per_seed)
    direction = sum(q.direction * q.moving_blocks for q in per_seed) / moving
    pos_err = sum(q.pos_err for q in per_seed) / len(per_seed)
    print(f"direction {direction:.3f} over {moving} moving blocks, mean position error {pos_err:.3f}")
    assert moving >= 40  # the scripts move the agent
    # Issue 17's bar, over all held-out arenas: direction right in >= 90% of moving blocks, mean position
    # error <= 10% of the arena over 20 blocks. Measured with the shipped weights (weights/TRAINING.md):
    # direction 0.987, error 0.065.
    assert direction >= 0.90
    assert pos_err <= 0.10
    # No single arena far off either (measured: worst 0.19, where the agent slid along a block).
    assert max(q.pos_err for q in per_seed) <= 0.25


def test_looks_like_the_renderer(rollouts):
    generated, rendered, start = rollouts
    psnr = [quality.measure(generated[i], rendered[i], start[i], F, psnr_blocks=8).psnr for i in range(len(SEEDS))]
    print("\nPSNR over the first 8 blocks per seed:", [round(p, 2) for p in psnr])
    # Measured with the shipped weights: 23.4 - 30.0 dB, mean 27.1.
    assert min(psnr) >= 22.5
    assert sum(psnr) / len(psnr) >= 26.0


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
def test_500_blocks_stay_stable_with_flat_memory():
    engine = flashdreams.load(preset="arena", device="cpu", batch=2)
    state = world.new_worlds([0, 10**9 + 3])
    start = world.render(state)
    ref_mean, ref_std = quality.frame_stats(start)
    session = engine.session(seed=0, inputs={"start_frame": start})
    script = world.loop_actions(500 * F)
    rss = {}
    seen = torch.zeros(2, 500)  # whether the agent is visible in some frame of the block
    for k in range(500):
        session.set_input("keyboard", script[k * F : (k + 1) * F][None].expand(2, F, 4))
        frames = _float(session.step().frames)
        seen[:, k] = world.detect_agent(frames)[1].any(dim=1).float()
        if k in (100, 499):
            rss[k] = _rss_mb()
        if k % 50 == 0 or k == 499:
            for row in range(2):
                mean, std = quality.frame_stats(frames[row])
                r_mean, r_std = quality.frame_stats(start[row])
                # No collapse: the frames' statistics stay in a band around the renderer's (noise raises the
                # std, a washed-out frame lowers it).
                assert abs(mean - r_mean) < 0.05, (k, row, mean, r_mean)
                assert 0.6 * r_std < std < 1.5 * r_std, (k, row, std, r_std)
    # The agent stays in the world. It blurs below the detector's threshold for short stretches in some
    # arenas (a known limit, weights/TRAINING.md): measured visible in 100% and 83% of the blocks, and in
    # >= 76% of every 50-block stretch, so it never fades for good.
    assert seen.mean(dim=1).min() >= 0.7, seen.mean(dim=1)
    assert seen.view(2, 10, 50).mean(dim=2).min() >= 0.5, seen.view(2, 10, 50).mean(dim=2)
    assert rss[499] - rss[100] < 32, rss  # MB: state is bounded, nothing grows per block
    assert 0.2 < ref_mean < 0.6 and ref_std > 0.05


SCRIPT = """
import hashlib, sys, torch
torch.set_num_threads(1)
import flashdreams
from flashdreams.models.families.arena import world
e = flashdreams.load(preset="arena", device="cpu")
s = e.session(seed=5)
keys = world.random_actions(1, 24, seed=3)[0]
h = hashlib.sha256()
for k in range(6):
    s.set_input("keyboard", keys[k * 4:(k + 1) * 4][None])
    h.update(s.step().frames.numpy().tobytes())
print(h.hexdigest())
"""


def _digest_here(seed: int = 5) -> str:
    e = flashdreams.load(preset="arena", device="cpu")
    s = e.session(seed=seed)
    keys = world.random_actions(1, 24, seed=3)[0]
    h = hashlib.sha256()
    for k in range(6):
        s.set_input("keyboard", keys[k * 4 : (k + 1) * 4][None])
        h.update(s.step().frames.numpy().tobytes())
    return h.hexdigest()


def test_same_seed_and_keys_are_bit_identical_in_and_across_processes():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocess runs on one thread too: the same kernels
    try:
        a, b = _digest_here(), _digest_here()
        other = _digest_here(seed=6)  # another seed picks another built-in arena
    finally:
        torch.set_num_threads(threads)
    assert a == b
    assert other != a
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == a, json.dumps({"here": a, "there": out.stdout, "err": out.stderr})
