"""The Wan 2.1 VAE (`WanVAE_` of `wan/modules/vae.py`) with explicit, preallocated decode state.

Parameter names are those of `Wan2.1_VAE.pth` (`encoder.*`, `conv1.*`, `conv2.*`,
`decoder.*`). Decoding is streamed: `new_decode_state` allocates one fixed-shape cache per
kernel-3 causal conv and `decode_stream` decodes a whole block of latent frames per call,
updating those caches in place, so the steady-state step can be captured in a CUDA graph.

Two first-frame rules (the fixture set's README.md ($FD_FIXTURES), "Kind wan_vae_decode"):
  * "official": the upsample3d time_conv skips latent frame 0 of the stream; decoding the
    blocks one after another equals `decode_full` (1 + 4(T-1) frames).
  * "demo": Self-Forcing's `demo_utils/vae_block3.py`; every cache starts as 2 zero frames and
    nothing is skipped, so each latent gives 4 frames; the caller drops the first 3.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor, nn

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.checkpoint import validate_and_load
from flashdreams.models.wan_vae_blocks import (
    CACHE_T,
    AttentionBlock,
    CausalConv3d,
    Resample,
    ResidualBlock,
    RMSNorm,
    assign_slots,
    fuse_norm_silu,
    use_narrow_forms,
)

logger = logging.getLogger(__name__)

# Per-channel statistics of the Wan 2.1 latent space (wan/modules/vae.py, WanVAE).
WAN21_LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)  # fmt: skip
WAN21_LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)  # fmt: skip

FIRST_FRAME_MODES = ("official", "demo")
# Which top-level key prefixes belong to which half of the model.
PART_PREFIXES = {"encoder": ("encoder.", "conv1."), "decoder": ("decoder.", "conv2.")}


@dataclass(frozen=True)
class WanVAEConfig:
    """`WanVAE_` constructor arguments; the defaults are the released Wan 2.1 VAE."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("dim_mult", "attn_scales", "temperal_downsample"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise InvalidArgumentError(
                f"WanVAEConfig: temperal_downsample needs {len(self.dim_mult) - 1} entries "
                f"(one per dim_mult stage but the last), got {len(self.temperal_downsample)}"
            )

    @classmethod
    def from_dict(cls, d: dict) -> WanVAEConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InvalidArgumentError(f"WanVAEConfig: unknown keys {unknown}; known are {sorted(known)}")
        return cls(**d)

    @property
    def spatial_ratio(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_ratio(self) -> int:
        return 2 ** sum(self.temperal_downsample)


def _run_sequence(layers: nn.Sequential, x: Tensor, caches: list | None, skip_first: bool = False) -> Tensor:
    for layer in layers:
        if isinstance(layer, ResidualBlock | CausalConv3d):
            x = layer(x, caches)
        elif isinstance(layer, Resample):
            x = layer(x, caches, skip_first)
        else:
            x = layer(x)
    return x


class Encoder3d(nn.Module):
    """Video [B, 3, T, H, W] -> [B, 2*z_dim, 1 + (T-1)/4, H/8, W/8] (mu | log_var before conv1)."""

    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, spatial_pad=1)
        layers: list[nn.Module] = []
        scale = 1.0
        for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(din, dout, cfg.dropout))
                if scale in cfg.attn_scales:
                    layers.append(AttentionBlock(dout))
                din = dout
            if i != len(cfg.dim_mult) - 1:
                layers.append(Resample(dout, "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"))
                scale /= 2.0
        self.downsamples = nn.Sequential(*layers)
        top = dims[-1]
        self.middle = nn.Sequential(
            ResidualBlock(top, top, cfg.dropout), AttentionBlock(top), ResidualBlock(top, top, cfg.dropout)
        )
        self.head = nn.Sequential(RMSNorm(top, images=False), nn.SiLU(), CausalConv3d(top, cfg.z_dim * 2, 3, 1))
        self.num_slots = assign_slots(self)

    def forward(self, x: Tensor, caches: list | None) -> Tensor:
        x = self.conv1(x, caches)
        x = _run_sequence(self.downsamples, x, caches)
        x = _run_sequence(self.middle, x, caches)
        return _run_sequence(self.head, x, caches)


