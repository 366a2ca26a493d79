"""Engines: a loaded model (eager or compiled) plus everything fixed for its sessions.

`flashdreams.load()` is the one entry point: the built-in default, a checkpoint, a
full-size preset with random weights, or (flashdreams.export) a built engine directory.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from flashdreams.backend import EagerBackend, StepBackend
from flashdreams.errors import InvalidArgumentError
from flashdreams.models.kv_ring import RingSpec
from flashdreams.models.random_init import init_random_
from flashdreams.models.scheduler import FlowSchedule
from flashdreams.models.wan_dit import WanDiT
from flashdreams.models.wan_loader import load_wan_dit
from flashdreams.presets import Preset, get_preset
from flashdreams.session import Session

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass(frozen=True)
class EngineSpec:
    """The static shapes and schedule every session of an engine shares."""

    preset: Preset
    height: int
    width: int
    latent_h: int
    latent_w: int
    latent_channels: int
    text_dim: int
    num_frame_per_block: int
    ring: RingSpec
    schedule: FlowSchedule

    @classmethod
    def from_preset(cls, preset: Preset, height: int | None = None, width: int | None = None) -> EngineSpec:
        height, width = height or preset.height, width or preset.width
        lh, lw = preset.latent_size(height, width)
        ph, pw = preset.model.patch_size[1:]
        fs = (lh // ph) * (lw // pw)
        return cls(
            preset=preset,
            height=height,
            width=width,
            latent_h=lh,
            latent_w=lw,
            latent_channels=preset.model.in_dim,
            text_dim=preset.model.text_dim,
            num_frame_per_block=preset.num_frame_per_block,
            ring=RingSpec(preset.sink_frames, preset.window_frames, fs),
            schedule=preset.schedule(),
        )

    @property
    def frames_per_block(self) -> int:
        """Video frames of a steady-state block (the first block has 3 fewer)."""
        return 4 * self.num_frame_per_block


class Engine:
    """A model ready to run sessions. Engines may be shared; a session belongs to one thread."""

    def __init__(self, backend: StepBackend, spec: EngineSpec, decoder=None, source: str = "") -> None:
        self.backend = backend
        self.spec = spec
        self.decoder = decoder
        self.source = source

    @property
    def device(self) -> torch.device:
        return self.backend.device

    def default_prompt(self, batch: int = 1, seed: int = 0) -> torch.Tensor:
        """A deterministic stand-in prompt embedding, for models whose text encoder is not loaded."""
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(batch, self.backend.text_len, self.spec.text_dim, generator=gen)

    def session(
        self, prompt_embeds: torch.Tensor | None = None, seed: int = 0, cuda_graphs: bool | None = None
    ) -> Session:
        """A new session with its own state; `prompt_embeds` [B, T, text_dim] (built-in: optional).

        `cuda_graphs` (default: on with CUDA) replays each block as captured graphs after
        one eager warm-up of its kind.
        """
        if prompt_embeds is None:
            if not self.spec.preset.builtin:
                raise InvalidArgumentError(
                    f"engine '{self.source}': a session needs prompt_embeds [B, T, {self.spec.text_dim}] "
                    "(from the text encoder, or fd-run --prompt-embeds FILE)"
                )
            prompt_embeds = self.default_prompt()
        return Session(self, prompt_embeds, seed, cuda_graphs=cuda_graphs)

    def __repr__(self) -> str:
        s = self.spec
        return (
            f"Engine({self.spec.preset.name}, backend={self.backend.name}, {s.height}x{s.width}, "
            f"device={self.device}, dtype={self.backend.dtype})"
        )


def resolve_device_dtype(device: str | torch.device | None, dtype: str | torch.dtype | None):
    """Defaults: the GPU in bfloat16 when there is one, else the CPU in float32."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError("device 'cuda' was asked for, but torch sees no CUDA device here")
    if dtype is None:
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif isinstance(dtype, torch.dtype):
        dt = dtype
    else:
        try:
            dt = DTYPES[str(dtype)]
        except KeyError:
            raise InvalidArgumentError(f"dtype '{dtype}' is unknown; choose one of {sorted(DTYPES)}") from None
    return dev, dt


