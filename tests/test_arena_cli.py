"""fd-run --actions: a Matrix-Game-style key script drives the arena; bad scripts are refused by name, early."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import flashdreams
from flashdreams.cli.run import main as run_main
from flashdreams.errors import EngineIncompatibleError, InvalidArgumentError, NotFoundError
from flashdreams.models.families.arena import world


def _write(path, obj) -> str:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def test_actions_file_drives_the_arena_like_the_python_api(tmp_path, monkeypatch):
    """The script's tensors are made once, checked before the load and used after it."""
    from flashdreams.cli import feeds, run

    made, real = [], feeds.action_tensors
    for module in (feeds, run):
        monkeypatch.setattr(module, "action_tensors", lambda *a: made.append(1) or real(*a))
    script = [{"keys": ["d"]}] * 6 + [{"keys": ["s", "a"]}] * 5 + [{"keys": []}]  # 12 frames: 3 blocks
    actions = _write(tmp_path / "keys.json", script)
    lat = tmp_path / "lat.safetensors"
    argv = ["--actions", actions, "--seed", "2", "--out", str(tmp_path / "v.mp4"), "--save-latents", str(lat)]
    assert run_main([*argv, "--no-progress"]) == 0
    assert len(made) == 1
    saved = load_file(str(lat))
    assert sorted(saved) == ["block_0", "block_1", "block_2"]  # blocks follow the script's length
    session = flashdreams.load(preset="arena", device="cpu").session(seed=2)
    keys = torch.zeros(12, 4)
    for t, item in enumerate(script):
        for k in item["keys"]:
            keys[t, world.KEYS.index(k)] = 1.0
    for b in range(3):
        session.set_input("keyboard", keys[b * 4 : (b + 1) * 4][None])
        assert torch.equal(saved[f"block_{b}"], session.step().latents)


def test_frames_past_the_script_repeat_its_last_entry(tmp_path):
    actions = _write(tmp_path / "keys.json", [{"keys": []}, {"keys": ["w"]}])
    lat = tmp_path / "lat.safetensors"
    assert run_main(["--actions", actions, "--blocks", "2", "--decoder", "none", "--save-latents", str(lat),
                     "--no-progress"]) == 0  # fmt: skip
    session = flashdreams.load(preset="arena", device="cpu", decoder=None).session(seed=0)
    first = torch.zeros(1, 4, 4)
    first[0, 1:, 0] = 1.0  # frame 0 no keys, then w held
    held = torch.zeros(1, 4, 4)
    held[..., 0] = 1.0
    for b, kb in enumerate([first, held]):
        session.set_input("keyboard", kb)
        assert torch.equal(load_file(str(lat))[f"block_{b}"], session.step().latents)


def test_matrixgame_script_frames_land_on_their_video_frames(tmp_path):
    """Matrix-Game's block 0 makes video frames 0..8 from its action rows 3..11: script frame i steers video
    frame i (rows 0..2 repeat frame 0), and block 1 takes script frames 9..20."""
    names = ["w", "s", "a", "d"]
    script = [{"keys": [names[i % 4]], "mouse": [0.0, 0.01 * i]} for i in range(21)]
    actions = _write(tmp_path / "keys.json", script)
    lat = tmp_path / "lat.safetensors"
    argv = ["--preset", "matrix-game-2-tiny", "--actions", actions, "--decoder", "none", "--save-latents", str(lat)]
    assert run_main([*argv, "--no-progress"]) == 0
    saved = load_file(str(lat))
    assert sorted(saved) == ["block_0", "block_1"]  # 9 + 12 frames: two blocks
    keys = torch.zeros(21, 4)
    keys[torch.arange(21), torch.arange(21) % 4] = 1.0
    mouse = torch.tensor([item["mouse"] for item in script])
    session = flashdreams.load(preset="matrix-game-2-tiny", device="cpu", decoder=None).session(seed=0)
    rows0 = torch.cat([torch.zeros(3, dtype=torch.long), torch.arange(9)])
    for b, rows in enumerate([rows0, torch.arange(9, 21)]):
        session.set_input("keyboard", keys[rows][None])
        session.set_input("mouse", mouse[rows][None])
        assert torch.equal(saved[f"block_{b}"], session.step().latents)


BAD = [
    ("{tmp}/none.json", None, "does not exist"),
    ("{tmp}/a.json", "[{", "is not valid JSON"),
    ("{tmp}/a.json", "[]", "non-empty JSON list"),
    ("{tmp}/a.json", {"keys": ["d"]}, "non-empty JSON list"),
    ("{tmp}/a.json", [{"keys": ["d"]}, 3], "frame 1 must be an object"),
    ("{tmp}/a.json", [{"key": ["d"]}], "unknown fields ['key']"),
    ("{tmp}/a.json", [{"keys": "d"}], "must be a list of key names"),
    ("{tmp}/a.json", [{"keys": ["d", "d"]}], "names a key twice"),
    ("{tmp}/a.json", [{"keys": [], "mouse": [0.1]}], "two finite numbers"),
]


