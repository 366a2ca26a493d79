"""Building blocks of the Wan 2.1 VAE (`wan/modules/vae.py`), with explicit temporal caches.

Every layer works on [B, C, T, H, W] and keeps the reference's parameter names, so a
`Wan2.1_VAE.pth` state dict loads as it is. Where the reference feeds one frame at a
time and keeps a per-conv cache of the last 2 input frames, these layers take a whole
chunk of frames at once and convolve over `[cached 2 frames | chunk]`: the same sums,
far fewer kernel launches. A cache is a tensor of fixed shape that is updated in place
(`copy_`), so a decode step can be captured in a CUDA graph.

Spatial 2-D convs are run as 3-D convs with a (1, k, k) kernel view of the same weight:
identical numbers, and no per-frame reshapes of the activations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flashdreams.errors import InvalidArgumentError

# Frames of history a kernel-3 causal conv needs (the reference's CACHE_T).
CACHE_T = 2

# A list of per-conv caches indexed by each conv's `slot`; `None` entries are
# created as zeros on first use (the encoder, whose caches live for one call).
Caches = list


def cat_frames(past: Tensor, x: Tensor) -> Tensor:
    """[past | x] along time, in x's memory layout. torch.cat falls back to NCDHW when its inputs'
    layouts differ, and a streaming cache (session state, NCDHW) meets channels_last_3d activations
    at every causal conv of a channels-last VAE (`WanVAE.use_channels_last`): copying both into an
    NDHWC buffer keeps the convolutions on cuDNN's native layout, without a transpose around each."""
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.cat([past, x], dim=2)
    t = past.shape[2]
    out = torch.empty(
        (*x.shape[:2], t + x.shape[2], *x.shape[3:]),
        dtype=x.dtype,
        device=x.device,
        memory_format=torch.channels_last_3d,
    )
    out[:, :, :t].copy_(past)
    out[:, :, t:].copy_(x)
    return out


