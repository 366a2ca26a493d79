"""FlashVSR: the four flashvsr_* parity fixtures, and the family on the seam (tiny preset, CPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import params_or_skip
from safetensors.torch import save_file

import flashdreams
from flashdreams.errors import CheckpointError, InvalidArgumentError, NotFoundError
from flashdreams.models.families.flashvsr import DIT_FILE, LQ_FILE, TC_FILE
from flashdreams.models.families.flashvsr.dit import from_windows, to_windows
from flashdreams.models.families.flashvsr.plan import cache_schedule
from flashdreams.models.families.flashvsr.presets import PRESETS
from flashdreams.models.families.flashvsr.tcdecoder import adain_colorfix, decoder_input, to_signed
from flashdreams.numerics import rel_l2
from flashdreams.parity import run_fixture

KINDS = ("flashvsr_lq_projector", "flashvsr_dit_forward", "flashvsr_tcdecoder", "flashvsr_stream")


@pytest.mark.parametrize("fixture_dir", params_or_skip(KINDS))
def test_parity(fixture_dir):
    fixture, checks = run_fixture(fixture_dir)
    assert checks, "the runner compared nothing"
    failed = [f"{c.name}: {c.rel_l2:.3g} > {c.tolerance:g} {c.reason}" for c in checks if not c.passed]
    assert not failed, failed
    if fixture.kind in ("flashvsr_dit_forward", "flashvsr_stream"):  # every exact mask was compared
        assert {c.name for c in checks} >= set(fixture.declared("debug, exact"))


@pytest.mark.parametrize("fixture_dir", params_or_skip(("flashvsr_stream",)))
def test_stream_parity_through_the_triton_kernel(fixture_dir):
    """The session's DiT with our block-sparse kernel (interpreted on a CPU): masks exact, latents in tolerance."""
    from flashdreams.kernels import triton_available

    if not triton_available("cuda" if torch.cuda.is_available() else "cpu"):
        pytest.skip("Triton kernels need CUDA, or TRITON_INTERPRET=1 set before triton is first imported")
    _, checks = run_fixture(fixture_dir, attention="triton")
    failed = [f"{c.name}: {c.rel_l2:.3g}" for c in checks if not c.passed]
    assert not failed and len(checks) == 7, failed


def test_fa4_choice_sends_every_sparse_attention_to_flashattention4(monkeypatch):
    """attention="fa4": each layer's selected windows go to FlashAttention-4's block-sparse entry point
    (stood in here by our kernel, so the frames must not change), with the same masks."""
    from flashdreams import kernels
    from flashdreams.kernels import fa4_attention
    from flashdreams.kernels.block_sparse_attention import block_sparse_attention

    if not kernels.triton_available("cpu"):
        pytest.skip("Triton kernels on the CPU need TRITON_INTERPRET=1 set before triton is first imported")
    monkeypatch.setattr(fa4_attention, "fa4_unavailable_reason", lambda device: None)  # as on an H200
    calls = []

    def stand_in(q, k, v, mask, block=128):
        calls.append(block)
        return block_sparse_attention(q, k, v, mask, block)

    monkeypatch.setattr(fa4_attention, "block_sparse_attention_fa4", stand_in)
    lq = _lq(41, seed=3)

    def frames(attention: str) -> list[torch.Tensor]:
        engine = flashdreams.load(preset="flashvsr-tiny", attention=attention)
        s = engine.session(seed=1, inputs={"lq_frames": lq[:, :25]})
        out = [s.step().frames]
        s.set_input("lq_frames", lq[:, 25:33])
        return out + [s.step().frames]

    ours = frames("triton")
    assert not calls
    routed = frames("fa4")
    layers = flashdreams.get_preset("flashvsr-tiny").model.num_layers
    assert len(calls) == 2 * layers and set(calls) == {128}
    assert all(torch.equal(a, b) for a, b in zip(ours, routed))


