"""The video decoders behind one small streaming interface (what a session calls per block).

A decoder turns a block of DiT latents [B, 16, nf, h, w] (normalised, channels before frames)
into RGB frames in [0, 1], frame-major [B, T, 3, 8h, 8w] float32, with T = 1 + 4(nf-1) for the
first block of a stream and 4*nf after. Its state is preallocated by `new_state` and updated
in place, so after the first block every call has the same shapes and buffer addresses (a CUDA
graph can capture `decode_block`).

Weights: `build_decoder` loads original-layout checkpoints; `tiny_decoder` and `random_decoder`
make random-weight instances (tests, the built-in default model, benchmarks).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.taehv import TAEHV, TAEHVConfig, TAEHVDecodeState
from flashdreams.models.wan_vae import FIRST_FRAME_MODES, WanVAE, WanVAEConfig, WanVAEDecodeState

logger = logging.getLogger(__name__)

DecoderState = WanVAEDecodeState | TAEHVDecodeState
DECODER_NAMES = ("wan-vae", "taehv")
# Frames the Self-Forcing demo drops from the first block of its zero-cache VAE stream.
DEMO_DROP_FRAMES = 3

TINY_CONFIGS = {"wan-vae": WanVAEConfig(dim=8), "taehv": TAEHVConfig(channels=(32, 16, 8, 8))}


@runtime_checkable
class StreamingDecoder(Protocol):
    """Latent blocks in, RGB frames out, with explicit state owned by the caller."""

    name: str
    device: torch.device
    dtype: torch.dtype

    def new_state(self, batch: int, latent_h: int, latent_w: int) -> DecoderState:
        """Zeroed state of a new stream, on the decoder's device and dtype."""
        ...

    def decode_block(self, latents: Tensor, state: DecoderState) -> Tensor:
        """Latents [B, 16, nf, h, w] -> RGB [B, T, 3, 8h, 8w] float32 in [0, 1]; `state` advances in place."""
        ...

    def reset(self, state: DecoderState) -> None:
        """Back to the start of a stream, in place (same buffers)."""
        ...

    def num_frames(self, num_latents: int, first: bool) -> int:
        """Frames `decode_block` returns for a block of `num_latents` (the first block of a stream or not)."""
        ...


class WanVAEDecoder:
    """The Wan 2.1 VAE as a StreamingDecoder; `first_frame` picks the official or demo rule."""

    name = "wan-vae"

    def __init__(self, vae: WanVAE, first_frame: str = "official") -> None:
        if first_frame not in FIRST_FRAME_MODES:
            raise InvalidArgumentError(f"wan-vae first_frame '{first_frame}' is not one of {FIRST_FRAME_MODES}")
        self.vae = vae.eval()
        self.first_frame = first_frame
        self.device = vae.conv2.weight.device
        self.dtype = vae.conv2.weight.dtype

    def new_state(self, batch: int, latent_h: int, latent_w: int) -> WanVAEDecodeState:
        return self.vae.new_decode_state(batch, latent_h, latent_w, self.device, self.dtype, self.first_frame)

    def decode_block(self, latents: Tensor, state: WanVAEDecodeState) -> Tensor:
        first = not state.started
        video = self.vae.decode_stream(latents.to(self.dtype), state)  # [B, 3, T, H, W], nominally [-1, 1]
        if first and state.mode == "demo":
            video = video[:, :, DEMO_DROP_FRAMES:]
        # Both reference wrappers clamp to [-1, 1]; the session wants [0, 1], frame-major.
        return video.float().clamp_(-1.0, 1.0).add_(1.0).mul_(0.5).permute(0, 2, 1, 3, 4).contiguous()

    def reset(self, state: WanVAEDecodeState) -> None:
        state.reset()

    def num_frames(self, num_latents: int, first: bool) -> int:
        return 1 + 4 * (num_latents - 1) if first else 4 * num_latents


