"""A live session: all state of one rollout on the device, and the per-block loop.

The loop is Self-Forcing's inference loop (../shared/fixtures/README.md, "The loop"):
per block, the few-step flow-matching denoise with re-noising between steps, the
frames decoded from the final x0, then the commit forward that rewrites the
block's keys and values with clean ones. Everything per block is a device tensor
filled from host-known block indices; nothing is read back from the device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.kv_ring import BlockPositions, KVRing
from flashdreams.models.scheduler import renoise, x0_from_flow

if TYPE_CHECKING:
    from flashdreams.engine import Engine

log = logging.getLogger(__name__)

# probe(block, call, x_in, t, flow): sees every model call (the commit is the last call
# of a block); for parity debugging. Its tensors are live buffers: copy what you keep.
Probe = Callable[[int, int, torch.Tensor, torch.Tensor, torch.Tensor | None], None]


@dataclass
class StepResult:
    """What one block produced. Tensors live on the session's device."""

    block: int
    latents: torch.Tensor  # [B, C, nf, h, w] float32: the block's final x0
    frames: torch.Tensor | None  # uint8 [B, T, H, W, 3], or None without a decoder
    frames_ready: torch.cuda.Event | None = None  # recorded after the decode, before the commit

    def frames_cpu(self) -> torch.Tensor:
        """The frames on the host; waits only for the decode, not for the commit after it."""
        if self.frames is None:
            raise InvalidArgumentError("this session has no decoder, so the step produced no frames")
        if self.frames_ready is not None:
            self.frames_ready.synchronize()
        return self.frames.cpu()