def test_windows_round_trip_and_order():
    x = torch.arange(4 * 16 * 8).float().reshape(1, 4 * 16 * 8, 1, 1)  # f=4, h=16, w=8 token grid
    w = to_windows(x, 4, 16, 8)
    assert torch.equal(from_windows(w, 4, 16, 8), x)
    # Window 0 = frames 0-1, rows 0-7, cols 0-7, token order (frame, row, col); window 1 = rows 8-15.
    first = w[0, :128, 0, 0].long().tolist()
    assert first[:3] == [0, 1, 2] and first[64] == 16 * 8 and w[0, 128, 0, 0] == 8 * 8


@pytest.mark.parametrize(
    "kv_ratio,expect",
    [(3.0, [(0, 3), (3, 3)]), (4.0, [(0, 3), (3, 4), (4, 4)]), (2.0, [(0, 2), (2, 2)]), (1.0, [(0, 2), (2, 2)])],
)
def test_cache_schedule_drops_at_most_one_slab(kv_ratio, expect):
    assert cache_schedule(kv_ratio) == expect


def test_cache_schedule_refuses_no_cache():
    with pytest.raises(InvalidArgumentError, match="kv_ratio"):
        cache_schedule(0.5)


def _lq(frames: int, h: int = 32, w: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, frames, h, w, 3), generator=g).float()


def test_tiny_session_streams_and_equals_one_whole_decode():
    """lq_frames in per block (25, then 8); frames out (21, then 8) equal the pipeline's one decode at the end."""
    engine = flashdreams.load(preset="flashvsr-tiny")
    spec = {s.name: s for s in engine.input_specs()}["lq_frames"]
    assert spec.units == "image" and (spec.low, spec.high) == (0.0, 255.0) and spec.shape == (1, 25, 32, 64, 3)
    lq = _lq(41)
    session = engine.session(inputs={"lq_frames": lq[:, :25]})
    videos = []
    session.probe = lambda b, i, g, a, outs: g.startswith("decode") and videos.append(outs[0].clone())
    results = [session.step()]
    for k in range(2):
        session.set_input("lq_frames", lq[:, 25 + 8 * k : 33 + 8 * k])
        results.append(session.step())
    assert [r.frames.shape[1] for r in results] == [21, 8, 8]
    assert results[0].frames.shape[2:] == (128, 256, 3) and results[0].frames.dtype == torch.uint8
    latents = torch.cat([r.latents for r in results], dim=2)  # [1, 16, 10, 16, 32]

    # The reference decodes all latents once, fresh, with the first 37 LQ frames, then colour-fixes.
    model = engine.model
    lq_video = torch.cat([model.graphs["prepare_first"](lq[:, :25]), model.graphs["prepare"](lq[:, 25:33])], 2)
    lq_video = torch.cat([lq_video, model.graphs["prepare"](lq[:, 33:41])], 2)
    cond = lq_video[:, :, :37]
    tc = model.decoder.model
    with torch.no_grad():
        seq = tc.decode_sequential(decoder_input(latents.transpose(1, 2), cond))[:, 3:]
    expect = ((adain_colorfix(to_signed(seq), cond) + 1) / 2).transpose(1, 2)
    assert rel_l2(torch.cat(videos, 1), expect) < 1e-5