@pytest.mark.parametrize("path, content, message", BAD, ids=[m for _, _, m in BAD])
def test_bad_scripts_are_refused_before_loading(path, content, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = path.replace("{tmp}", str(tmp_path))
    if content is not None:
        _write(tmp_path / "a.json", content)

    def no_load(*_a, **_k):
        raise AssertionError("flashdreams.load was called")

    monkeypatch.setattr(flashdreams, "load", no_load)
    assert run_main(["--actions", path, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fd-run: ") and message in err and "--actions" in err, err
    assert not (tmp_path / "flashdreams.mp4").exists()


def _no_load(*_a, **_k):
    raise AssertionError("flashdreams.load was called")


def test_keys_and_mouse_the_model_does_not_take_are_refused(tmp_path, capsys, monkeypatch):
    """Against the arena's inputs before its weights load; a family that learns its inputs only at load
    (the tiny causal Wan) refuses after it."""
    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as m:
        m.setattr(flashdreams, "load", _no_load)
        assert run_main(["--actions", _write(tmp_path / "k.json", [{"keys": ["q"]}]), "--no-progress"]) == 2
        assert "key 'q' is not one of arena's keys ['w', 's', 'a', 'd']" in capsys.readouterr().err
        m_json = _write(tmp_path / "m.json", [{"keys": [], "mouse": [0, 1]}])
        assert run_main(["--actions", m_json, "--no-progress"]) == 2
        assert "takes no mouse input" in capsys.readouterr().err
    assert run_main(["--preset", "tiny", "--actions", str(tmp_path / "k.json"), "--no-progress"]) == 2
    assert "takes no keyboard input" in capsys.readouterr().err
    assert not (tmp_path / "flashdreams.mp4").exists()


@pytest.mark.slow
def test_universal_preset_runs_from_a_key_script_at_a_small_resolution(tmp_path):
    """The released universal preset's full-size network (1.6B random weights, 30 layers) driven by a key
    and mouse script at 32x48 on the CPU: a block of latents of the preset's shape comes out, and a key
    the universal controls do not have is refused by name first."""
    script = [{"keys": ["w", "d"][: 1 + i % 2], "mouse": [0.0, 0.02 * i]} for i in range(9)]
    lat = tmp_path / "lat.safetensors"
    argv = ["--preset", "matrix-game-2-universal", "--random-weights", "--height", "32", "--width", "48"]
    argv += ["--actions", _write(tmp_path / "keys.json", script), "--blocks", "1", "--decoder", "none"]
    assert run_main([*argv, "--save-latents", str(lat), "--no-progress"]) == 0
    block = load_file(str(lat))["block_0"]
    assert block.shape == (1, 16, 3, 4, 6) and torch.isfinite(block).all() and block.std() > 0.1
    bad = ["--preset", "matrix-game-2-universal", "--random-weights", "--height", "64", "--width", "96"]
    bad += ["--actions", _write(tmp_path / "q.json", [{"keys": ["q"]}]), "--no-progress"]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(flashdreams, "load", _no_load)  # refused before 1.6B weights are made
        assert run_main(bad) == 2


@pytest.mark.parametrize(
    "preset, size", [("arena", {}), ("matrix-game-2-tiny", {}), ("matrix-game-2-tiny", {"height": 64, "width": 96})]
)
def test_input_specs_before_the_load_are_the_loaded_plans(preset, size):
    """`flashdreams.input_specs` (no weights) gives what the loaded engine's `input_specs()` gives."""
    before = flashdreams.input_specs(preset, **size)
    loaded = flashdreams.load(preset=preset, device="cpu", **size).input_specs()
    assert before is not None and [s.to_dict() for s in before] == [s.to_dict() for s in loaded]
    assert flashdreams.input_specs(preset, batch=3, **size)[0].shape[0] == 3
    assert flashdreams.input_specs("tiny") is None  # the causal Wan family learns its inputs at load
    with pytest.raises(flashdreams.FlashDreamsError, match="batch"):
        flashdreams.input_specs(preset, batch=0)


def _manifest_only_engine(path, preset: str):
    """An engine directory reduced to what is read before a load: its manifest's preset and plan."""
    eng = flashdreams.load(preset=preset, device="cpu")
    path.mkdir()
    manifest = {"preset": eng.spec.preset.to_dict(), "plan": eng.plan.to_dict()}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return eng


def test_a_built_engines_inputs_are_read_from_its_manifest_before_the_load(tmp_path, capsys, monkeypatch):
    """`flashdreams.input_specs(engine_dir)` reads the manifest's plan (no weights, no validation), and fd-run
    refuses an --actions key such an engine lacks before loading it."""
    engine_dir = tmp_path / "arena-engine"
    eng = _manifest_only_engine(engine_dir, "arena")
    got = flashdreams.input_specs(str(engine_dir))
    assert [s.to_dict() for s in got] == [s.to_dict() for s in eng.input_specs()]
    assert [s.to_dict() for s in flashdreams.input_specs(engine_dir)] == [s.to_dict() for s in got]  # a Path too
    for sizes in ({"height": 64}, {"width": 64}, {"batch": 2}):
        with pytest.raises(InvalidArgumentError, match="fixed at build"):
            flashdreams.input_specs(engine_dir, **sizes)
    with pytest.raises(NotFoundError, match="not an engine directory"):
        flashdreams.input_specs(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(flashdreams, "load", _no_load)
    argv = ["--checkpoint", str(engine_dir), "--no-progress", "--actions"]
    assert run_main([*argv, _write(tmp_path / "k.json", [{"keys": ["w"]}, {"keys": ["q"]}])]) == 2
    assert "frame 1: key 'q' is not one of arena's keys ['w', 's', 'a', 'd']" in capsys.readouterr().err
    broken = tmp_path / "broken-engine"
    broken.mkdir()
    (broken / "manifest.json").write_text(json.dumps({"plan": {"inputs": "not a table"}}))
    with pytest.raises(EngineIncompatibleError, match="plan cannot be read"):
        flashdreams.input_specs(broken)
    assert run_main(["--checkpoint", str(broken), "--no-progress", "--actions", str(tmp_path / "k.json")]) == 2
    assert "plan cannot be read" in capsys.readouterr().err