class Decoder3d(nn.Module):
    """Latent [B, z_dim, n, h, w] -> video [B, 3, T, 8h, 8w], caching 2 frames per causal conv."""

    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        dims = [cfg.dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        temporal_up = tuple(reversed(cfg.temperal_downsample))
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, spatial_pad=1)
        self.middle = nn.Sequential(
            ResidualBlock(dims[0], dims[0], cfg.dropout),
            AttentionBlock(dims[0]),
            ResidualBlock(dims[0], dims[0], cfg.dropout),
        )
        layers: list[nn.Module] = []
        scale = 1.0 / 2 ** (len(cfg.dim_mult) - 2)
        for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
            if i in (1, 2, 3):  # the previous Resample halved the width (reference rule)
                din = din // 2
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(din, dout, cfg.dropout))
                if scale in cfg.attn_scales:
                    layers.append(AttentionBlock(dout))
                din = dout
            if i != len(cfg.dim_mult) - 1:
                layers.append(Resample(dout, "upsample3d" if temporal_up[i] else "upsample2d"))
                scale *= 2.0
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(RMSNorm(dims[-1], images=False), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, 1))
        self.num_slots = assign_slots(self)

    def cache_specs(self) -> list[tuple[int, int]]:
        """(channels, spatial upscale) of every cache slot, in slot order."""
        specs: list[tuple[int, int]] = []
        up = 1
        for module in self.modules():
            if isinstance(module, CausalConv3d) and module.causal:
                specs.append((module.in_channels, up))
                if module.kernel_size == (3, 1, 1):  # an upsample3d time_conv: spatial 2x follows
                    up *= 2
            elif isinstance(module, Resample) and module.mode == "upsample2d":
                up *= 2
        if len(specs) != self.num_slots:  # pragma: no cover - guards the walk above
            raise AssertionError(f"cache walk found {len(specs)} slots, expected {self.num_slots}")
        return specs

    def forward(self, x: Tensor, caches: list | None, skip_first: bool = False) -> Tensor:
        x = self.conv1(x, caches)
        x = _run_sequence(self.middle, x, caches)
        x = _run_sequence(self.upsamples, x, caches, skip_first)
        return _run_sequence(self.head, x, caches)


@dataclass
class WanVAEDecodeState:
    """The decoder's streaming state: one [B, C, 2, H, W] cache per causal conv, updated in place."""

    caches: list[Tensor]
    mode: str
    batch: int
    latent_h: int
    latent_w: int
    # Host-side flag (no device read): has the first block of the stream been decoded?
    started: bool = field(default=False)

    def reset(self) -> None:
        """Back to the start of a stream, without reallocating."""
        for cache in self.caches:
            cache.zero_()
        self.started = False


