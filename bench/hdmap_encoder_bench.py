"""OmniDreams' HD-map encode of one steady chunk (8 frames -> 2 latents), and what might make it cheaper.

The encode runs inside the block program before the first DiT forward, so all of it delays the
chunk's frames (69 ms at 704x1280 in `bench/results/next7-h200/omni-fp8.json`). Timed here on
the same weights, caches and video, in one process:

* `two passes`: the causal encoder on frames 0-3, then 4-7 (how a chunk was coded before);
* `one pass`: all 8 frames at once (what `EncodeHdmapStep` does now; same latents);
* `one pass, channels_last_3d`: the same with the encoder's weights and the video in NDHWC, which
  cuDNN's convolutions use natively (the NCDHW form pays a layout transpose around each conv);
* `... fused norms`: the same with each RMSNorm + SiLU as one kernel pass (`use_fused_norms`);
* `narrow forms`: the engine's form (`use_narrow_forms`), padding the convs of up to 31 input channels,
  then of up to 48 (48 -> 64);
* and the Wan VAE decoder's steady block at Matrix-Game's 352x640: NCDHW, `use_channels_last`,
  and NCDHW with `use_fused_norms`.

    python bench/hdmap_encoder_bench.py --out hdmap.json               # GPU: ~20 s
    python bench/hdmap_encoder_bench.py --smoke --out /tmp/hdmap.json  # CPU, tiny frames
"""

from __future__ import annotations

import torch

from flashdreams.benchmark.environment import environment
from flashdreams.benchmark.micro import micro_bench_setup, write_result
from flashdreams.models import wan_vae_blocks as blocks
from flashdreams.models.families.omnidreams.hdmap_encoder import LIGHTVAE, cache_templates
from flashdreams.models.wan_vae import WanVAE, WanVAEConfig
from flashdreams.numerics import rel_l2


def _variants(vae: WanVAE, video: torch.Tensor, templates: list[torch.Tensor]) -> dict:
    """name -> a function coding one steady chunk from fresh copies of the caches -> latents."""
    enc = vae.encoder

    def start() -> list:
        return [t.clone() for t in templates]

    def two_passes() -> torch.Tensor:
        live = start()
        return torch.cat([enc(video[:, :, :4], live), enc(video[:, :, 4:], live)], dim=2)

    def one_pass() -> torch.Tensor:
        return enc(video, start())

    return {"two passes": two_passes, "one pass": one_pass}


def measure(cfg: WanVAEConfig, height: int, width: int, dev: torch.device, dtype: torch.dtype, ms) -> dict:
    torch.manual_seed(0)
    vae = WanVAE(cfg).to(dev, dtype).eval()
    templates = cache_templates(vae, 1, height, width)
    video = (torch.rand(1, 3, 8, height, width, device=dev) * 2 - 1).to(dtype)
    rows = {}
    with torch.no_grad():
        variants = _variants(vae, video, templates)
        ref = variants["two passes"]()
        for name, fn in variants.items():
            rows[name] = {"ms": ms(fn), "rel_l2_vs_two_passes": rel_l2(fn(), ref)}
        last = vae.use_channels_last()
        cl_templates = [t.contiguous(memory_format=torch.channels_last_3d) if t.dim() == 5 else t for t in templates]
        cl = _variants(last, video.contiguous(memory_format=torch.channels_last_3d), cl_templates)["one pass"]
        rows["one pass, channels_last_3d"] = {"ms": ms(cl), "rel_l2_vs_two_passes": rel_l2(cl(), ref)}
        last.use_fused_norms()  # the same weights, each RMSNorm + SiLU one kernel pass
        rows["one pass, channels_last_3d, fused norms"] = {"ms": ms(cl), "rel_l2_vs_two_passes": rel_l2(cl(), ref)}
        # The engine's form (`use_narrow_forms`), its padded convs up to 31 input channels (the rule before
        # 2026-12-06's fourth session) and up to PAD_MAX_CHANNELS (48 -> 64 too), each on its own copy.
        for name, widest in (("narrow forms, pad <= 31", 31), ("narrow forms, pad <= 48", blocks.PAD_MAX_CHANNELS)):
            rows[name] = _narrow(vae, cfg, widest, video, ref, height, width, ms)
    for name, r in rows.items():
        print(
            f"dim {cfg.dim:3d} {height}x{width}  {name:28s} {r['ms']:8.2f} ms  rel.L2 {r['rel_l2_vs_two_passes']:.1e}"
        )
    return rows


