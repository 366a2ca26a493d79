"""LingBot-World: the causal form against the bidirectional one, the streaming camera rules, the sessions
(Fast against an eager loop written here, Base with its expert switch), the camera path and loading."""

from __future__ import annotations

import json
import math

import pytest
import torch

import flashdreams
from flashdreams.errors import CheckpointError, InvalidArgumentError
from flashdreams.models.camera_path import block_poses, load_camera_path, moves_path, orbit_path
from flashdreams.models.camera_rays import (
    camera_tokens,
    check_intrinsics,
    check_poses,
    clip_relative_poses,
    latent_pose_frames,
    stream_relative_poses,
    world_scale_of,
)
from flashdreams.models.families.lingbot.plan import fast_schedule
from flashdreams.models.families.lingbot.presets import PRESETS, Preset
from flashdreams.models.family import BlockPlan
from flashdreams.models.lingbot_dit import LINGBOT_TINY, LingBotDiT, load_lingbot_dit
from flashdreams.numerics import rel_l2

LAT = (4, 6)  # 32x48 pixels


def _model(seed: int = 0) -> LingBotDiT:
    torch.manual_seed(seed)
    model = LingBotDiT(LINGBOT_TINY).eval()
    with torch.no_grad():  # keep 1 + scale O(1) as the fixtures do
        for blk in model.blocks:
            blk.cam_scale_layer.weight.mul_(0.5)
    return model