def load(
    source: str | os.PathLike | None = None,
    *,
    preset: str | Preset | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    attention: str = "sdpa",
    decoder: str | None = "preset",
    height: int | None = None,
    width: int | None = None,
    random_weights: bool = False,
    weights_seed: int = 0,
    decoder_weights: str | os.PathLike | None = None,
    precision: str = "bf16",
) -> Engine:
    """Load an engine.

    `decoder` is "wan-vae", "taehv", None (latents only) or "preset" (the preset's choice);
    a real checkpoint needs `decoder_weights` (Wan2.1_VAE / taew2_1 as safetensors) for it.
    `weights_seed` picks the random weights of the built-in and `random_weights` models; a
    session's own `seed` (engine.session) only drives its noise. `precision="fp8"` (with
    attention="triton") runs the blocks' linears and self-attention in float8 (opt-in).

    * `load()`: the built-in tiny model (deterministic random weights, no download).
    * `load(preset="self-forcing-1.3b", random_weights=True)`: full size, random weights (speed runs).
    * `load("ckpt.safetensors" | "ckpt_dir", preset=...)`: a real checkpoint, run eagerly.
    * `load("engine_dir")`: a built engine (manifest.json), see `fd-build`.
    """
    if source is not None and (Path(source) / "manifest.json").is_file():
        from flashdreams.export.runtime import load_engine_dir

        return load_engine_dir(source, device=device, attention=attention, decoder=decoder)
    if isinstance(preset, str):
        preset = get_preset(preset)
    if preset is None:
        preset = get_preset("tiny" if source is None else "self-forcing-1.3b")
    dev, dt = resolve_device_dtype(device, dtype)
    spec = EngineSpec.from_preset(preset, height, width)
    if source is None:
        if not (preset.builtin or random_weights):
            raise InvalidArgumentError(
                f"preset '{preset.name}' needs a checkpoint; pass one, or random_weights=True for speed runs"
            )
        with torch.device("meta"):
            model = WanDiT(preset.model)
        model = model.to_empty(device=dev).to(dt)
        # The built-in model draws on the CPU (identical everywhere); big speed runs on the device.
        init_random_(model, weights_seed, "cpu" if preset.builtin or dev.type == "cpu" else dev)
        model = model.eval().requires_grad_(False)
        label = "builtin:" + preset.name if preset.builtin else f"random:{preset.name}"
    else:
        model = load_wan_dit(source, preset.model, device=dev, dtype=dt)
        label = str(source)
    model.fuse_projections_()
    model.set_attention(attention)
    model.set_precision(precision)
    dec = build_session_decoder(
        preset, decoder, dev, dt, weights_seed, decoder_weights, random_weights or source is None
    )
    return Engine(EagerBackend(model), spec, dec, label)


def build_session_decoder(
    preset: Preset,
    decoder: str | None,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    weights: str | os.PathLike | None = None,
    random_ok: bool = False,
):
    """The streaming decoder a session uses: from weights, tiny (built-in), or random (speed runs)."""
    from flashdreams.models import decoders
    from flashdreams.models.checkpoint import read_state_dict, strip_prefixes

    name = preset.decoder if decoder == "preset" else decoder
    if name in (None, "none"):
        return None
    if name not in decoders.DECODER_NAMES:
        raise InvalidArgumentError(f"decoder '{name}' is unknown; choose one of {decoders.DECODER_NAMES} or none")
    if weights is not None:
        return decoders.build_decoder(name, strip_prefixes(read_state_dict(weights)), device=device, dtype=dtype)
    if preset.builtin:
        return decoders.tiny_decoder(name, seed=seed, device=device, dtype=dtype)
    if random_ok:
        return decoders.random_decoder(name, device=device, dtype=dtype, seed=seed)
    raise InvalidArgumentError(
        f"decoder '{name}' needs its weights for a real checkpoint: pass decoder_weights "
        "(fd-run --decoder-weights Wan2.1_VAE.safetensors or taew2_1.safetensors), or decoder=None for latents"
    )
