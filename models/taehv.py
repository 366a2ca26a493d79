"""TAEHV, the tiny video decoder of the Self-Forcing demo (`demo_utils/taehv.py`, `taew2_1.pth`).

TAEHV takes the *normalised* Wan latents as they are: no mean/std de-normalisation (unlike the
Wan VAE and LightTAE). Its only temporal state is the MemBlock memory: each MemBlock sees its
own input of the previous time step (zeros at the start). Carrying that memory in a fixed-shape
tensor per MemBlock lets a whole block of latent frames be decoded in parallel per call with
exactly the numbers of a parallel decode of the whole video (`decode_stream`).

Layout: latents [N, T, 16, h, w] and frames [N, 4T, 3, 8h, 8w] (NTCHW), values nominally in [0, 1].
Only the decoder is built; the `encoder.*` keys of the released file are accepted and ignored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.checkpoint import validate_and_load

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TAEHVConfig:
    """Decoder shape. `channels` is the reference's `n_f`; smaller ones give a test-sized model."""

    decoder_time_upscale: tuple[bool, ...] = (True, True)
    decoder_space_upscale: tuple[bool, ...] = (True, True, True)
    channels: tuple[int, ...] = (256, 128, 64, 64)
    latent_channels: int = 16
    image_channels: int = 3

    def __post_init__(self) -> None:
        for name in ("decoder_time_upscale", "decoder_space_upscale", "channels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.decoder_time_upscale) != 2 or len(self.decoder_space_upscale) != 3 or len(self.channels) != 4:
            raise InvalidArgumentError(
                f"TAEHVConfig: need 2 time flags, 3 space flags and 4 channel widths; got {self}"
            )

    @classmethod
    def from_dict(cls, d: dict) -> TAEHVConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InvalidArgumentError(f"TAEHVConfig: unknown keys {unknown}; known are {sorted(known)}")
        return cls(**d)

    @property
    def time_upscale(self) -> int:
        return 2 ** sum(self.decoder_time_upscale)

    @property
    def space_upscale(self) -> int:
        return 2 ** sum(self.decoder_space_upscale)

    @property
    def frames_to_trim(self) -> int:
        """Frames before the first real one: the reference's (commented-out) trim, 3 by default."""
        return self.time_upscale - 1


# The decoder's nearest 2x upsampling as a broadcast copy in the activations' layout instead of torch's
# upsample kernel (bench/taehv_upsample_bench.py compares both in one run; the Wan VAE decoder's
# broadcast copy took 1.28 ms where F.interpolate took 6.34, next10-h200).
UPSAMPLE_AS_COPY = True


def upsample_nearest(x: Tensor, factor: int) -> Tensor:
    """Nearest upsampling of [N, C, H, W] by an integer factor, as a copy of a broadcast view: rows and
    columns repeated, the same values as `nn.Upsample(scale_factor=factor)`, in x's memory layout."""
    if factor == 1:
        return x
    n, c, h, w = x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        y = x.permute(0, 2, 3, 1)[:, :, None, :, None, :]  # [N, H, 1, W, 1, C] view of NHWC memory
        y = y.expand(n, h, factor, w, factor, c).reshape(n, h * factor, w * factor, c)
        return y.permute(0, 3, 1, 2)  # NHWC memory again
    y = x[:, :, :, None, :, None].expand(n, c, h, factor, w, factor)
    return y.reshape(n, c, h * factor, w * factor)


# The decoder's end, ReLU then a 3x3 conv to RGB, as one Triton pass on CUDA in NHWC (kernels/narrow_conv.py):
# cuDNN ran that conv with 61 of its 64 output columns idle, 1.45 ms at 704x1280 on an H100 (next78-h100).
NARROW_LAST_CONV = True


def _narrow_last_conv(x: Tensor, conv: nn.Conv2d) -> Tensor | None:
    """conv(relu(x)) by `kernels.narrow_conv` where it serves (NARROW_LAST_CONV, CUDA, bf16/fp16 NHWC
    activations, a power-of-two channel count, <= 16 outputs); else None (the layers run as they are)."""
    c = x.shape[1]
    if not (NARROW_LAST_CONV and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.dim() == 4):
        return None
    if not x.is_contiguous(memory_format=torch.channels_last) or c & (c - 1) or not 16 <= c <= 256:
        return None
    from flashdreams.kernels import narrow_conv, triton_available

    if conv.out_channels > narrow_conv.MAX_OUT or not triton_available(x.device):
        return None
    w, b = narrow_conv.narrow_conv_weights(conv.weight.to(x.dtype), conv.bias)
    return narrow_conv.conv3x3_narrow(x, w, b, conv.out_channels, relu_in=True)


# MemBlock's bias adds, residual add and ReLUs as one pass after each conv where Triton runs on NHWC activations
# (kernels/bias_act.py; torch's broadcast bias add on an NHWC output takes its slow generic path): at
# OmniDreams' 704x1280 the last stage's nine convs paid 1.43 ms of bias adds and 0.49 ms of ReLUs (H200,
# next76). Same numbers, bit for bit.
FUSED_BIAS_ACT = True


def _conv_relu(conv: nn.Conv2d, x: Tensor, residual: Tensor | None = None) -> Tensor:
    """relu(conv(x) [+ residual]); with FUSED_BIAS_ACT on NHWC activations where Triton runs, the conv without
    its bias and then `kernels.bias_act` (the bias, the residual and the ReLU in one pass)."""
    nhwc = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    if FUSED_BIAS_ACT and nhwc and conv.bias is not None:
        from flashdreams.kernels import bias_act, triton_available

        if triton_available(x.device):
            y = _conv2d(conv, x, with_bias=False)
            fits = y.is_contiguous(memory_format=torch.channels_last) and (
                residual is None or residual.is_contiguous(memory_format=torch.channels_last)
            )
            fuse = bias_act.bias_act if fits else bias_act.bias_act_reference
            return fuse(y, conv.bias, residual)
    y = conv(x)
    return F.relu(y if residual is None else y + residual, inplace=True)


# Each stage's `Upsample -> TGrow` as TGrow's 1x1 conv at the stage's resolution (it commutes with nearest
# upsampling) and then one Triton copy that splits the frames and repeats the pixels (kernels/upsample_frames.py),
# where Triton runs on NHWC activations: at OmniDreams' 704x1280 the full-resolution 1x1 conv, the upsample copy
# (0.67 ms) and the frame split (1.25 ms) ran at full resolution in torch (H200, next76).
UPSAMPLE_FRAMES_KERNEL = True


def _upsample_then_tgrow(x: Tensor, factor: int, tgrow: TGrow) -> Tensor | None:
    """tgrow(upsample(x, factor)) as `kernels.upsample_frames(tgrow.conv(x))` where it serves (the switch on,
    NHWC activations, Triton); else None (the layers run as they are)."""
    if not (UPSAMPLE_FRAMES_KERNEL and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return None
    from flashdreams.kernels import triton_available, upsample_frames

    if not triton_available(x.device):
        return None
    y = tgrow.conv(x)
    if not y.is_contiguous(memory_format=torch.channels_last):
        return None
    return upsample_frames.upsample_frames(y, tgrow.stride, factor)


# Each MemBlock's input, cat([x, past]), and its memory update as one Triton pass where Triton runs on NHWC
# activations (kernels/memblock_join.py) instead of torch's three copies into the joined buffer's channel halves
# and the transposing copy into the (NCHW) memory: steady decode 8.21 -> 7.83 ms at Self-Forcing's 480x832,
# 10.84 -> 9.99 ms at OmniDreams' 704x1280, the same frames bit for bit (H100, next105).
MEMBLOCK_JOIN_KERNEL = True


def _memblock_join(x: Tensor, batch: int, memory: Tensor | None) -> Tensor | None:
    """`memblock_input` and the memory update as `kernels.memblock_join` where it serves (the switch on, NHWC
    activations, a memory of x's dtype, Triton); else None (the torch copies run, the memory untouched)."""
    if not (MEMBLOCK_JOIN_KERNEL and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return None
    if memory is not None and (memory.dtype != x.dtype or memory.stride(2) != memory.shape[3] * memory.stride(3)):
        return None
    from flashdreams.kernels import memblock_join, triton_available

    if not triton_available(x.device):
        return None
    return memblock_join.memblock_join(x, batch, memory)


class NHWCConv2d(nn.Conv2d):
    """nn.Conv2d (the same parameters and keys) that keeps NHWC activations NHWC where Triton runs: its output is
    channels-last by contract there (`kernels.conv_nhwc`), in eager runs and in traced graphs alike, so an engine's
    decode graph picks the same Triton passes as the eager decoder (a traced cuDNN conv reported NCHW outputs)."""

    def forward(self, x: Tensor) -> Tensor:
        return _conv2d(self, x)


def _conv2d(conv: nn.Conv2d, x: Tensor, with_bias: bool = True) -> Tensor:
    """conv(x), without its bias unless `with_bias`: by `kernels.conv_nhwc` on NHWC activations and weights where
    Triton runs, else by F.conv2d."""
    bias = conv.bias if with_bias else None
    if _channels_last(x) and conv.weight.is_contiguous(memory_format=torch.channels_last):
        from flashdreams.kernels import conv_nhwc

        return conv_nhwc.conv_pinned_where_it_runs(
            x, conv.weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups
        )
    return F.conv2d(x, conv.weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return NHWCConv2d(n_in, n_out, 3, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of the latents: tanh(x/3) * 3."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """ReLU(conv(ReLU(conv(ReLU(conv(cat[x, past]))))) + x), `past` = the previous step's input."""

    def __init__(self, n: int) -> None:
        super().__init__()
        # Indices 0, 2, 4 reproduce the reference's `conv.{0,2,4}` keys.
        self.conv = nn.Sequential(_conv(2 * n, n), nn.ReLU(), _conv(n, n), nn.ReLU(), _conv(n, n))

    def forward(self, x: Tensor, past: Tensor) -> Tensor:
        return self.forward_joined(x, torch.cat([x, past], 1))

    def forward_joined(self, x: Tensor, joined: Tensor) -> Tensor:
        """The block with its first conv's input cat([x, past], channels) given (`memblock_input`)."""
        h = _conv_relu(self.conv[0], joined)
        h = _conv_relu(self.conv[2], h)
        return _conv_relu(self.conv[4], h, residual=x)


def _channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and x.shape[1] > 1 and x.stride(1) == 1


def memblock_input(x: Tensor, batch: int, memory: Tensor | None) -> Tensor:
    """cat([x, past], channels) for x [N*T, C, H, W] (frames of a batch row consecutive), past = each
    frame's predecessor: `memory` [N, C, H, W] (zeros when None) for the first. Written into one
    buffer in x's memory format: with NHWC activations, two concatenations came out NCHW, and every
    MemBlock's conv paid layout transposes on top of the copies."""
    nt, c, h, w = x.shape
    fmt = torch.channels_last if _channels_last(x) else torch.contiguous_format
    joined = torch.empty((nt, 2 * c, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)
    joined[:, :c].copy_(x)
    frames = x.view(batch, nt // batch, c, h, w)
    past = joined.view(batch, nt // batch, 2 * c, h, w)[:, :, c:]
    past[:, 1:].copy_(frames[:, :-1])
    if memory is None:
        past[:, 0].zero_()
    else:
        past[:, 0].copy_(memory)
    return joined


class TGrow(nn.Module):
    """1x1 conv C -> C*stride; output channel group j of frame t becomes frame t*stride + j."""

    def __init__(self, n: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = NHWCConv2d(n, n * stride, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        nt, c, h, w = x.shape
        y = self.conv(x)
        if self.stride == 1:
            return y
        if not _channels_last(y):  # NCHW: channel group j is already frame t*stride + j's block
            return y.reshape(nt * self.stride, c, h, w)
        # NHWC: one copy that moves the groups out of the pixels' channels, staying NHWC (a plain
        # reshape would copy to NCHW and leave the next convs to transpose back).
        groups = y.permute(0, 2, 3, 1).reshape(nt, h, w, self.stride, c).permute(0, 3, 1, 2, 4)
        return groups.reshape(nt * self.stride, h, w, c).permute(0, 3, 1, 2)


@dataclass
class TAEHVDecodeState:
    """One [N, C, H, W] memory per MemBlock (its previous input frame), updated in place."""

    memory: list[Tensor]
    batch: int
    latent_h: int
    latent_w: int
    # Host-side flag: has the first block been decoded (its leading frames are trimmed)?
    started: bool = field(default=False)

    def reset(self) -> None:
        for mem in self.memory:
            mem.zero_()
        self.started = False


class TAEHV(nn.Module):
    """The TAEHV decoder under the `taew2_1.pth` key names (`decoder.<index>...`)."""

    def __init__(self, config: TAEHVConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or TAEHVConfig()
        c = cfg.channels
        tu, su = cfg.decoder_time_upscale, cfg.decoder_space_upscale

        def stage(n_in: int, n_out: int, space: bool, stride: int) -> list[nn.Module]:
            blocks: list[nn.Module] = [MemBlock(n_in) for _ in range(3)]
            return [
                *blocks,
                nn.Upsample(scale_factor=2 if space else 1),
                TGrow(n_in, stride),
                _conv(n_in, n_out, False),
            ]

        self.decoder = nn.Sequential(
            Clamp(),
            _conv(cfg.latent_channels, c[0]),
            nn.ReLU(),
            *stage(c[0], c[1], su[0], 1),
            *stage(c[1], c[2], su[1], 2 if tu[0] else 1),
            *stage(c[2], c[3], su[2], 2 if tu[1] else 1),
            nn.ReLU(),
            _conv(c[3], cfg.image_channels),
        )

    def in_device_layout(self, channels_last: bool) -> TAEHV:
        """On CUDA with `channels_last`, the convs' weights in NHWC, so their activations follow (in
        NCHW cuDNN wraps bf16 convs in layout transposes). Measured on the H200 once the activations
        stay NHWC end to end (`memblock_input`, TGrow): TAEHV's streaming decode 10.16 vs 13.24 ms at
        480x832 and 6.19 vs 8.08 ms at 352x640, FlashVSR's TC decoder 46.0 vs 56.5 ms per 768x1408
        chunk (next32-h200; before that fix NHWC lost, 19.38 vs 13.96 ms, next26-h200). Both
        TAEHVDecoder and the TC decoder ask for it; FD_TC_DECODER_LAYOUT=nchw keeps the TC decoder
        NCHW for comparisons. Same values."""
        if channels_last and self.decoder[1].weight.is_cuda:
            return self.to(memory_format=torch.channels_last)
        return self

    # ---- weights -------------------------------------------------------------------------

    def load_weights(self, state_dict: dict[str, Tensor], source: str = "state dict") -> None:
        """Load a `taew2_1.pth`-layout state dict (any float dtype) into the decoder.

        Where a time upscale is disabled, a TGrow weight with more output channels than needed
        keeps only the last C*stride of them (the reference's `patch_tgrow_layers`).
        """
        own = self.state_dict()
        patched = dict(state_dict)
        for i, layer in enumerate(self.decoder):
            key = f"decoder.{i}.conv.weight"
            if isinstance(layer, TGrow) and key in patched:
                need = own[key].shape[0]
                if patched[key].shape[0] > need and patched[key].shape[0] % layer.conv.in_channels == 0:
                    patched[key] = patched[key][-need:]
        # The encoder half of taew2_1.pth is not built; its keys are expected and skipped.
        wanted = {k: v for k, v in patched.items() if not k.startswith("encoder.")}
        validate_and_load(
            self,
            wanted,
            source,
            hint=f"expected the taew2_1.pth layout (decoder.<index>.*, encoder.*) for {self.config}; "
            "LightTAE (lighttaew2_1) files use decoder.blocks.<index> and are a different model",
        )
        logger.debug("loaded %d TAEHV tensors from %s", len(wanted), source)

    # ---- decoding ------------------------------------------------------------------------

    def _memory_specs(self) -> list[tuple[int, int]]:
        """(channels, spatial upscale) of each MemBlock's memory, in order."""
        specs, up = [], 1
        for layer in self.decoder:
            if isinstance(layer, MemBlock):
                specs.append((layer.conv[2].in_channels, up))
            elif isinstance(layer, nn.Upsample):
                up *= int(layer.scale_factor)
        return specs

    def _run(self, latents: Tensor, memory: list[Tensor] | None) -> Tensor:
        """Latents [N, T, C, h, w] -> frames [N, T', 3, H, W], all frames in parallel.

        With `memory`, each MemBlock's past for the first frame is its stored previous input,
        which is then overwritten in place by this call's last input frame.
        """
        n, t = latents.shape[:2]
        weight = self.decoder[1].weight
        x = latents.reshape(n * t, *latents.shape[2:]).to(weight.dtype)
        if _channels_last(weight):  # the latents (small) in the convs' layout, so none of them transposes
            x = x.contiguous(memory_format=torch.channels_last)
        index = 0
        last = len(self.decoder) - 1
        done = -1  # a layer already applied by the one before it (TGrow by `_upsample_then_tgrow`)
        for i, layer in enumerate(self.decoder):
            if i == done:
                continue
            if i == last - 1 and isinstance(layer, nn.ReLU):  # the end: ReLU, conv to RGB
                y = _narrow_last_conv(x, self.decoder[last])
                if y is not None:
                    x = y
                    break
            if isinstance(layer, nn.Upsample) and isinstance(self.decoder[i + 1], TGrow):
                y = _upsample_then_tgrow(x, int(layer.scale_factor), self.decoder[i + 1])
                if y is not None:
                    x, done = y, i + 1
                    continue
            if isinstance(layer, nn.Upsample) and UPSAMPLE_AS_COPY:
                x = upsample_nearest(x, int(layer.scale_factor))
                continue
            if not isinstance(layer, MemBlock):
                x = layer(x)
                continue
            mem = None if memory is None else memory[index]
            joined = _memblock_join(x, n, mem)
            if joined is None:
                joined = memblock_input(x, n, mem)
                if mem is not None:
                    mem.copy_(x.view(n, x.shape[0] // n, *x.shape[1:])[:, -1])
            x = layer.forward_joined(x, joined)
            index += 1
        return x.view(n, x.shape[0] // n, *x.shape[1:])

    def decode_full(self, latents: Tensor) -> Tensor:
        """`decode_video(parallel=True)`: all frames at once, nothing trimmed (4T frames)."""
        with torch.no_grad():
            return self._run(latents, None)

    def new_decode_state(
        self,
        batch: int,
        latent_h: int,
        latent_w: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> TAEHVDecodeState:
        """Zeroed MemBlock memories for a stream (on the model's device/dtype by default)."""
        ref = self.decoder[1].weight
        device = ref.device if device is None else device
        dtype = ref.dtype if dtype is None else dtype
        memory = [
            torch.zeros(batch, ch, latent_h * up, latent_w * up, device=device, dtype=dtype)
            for ch, up in self._memory_specs()
        ]
        return TAEHVDecodeState(memory, batch, latent_h, latent_w)

    def decode_stream(self, latents: Tensor, state: TAEHVDecodeState, trim: bool = True) -> Tensor:
        """Decode the next block [N, n, 16, h, w] with carried memory; equals the parallel decode.

        With `trim`, the first `frames_to_trim` frames of the stream are dropped, so a first
        block of n latents gives 4n - 3 frames and later ones 4n (the Wan VAE's counts).
        """
        expected = (state.batch, self.config.latent_channels, state.latent_h, state.latent_w)
        if latents.dim() != 5 or (latents.shape[0], *latents.shape[2:]) != expected:
            raise InvalidArgumentError(
                f"TAEHV decode: latents of shape {tuple(latents.shape)} do not fit the state, which expects "
                f"[{state.batch}, n, {self.config.latent_channels}, {state.latent_h}, {state.latent_w}]"
            )
        with torch.no_grad():
            out = self._run(latents, state.memory)
        first = not state.started
        state.started = True
        return out[:, self.config.frames_to_trim :] if trim and first else out

    def decode_sequential(self, latents: Tensor) -> Tensor:
        """`decode_video(parallel=False)`: one latent frame at a time, carrying the memory."""
        n, t, _, h, w = latents.shape
        state = self.new_decode_state(n, h, w, latents.device)
        return torch.cat([self.decode_stream(latents[:, i : i + 1], state, trim=False) for i in range(t)], 1)

    def decode_demo(self, latents: Tensor, block: int = 3, context: int = 3) -> Tensor:
        """The Self-Forcing demo's stream: each block decoded from scratch after the previous one.

        The first block alone keeps frames [frames_to_trim:]; every later block is decoded as
        cat[previous block's last `context` latents, block] and keeps the frames after the
        context's (context * time_upscale of them).
        """
        outs, previous = [], None
        for i in range(0, latents.shape[1], block):
            current = latents[:, i : i + block]
            if previous is None:
                outs.append(self.decode_full(current)[:, self.config.frames_to_trim :])
            else:
                window = torch.cat([previous[:, -context:], current], dim=1)
                ctx_frames = window.shape[1] - current.shape[1]
                outs.append(self.decode_full(window)[:, ctx_frames * self.config.time_upscale :])
            previous = current
        return torch.cat(outs, dim=1)