class Session:
    """One rollout. Create it with `engine.session(...)`; call `step()` once per block."""

    def __init__(self, engine: Engine, prompt_embeds: torch.Tensor, seed: int = 0) -> None:
        self.engine = engine
        backend, spec = engine.backend, engine.spec
        self.device = backend.device
        context = self._check_prompt(prompt_embeds)
        b = context.shape[0]
        self.batch = b
        nf, c, h, w = spec.num_frame_per_block, spec.latent_channels, spec.latent_h, spec.latent_w
        self.ring = KVRing(
            spec.ring, backend.num_layers, b, backend.num_heads, backend.head_dim, self.device, backend.dtype
        )
        self.positions = BlockPositions.allocate(nf, self.device)
        self.cross_k, self.cross_v = backend.encode_prompt(context)
        sched = spec.schedule
        f32 = dict(dtype=torch.float32, device=self.device)
        self.noise = torch.empty(b, c, nf, h, w, **f32)
        self.renoise = torch.empty(max(sched.num_steps - 1, 1), b, c, nf, h, w, **f32)
        self.t_steps = [torch.full((b, nf), t, **f32) for t in sched.timesteps]
        self.t_commit = torch.full((b, nf), sched.context_noise, **f32)
        self.decoder = engine.decoder
        self.decoder_state = self.decoder.new_state(b, h, w) if self.decoder is not None else None
        self.seed = seed
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.block = 0
        self.probe: Probe | None = None
        self._warned_roll = False

    # -- inputs ------------------------------------------------------------------
    def _check_prompt(self, prompt_embeds: torch.Tensor) -> torch.Tensor:
        backend = self.engine.backend
        if not isinstance(prompt_embeds, torch.Tensor):
            raise InvalidArgumentError(f"prompt_embeds must be a tensor, got {type(prompt_embeds).__name__}")
        x = prompt_embeds if prompt_embeds.dim() == 3 else prompt_embeds.unsqueeze(0)
        text_dim = self.engine.spec.text_dim
        if x.dim() != 3 or x.shape[-1] != text_dim:
            raise InvalidArgumentError(
                f"prompt_embeds must be [B, T, {text_dim}] (or [T, {text_dim}]); got {tuple(prompt_embeds.shape)}"
            )
        if x.shape[1] > backend.text_len:
            raise InvalidArgumentError(
                f"prompt_embeds has {x.shape[1]} rows; this model attends to at most text_len={backend.text_len}"
            )
        if not torch.is_floating_point(x):
            raise InvalidArgumentError(f"prompt_embeds must be floating point, got {x.dtype}")
        return x.to(self.engine.backend.device)

    def set_prompt(self, prompt_embeds: torch.Tensor) -> None:
        """Switch the prompt between blocks: the cross-attention cache is rewritten in place."""
        context = self._check_prompt(prompt_embeds)
        if context.shape[0] != self.batch:
            raise InvalidArgumentError(f"set_prompt: batch {context.shape[0]} differs from the session's {self.batch}")
        k, v = self.engine.backend.encode_prompt(context)
        self.cross_k.copy_(k)
        self.cross_v.copy_(v)

    def reset(self, seed: int | None = None, prompt_embeds: torch.Tensor | None = None) -> None:
        """Back to block 0 (same buffers, so captured graphs stay valid); optionally a new seed/prompt."""
        if prompt_embeds is not None:
            self.set_prompt(prompt_embeds)
        self.seed = self.seed if seed is None else seed
        self.generator.manual_seed(self.seed)
        self.ring.clear()
        if self.decoder is not None:
            self.decoder.reset(self.decoder_state)
        self.block = 0

    def _draw(self, noise: torch.Tensor | None, renoise_draws: torch.Tensor | None) -> None:
        """Fill the noise buffers: given tensors (parity, replay) or the session's generator."""
        for name, buf, given in (("noise", self.noise, noise), ("renoise", self.renoise, renoise_draws)):
            if given is None:
                torch.randn(buf.shape, generator=self.generator, device=self.device, out=buf)
            elif tuple(given.shape) != tuple(buf.shape):
                raise InvalidArgumentError(f"step: {name} must have shape {tuple(buf.shape)}, got {tuple(given.shape)}")
            else:
                buf.copy_(given)

    # -- the loop ------------------------------------------------------------------
    @torch.no_grad()
    def step(self, noise: torch.Tensor | None = None, renoise_draws: torch.Tensor | None = None) -> StepResult:
        """Generate the next block: denoise, decode, then commit it to the cache.

        `noise` [B, C, nf, h, w] and `renoise_draws` [steps-1, B, C, nf, h, w] replace the
        session's own random draws (for parity with stored draws); by default the
        session's generator draws them.
        """
        spec, backend = self.engine.spec, self.engine.backend
        nf = spec.num_frame_per_block
        first = self.block * nf
        if not self._warned_roll and spec.ring.sink_frames == 0 and first + nf > spec.ring.capacity_frames:
            log.info(
                "session passed the cache's %d frames: the oldest frames roll out from now on",
                spec.ring.capacity_frames,
            )
            self._warned_roll = True
        self.positions.fill(spec.ring, first)
        self._draw(noise, renoise_draws)
        state = (
            self.cross_k,
            self.cross_v,
            self.ring.k,
            self.ring.v,
            self.positions.frame_positions,
            self.positions.slots,
            self.positions.valid_len,
        )
        sched = spec.schedule
        x = self.noise
        for s in range(sched.num_steps):
            flow = backend.denoise(x, self.t_steps[s], *state)
            if self.probe is not None:
                self.probe(self.block, s, x, self.t_steps[s], flow)
            x0 = x0_from_flow(x, flow, sched.sigmas[s])
            if s + 1 < sched.num_steps:
                x = renoise(x0, self.renoise[s], sched.sigmas[s + 1])
        frames, ready = self._decode(x0)
        backend.commit(x0, self.t_commit, *state)
        if self.probe is not None:
            self.probe(self.block, sched.num_steps, x0, self.t_commit, None)
        result = StepResult(self.block, x0, frames, ready)
        self.block += 1
        return result

    def _decode(self, latents: torch.Tensor) -> tuple[torch.Tensor | None, torch.cuda.Event | None]:
        if self.decoder is None:
            return None, None
        video = self.decoder.decode_block(latents, self.decoder_state)  # [B, T, 3, H, W] in [0, 1]
        frames = (video.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2)
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        return frames, ready

    def frames(self, num_blocks: int | None = None):
        """Iterate over blocks' frames (uint8 [T, H, W, 3] per block, batch 0) for embedding in an app."""
        n = 0
        while num_blocks is None or n < num_blocks:
            result = self.step()
            yield result.frames_cpu()[0]
            n += 1