class TAEHVDecoder:
    """TAEHV as a StreamingDecoder: carried MemBlock memory, the stream's first 3 frames trimmed."""

    name = "taehv"

    def __init__(self, model: TAEHV) -> None:
        self.model = model.in_device_layout(channels_last=True).eval()  # NHWC on CUDA: measured faster
        self.device = model.decoder[1].weight.device
        self.dtype = model.decoder[1].weight.dtype

    def new_state(self, batch: int, latent_h: int, latent_w: int) -> TAEHVDecodeState:
        return self.model.new_decode_state(batch, latent_h, latent_w, self.device, self.dtype)

    def decode_block(self, latents: Tensor, state: TAEHVDecodeState) -> Tensor:
        # TAEHV takes the normalised latents as they are, frame-major.
        frames = self.model.decode_stream(latents.to(self.dtype).permute(0, 2, 1, 3, 4), state, trim=True)
        return frames.float().clamp_(0.0, 1.0).contiguous()

    def reset(self, state: TAEHVDecodeState) -> None:
        state.reset()

    def num_frames(self, num_latents: int, first: bool) -> int:
        cfg = self.model.config
        return cfg.time_upscale * num_latents - (cfg.frames_to_trim if first else 0)


def _check_name(name: str) -> None:
    if name not in DECODER_NAMES:
        raise InvalidArgumentError(f"unknown decoder '{name}'; known decoders are {DECODER_NAMES}")


def _config_for(name: str, config: WanVAEConfig | TAEHVConfig | dict | None) -> WanVAEConfig | TAEHVConfig:
    cls = WanVAEConfig if name == "wan-vae" else TAEHVConfig
    if config is None:
        return cls()
    if isinstance(config, dict):
        return cls.from_dict(config)
    if not isinstance(config, cls):
        raise InvalidArgumentError(f"decoder '{name}' needs a {cls.__name__}, got {type(config).__name__}")
    return config


def _empty_model(name: str, config: WanVAEConfig | TAEHVConfig, device: torch.device | str, dtype: torch.dtype):
    """The decoder module with uninitialised parameters, allocated directly on `device` in `dtype`."""
    with torch.device("meta"):
        model = WanVAE(config, parts=("decoder",)) if name == "wan-vae" else TAEHV(config)
    # The decoder stays NCDHW: in channels_last_3d its steady block at 352x640 took 126.6 instead of
    # 120.6 ms on the H200 (bench/results/next9-h200/hdmap-encoder.json), unlike the encoders.
    model = model.to(dtype=dtype).to_empty(device=device)
    if name == "wan-vae" and torch.device(device).type == "cuda":
        # RMSNorm + SiLU as one kernel pass: the steady decode took 101.7 instead of 112.4 ms
        # (next12-h200/hdmap-encoder.json). No parameter changes, so weights load the same.
        model.use_fused_norms()
    return model


@torch.no_grad()
def init_random_(model: nn.Module, generator: torch.Generator) -> None:
    """Fill every parameter with seeded uniform values, in definition order.

    Convs get std gain/sqrt(fan_in) (gain 1, less on residual branches and the Wan head), norms'
    gamma about 1, biases small: the random decoders' outputs then spread over their range
    without saturating (checked for the tiny and the full sizes).
    """
    relu_net = isinstance(model, TAEHV)
    params = list(model.named_parameters())
    last_weight = max(i for i, (n, p) in enumerate(params) if p.dim() > 1)
    for i, (name, p) in enumerate(params):
        if name.endswith("gamma"):
            p.uniform_(0.9, 1.1, generator=generator)
        elif p.dim() == 1:
            p.uniform_(-0.1, 0.1, generator=generator)
        else:
            gain = 1.0
            if relu_net and name.endswith(".conv.4.weight"):
                gain = 0.5  # a MemBlock's residual branch: keeps 9 stacked blocks from blowing up
            elif i == last_weight and not relu_net:
                gain = 0.7  # the Wan VAE's head: about 5% of the values clamp at +-1
            bound = gain * math.sqrt(3.0 / math.prod(p.shape[1:]))
            p.uniform_(-bound, bound, generator=generator)
    if relu_net:  # centre TAEHV's output on mid-grey, as trained weights are
        model.decoder[-1].bias.add_(0.5)