def _trajectory(n: int, seed: int = 0, rotate_only: bool = False) -> torch.Tensor:
    """A smooth random camera-to-world path [n, 4, 4]."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, generator=g) * 0.05
    v = torch.randn(3, generator=g) * 0.3
    out = []
    for i in range(n):
        ang = w * i
        k = torch.tensor([[0, -ang[2], ang[1]], [ang[2], 0, -ang[0]], [-ang[1], ang[0], 0]])
        pose = torch.eye(4)
        pose[:3, :3] = torch.linalg.matrix_exp(k)
        if not rotate_only:
            pose[:3, 3] = v * i + 0.1 * torch.sin(torch.tensor(i * 0.3))
        out.append(pose)
    return torch.stack(out)


def _k() -> torch.Tensor:
    return torch.tensor([[40.0, 42.0, 24.0, 16.0]])


def test_causal_block_with_empty_cache_equals_bidirectional_forward():
    model = _model()
    nf, (lh, lw) = 3, LAT
    x, y = torch.randn(1, 16, nf, lh, lw), torch.randn(1, 20, nf, lh, lw)
    t = torch.tensor([[642.0, 642.0, 642.0]])
    rel, _ = stream_relative_poses(_trajectory(12)[None], torch.eye(4)[None], torch.ones(1), True, nf)
    tokens = camera_tokens(rel, _k(), LAT)
    ck, cv = model.cross_kv(torch.randn(1, 16, 32))
    fs = (lh // 2) * (lw // 2)
    ring = torch.zeros(2, 1, 6 * fs, 2, 32)
    with torch.no_grad():
        bidir = model.forward_camera(x, t, ck, cv, y, tokens)
        scale, shift = model.camera_modulation(tokens)
        pos = torch.arange(nf)
        causal = model.forward_step_camera(
            x, t, y, scale, shift, ck, cv, ring.clone(), ring.clone(), pos, pos, torch.tensor([nf * fs])
        )
        nocam = model.forward_camera(x, t, ck, cv, y, None)
    assert rel_l2(causal, bidir) < 1e-5
    assert rel_l2(nocam, bidir) > 1e-2, "the camera must matter"


def test_camera_in_one_pass_with_the_residual_and_norm_matches_torch(monkeypatch):
    """With our kernels the camera's scale/shift is applied in the row pass of the self-attention's
    residual and the cross-attention's pre-norm (one kernel per layer for three torch steps): the
    causal block equals the torch path, and the camera still matters there."""
    from flashdreams.kernels import triton_available

    if not triton_available(torch.device("cpu")):
        pytest.skip("triton not available")
    import flashdreams.kernels.adaln as adaln

    model = _model(1)
    nf, (lh, lw) = 3, LAT
    x, y = torch.randn(1, 16, nf, lh, lw), torch.randn(1, 20, nf, lh, lw)
    t = torch.tensor([[821.0, 821.0, 821.0]])
    rel, _ = stream_relative_poses(_trajectory(12, seed=3)[None], torch.eye(4)[None], torch.ones(1), True, nf)
    ck, cv = model.cross_kv(torch.randn(1, 16, 32))
    fs = (lh // 2) * (lw // 2)
    pos = torch.arange(nf)

    def block(impl: str, camera: bool) -> torch.Tensor:
        model.set_attention(impl)
        scale, shift = model.camera_modulation(camera_tokens(rel, _k(), LAT))
        if not camera:
            scale, shift = torch.zeros_like(scale), torch.zeros_like(shift)
        ring = torch.zeros(2, 1, 6 * fs, 2, 32)
        with torch.no_grad():
            return model.forward_step_camera(
                x, t, y, scale, shift, ck, cv, ring.clone(), ring.clone(), pos, pos, torch.tensor([nf * fs])
            )

    torch_path = block("sdpa", True)
    modulated_rows, real_launch = [], adaln.launch

    def spy(kernel, grid, *args, **kwargs):
        modulated_rows.append(kwargs["TOKEN_MOD"])
        return real_launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(adaln, "launch", spy)
    kernels = block("triton", True)
    monkeypatch.undo()
    assert modulated_rows.count(True) == len(model.blocks)  # one modulated row pass per layer
    assert rel_l2(kernels, torch_path) < 1e-4
    assert rel_l2(kernels, block("sdpa", False)) > 1e-2, "the camera must matter"


def test_stream_of_blocks_reproduces_the_clip_rule():
    """Blocks anchored on the previous block's last pose, divided by the trajectory's world scale,
    give exactly the clip's framewise relative poses (whose scale is the same maximum)."""
    nf, blocks = 3, 4
    path = _trajectory(4 * nf * blocks)
    ws = world_scale_of(path)
    got, anchor = [], torch.eye(4)[None]
    for b in range(blocks):
        rel, anchor = stream_relative_poses(block_poses(path, b, nf)[None], anchor, ws[None], b == 0, nf)
        got.append(rel[0])
    frames = latent_pose_frames(path.shape[0])[: nf * blocks]
    want = clip_relative_poses(path[frames][None])[0]
    assert torch.allclose(torch.cat(got), want, atol=1e-5)
    # Which poses a block uses: block 0 frames 0, 4, 8; later blocks 3, 7, 11 of their chunk.
    chunk = block_poses(path, 1, nf)[None]
    base, _ = stream_relative_poses(chunk, anchor, ws[None], False, nf)
    for unused, used in ((0, 3), (5, 7), (10, 11)):
        moved = chunk.clone()
        moved[:, unused, :3, 3] += 5.0
        assert torch.equal(stream_relative_poses(moved, anchor, ws[None], False, nf)[0], base)
        moved = chunk.clone()
        moved[:, used, :3, 3] += 5.0
        assert not torch.allclose(stream_relative_poses(moved, anchor, ws[None], False, nf)[0], base)


def test_pure_rotation_and_world_scale():
    nf = 3
    path = _trajectory(24, rotate_only=True)
    assert float(world_scale_of(path)) == 0.0
    rel = clip_relative_poses(path[latent_pose_frames(24)][None])
    assert torch.isfinite(rel).all() and rel[..., :3, 3].abs().max() < 1e-6, "no division for a pure rotation"
    srel, _ = stream_relative_poses(path[None, :12], torch.eye(4)[None], torch.zeros(1), True, nf)
    assert torch.isfinite(srel).all() and srel[..., :3, 3].abs().max() < 1e-6
    assert rel[0, 1, :3, :3].sub(torch.eye(3)).abs().max() > 1e-3, "the rotation itself is kept"
    # Scaling the world and the scale together changes nothing; the scale alone does.
    moving = _trajectory(12, seed=3)
    scaled = moving.clone()
    scaled[:, :3, 3] *= 7.0
    a, _ = stream_relative_poses(moving[None], torch.eye(4)[None], torch.tensor([2.0]), True, nf)
    b, _ = stream_relative_poses(scaled[None], torch.eye(4)[None], torch.tensor([14.0]), True, nf)
    assert torch.allclose(a, b, atol=1e-5)
    c, _ = stream_relative_poses(moving[None], torch.eye(4)[None], torch.tensor([4.0]), True, nf)
    assert torch.allclose(c[..., :3, 3] * 2, a[..., :3, 3], atol=1e-6)
    # The ray map is cast to the compute dtype before the folds.
    assert camera_tokens(a, _k(), LAT, torch.bfloat16).dtype == torch.bfloat16


