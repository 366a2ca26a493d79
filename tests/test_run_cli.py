"""fd-run: the README's run command writes a playable video; options and errors behave."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import flashdreams
from flashdreams.cli.run import main as run_main
from flashdreams.video import read_video


def test_readme_run_command_writes_a_playable_mp4(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_main(["--no-progress"]) == 0  # the README's command is plain `fd-run`: the arena world
    video = read_video(tmp_path / "flashdreams.mp4")
    assert video.shape == (80, 64, 64, 3)  # 20 blocks of 4 frames: one loop of the built-in key script
    assert video.std() > 5
    # The yellow agent walks the loop (right, down, left, up; 20 frames each): read its place from the
    # video (loosely: the mp4's chroma is subsampled) and check each leg moves the way its key says.
    v = torch.from_numpy(video).float() / 255
    yellow = (v[..., 0] > 0.55) & (v[..., 1] > 0.5) & (v[..., 2] < 0.45)
    ys, xs = torch.arange(64.0).view(1, 64, 1), torch.arange(64.0).view(1, 1, 64)
    n = yellow.sum(dim=(1, 2)).clamp(min=1)
    cx, cy = (yellow * xs).sum(dim=(1, 2)) / n, (yellow * ys).sum(dim=(1, 2)) / n
    assert (yellow.sum(dim=(1, 2)) >= 6).float().mean() > 0.8, "the agent is visible in most frames"
    legs = [(cx, 1), (cy, 1), (cx, -1), (cy, -1)]  # d: +x, s: +y, a: -x, w: -y
    moved = [sign * float(axis[20 * i + 17] - axis[20 * i + 2]) for i, (axis, sign) in enumerate(legs)]
    assert sum(m > 3 for m in moved) >= 3, moved  # a wall or block may stop one leg


def test_tiny_model_still_plays_with_its_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_main(["--preset", "tiny", "--no-progress"]) == 0
    video = read_video(tmp_path / "flashdreams.mp4")
    spec = flashdreams.load(decoder=None).spec
    assert video.shape == (9 + 12 * 6, spec.height, spec.width, 3)  # 7 blocks: 81 frames
    diffs = np.abs(np.diff(video.astype(np.int16), axis=0)).mean(axis=(1, 2, 3))
    assert (diffs > 0.5).all()


def test_latents_saved_match_the_python_api(tmp_path):
    out, lat = tmp_path / "v.mp4", tmp_path / "lat.safetensors"
    assert (
        run_main(
            [
                "--blocks",
                "3",
                "--seed",
                "5",
                "--out",
                str(out),
                "--save-latents",
                str(lat),
                "--decoder",
                "taehv",
                "--no-progress",
            ]
        )
        == 0
    )
    saved = load_file(str(lat))
    assert sorted(saved) == ["block_0", "block_1", "block_2"]
    session = flashdreams.load(decoder=None).session(seed=5)
    for k in range(3):
        assert torch.equal(saved[f"block_{k}"], session.step().latents)
    assert read_video(out).shape[0] == 9 + 12 + 12


def test_prompt_embeds_file_and_errors(tmp_path, capsys):
    emb = torch.randn(1, 16, 32)
    save_file({"prompt_embeds": emb}, str(tmp_path / "p.safetensors"))
    assert (
        run_main(
            [
                "--blocks",
                "1",
                "--decoder",
                "none",
                "--prompt-embeds",
                str(tmp_path / "p.safetensors"),
                "--save-latents",
                str(tmp_path / "l.safetensors"),
                "--no-progress",
            ]
        )
        == 0
    )
    session = flashdreams.load(decoder=None).session(emb, seed=0)
    assert torch.equal(load_file(str(tmp_path / "l.safetensors"))["block_0"], session.step().latents)
    assert run_main(["--preset", "self-forcing-1.3b", "--device", "cpu"]) == 2
    assert "needs a checkpoint" in capsys.readouterr().err
    assert run_main(["--prompt", "a cat", "--decoder", "none"]) == 2
    assert "--text-encoder" in capsys.readouterr().err
    assert run_main(["--decoder", "vqgan"]) == 2
    assert "decoder 'vqgan' is unknown" in capsys.readouterr().err
    assert not (tmp_path / "flashdreams.mp4").exists()


def test_list_presets(capsys):
    assert run_main(["--list-presets"]) == 0
    out = capsys.readouterr().out
    assert "self-forcing-1.3b" in out and "tiny" in out and "arena" in out


@pytest.mark.parametrize("name", ["wan-vae", "taehv"])
def test_session_frames_are_uint8_rgb_with_reference_counts(name):
    s = flashdreams.load(decoder=name).session(seed=0)
    spec = s.engine.spec
    counts = []
    for _ in range(3):
        r = s.step()
        assert r.frames.dtype == torch.uint8 and r.frames.shape[2:] == (spec.height, spec.width, 3)
        counts.append(r.frames.shape[1])
    assert counts == [9, 12, 12]
    it = s.frames(num_blocks=2)
    assert next(it).shape == (12, spec.height, spec.width, 3)


def test_save_state_then_resume_continues_the_world(tmp_path, capsys):
    """fd-run --save-state after 2 blocks, then --resume for 2 more: the same latents as one 4-block run."""
    state, whole, resumed = tmp_path / "world.safetensors", tmp_path / "whole.safetensors", tmp_path / "r.safetensors"
    common = ["--preset", "tiny", "--seed", "3", "--no-progress", "--out", str(tmp_path / "v.mp4")]
    assert run_main([*common, "--blocks", "4", "--save-latents", str(whole)]) == 0
    assert run_main([*common, "--blocks", "2", "--save-state", str(state)]) == 0
    assert "wrote" in capsys.readouterr().out and state.is_file()
    assert run_main([*common, "--blocks", "2", "--resume", str(state), "--save-latents", str(resumed)]) == 0
    a, b = load_file(str(whole)), load_file(str(resumed))
    assert torch.equal(b["block_0"], a["block_2"]) and torch.equal(b["block_1"], a["block_3"])
    # refusals, before anything loads
    assert run_main([*common, "--resume", str(tmp_path / "none.safetensors")]) == 2
    assert run_main([*common, "--resume", str(state), "--record", str(tmp_path / "rec.safetensors")]) == 2
    assert run_main([*common, "--save-state", str(tmp_path / "world.pt")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "drop --resume" in err and "must end in .safetensors" in err
    # a world of another model
    other = ["--preset", "arena", "--no-progress", "--out", str(tmp_path / "a.mp4")]
    assert run_main([*other, "--resume", str(state)]) == 2
    assert "same preset" in capsys.readouterr().err


def test_a_resumed_key_script_plays_from_its_start(tmp_path):
    """Matrix-Game's block 0 takes 9 video frames, later blocks 12: a run resumed after 2 blocks plays its
    --actions script from frame 0, so resuming with the script's frames 21.. equals one run of the whole script."""
    import json
    import random

    pick = random.Random(0)  # keys that change from frame to frame: any misplaced frame shows
    frames = [{"keys": pick.sample(["w", "a", "s", "d"], pick.randint(0, 2))} for t in range(9 + 12 * 3)]
    script, rest = tmp_path / "all.json", tmp_path / "rest.json"
    script.write_text(json.dumps(frames))
    rest.write_text(json.dumps(frames[9 + 12 :]))
    state, whole, resumed = tmp_path / "w.safetensors", tmp_path / "whole.safetensors", tmp_path / "r.safetensors"
    common = ["--preset", "matrix-game-2-tiny", "--no-progress", "--out", str(tmp_path / "v.mp4")]
    assert run_main([*common, "--actions", str(script), "--blocks", "4", "--save-latents", str(whole)]) == 0
    assert run_main([*common, "--actions", str(script), "--blocks", "2", "--save-state", str(state)]) == 0
    assert run_main([*common, "--actions", str(rest), "--blocks", "2", "--resume", str(state)]
                    + ["--save-latents", str(resumed)]) == 0  # fmt: skip
    a, b = load_file(str(whole)), load_file(str(resumed))
    assert torch.equal(b["block_0"], a["block_2"]) and torch.equal(b["block_1"], a["block_3"])
