"""train/train_arena.py: the relabelled targets of run 3's recipe, and a tiny CPU run end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from flashdreams.models.families.arena import world

ROOT = Path(__file__).resolve().parents[1]


def _train_module():
    spec = importlib.util.spec_from_file_location("train_arena", ROOT / "train" / "train_arena.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _free_spot(state: world.ArenaState, avoid: torch.Tensor) -> torch.Tensor:
    """A free agent position at least 10 px from `avoid` (so a relabel visibly moves the targets)."""
    for y in range(world.WALL, world.SIZE - world.WALL - world.AGENT + 1, 2):
        for x in range(world.WALL, world.SIZE - world.WALL - world.AGENT + 1, 2):
            p = torch.tensor([[x, y]])
            if not bool(world._overlaps(p[:, 0], p[:, 1], state.blocks)[0]) and (p[0] - avoid).abs().max() >= 10:
                return p
    raise AssertionError("no free spot")


def test_relabelled_targets_continue_from_where_the_context_shows_the_agent():
    t = _train_module()
    state = world.new_worlds([10**9 + 50])
    seen = state.clone()
    seen.pos = _free_spot(state, state.pos[0])
    ctx = world.render(seen)  # the "model's" frame: the agent drawn somewhere else than the truth
    keys = torch.zeros(1, 2, 4, 4)
    keys[..., 3] = 1.0  # d: right
    start, target = t.rollout_targets(state, ctx, keys, relabel=True)
    pos = world.detect_agent(target[:, -1, -1])[0].round().long()
    expect = world.rollout(seen, keys.view(1, 8, 4))[1][:, -1]
    assert torch.equal(pos, expect)
    assert torch.equal(start, ctx)  # the clean render of the relabelled state is the context itself here
    start, target = t.rollout_targets(state, ctx, keys, relabel=False)
    truth = world.rollout(state, keys.view(1, 8, 4))[1][:, -1]
    assert torch.equal(world.detect_agent(target[:, -1, -1])[0].round().long(), truth)


def test_relabel_falls_back_to_the_truth_where_the_agent_is_not_seen():
    t = _train_module()
    state = world.new_worlds([10**9 + 51])
    empty = world.render(state)
    empty[:] = 0.5  # no agent anywhere in the context
    keys = torch.zeros(1, 1, 4, 4)
    _, target = t.rollout_targets(state, empty, keys, relabel=True)
    assert torch.equal(world.detect_agent(target[:, 0, -1])[0].round().long(), state.pos)


def test_a_tiny_cpu_run_keeps_its_best_weights_with_their_record(tmp_path):
    from safetensors import safe_open

    t = _train_module()
    best = tmp_path / "best.safetensors"
    argv = ["--out", str(tmp_path / "ckpt"), "--device", "cpu", "--steps", "2", "--batch", "2", "--dim", "32"]
    argv += ["--layers", "1", "--heads", "2", "--burn-max", "2", "--relabel", "--teacher-frac", "0"]
    argv += ["--rollout", "1", "--eval-every", "1", "--eval-blocks", "2", "--eval-loop-blocks", "2"]
    argv += ["--keep-best", str(best), "--warmup", "1", "--persistence", "0.85,0.95"]
    assert t.main(argv) == 0
    with safe_open(str(best), framework="pt") as f:
        meta = f.metadata()
        assert all(v.dtype == torch.float16 for v in (f.get_tensor(k) for k in f.keys()))  # noqa: SIM118
    metrics = json.loads(meta["metrics"])
    assert metrics["pos_err"] >= 0 and 0 <= metrics["loop_found"] <= 1
    assert metrics["score"] == metrics["pos_err"] + metrics["loop_pos_err"]
    assert int(meta["steps"]) <= 2 and json.loads(meta["config"])["dim"] == 32
    assert (tmp_path / "ckpt" / "ckpt.safetensors").is_file()


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--burn-max", "-1", "--burn-max must be at least 0"),
        ("--rollout", "0", "--rollout must be at least 1"),
        ("--eval-every", "0", "--eval-every must be at least 1"),
        ("--persistence", "0.8,x", "comma-separated numbers"),
        ("--persistence", "1.0", "in [0, 1)"),
        ("--settle", "-0.1", "--settle must be >= 0"),
    ],
)
def test_bad_options_are_refused_before_anything_is_written(tmp_path, capsys, flag, value, message):
    t = _train_module()
    out = tmp_path / "ckpt"
    with pytest.raises(SystemExit) as exc:
        t.main(["--out", str(out), "--device", "cpu", flag, value])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