def _narrow(vae: WanVAE, cfg: WanVAEConfig, widest: int, video, ref, height: int, width: int, ms) -> dict:
    """The encoder in the engine's form with "pad" convs up to `widest` input channels: ms and rel. L2."""
    form = WanVAE(cfg).to(video.device, video.dtype).eval()
    form.load_state_dict(vae.state_dict())
    saved = blocks.PAD_MAX_CHANNELS
    blocks.PAD_MAX_CHANNELS = widest  # read by use_narrow_forms only (each conv keeps the form it got)
    try:
        form.use_channels_last().use_fused_norms().use_narrow_forms()
    finally:
        blocks.PAD_MAX_CHANNELS = saved
    templates = cache_templates(form, 1, height, width)
    fn = _variants(form, video.contiguous(memory_format=torch.channels_last_3d), templates)["one pass"]
    padded = sorted({m.in_channels for m in form.modules() if getattr(m, "narrow_form", None) == "pad"})
    return {"ms": ms(fn), "rel_l2_vs_two_passes": rel_l2(fn(), ref), "padded_inputs": padded}


def measure_decode(height: int, width: int, dev: torch.device, dtype: torch.dtype, ms, cfg: WanVAEConfig) -> dict:
    """The Wan VAE's steady streaming decode of 3 latent frames (Matrix-Game's block), NCDHW vs NDHWC."""
    torch.manual_seed(0)
    plain = WanVAE(cfg, parts=("decoder",)).to(dev, dtype).eval()
    last = WanVAE(cfg, parts=("decoder",)).to(dev, dtype).eval()
    last.load_state_dict(plain.state_dict())
    last.use_channels_last()
    h, w = height // 8, width // 8
    z = torch.randn(1, 16, 3, h, w, device=dev)
    rows = {}
    with torch.no_grad():
        outs = {}
        fused = WanVAE(cfg, parts=("decoder",)).to(dev, dtype).eval()
        fused.load_state_dict(plain.state_dict())
        fused.use_fused_norms()
        for name, vae in (("ncdhw", plain), ("channels_last_3d", last), ("ncdhw, fused norms", fused)):
            state = vae.new_decode_state(1, h, w, device=dev)
            vae.decode_stream(z, state)  # past the first block: the steady 4-frames-per-latent form
            outs[name] = vae.decode_stream(z, state)
            rows[name] = {"ms": ms(lambda vae=vae, state=state: vae.decode_stream(z, state))}
        for name in ("channels_last_3d", "ncdhw, fused norms"):
            rows[name]["rel_l2_vs_ncdhw"] = rel_l2(outs[name], outs["ncdhw"])
        # The decoder's spatial 2x nearest upsampling at its full-resolution input (the largest of its
        # three), as torch's kernel did it and as the broadcast copy the decoder uses now.
        x = torch.randn(1, 192, 12, height // 2, width // 2, device=dev, dtype=dtype)

        def interpolate() -> torch.Tensor:
            return torch.nn.functional.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")

        def broadcast() -> torch.Tensor:
            b, c, t, hh, ww = x.shape
            return x[:, :, :, :, None, :, None].expand(b, c, t, hh, 2, ww, 2).reshape(b, c, t, 2 * hh, 2 * ww)

        assert torch.equal(interpolate(), broadcast())
        rows["upsample 2x, F.interpolate"] = {"ms": ms(interpolate)}
        rows["upsample 2x, broadcast copy"] = {"ms": ms(broadcast)}
    for name, r in rows.items():
        print(f"wan vae decode {height}x{width} 3 latents  {name:28s} {r['ms']:8.2f} ms")
    return rows


def main() -> None:
    args, dev, ms = micro_bench_setup(__doc__, default_reps=10)
    dtype = torch.float32 if args.smoke else torch.bfloat16

    hw = (32, 48) if args.smoke else (704, 1280)
    configs = (
        {"lightvae (dim 24)": LIGHTVAE} if args.smoke else {"lightvae (dim 24)": LIGHTVAE, "wan vae": WanVAEConfig()}
    )
    out = {"env": environment(dev), "height": hw[0], "width": hw[1], "encoders": {}}
    for name, cfg in configs.items():
        out["encoders"][name] = measure(cfg, *hw, dev, dtype, ms)
    dec_hw = (32, 48) if args.smoke else (352, 640)
    # The smoke run checks the forms agree on a narrow decoder (a third of the released widths: ~9x fewer FLOPs).
    dec_cfg = WanVAEConfig(dim=32) if args.smoke else WanVAEConfig()
    rows = measure_decode(*dec_hw, dev, dtype, ms, dec_cfg)
    out["decoder"] = {"height": dec_hw[0], "width": dec_hw[1], "dim": dec_cfg.dim, "rows": rows}
    write_result(args.out, out)


if __name__ == "__main__":
    main()