def cat_frames_padded(past: Tensor | None, x: Tensor, channels: int, ones: bool = False) -> Tensor:
    """[past | x] along time (zeros for a None past of CACHE_T frames) in a new NDHWC buffer of `channels`
    channels, those past x's own zero but channel C one with `ones` (a folded bias's input): a narrow
    conv's input as cuDNN runs it fastest (see `CausalConv3d.narrow_form`). A past of `channels`
    channels (a padded cache) is copied whole."""
    b, c, t, h, w = x.shape
    t_past = CACHE_T if past is None else past.shape[2]
    out = torch.empty(
        (b, channels, t_past + t, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d
    )
    pad_from = 0  # the first frame whose added channels are written here
    if past is None:
        out[:, :c, :t_past].zero_()
    elif past.shape[1] == channels:  # a padded cache (`CausalConv3d`): its frames as they were, one block
        out[:, :, :t_past].copy_(past)
        pad_from = t_past
    else:
        out[:, :c, :t_past].copy_(past)
    out[:, c:, pad_from:].zero_()
    if ones:
        out[:, c, pad_from:].fill_(1.0)
    out[:, :c, t_past:].copy_(x)
    return out


def frames_as_images(x: Tensor) -> Tensor:
    """[B, C, T, H, W] -> [B*T, C, H, W]: a view when x is NDHWC (then channels-last images)."""
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def images_as_frames(y: Tensor, batch: int) -> Tensor:
    """The inverse of `frames_as_images`: [B*T, C, H, W] -> [B, C, T, H, W] (a view; NDHWC from NHWC)."""
    return y.reshape(batch, y.shape[0] // batch, *y.shape[1:]).transpose(1, 2)


# A narrow conv's input channels are padded up to a multiple of this, with room for the ones channel that
# carries its bias (LightVAE: 24 -> 32, 48 -> 64).
NARROW_PAD = 32
# The widest input a conv is padded from. 48 -> 64 measured on an H100 (bench/results/next78-h100,
# narrow-convs): LightVAE's 48-channel 3x3x3 conv at 352x640 in 1.92 instead of 2.16 ms, its bias add
# (0.24 ms) and the [past | x] copy gone besides; 96 would pad to 128 (a third more work).
PAD_MAX_CHANNELS = 48


def padded_channels(c: int) -> int:
    """The channels a "pad" conv's input of c channels is padded to: c and a ones channel, rounded up to a
    multiple of NARROW_PAD (24 -> 32, 48 -> 64)."""
    return -(-(c + 1) // NARROW_PAD) * NARROW_PAD


# The first conv's 3 taps in time x its channels are stacked into this many channels (3 x 3 RGB -> 16).
FOLD_CHANNELS = 16


class RMSNorm(nn.Module):
    """The VAE's RMS_norm: L2-normalise over channels, times sqrt(C) and `gamma`.

    Not the DiT's RMSNorm: there is no eps inside a root mean, only F.normalize's 1e-12 floor.
    """

    def __init__(self, dim: int, images: bool = True) -> None:
        super().__init__()
        # The reference stores gamma as [C,1,1] for 2-D (attention) and [C,1,1,1] for 3-D use.
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))
        self.scale = dim**0.5
        # Set by `fuse_norm_silu`: one kernel pass (kernels/channel_rms_norm.py), with the SiLU
        # that follows this norm folded in when `silu` (the Sequential's SiLU is then an Identity).
        self.fused = False
        self.silu = False
        # Set by `use_narrow_forms`: the padded conv after this norm applies it (`padded`), writing its
        # padded input in the norm's own pass; forward hands x on unchanged.
        self.deferred = False

    def padded(self, x: Tensor, past: Tensor | None, channels: int, ones: bool) -> Tensor:
        """[past | this norm (+ SiLU) of x] in a channel-padded NDHWC buffer (`cat_frames_padded`'s form)."""
        from flashdreams.kernels import triton_available
        from flashdreams.kernels.channel_rms_norm import channel_rms_norm_padded, channel_rms_norm_padded_reference

        if past is None:
            past = x.new_zeros((*x.shape[:2], CACHE_T, *x.shape[3:]))
        fn = channel_rms_norm_padded if triton_available(x.device) else channel_rms_norm_padded_reference
        return fn(x, self.gamma, self.silu, past, channels, ones)

    def forward(self, x: Tensor) -> Tensor:
        if self.deferred:
            return x
        if self.fused and x.dim() == 5:
            from flashdreams.kernels import triton_available
            from flashdreams.kernels.channel_rms_norm import channel_rms_norm, channel_rms_norm_reference

            fn = channel_rms_norm if triton_available(x.device) else channel_rms_norm_reference
            return fn(x, self.gamma, self.silu)
        gamma = self.gamma.view(-1, 1, 1, 1) if x.dim() == 5 else self.gamma
        return F.normalize(x, dim=1) * self.scale * gamma


def fuse_norm_silu(module: nn.Module) -> int:
    """Run every video RMSNorm of `module` as one kernel pass, folding a SiLU right after it into the
    pass (the SiLU module becomes an Identity; no parameter changes). Returns the norms fused."""
    count = 0
    for seq in module.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for i, layer in enumerate(seq):
            if isinstance(layer, RMSNorm) and layer.gamma.dim() == 4:
                layer.fused = True
                count += 1
                if i + 1 < len(seq) and isinstance(seq[i + 1], nn.SiLU):
                    layer.silu = True
                    seq[i + 1] = nn.Identity()
    return count


class CausalConv3d(nn.Conv3d):
    """Conv3d padded in time on the past side only; kernel-3 ones carry a 2-frame cache.

    `slot` is this conv's index in the decoder's cache list, set by the model that owns it
    (None for pointwise convs and the strided downsampling conv, which need no cache).

    `narrow_form` (set by `use_narrow_forms`) runs a 3x3x3 conv of few input channels the way cuDNN
    does it fastest; the sums are the same, only their order differs:
      * "pad": the input's channels zero-padded to `padded_channels` (in the cache concatenation's buffer)
        and the weight's likewise. cuDNN runs LightVAE's 24-channel full-resolution convs as an sm80
        `implicit_gemm_indexed` kernel; at 32 channels it takes 2.4 instead of 5.2 ms (H100,
        bench/results/next64-h100/hdmap-conv-forms.json); for its 48-channel ones at 64 see
        PAD_MAX_CHANNELS. The bias rides in the padding: input channel C is all ones and the weight's
        tap on it (current frame, centre pixel, always inside the image) is the bias, which saves
        torch's separate broadcast add after the conv. A fused norm right
        before the conv (`_pre_norm`) writes the padded buffer itself.
      * "fold": the 3 taps in time stacked on channels (frame t | t+1 | t+2, zero-padded to
        FOLD_CHANNELS) and one 2-D conv over the frames: the 3-channel first conv, which cuDNN ran as a
        generic fallback kernel (3.5 ms), in 2.2 ms, the stacking copy included (same file).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int | tuple[int, int, int], spatial_pad: int = 0):
        super().__init__(in_ch, out_ch, kernel, padding=(0, spatial_pad, spatial_pad))
        self.slot: int | None = None
        self.narrow_form: str | None = None
        # [the fused RMSNorm this "pad" conv applies itself] (a list: not a submodule, so the state
        # dict keeps the norm's gamma where the reference has it)
        self._pre_norm: list[RMSNorm] = []

    @property
    def causal(self) -> bool:
        return self.kernel_size[0] > 1

    def ndhwc_weight(self) -> bool:
        """Whether the weight is held channels_last_3d (`WanVAE.use_channels_last`): then the conv's output is NDHWC
        by contract where Triton runs (`kernels.conv_nhwc.conv3d_ndhwc`), and its cache takes the NDHWC form. Both
        follow the weight rather than the activations, whose layout a trace on CUDA does not keep (next114: an
        OmniDreams engine's encoder traced NCDHW activations and NCDHW first caches against its NDHWC state)."""
        w = self.weight
        return not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last_3d)

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.ndhwc_weight():
            from flashdreams.kernels import conv_nhwc

            return conv_nhwc.conv_pinned_where_it_runs(
                x, weight, bias, self.stride, self.padding, self.dilation, self.groups
            )
        return F.conv3d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: Tensor, caches: Caches | None = None) -> Tensor:
        if not self.causal:
            return self._conv(x, self.weight, self.bias)
        cache = None
        if caches is not None:
            cache = caches[self.slot]
            if cache is None:
                cache = caches[self.slot] = self._new_cache(x)
        ndhwc_cache = cache is not None and _is_ndhwc_cache(cache, x)
        past = cache.permute(0, 4, 1, 2, 3) if ndhwc_cache else cache  # [B, C (or padded), 2, H, W]
        if self.narrow_form == "pad":
            ones, width = self.bias is not None, padded_channels(self.in_channels)
            if self._pre_norm:
                x = self._pre_norm[0].padded(x, past, width, ones)
            else:
                x = cat_frames_padded(past, x, width, ones)
        elif cache is None:  # whole stream at once: the past is zeros
            x = F.pad(x, (0, 0, 0, 0, self.kernel_size[0] - 1, 0))
        else:
            x = cat_frames(past, x)
        if ndhwc_cache:  # the input's last 2 frames: one contiguous block of the NDHWC buffer
            cache.copy_(x[:, : cache.shape[4], -CACHE_T:].permute(0, 2, 3, 4, 1))
        elif cache is not None:
            # The cache is always the last 2 frames of this conv's own input stream (zeros before it).
            cache.copy_(x[:, : self.in_channels, -CACHE_T:])
        if self.narrow_form == "pad":
            return self._conv(x, self._padded_weight(), None)
        if self.narrow_form == "fold":
            return self._folded(x)
        return self._conv(x, self.weight, self.bias)

    def _new_cache(self, x: Tensor) -> Tensor:
        """Zeros for a stream's first call, in the layout of the conv's activations: [B, C, 2, H, W] for NCDHW
        ones; for NDHWC ones (the weight held so: `ndhwc_weight`) [B, 2, H, W, C] (a "pad" conv, always:
        [B, 2, H, W, padded]), the input's frames as they lie in memory. Such a cache is copied to and from the
        input buffer as one contiguous block, where an NCDHW cache meets NDHWC activations in a transposing copy (12 of
        them took 4.6 ms of the HD-map encode, next68-h100)."""
        b, c, _, h, w = x.shape
        shape = None
        if self.narrow_form == "pad":
            shape = _ndhwc_cache_shape(x, padded_channels(c))
        elif self.ndhwc_weight() and c > 1:
            shape = _ndhwc_cache_shape(x, c)
        return x.new_zeros(shape or (b, c, CACHE_T, h, w))

    def _padded_weight(self) -> Tensor:
        """The weight over `padded_channels` input channels: zeros past in_channels, the bias on channel C's
        tap at the current frame's centre pixel (the input holds ones there). Built from the weight
        and bias by device ops alone (no host scalars: it runs inside captured graphs)."""
        pad = padded_channels(self.in_channels) - self.in_channels
        kt, kh, kw = self.kernel_size
        if self.bias is None:
            return F.pad(self.weight, (0, 0, 0, 0, 0, 0, 0, pad)).contiguous(memory_format=torch.channels_last_3d)
        # [out] -> [out, pad, kt, kh, kw], the bias at [:, 0, kt - 1, kh // 2, kw // 2], zeros elsewhere
        centre = (kw // 2, kw - 1 - kw // 2, kh // 2, kh - 1 - kh // 2, kt - 1, 0, 0, pad - 1)
        bias_tap = F.pad(self.bias.view(-1, 1, 1, 1, 1), centre)
        return torch.cat([self.weight, bias_tap], dim=1).contiguous(memory_format=torch.channels_last_3d)

    def _folded(self, x: Tensor) -> Tensor:
        """The conv over [past | chunk] (x) as one 2-D conv over frames whose channels are the 3 time taps'."""
        b, c, t_in, h, w = x.shape
        t = t_in - 2
        stacked = torch.zeros((b, t, h, w, FOLD_CHANNELS), dtype=x.dtype, device=x.device)
        for k in range(3):
            stacked[..., k * c : (k + 1) * c].copy_(x[:, :, k : k + t].permute(0, 2, 3, 4, 1))
        # [out, c, kt, kh, kw] -> [out, kt*c (tap-major, as stacked), kh, kw], zero-padded; as in "pad",
        # the bias rides on a ones channel (3c), at the centre tap (no broadcast add after the conv)
        kh, kw = self.kernel_size[1:]
        weight = self.weight.permute(0, 2, 1, 3, 4).reshape(self.out_channels, 3 * c, kh, kw)
        if self.bias is not None:
            stacked[..., 3 * c].fill_(1.0)
            centre = (kw // 2, kw - 1 - kw // 2, kh // 2, kh - 1 - kh // 2)
            weight = torch.cat([weight, F.pad(self.bias.view(-1, 1, 1, 1), centre)], dim=1)
        weight = F.pad(weight, (0, 0, 0, 0, 0, FOLD_CHANNELS - weight.shape[1]))
        weight = weight.contiguous(memory_format=torch.channels_last)
        images = stacked.view(b * t, h, w, FOLD_CHANNELS).permute(0, 3, 1, 2)
        from flashdreams.kernels import conv_nhwc  # (NHWC frames: their layout pinned where Triton runs, traced so too)

        y = conv_nhwc.conv_pinned_where_it_runs(images, weight, None, (1, 1), self.padding[1:], (1, 1), 1)
        return images_as_frames(y, b)


def _ndhwc_cache_shape(x: Tensor, channels: int) -> tuple[int, ...] | None:
    """[B, 2, H, W, channels], the NDHWC form of a conv's cache for input x, or None where that shape also
    reads as the NCDHW [B, C, 2, H, W] (only a 2x2 image of 2 channels): such a cache stays NCDHW."""
    b, c, _, h, w = x.shape
    shape = (b, CACHE_T, h, w, channels)
    return None if shape == (b, c, CACHE_T, h, w) else shape


def _is_ndhwc_cache(cache: Tensor, x: Tensor) -> bool:
    """Whether a conv's cache is in the NDHWC form (`_ndhwc_cache_shape`, of C or the padded channels)."""
    shape = tuple(cache.shape)
    widths = (x.shape[1], padded_channels(x.shape[1]))
    return len(shape) == 5 and shape[4] in widths and shape == _ndhwc_cache_shape(x, shape[4])


class ResidualBlock(nn.Module):
    """RMS_norm, SiLU, conv, RMS_norm, SiLU, dropout, conv; plus a (1x1x1-conv) shortcut."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        # Indices 0..6 reproduce the reference's `residual.{0,2,3,6}` keys.
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, spatial_pad=1),
            RMSNorm(out_dim, images=False),
            nn.SiLU(),
            nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, spatial_pad=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, caches: Caches | None = None) -> Tensor:
        h = self.shortcut(x)
        for layer in self.residual:
            x = layer(x, caches) if isinstance(layer, CausalConv3d) else layer(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the h*w positions of each frame separately."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        y = self.norm(x)
        qkv = F.conv3d(y, self.to_qkv.weight.unsqueeze(2), self.to_qkv.bias)
        # [B, 3C, T, H, W] -> [B*T, 1, H*W, 3C]: one head per frame.
        qkv = qkv.permute(0, 2, 3, 4, 1).reshape(b * t, 1, h * w, 3 * c)
        q, k, v = qkv.chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)
        out = F.conv3d(out, self.proj.weight.unsqueeze(2), self.proj.bias)
        return out + x


class Resample(nn.Module):
    """Spatial 2x up/down-sampling, with a temporal 2x step for the 3-D modes.

    Keys: `resample.1` (the 3x3 Conv2d) and `time_conv` (kernel (3,1,1)).
    """

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise InvalidArgumentError(f"Resample mode '{mode}' is not one of {self.MODES}")
        self.mode = mode
        if mode.startswith("upsample"):
            # Index 0 is the (parameterless) nearest upsample of the reference.
            self.resample = nn.Sequential(nn.Identity(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.Identity(), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1))
        elif mode == "downsample3d":
            self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        self.down_slot: int | None = None  # downsample3d's one-frame memory, set by the owner
        # Set by `use_narrow_forms`: the stride-2 downsampling conv as a 2-D conv over the frames. cuDNN
        # ran LightVAE's 24-channel full-resolution one as a 3-D conv in 2.07 ms, as 2-D in 0.51 (H100,
        # next64-h100/hdmap-conv-forms.json; at 48 channels the 2-D form was slower: 1.38 vs 0.96).
        self.spatial_as_2d = False

    def _spatial(self, x: Tensor) -> Tensor:
        conv = self.resample[1]
        weight = conv.weight.unsqueeze(2)
        if self.mode.startswith("upsample"):
            # Nearest 2x (the reference's 'nearest-exact' is the same at an exact factor of 2), as a
            # broadcast copy: torch's upsample_nearest3d kernel took 3.5 ms per call at 352x640 on the
            # H200, ~20x this copy's memory time.
            b, c, t, h, w = x.shape
            x = x[:, :, :, :, None, :, None].expand(b, c, t, h, 2, w, 2).reshape(b, c, t, 2 * h, 2 * w)
            return F.conv3d(x, weight, conv.bias, padding=(0, 1, 1))
        # Zero-pad right and bottom only, then a stride-2 valid conv.
        x = F.pad(x, (0, 1, 0, 1))
        if self.spatial_as_2d:
            w2 = conv.weight.contiguous(memory_format=torch.channels_last)
            return images_as_frames(F.conv2d(frames_as_images(x), w2, conv.bias, stride=2), x.shape[0])
        return F.conv3d(x, weight, conv.bias, stride=(1, 2, 2))

    def _time_double(self, x: Tensor, caches: Caches | None) -> Tensor:
        b, c, t, h, w = x.shape
        y = self.time_conv(x, caches)
        # Output channels [0:C] become frame 2t, [C:2C] frame 2t+1.
        return y.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)

    def forward(self, x: Tensor, caches: Caches | None = None, skip_first: bool = False) -> Tensor:
        if self.mode == "upsample3d":
            if skip_first:
                # Official first-frame rule: latent frame 0 passes un-doubled and never
                # enters the time_conv's stream, which starts at the next frame.
                head, rest = x[:, :, :1], x[:, :, 1:]
                x = head if rest.shape[2] == 0 else torch.cat([head, self._time_double(rest, caches)], 2)
            else:
                x = self._time_double(x, caches)
        x = self._spatial(x)
        if self.mode == "downsample3d":
            x = self._time_halve(x, caches)
        return x

    def _time_halve(self, x: Tensor, caches: Caches | None) -> Tensor:
        """Frame 0 passes; then a stride-2 valid conv over [previous chunk's last frame | chunk]."""
        if caches is None:
            head, body = x[:, :, :1], x
        else:
            last = caches[self.down_slot]
            caches[self.down_slot] = x[:, :, -1:].clone()
            if last is None:  # first chunk of the stream: skipped, only remembered
                return x
            head, body = None, cat_frames(last, x)
        out = self.time_conv(body) if body.shape[2] >= 3 else body[:, :, :0]
        return out if head is None else torch.cat([head, out], 2)


def use_narrow_forms(module: nn.Module) -> int:
    """Give the few-channel convs of `module` the forms cuDNN runs fastest (same sums, see
    `CausalConv3d.narrow_form` and `Resample.spatial_as_2d`): 3x3x3 causal convs of <= 5 input channels
    fold their time taps into channels, other ones of at most PAD_MAX_CHANNELS that are not a multiple of
    NARROW_PAD pad their channels (`padded_channels`), and stride-2
    downsampling convs of fewer than NARROW_PAD channels run as 2-D convs. Returns the layers changed."""
    count = 0
    for sub in module.modules():
        form = _narrow_form_of(sub)
        if form is not None:
            sub.narrow_form = form
            count += 1
        elif isinstance(sub, nn.Sequential):
            _defer_norms_into_padded_convs(sub)
        elif isinstance(sub, Resample) and sub.mode.startswith("down") and sub.resample[1].in_channels < NARROW_PAD:
            sub.spatial_as_2d = True
            count += 1
    return count


def _narrow_form_of(conv: nn.Module) -> str | None:
    """The narrow form `use_narrow_forms` gives a conv, if any."""
    if not isinstance(conv, CausalConv3d) or conv.kernel_size != (3, 3, 3):
        return None
    if conv.in_channels > PAD_MAX_CHANNELS or conv.in_channels % NARROW_PAD == 0:  # wide, or aligned already
        return None
    return "fold" if 3 * conv.in_channels < FOLD_CHANNELS else "pad"  # fold: the 3 taps and a ones channel


def _defer_norms_into_padded_convs(seq: nn.Sequential) -> None:
    """A fused RMSNorm whose output goes (through Identity / Dropout only) into a "pad" conv is applied by
    that conv, so the norm's pass writes the conv's padded input (`RMSNorm.padded`)."""
    layers = list(seq)
    for i, layer in enumerate(layers):
        if not (isinstance(layer, RMSNorm) and layer.fused and layer.gamma.dim() == 4):
            continue
        j = i + 1
        while j < len(layers) and isinstance(layers[j], nn.Identity | nn.Dropout):
            j += 1
        conv = layers[j] if j < len(layers) else None
        if _narrow_form_of(conv) == "pad":
            layer.deferred = True
            conv._pre_norm = [layer]


def assign_slots(module: nn.Module, first: int = 0) -> int:
    """Number the cached convs (and downsample3d memories) of `module` in execution order.

    Module registration order is execution order in the Wan VAE (residual before shortcut,
    spatial resample before or after time_conv does not matter: they are separate slots).
    Returns the next free slot index.
    """
    slot = first
    for sub in module.modules():
        if isinstance(sub, CausalConv3d) and sub.causal:
            sub.slot = slot
            slot += 1
        elif isinstance(sub, Resample) and sub.mode == "downsample3d":
            sub.down_slot = slot
            slot += 1
    return slot