def test_camera_validation_names_the_problem():
    good = _trajectory(5)
    check_poses(good)
    check_intrinsics(_k())
    bad = good.clone()
    bad[2, :3, :3] *= 1.5
    with pytest.raises(InvalidArgumentError, match="pose 2"):
        check_poses(bad)
    mirror = good.clone()
    mirror[1, :3, 0] *= -1  # det -1
    with pytest.raises(InvalidArgumentError, match="det"):
        check_poses(mirror)
    with pytest.raises(InvalidArgumentError, match="non-finite"):
        check_poses(torch.full((4, 4), float("nan")))
    with pytest.raises(InvalidArgumentError, match="focal"):
        check_intrinsics(torch.tensor([[-1.0, 40.0, 24.0, 16.0]]))


def test_fast_schedule():
    preset = next(p for p in PRESETS if p.name == "lingbot-world-fast")
    ts, sigmas = fast_schedule(preset)
    assert all(t == int(t) for t in ts) and ts[0] > ts[1] > ts[2] > ts[3] > 0
    assert 0.99 < sigmas[0] < 1.0 and sigmas == sorted(sigmas, reverse=True)
    with pytest.raises(InvalidArgumentError):
        fast_schedule(preset.replace(denoising_step_list=(1200,)))


def _fast_engine():
    return flashdreams.load(preset="lingbot-world-fast-tiny", decoder=None)


def test_fast_session_equals_an_eager_loop():
    """Three blocks of the session (block 0, its own image-conditioning kind, the steady kind) against
    the loop written out here from the model's own functions and stored draws."""
    eng = _fast_engine()
    plan, graphs = eng.plan, eng.model.graphs
    model: LingBotDiT = graphs["dit"].model
    g = torch.Generator().manual_seed(5)
    image, prompt = torch.rand(1, 3, 32, 48, generator=g), torch.randn(1, 16, 32, generator=g)
    path = orbit_path(60)
    ws = world_scale_of(path)
    s = eng.session(
        inputs={
            "prompt_embeds": prompt,
            "image": image,
            "poses": block_poses(path, 0, 3)[None],
            "intrinsics": _k(),
            "world_scale": ws[None],
        }
    )
    ts, sig = plan.meta["schedule"]["timesteps"], plan.meta["schedule"]["sigmas"]
    with torch.no_grad():
        y_all = graphs["encode_image"](image)
        ck, cv = graphs["encode_prompt"](prompt)
    ring_k = torch.zeros(plan.state["ring_k"].shape)
    ring_v = torch.zeros_like(ring_k)
    anchor = torch.eye(4)[None]
    kimg = eng.spec.preset.image_blocks
    assert plan.sequence == [f"image_{k}" for k in range(kimg)]
    for b in range(kimg + 1):
        draws = {n: torch.randn(d.shape, generator=g) for n, d in plan.draws.items()}
        s.set_input("poses", block_poses(path, b, 3)[None])
        got = s.step(draws=draws).latents
        vals = plan.ring.values(b)
        pos, slots, vl = (torch.tensor(vals[n]) for n in ("frame_positions", "slots", "valid_len"))
        with torch.no_grad():
            rel, anchor = stream_relative_poses(block_poses(path, b, 3)[None], anchor, ws[None], b == 0, 3)
            scale, shift = model.camera_modulation(camera_tokens(rel, _k(), LAT))
            k = min(b, kimg - 1)
            y = y_all[:, :, 3 * k : 3 * k + 3]

            args = (y, scale, shift, ck, cv, ring_k, ring_v, pos, slots, vl)
            x = draws["noise"]
            for i, t in enumerate(ts):
                flow = model.forward_step_camera(x, torch.full((1, 3), t), *args)
                x0 = (x.double() - sig[i] * flow.double()).float()
                if i + 1 < len(ts):
                    x = (1 - sig[i + 1]) * x0 + sig[i + 1] * draws[f"renoise_{i}"]
            model.forward_step_camera(x0, torch.zeros(1, 3), *args)
        assert rel_l2(got, x0) < 1e-5, f"block {b}"
    # The camera matters: another path, another block.
    s.reset()
    s.set_input("poses", block_poses(_trajectory(12, seed=9), 0, 3)[None])
    draws = {n: torch.zeros(d.shape) for n, d in plan.draws.items()}
    a = s.step(draws=draws).latents
    s.reset()
    s.set_input("poses", block_poses(path, 0, 3)[None])
    assert rel_l2(s.step(draws=draws).latents, a) > 1e-3