def _wrap(name: str, model: nn.Module, first_frame: str) -> StreamingDecoder:
    return WanVAEDecoder(model, first_frame) if name == "wan-vae" else TAEHVDecoder(model)


def build_decoder(
    name: str,
    weights: Mapping[str, Tensor] | None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    config: WanVAEConfig | TAEHVConfig | dict | None = None,
    first_frame: str = "official",
    seed: int = 0,
) -> StreamingDecoder:
    """A decoder from an original-layout state dict (`Wan2.1_VAE.pth` or `taew2_1.pth`).

    `weights=None` gives seeded random weights (for benchmarks; a warning is logged).
    `first_frame` ("official" | "demo") only applies to the Wan VAE.
    """
    _check_name(name)
    cfg = _config_for(name, config)
    model = _empty_model(name, cfg, device, dtype)
    if weights is None:
        logger.warning("decoder '%s': no weights given, using random weights (seed %d)", name, seed)
        generator = torch.Generator(device=torch.device(device)).manual_seed(seed)
        init_random_(model, generator)
    else:
        model.load_weights(dict(weights), source=f"{name} weights")
    return _wrap(name, model, first_frame)


def tiny_decoder(
    name: str,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    first_frame: str = "official",
) -> StreamingDecoder:
    """A small decoder with deterministic random weights (Wan VAE dim 8; TAEHV at 1/8 width).

    The weights are drawn on the CPU from a seeded generator in a fixed order, so they are the
    same on every machine; a 3-latent block of 8x8 decodes in well under a second on a CPU.
    """
    _check_name(name)
    model = _empty_model(name, TINY_CONFIGS[name], "cpu", torch.float32)
    init_random_(model, torch.Generator().manual_seed(seed))
    return _wrap(name, model.to(device=device, dtype=dtype), first_frame)


def random_decoder(
    name: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    config: WanVAEConfig | TAEHVConfig | dict | None = None,
    seed: int = 0,
    first_frame: str = "official",
) -> StreamingDecoder:
    """A full-size decoder (released shapes unless `config` says otherwise) with random weights.

    Initialised directly on `device`; for benchmarks, whose speed does not depend on the values.
    """
    _check_name(name)
    model = _empty_model(name, _config_for(name, config), device, dtype)
    init_random_(model, torch.Generator(device=torch.device(device)).manual_seed(seed))
    return _wrap(name, model, first_frame)


def choose_decoder(
    name: str | None,
    device: torch.device,
    dtype: torch.dtype,
    *,
    builtin: bool,
    random_ok: bool,
    seed: int = 0,
    weights: str | None = None,
) -> StreamingDecoder | None:
    """The streaming decoder a session uses: from weights, tiny (built-in models), or random (speed runs)."""
    from flashdreams.models.checkpoint import read_state_dict, strip_prefixes

    if name in (None, "none"):
        return None
    if name not in DECODER_NAMES:
        raise InvalidArgumentError(f"decoder '{name}' is unknown; choose one of {DECODER_NAMES} or none")
    if weights is not None:
        return build_decoder(name, strip_prefixes(read_state_dict(weights)), device=device, dtype=dtype)
    if builtin:
        return tiny_decoder(name, seed=seed, device=device, dtype=dtype)
    if random_ok:
        return random_decoder(name, device=device, dtype=dtype, seed=seed)
    raise InvalidArgumentError(
        f"decoder '{name}' needs its weights for a real checkpoint: pass --decoder-weights "
        "(Wan2.1_VAE.safetensors or taew2_1.safetensors), or --decoder none for latents only"
    )