def test_session_is_deterministic_and_resets():
    engine = flashdreams.load(preset="flashvsr-tiny")
    lq = _lq(25, seed=1)
    s = engine.session(inputs={"lq_frames": lq}, seed=3)
    a = [s.step().frames.clone() for _ in range(2)]
    s.reset()
    b = [s.step().frames.clone() for _ in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    other = engine.session(inputs={"lq_frames": lq}, seed=4).step().frames
    assert not torch.equal(other, a[0])  # the noise is the session's own


def test_latents_only_without_decoder():
    engine = flashdreams.load(preset="flashvsr-tiny", decoder=None)
    r = engine.session(inputs={"lq_frames": _lq(25)}).step()
    assert r.frames is None and r.latents.shape == (1, 16, 6, 16, 32)
    assert not any(n.startswith("tc_mem") for n in engine.plan.state)
    # What a built engine does with --decoder none: the decoder's graphs and state leave the plan.
    stripped = flashdreams.load(preset="flashvsr-tiny").plan.without_decoder()
    stripped.validate()
    assert set(stripped.state) == set(engine.plan.state) and set(stripped.graphs) == set(engine.plan.graphs)


def test_bad_inputs_and_sizes_are_named_errors():
    engine = flashdreams.load(preset="flashvsr-tiny")
    s = engine.session(inputs={"lq_frames": _lq(25)})
    with pytest.raises(InvalidArgumentError, match="lq_frames"):
        s.set_input("lq_frames", _lq(8) + 300)  # not pixel values
    with pytest.raises(InvalidArgumentError, match="lq_frames"):
        s.set_input("lq_frames", _lq(8, h=40))  # wrong LQ size
    with pytest.raises(InvalidArgumentError, match="multiples of 128"):
        flashdreams.load(preset="flashvsr-tiny", height=192, width=256)
    with pytest.raises(InvalidArgumentError, match="checkpoint"):
        flashdreams.load(preset="flashvsr")  # full size needs weights or --random-weights


def test_presets_and_sparse_budget():
    names = {p.name: p for p in PRESETS}
    assert {"flashvsr", "flashvsr-faster", "flashvsr-1080p", "flashvsr-tiny"} <= set(names)
    assert names["flashvsr-faster"].topk(768, 1408) < names["flashvsr"].topk(768, 1408)
    p = names["flashvsr"]
    assert p.to_dict()["sparse_ratio"] == 2.0 and type(p).from_dict(p.to_dict()) == p


def test_loads_the_released_file_layout(tmp_path):
    """A directory with the three released files (safetensors) loads and runs like the weights it holds."""
    engine = flashdreams.load(preset="flashvsr-tiny")
    sd = engine.model.weights.state_dict()
    for name, prefix in ((DIT_FILE, "dit."), (LQ_FILE, "LQ_proj_in."), (TC_FILE, "TCDecoder.")):
        save_file({k[len(prefix) :]: v.contiguous() for k, v in sd.items() if k.startswith(prefix)}, tmp_path / name)
    inputs = {"lq_frames": _lq(25, seed=2), "prompt_embeds": engine.default_inputs()["prompt_embeds"]}
    loaded = flashdreams.load(tmp_path, preset="flashvsr-tiny")
    assert torch.equal(loaded.session(inputs=inputs).step().frames, engine.session(inputs=inputs).step().frames)
    (tmp_path / LQ_FILE).unlink()
    with pytest.raises(NotFoundError, match="fd-convert"):
        flashdreams.load(tmp_path, preset="flashvsr-tiny")
    save_file({"conv1.weight": torch.zeros(1)}, tmp_path / LQ_FILE)
    with pytest.raises(CheckpointError, match="LQ_proj_in"):
        flashdreams.load(tmp_path, preset="flashvsr-tiny")


def test_upscaler_chains_a_frame_stream():
    """Blocks of 9, 12, 12 frames (a world's) larger than the LQ size: cropped, queued, all 33 frames come out."""
    from flashdreams.stage import fit_frames, upscale

    engine = flashdreams.load(preset="flashvsr-tiny")
    g = torch.Generator().manual_seed(5)
    blocks = [torch.randint(0, 256, (1, n, 40, 70, 3), generator=g, dtype=torch.uint8) for n in (9, 12, 12)]
    out = list(upscale(iter(blocks), engine.session(seed=1, inputs={"lq_frames": _lq(25)})))
    assert sum(b.shape[1] for b in out) == 33 and out[0].shape[2:] == (128, 256, 3)
    lq = fit_frames(torch.cat(blocks, 1), 32, 64)
    assert torch.equal(lq[:, :, :, :3], torch.cat(blocks, 1)[:, :, 4:36, 3:6])  # centre crop
    direct = engine.session(seed=1, inputs={"lq_frames": lq[:, :25].float()}).step().frames
    assert torch.equal(out[0], direct)


def test_other_decoders_are_refused():
    with pytest.raises(InvalidArgumentError, match="TC decoder"):
        flashdreams.load(preset="flashvsr-tiny", decoder="taehv")


def test_upscaler_flushes_a_short_stream():
    """10 frames (fewer than block 0's 25): flush repeats the last one and trims, so exactly 10 come out."""
    from flashdreams.stage import Upscaler

    engine = flashdreams.load(preset="flashvsr-tiny")
    up = Upscaler(engine.session(inputs={"lq_frames": _lq(25)}))
    assert up.push(_lq(10).to(torch.uint8)) == []
    out = up.flush()
    assert [b.shape[1] for b in out] == [10] and up.flush() == []
    with pytest.raises(InvalidArgumentError, match="B, T, H, W, 3"):
        up.push(torch.zeros(10, 32, 64, 3))


def test_fd_run_upscales_a_video_file(tmp_path, monkeypatch):
    """`fd-run --preset flashvsr-tiny --input low.mp4`: the decoded input streams through the Upscaler stage
    block by block; every frame comes out 4x larger, equal to the stage run on the whole video at once."""
    import flashdreams.video
    from flashdreams.cli.run import main as run_main
    from flashdreams.stage import upscale
    from flashdreams.video import read_video, write_video

    written = []

    class Recorder(flashdreams.video.VideoWriter):
        def write(self, frames):
            written.append(torch.as_tensor(frames).clone())
            return super().write(frames)

    low = tmp_path / "low.mp4"
    write_video(low, [torch.randint(0, 256, (30, 32, 64, 3), dtype=torch.uint8)], fps=12)
    monkeypatch.setattr(flashdreams.video, "VideoWriter", Recorder)
    out = tmp_path / "up.mp4"
    assert run_main(["--preset", "flashvsr-tiny", "--input", str(low), "--out", str(out), "--no-progress"]) == 0
    got = torch.cat(written)
    assert got.shape == (30, 128, 256, 3) and read_video(out).shape == (30, 128, 256, 3)
    engine = flashdreams.load(preset="flashvsr-tiny", device="cpu")
    session = engine.session(seed=0, inputs={"lq_frames": torch.zeros(engine.plan.inputs["lq_frames"].shape)})
    want = torch.cat(list(upscale(iter([torch.from_numpy(read_video(low))[None]]), session)), dim=1)[0]
    assert torch.equal(got, want)


def test_output_size_follows_the_input_in_whole_windows():
    preset = flashdreams.get_preset("flashvsr")
    assert preset.size_for_input(192, 352) == (768, 1408)  # the preset's own LQ size
    assert preset.size_for_input(360, 640) == (1408, 2560)  # 1440x2560, rows floored to 128-multiples
    assert preset.size_for_input(20, 20) == (128, 128)  # at least one window


def test_fd_run_sizes_flashvsr_to_the_input_video(tmp_path, capsys):
    """Without --height/--width the output is 4x the input video, floored to whole 128-pixel windows (the
    frames centre-cropped to it); --height/--width still pick the size."""
    from flashdreams.cli.run import main as run_main
    from flashdreams.video import read_video, write_video

    low = tmp_path / "low.mp4"
    write_video(low, [torch.randint(0, 256, (9, 40, 72, 3), dtype=torch.uint8)], fps=12)
    out = tmp_path / "up.mp4"
    assert run_main(["--preset", "flashvsr-tiny", "--input", str(low), "--out", str(out), "--no-progress"]) == 0
    assert read_video(out).shape == (9, 128, 256, 3)  # 160x288 floored to 128x256
    err = capsys.readouterr().err
    assert "--input frames 40x72 -> 128x256 out" in err and "warning" not in err
    args = ["--preset", "flashvsr-tiny", "--input", str(low), "--out", str(out), "--height", "128", "--width", "128"]
    assert run_main([*args, "--no-progress"]) == 0
    assert read_video(out).shape == (9, 128, 128, 3)
    big = tmp_path / "big.mp4"  # 4x of 96x160 is 8x the preset's pixels: said before loading
    write_video(big, [torch.randint(0, 256, (9, 96, 160, 3), dtype=torch.uint8)], fps=12)
    assert run_main(["--preset", "flashvsr-tiny", "--input", str(big), "--out", str(out), "--no-progress"]) == 0
    assert read_video(out).shape == (9, 384, 640, 3)
    assert "warning: that is 8x the pixels of preset 'flashvsr-tiny'" in capsys.readouterr().err


def test_fd_run_upscales_a_world_as_it_streams(tmp_path):
    from flashdreams.cli.run import main as run_main
    from flashdreams.video import read_video

    out = tmp_path / "up.mp4"
    args = ["--preset", "tiny", "--upscale", "flashvsr-tiny", "--blocks", "3", "--out", str(out), "--no-progress"]
    assert run_main(args) == 0
    # the tiny causal Wan's 9 + 12 + 12 frames of 64x96, upscaled 4x to its whole frame (256x384)
    assert read_video(out).shape == (33, 256, 384, 3)


@pytest.mark.gpu
def test_cuda_graphs_and_triton_match_eager_on_gpu():
    """On a GPU: the plan captured as CUDA graphs with our kernels gives the eager torch session's frames."""
    lq = _lq(41, seed=6).cuda()
    runs = []
    for attention, graphs in (("sdpa", False), ("triton", True)):
        engine = flashdreams.load(preset="flashvsr-tiny", device="cuda", dtype="float32", attention=attention)
        s = engine.session(seed=2, inputs={"lq_frames": lq[:, :25]}, cuda_graphs=graphs)
        outs = [s.step().latents]
        for k in range(3):  # block 2 is the first replay of the captured steady kind
            s.set_input("lq_frames", lq[:, 25 + 8 * (k % 2) : 33 + 8 * (k % 2)])
            outs.append(s.step().latents)
        runs.append(torch.cat(outs, 2))
    assert rel_l2(runs[1], runs[0]) < 1e-4


def _reference_chunk(dit, feats, x, chunk, caches, attn, kv_ratio, ck, cv) -> torch.Tensor:
    """One chunk with the reference's cache rule written out: keys = cat[cache (oldest first), current],
    then the oldest slab is dropped once more than kv_ratio are held. Returns the clean latents."""
    from functools import partial

    from flashdreams.kernels.block_sparse_attention import block_sparse_attention_reference, select_blocks
    from flashdreams.models.families.flashvsr.dit import chunk_frame_positions, from_windows, to_windows
    from flashdreams.models.rope import apply_rope, rope_tables

    tokens, (f, h, w) = dit.embed_tokens(x)
    e, e0 = dit.time_embed(torch.full((1, 1), 1000.0))
    e, e0 = e.expand(1, f, -1), e0.expand(1, f, -1, -1)
    cos, sin = rope_tables(chunk_frame_positions(chunk, f), h, w, dit.cfg.head_dim)
    slab = (h // 8) * (w // 8) * 128  # tokens of one frame pair

    def attend(q, kk, v, sa, layer):
        q = to_windows(apply_rope(sa.heads(sa.norm_q(q)), cos, sin), f, h, w)
        kk = to_windows(apply_rope(sa.heads(sa.norm_k(kk)), cos, sin), f, h, w)
        v = to_windows(sa.heads(v), f, h, w)
        if caches[layer] is not None:
            kk, v = torch.cat([caches[layer][0], kk], 1), torch.cat([caches[layer][1], v], 1)
        mask = select_blocks(q, kk, 128, (h // 8, w // 8), attn["local_range"], attn["topk"])
        out = block_sparse_attention_reference(q, kk, v, mask, 128)
        drop = slab if kk.shape[1] // slab > int(kv_ratio) else 0
        caches[layer] = (kk[:, drop:], v[:, drop:])
        return from_windows(out, f, h, w)

    with torch.no_grad():
        for i, blk in enumerate(dit.blocks):
            tokens = tokens + feats[i] if i < len(feats) else tokens
            tokens = blk(tokens, e0, partial(attend, layer=i), ck[i], cv[i])
        return x - dit.unpatchify(dit.head(tokens, e), (f, h, w))


def _reference_stream(model, lq, prompt, noises: list[torch.Tensor], kv_ratio: float) -> torch.Tensor:
    """The pipeline loop over all chunks with `_reference_chunk` (the model's own weights)."""
    dit_step, prep = model.graphs["dit_first"], model.graphs["prepare_first"]
    video = prep.__class__(lq.shape[1], prep.scale)(lq)  # all LQ frames, upsampled, [-1, 1]
    ck, cv = model.graphs["encode_prompt"](prompt)
    caches: list = [None] * len(dit_step.dit.blocks)
    outs = []
    for k, x in enumerate(noises):
        clips = video[:, :, 1:25] if k == 0 else video[:, :, 8 * k + 17 : 8 * k + 25]
        with torch.no_grad():
            feats = dit_step.lq_proj.stream_features(clips)
        outs.append(_reference_chunk(dit_step.dit, feats, x, k, caches, dit_step.attn, kv_ratio, ck, cv))
    return torch.cat(outs, 2)


@pytest.mark.parametrize("kv_ratio", [3.0, 4.0])
def test_kv_ring_equals_the_reference_cache_over_a_long_stream(kv_ratio):
    """Six chunks (the ring wraps; kv_ratio 4 also grows for a block): same latents as cat + drop-oldest."""
    preset = {p.name: p for p in PRESETS}["flashvsr-tiny"].replace(kv_ratio=kv_ratio)
    engine = flashdreams.load(preset=preset, decoder=None)
    lq = _lq(25 + 8 * 5, seed=8)
    prompt = engine.model.examples("encode_prompt")[0]
    s = engine.session(seed=0, inputs={"lq_frames": lq[:, :25], "prompt_embeds": prompt})
    g = torch.Generator().manual_seed(9)
    noises, lat = [], []
    for k in range(6):
        draw = torch.randn(engine.plan.draws["noise"].shape, generator=g)
        noises.append(draw if k == 0 else draw[:, :, :2])
        if k:
            s.set_input("lq_frames", lq[:, 8 * k + 17 : 8 * k + 25])
        lat.append(s.step(draws={"noise": draw}).latents)
    assert len(engine.plan.sequence) == (2 if kv_ratio == 4.0 else 1)
    assert rel_l2(torch.cat(lat, 2), _reference_stream(engine.model, lq, prompt, noises, kv_ratio)) < 1e-5


def test_a_failed_block_retries_to_the_same_frames():
    """A block that fails after its DiT call (cache slot written) and its decode: retried, it gives the
    uninterrupted run's frames (the ring slot is rewritten in place; decoder memory is rolled back)."""
    engine = flashdreams.load(preset="flashvsr-tiny")
    lq = _lq(33, seed=4)

    def run(fail_at: int | None) -> list[torch.Tensor]:
        s = engine.session(seed=7, inputs={"lq_frames": lq[:, :25]})
        armed = [fail_at is not None]

        def probe(block, i, graph, args, outs):
            if armed[0] and block == fail_at and graph == "decode":
                armed[0] = False
                raise RuntimeError("injected failure after the decode")

        s.probe = probe
        frames = [s.step().frames]
        s.set_input("lq_frames", lq[:, 25:33])
        if fail_at is not None:
            with pytest.raises(RuntimeError, match="injected"):
                s.step()
        frames.append(s.step().frames)
        return frames

    clean, retried = run(None), run(1)
    assert all(torch.equal(a, b) for a, b in zip(clean, retried))


def test_uint8_frames_are_taken_as_pixel_values():
    engine = flashdreams.load(preset="flashvsr-tiny")
    lq = _lq(25, seed=2).round()
    a = engine.session(inputs={"lq_frames": lq}, seed=1).step().frames
    b = engine.session(inputs={"lq_frames": lq.to(torch.uint8)}, seed=1).step().frames
    assert torch.equal(a, b)
    s = engine.session(inputs={"lq_frames": lq}, seed=1)
    with pytest.raises(InvalidArgumentError, match="floating point"):  # integers that are not frames
        s.set_input("lq_frames", lq[:, :8].to(torch.int32))


def test_tc_decoder_layout_knob(monkeypatch):
    """FD_TC_DECODER_LAYOUT picks the TC decoder's conv layout on CUDA (NHWC by default); a bad value is
    refused by name, before any model is built."""
    from flashdreams.models.families.flashvsr import tc_channels_last

    monkeypatch.delenv("FD_TC_DECODER_LAYOUT", raising=False)
    assert tc_channels_last() is True
    monkeypatch.setenv("FD_TC_DECODER_LAYOUT", "nchw")
    assert tc_channels_last() is False
    monkeypatch.setenv("FD_TC_DECODER_LAYOUT", "NHWC ")
    with pytest.raises(InvalidArgumentError, match="FD_TC_DECODER_LAYOUT"):
        flashdreams.load(preset="flashvsr-tiny")