def test_fast_plan_is_data():
    eng = _fast_engine()
    plan = eng.plan
    again = BlockPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.to_dict() == plan.to_dict()
    units = {n: s.units for n, s in plan.inputs.items()}
    assert units["poses"] == units["intrinsics"] == units["world_scale"] == "camera"
    assert plan.inputs["poses"].shape == (1, 12, 4, 4) and plan.inputs["image"].when == "reset"
    assert plan.state["cam_anchor"].rollback
    with pytest.raises(InvalidArgumentError):
        Preset(name="x", description="", model=LINGBOT_TINY, window_frames=2)


def test_base_session_switches_experts_by_timestep():
    eng = flashdreams.load(preset="lingbot-world-base-tiny", decoder=None)
    plan = eng.plan
    sched = plan.meta["schedule"]
    calls = [op["graph"] for op in plan.programs["clip"] if op["op"] == "call" and op["graph"].startswith("dit_")]
    want = ["dit_high" if t >= sched["boundary_timestep"] else "dit_low" for t in sched["timesteps"]]
    assert calls == want and "dit_high" in calls and "dit_low" in calls
    g = torch.Generator().manual_seed(1)
    inputs = {
        "prompt_embeds": torch.randn(1, 16, 32, generator=g),
        "negative_prompt_embeds": torch.randn(1, 16, 32, generator=g),
        "image": torch.rand(1, 3, 32, 48, generator=g),
        "poses": _trajectory(9)[None],
        "intrinsics": _k(),
    }
    s = eng.session(inputs=inputs)
    out = s.step().latents
    assert out.shape == (1, 16, 3, 4, 6) and torch.isfinite(out).all()
    # Each expert is its own network: swapping the low-noise expert's weights changes the clip.
    low = eng.model.graphs["dit_low"].model
    with torch.no_grad():
        low.head.head.bias.add_(1.0)
    s.reset()
    assert rel_l2(s.step().latents, out) > 1e-3