class WanVAE(nn.Module):
    """The Wan 2.1 VAE; `parts` selects which halves are built (and must be in the weights)."""

    def __init__(self, config: WanVAEConfig | None = None, parts: tuple[str, ...] = ("encoder", "decoder")):
        super().__init__()
        self.config = cfg = config or WanVAEConfig()
        unknown = set(parts) - set(PART_PREFIXES)
        if unknown or not parts:
            raise InvalidArgumentError(f"WanVAE: parts {parts} must be a non-empty subset of {tuple(PART_PREFIXES)}")
        self.parts = tuple(p for p in PART_PREFIXES if p in parts)
        if "encoder" in parts:
            self.encoder = Encoder3d(cfg)
            self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        if "decoder" in parts:
            self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
            self.decoder = Decoder3d(cfg)
        # The latent statistics stay float32 whatever dtype the weights are cast to: they are
        # kept as Python floats and rebuilt as buffers after every .to()/.cuda() (see _apply).
        self._stats = (WAN21_LATENT_MEAN, WAN21_LATENT_STD)
        self.register_buffer("latent_mean", torch.empty(cfg.z_dim), persistent=False)
        self.register_buffer("latent_inv_std", torch.empty(cfg.z_dim), persistent=False)
        self._build_stats(self.latent_mean.device)

    def _build_stats(self, device: torch.device) -> None:
        mean, std = self._stats
        self.latent_mean = torch.tensor(mean, dtype=torch.float32, device=device)
        # The reference divides by the float32 reciprocal of std.
        self.latent_inv_std = 1.0 / torch.tensor(std, dtype=torch.float32, device=device)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> WanVAE:
        super()._apply(fn, recurse)
        self._build_stats(self.latent_mean.device)
        return self

    def use_channels_last(self) -> WanVAE:
        """Keep the 3-D convolutions' weights in channels_last_3d (NDHWC), so that their activations
        stay NDHWC too: cuDNN's convolutions run natively in that layout, while NCDHW tensors are
        transposed around each of them (at 704x1280 the HD-map encoder took 52 instead of 64 ms, the
        Wan VAE encoder 178 instead of 210: bench/results/next8-h200/hdmap-encoder.json; the decoder,
        whose nearest upsampling and time doubling reshape back to NCDHW, got slower: 126.6 vs 120.6
        ms, next9-h200/, so decoders stay NCDHW). Same function: only the memory order changes (bf16
        results differ by the convolution algorithm's summation order). Returns self."""
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last_3d)
        return self

    def use_fused_norms(self) -> WanVAE:
        """Run the residual blocks' and heads' RMSNorm + SiLU pairs as one kernel pass each
        (`kernels/channel_rms_norm.py`: float32 math, one rounding) instead of torch's six passes.
        On the H200 the HD-map encode at 704x1280 took 43.8 instead of 51.7 ms and the decoder's steady
        block at 352x640 101.7 instead of 112.4 ms (bench/results/next12-h200/hdmap-encoder.json), so
        the CUDA decoders (models/decoders.py) and the OmniDreams HD-map encoder use it. Returns self."""
        fuse_norm_silu(self)
        return self

    def use_narrow_forms(self) -> WanVAE:
        """Run the few-channel convolutions (LightVAE's width-24 layers, the 3-channel first conv) in
        the forms cuDNN runs fastest: channels padded to 32, the first conv's time taps folded into
        channels, the stride-2 downsampling as 2-D convs (`wan_vae_blocks.use_narrow_forms`). Same
        function and state dict; a padded conv's streaming cache, made on a stream's first call, is
        [B, 2, H, W, 32] (its padded input's frames) instead of [B, C, 2, H, W]. Returns self."""
        use_narrow_forms(self)
        return self

    # ---- weights -------------------------------------------------------------------------

    def load_weights(self, state_dict: dict[str, Tensor], source: str = "state dict") -> None:
        """Load an original-layout (`Wan2.1_VAE.pth`) state dict into the built parts.

        Keys of a part that was not built are ignored (so a full checkpoint loads into a
        decoder-only model); anything else must match exactly, or nothing is loaded.
        """
        skip = tuple(p for part, prefixes in PART_PREFIXES.items() if part not in self.parts for p in prefixes)
        wanted = {k: v for k, v in state_dict.items() if not k.startswith(skip)} if skip else state_dict
        validate_and_load(
            self,
            wanted,
            source,
            hint=f"expected the Wan2.1_VAE.pth layout (encoder.*, conv1.*, conv2.*, decoder.*) without a prefix, "
            f"for {self.config} with parts {self.parts}; check that `dim` matches the checkpoint",
        )
        logger.debug("loaded %d Wan VAE tensors from %s", len(wanted), source)

    def set_latent_stats(self, mean: Tensor, std: Tensor) -> None:
        """Replace the latent mean/std constants (e.g. by a fixture's stored values)."""
        if mean.numel() != self.config.z_dim or std.numel() != self.config.z_dim:
            raise InvalidArgumentError(
                f"latent stats need {self.config.z_dim} values each; got {mean.numel()} and {std.numel()}"
            )
        self._stats = (tuple(mean.float().tolist()), tuple(std.float().tolist()))
        self._build_stats(self.latent_mean.device)

    # ---- decoding ------------------------------------------------------------------------

    def _require(self, part: str) -> None:
        if part not in self.parts:
            raise InvalidArgumentError(f"WanVAE was built with parts {self.parts}; '{part}' is needed here")

    def new_decode_state(
        self,
        batch: int,
        latent_h: int,
        latent_w: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        mode: str = "official",
    ) -> WanVAEDecodeState:
        """Allocate the zeroed caches of a decode stream (on the model's device/dtype by default)."""
        self._require("decoder")
        if mode not in FIRST_FRAME_MODES:
            raise InvalidArgumentError(f"decode mode '{mode}' is not one of {FIRST_FRAME_MODES}")
        ref = self.conv2.weight
        device = ref.device if device is None else device
        dtype = ref.dtype if dtype is None else dtype
        caches = [
            torch.zeros(batch, ch, CACHE_T, latent_h * up, latent_w * up, device=device, dtype=dtype)
            for ch, up in self.decoder.cache_specs()
        ]
        return WanVAEDecodeState(caches, mode, batch, latent_h, latent_w)

    def denormalize(self, z: Tensor) -> Tensor:
        """`z / (1/std) + mean` per channel (the reference's exact form), in float32."""
        inv_std = self.latent_inv_std.view(1, -1, 1, 1, 1)
        mean = self.latent_mean.view(1, -1, 1, 1, 1)
        return (z.float() / inv_std + mean).to(self.conv2.weight.dtype)

    def decode_stream(self, z: Tensor, state: WanVAEDecodeState, clamp: bool = False) -> Tensor:
        """Decode the next block of normalised latents [B, z_dim, n, h, w] -> [B, 3, T, 8h, 8w].

        T is 1 + 4(n-1) for the first block in "official" mode and 4n otherwise. The caches
        in `state` are read and overwritten in place; nothing is read back to the host.
        """
        self._require("decoder")
        expected = (state.batch, self.config.z_dim, state.latent_h, state.latent_w)
        if z.dim() != 5 or (z.shape[0], z.shape[1], z.shape[3], z.shape[4]) != expected:
            raise InvalidArgumentError(
                f"Wan VAE decode: latents of shape {tuple(z.shape)} do not fit the state, which expects "
                f"[{state.batch}, {self.config.z_dim}, n, {state.latent_h}, {state.latent_w}]"
            )
        with torch.no_grad():
            x = self.conv2(self.denormalize(z))
            skip_first = state.mode == "official" and not state.started
            out = self.decoder(x, state.caches, skip_first=skip_first)
        state.started = True
        return out.clamp(-1.0, 1.0) if clamp else out

    def decode_full(self, z: Tensor, clamp: bool = False, chunk: int = 3) -> Tensor:
        """Reference full decode of [B, z_dim, T, h, w] -> [B, 3, 1 + 4(T-1), 8h, 8w].

        Decoded `chunk` latent frames at a time (only memory depends on it, not the result).
        """
        state = self.new_decode_state(z.shape[0], z.shape[3], z.shape[4], z.device, mode="official")
        outs = [self.decode_stream(z[:, :, i : i + chunk], state, clamp) for i in range(0, z.shape[2], chunk)]
        return torch.cat(outs, dim=2)

    def decode_demo(self, z: Tensor, block: int = 3, drop: int = 3, clamp: bool = False) -> Tensor:
        """The Self-Forcing demo's block stream: zero caches, no skip, first `drop` frames dropped."""
        state = self.new_decode_state(z.shape[0], z.shape[3], z.shape[4], z.device, mode="demo")
        outs = [self.decode_stream(z[:, :, i : i + block], state, clamp) for i in range(0, z.shape[2], block)]
        return torch.cat(outs, dim=2)[:, :, drop:]

    # ---- encoding ------------------------------------------------------------------------

    def encode(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """Video [B, 3, T, H, W] in [-1, 1] -> (mu, log_var), each [B, z_dim, 1 + (T-1)/4, H/8, W/8].

        Fed in the reference's chunks of 1, 4, 4, ... frames with per-call caches, which keeps
        memory bounded for long videos.
        """
        self._require("encoder")
        ratio = self.config.spatial_ratio
        if (
            video.dim() != 5
            or video.shape[1] != 3
            or (video.shape[2] - 1) % 4
            or video.shape[3] % ratio
            or (video.shape[4] % ratio)
        ):
            raise InvalidArgumentError(
                f"Wan VAE encode: video must be [B, 3, 1+4k, H, W] with H, W multiples of {ratio}; "
                f"got {tuple(video.shape)}"
            )
        video = video.to(self.conv1.weight.dtype)
        caches: list = [None] * self.encoder.num_slots
        with torch.no_grad():
            outs = [self.encoder(video[:, :, :1], caches)]
            for start in range(1, video.shape[2], 4):
                outs.append(self.encoder(video[:, :, start : start + 4], caches))
            mu, log_var = self.conv1(torch.cat(outs, dim=2)).chunk(2, dim=1)
        return mu, log_var

    def normalize(self, mu: Tensor) -> Tensor:
        """`(mu - mean) * (1/std)` per channel: the latent the DiT works in."""
        mean = self.latent_mean.view(1, -1, 1, 1, 1)
        inv_std = self.latent_inv_std.view(1, -1, 1, 1, 1)
        return ((mu.float() - mean) * inv_std).to(mu.dtype)

    def encode_latent(self, video: Tensor) -> Tensor:
        """Video -> normalised latent (what `WanVAE.encode` of the reference returns)."""
        return self.normalize(self.encode(video)[0])
