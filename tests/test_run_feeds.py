"""fd-run's per-block feeds: --image, --camera and --drive give the sessions the Python API gives, and models
without such inputs refuse them by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import flashdreams
from flashdreams.cli.feeds import read_image
from flashdreams.cli.run import main as run_main


def _png(path, pixels: np.ndarray) -> str:
    from PIL import Image

    Image.fromarray(pixels).save(path)
    return str(path)


def _latents(tmp_path, argv: list[str]) -> dict[str, torch.Tensor]:
    lat = tmp_path / "lat.safetensors"
    assert run_main([*argv, "--decoder", "none", "--save-latents", str(lat), "--no-progress"]) == 0
    return load_file(str(lat))


def test_read_image_centre_crops_to_the_aspect_then_resizes(tmp_path):
    pixels = np.zeros((50, 80, 3), np.uint8)
    pixels[:, :, 1] = 200  # green, with red bands that the crop to 2:3 (75 of 80 columns) removes
    pixels[:, :2, 0], pixels[:, 77:, 0] = 255, 255
    img = read_image(_png(tmp_path / "a.png", pixels), 64, 96)
    assert img.shape == (1, 3, 64, 96) and img.dtype == torch.float32
    assert torch.allclose(img[0, 1], torch.full((64, 96), 200 / 255), atol=1e-6) and img[0, 0].abs().max() == 0
    assert read_image(str(tmp_path / "a.png")).shape == (1, 3, 50, 80)  # no size: as it is


def test_image_and_camera_drive_a_lingbot_session(tmp_path):
    from flashdreams.models.camera_path import camera_inputs, load_camera_path

    image = _png(tmp_path / "start.png", np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    path = tmp_path / "path.json"
    path.write_text(json.dumps({"moves": ["forward 1 m", "yaw 30 deg"]}))
    argv = ["--preset", "lingbot-world-fast-tiny", "--blocks", "2", "--image", image, "--camera", str(path)]
    saved = _latents(tmp_path, argv)
    engine = flashdreams.load(preset="lingbot-world-fast-tiny", device="cpu", decoder=None)
    h, w = engine.plan.meta["height"], engine.plan.meta["width"]
    cam = load_camera_path(path, h, w)
    session = engine.session(seed=0, inputs={"image": read_image(image, h, w), **camera_inputs(engine.plan, cam, 0)})
    for k in range(2):
        if k:
            for name, value in camera_inputs(engine.plan, cam, k).items():
                session.set_input(name, value)
        assert torch.equal(saved[f"block_{k}"], session.step().latents)
    orbit = _latents(tmp_path, argv[:-2])  # no --camera: the built-in orbit, another path
    assert not torch.equal(orbit["block_1"], saved["block_1"])


def test_drive_demo_feeds_the_hd_map_chunk_by_chunk(tmp_path):
    from flashdreams.models.hdmap import DemoDrive

    saved = _latents(tmp_path, ["--preset", "omnidreams-sv-tiny", "--blocks", "3", "--drive", "demo"])
    engine = flashdreams.load(preset="omnidreams-sv-tiny", device="cpu", decoder=None)
    meta, frames = engine.plan.meta, engine.plan.inputs["hdmap_video"].shape[1]
    drive = DemoDrive(meta["height"], meta["width"], fps=meta["fps"], frames=frames)
    session = engine.session(seed=0, inputs={"hdmap_video": drive.next_chunk()})
    for k in range(3):
        if k:
            session.set_input("hdmap_video", drive.next_chunk())
        assert torch.equal(saved[f"block_{k}"], session.step().latents)


def test_image_sets_the_matrixgame_start(tmp_path):
    image = _png(tmp_path / "start.png", np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    with_image = _latents(tmp_path, ["--preset", "matrix-game-2-tiny", "--blocks", "1", "--image", image])
    stand_in = _latents(tmp_path, ["--preset", "matrix-game-2-tiny", "--blocks", "1"])
    engine = flashdreams.load(preset="matrix-game-2-tiny", device="cpu", decoder=None)
    session = engine.session(seed=0, inputs={"image": read_image(image, 64, 96)})
    keys = torch.zeros(1, 12, 4)
    keys[..., 3] = 1.0  # the built-in loop starts with d held
    session.set_input("keyboard", keys)
    assert torch.equal(with_image["block_0"], session.step().latents)
    assert not torch.equal(with_image["block_0"], stand_in["block_0"])


@pytest.mark.parametrize(
    "flag, value, message",
    [("--camera", "path.json", "takes no camera poses"), ("--drive", "demo", "takes no hdmap_video input"),
     ("--image", "start.png", "takes no start image")],
)  # fmt: skip
def test_models_without_the_input_refuse_the_option(flag, value, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "path.json").write_text(json.dumps({"moves": ["forward 1 m"]}))
    _png(tmp_path / "start.png", np.zeros((8, 8, 3), np.uint8))
    assert run_main(["--preset", "tiny", flag, value, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fd-run: ") and message in err, err
    assert not (tmp_path / "flashdreams.mp4").exists()


@pytest.mark.parametrize("flag", ["--image", "--camera"])
def test_missing_files_are_refused_before_loading(flag, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def no_load(*_a, **_k):
        raise AssertionError("flashdreams.load was called")

    monkeypatch.setattr(flashdreams, "load", no_load)
    assert run_main([flag, "nope", "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