def test_camera_path_files(tmp_path):
    poses = moves_path(["forward 2 m", "yaw 90 deg in 6 frames", "hold in 2 frames"])
    assert poses.shape == (1 + 12 + 6 + 2, 4, 4)
    assert torch.allclose(poses[12, :3, 3], torch.tensor([0.0, 0.0, 2.0]), atol=1e-5)
    # After a right turn of 90 degrees the camera's forward axis points along world +x.
    assert torch.allclose(poses[18, :3, 2], torch.tensor([1.0, 0.0, 0.0]), atol=1e-5)
    check_poses(poses)
    with pytest.raises(InvalidArgumentError, match="unknown move"):
        moves_path(["jump 2 m"])
    f = tmp_path / "path.json"
    f.write_text(
        json.dumps(
            {"moves": ["forward 1 m in 24 frames"], "intrinsics": [416, 416, 416, 240], "intrinsics_hw": [480, 832]}
        )
    )
    cam = load_camera_path(f, 32, 48)
    assert torch.allclose(cam["intrinsics"], torch.tensor([416 * 48 / 832, 416 * 32 / 480, 24.0, 16.0]))
    assert math.isclose(float(cam["world_scale"]), 4 / 24, rel_tol=1e-5)
    f.write_text(json.dumps({"poses": [[[2, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]]}))
    with pytest.raises(InvalidArgumentError, match="rigid"):
        load_camera_path(f, 32, 48)
    # Block chunks: block 0 frames 0..11, block 1 frames 9..20; the last pose is held past the end.
    idx = torch.arange(30, dtype=torch.float32)
    path = torch.eye(4).repeat(30, 1, 1)
    path[:, 0, 3] = idx
    assert block_poses(path, 0, 3)[:, 0, 3].tolist() == list(range(12))
    assert block_poses(path, 1, 3)[:, 0, 3].tolist() == list(range(9, 21))
    assert block_poses(path, 2, 3)[-1, 0, 3].item() == 29


def test_checkpoint_round_trip_and_refusal():
    model = _model(1)
    sd = model.state_dict()
    assert "blocks.1.cam_shift_layer.weight" in sd and "patch_embedding_wancamctrl.weight" in sd
    loaded = load_lingbot_dit(sd, LINGBOT_TINY)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())
    broken = {k: v for k, v in sd.items() if "cam_injector_layer1" not in k}
    with pytest.raises(CheckpointError):
        load_lingbot_dit(broken, LINGBOT_TINY)


def test_camera_inputs_for_a_session(tmp_path):
    """What fd-run sets before each block: the orbit by default, the block's chunk of a path file."""
    from flashdreams.models.camera_path import camera_inputs

    eng = _fast_engine()
    s = eng.session(inputs={**eng.default_inputs(), **camera_inputs(eng.plan, None, 0)})
    for b in range(2):
        for name, value in camera_inputs(eng.plan, None, b).items():
            s.set_input(name, value)
        check_poses(camera_inputs(eng.plan, None, b)["poses"])
        assert torch.isfinite(s.step().latents).all()
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"moves": ["forward 3 m in 30 frames"]}))
    cam = load_camera_path(f, 32, 48)
    one = camera_inputs(eng.plan, cam, 1)
    assert one["poses"].shape == (1, 12, 4, 4)
    assert torch.allclose(one["poses"][0, 3, 2, 3], torch.tensor(0.1 * 12), atol=1e-5)  # video frame 12
    assert float(one["world_scale"]) == pytest.approx(0.4)
    base = flashdreams.load(preset="lingbot-world-base-tiny", decoder=None)
    clip = camera_inputs(base.plan, cam, 0)
    assert clip["poses"].shape == (1, 9, 4, 4) and "world_scale" not in clip


def test_session_refuses_a_pose_that_is_not_rigid_and_a_zero_focal_length():
    engine = flashdreams.load(preset="lingbot-world-fast-tiny")
    session = engine.session(seed=0)
    spec = {s.name: s for s in engine.input_specs()}
    poses = torch.eye(4).expand(*spec["poses"].shape).clone()
    session.set_input("poses", poses)  # identity poses are rigid
    before = session.buffers["poses"].clone()
    sheared = poses.clone()
    sheared[0, 1, 0, 1] = 0.3
    with pytest.raises(InvalidArgumentError, match="not a rigid transform"):
        session.set_input("poses", sheared)
    assert torch.equal(session.buffers["poses"], before)  # nothing was written
    k = torch.tensor([[0.0, 100.0, 32.0, 32.0]])
    with pytest.raises(InvalidArgumentError, match="focal lengths"):
        session.set_input("intrinsics", k)


def test_fast_fp8_ring_shadow_equals_quantizing_the_ring_every_call(monkeypatch):
    """With FP8 attention the fast stream keeps the KV ring's fp8 shadow (every DiT call, commits too,
    takes it); the latents equal, bit for bit, quantizing the whole ring in every call."""
    from flashdreams.kernels import triton_available
    from flashdreams.models.families import lingbot

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not triton_available(torch.device(device)):
        pytest.skip("Triton kernels on the CPU need TRITON_INTERPRET=1 set before triton is imported")
    opts = dict(preset="lingbot-world-fast-tiny", device=device, decoder=None, attention="triton", precision="fp8")
    shadowed = flashdreams.load(**opts)
    with monkeypatch.context() as m:
        m.setattr(lingbot, "shadow_block_n", lambda *a: None)
        per_call = flashdreams.load(**opts)
    assert {"ring_k8", "ring_kt", "ring_v8t", "ring_vt"} <= set(shadowed.plan.state)
    assert "ring_k8" not in per_call.plan.state
    dit_calls = [op for ops in shadowed.plan.programs.values() for op in ops if op.get("graph") == "dit"]
    assert dit_calls and all("ring_k8" in op["args"] for op in dit_calls)
    g = torch.Generator().manual_seed(5)
    path = orbit_path(60)
    inputs = {
        "prompt_embeds": torch.randn(1, 16, 32, generator=g),
        "image": torch.rand(1, 3, 32, 48, generator=g),
        "poses": block_poses(path, 0, 3)[None],
        "intrinsics": _k(),
        "world_scale": world_scale_of(path)[None],
    }
    inputs = {k: v.to(device) for k, v in inputs.items()}
    a, b = shadowed.session(inputs=inputs, seed=2), per_call.session(inputs=inputs, seed=2)
    for blk in range(4):
        for s in (a, b):
            s.set_input("poses", block_poses(path, blk, 3)[None].to(device))
        assert torch.equal(a.step().latents, b.step().latents)


def test_fp8_camera_layers_are_opt_in_with_scale_and_shift_fused():
    """FP8 keeps each block's camera layers in bf16 by default (LingBotDiT.fp8_keep); with nothing excluded they
    go FP8 too, scale and shift as one fused GEMM: the modulation stays within FP8's error of bf16's and the
    camera step of a session runs them."""
    from flashdreams.kernels import triton_available
    from flashdreams.models.families.lingbot.steps import CameraStep
    from flashdreams.models.lingbot_dit import CAM_SCALE_SHIFT_FP8

    if not triton_available(torch.device("cpu")):
        pytest.skip("triton not available")
    ref = _model(2).to(torch.bfloat16)
    tokens = camera_tokens(
        stream_relative_poses(_trajectory(12, seed=4)[None], torch.eye(4)[None], torch.ones(1), True, 3)[0],
        _k(),
        LAT,
        torch.bfloat16,
    )
    with torch.no_grad():
        want = ref.camera_modulation(tokens)
    fp8 = _model(2).to(torch.bfloat16)
    fp8.set_attention("triton")
    names = fp8.quantize_fp8_(exclude="")
    for i, blk in enumerate(fp8.blocks):
        assert {
            f"blocks.{i}.cam_{n}" for n in ("injector_layer1", "injector_layer2", "scale_layer", "shift_layer")
        } <= set(names)
        assert type(getattr(blk, CAM_SCALE_SHIFT_FP8)).__name__ == "Fp8Linear" and not hasattr(blk, "cam_scale_layer")
        assert type(blk.cam_injector_layer1).__name__ == "Fp8Linear"
    with torch.no_grad():
        got = fp8.camera_modulation(tokens)
        stepped = CameraStep(fp8, True, 3, LAT)(_trajectory(12, seed=4)[None], _k(), torch.ones(1), torch.eye(4)[None])
    for g, w in zip(got, want):
        assert g.shape == w.shape and 1e-4 < rel_l2(g.float(), w.float()) < 5e-2
    assert all(torch.equal(a, b) for a, b in zip(stepped[:2], got))
    kept = _model(2).to(torch.bfloat16)
    kept.set_attention("triton")
    kept.set_precision("fp8")  # the default: the camera stays bf16, the rest of the block goes FP8
    cam = [m for n, m in kept.named_modules() if ".cam_" in n]
    assert cam and all(type(m) is torch.nn.Linear for m in cam)
    assert type(kept.blocks[0].ffn[0]).__name__ == "Fp8Linear"
