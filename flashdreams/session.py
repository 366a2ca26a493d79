"""A live session: all state of one rollout on the device, and the per-block loop.

The loop is Self-Forcing's inference loop (../shared/fixtures/README.md, "The loop"):
per block, the few-step flow-matching denoise with re-noising between steps, the
frames decoded from the final x0, then the commit forward that rewrites the
block's keys and values with clean ones. Everything per block is a device tensor
filled from host-known block indices; nothing is read back from the device.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
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
class _BlockGraphs:
    """A captured block (denoise steps, decode, commit) with the graphs' output buffers."""

    denoise: torch.cuda.CUDAGraph
    decode: torch.cuda.CUDAGraph
    commit: torch.cuda.CUDAGraph
    x0: torch.Tensor
    frames: torch.Tensor | None


class _Marks:
    """Stage boundaries of one block: CUDA events on a GPU (no sync until read), clock reads on a CPU."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.cuda = device.type == "cuda"
        self.enabled = enabled
        self.points: list[tuple[str, object]] = []
        if enabled:
            self._add("start", True)

    def _add(self, name: str, timing: bool):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=timing)
            ev.record()
        else:
            ev = time.perf_counter()
        self.points.append((name, ev))
        return ev if self.cuda else None

    def mark(self, name: str, always: bool = False):
        """Record a boundary; returns the CUDA event (for `frames_ready`) when there is one."""
        if self.enabled or (always and self.cuda):
            return self._add(name, self.enabled)
        return None

    def stage_ms(self) -> dict[str, float]:
        """Milliseconds of each stage since the previous mark (syncs on the last event)."""
        if not self.points:
            return {}
        if self.cuda:
            self.points[-1][1].synchronize()
            delta = lambda a, b: a.elapsed_time(b)  # noqa: E731
        else:
            delta = lambda a, b: (b - a) * 1e3  # noqa: E731
        return {name: delta(prev[1], cur) for prev, (name, cur) in zip(self.points, self.points[1:])}


@dataclass
class StepResult:
    """What one block produced. Tensors live on the session's device."""

    block: int
    latents: torch.Tensor  # [B, C, nf, h, w] float32: the block's final x0
    frames: torch.Tensor | None  # uint8 [B, T, H, W, 3], or None without a decoder
    frames_ready: torch.cuda.Event | None = None  # recorded after the decode, before the commit
    marks: _Marks | None = None  # stage boundaries when the session's `timing` is on

    def stage_ms(self) -> dict[str, float]:
        """{'denoise', 'decode', 'commit'}: milliseconds of each stage (needs `session.timing = True`)."""
        if self.marks is None:
            raise InvalidArgumentError("stage times need session.timing = True before the step")
        return self.marks.stage_ms()

    def frames_cpu(self) -> torch.Tensor:
        """The frames on the host; waits only for the decode, not for the commit after it."""
        if self.frames is None:
            raise InvalidArgumentError("this session has no decoder, so the step produced no frames")
        if self.frames_ready is not None:
            self.frames_ready.synchronize()
        return self.frames.cpu()


class Session:
    """One rollout. Create it with `engine.session(...)`; call `step()` once per block."""

    def __init__(
        self, engine: Engine, prompt_embeds: torch.Tensor, seed: int = 0, cuda_graphs: bool | None = None
    ) -> None:
        self.engine = engine
        backend, spec = engine.backend, engine.spec
        self.device = backend.device
        context = self._check_prompt(prompt_embeds)
        b = context.shape[0]
        self.batch = b
        nf, c, h, w = spec.num_frame_per_block, spec.latent_channels, spec.latent_h, spec.latent_w
        # A backend may shape the ring itself (context parallel keeps a shard per rank).
        new_ring = getattr(backend, "new_ring", None)
        if new_ring is not None:
            self.ring = new_ring(spec.ring, b)
        else:
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
        # On CUDA a block kind ("first", "steady") runs eagerly once as warm-up, is captured
        # the next time it comes, and is replayed from then on.
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and self.device.type != "cuda":
            raise InvalidArgumentError("cuda_graphs=True needs a CUDA device; this session runs on " + str(self.device))
        self._graphs: dict[str, _BlockGraphs] = {}
        self._specialized = bool(getattr(backend, "shape_specialized", False))
        self.timing = False  # record stage boundaries (events) for fd-bench
        self.capture_s = 0.0  # wall seconds spent capturing graphs
        self._warm: set[str] = set()

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

    def input_names(self) -> list[str]:
        """Names `set_input` accepts. A text-to-video world model is steered by its prompt."""
        return ["prompt_embeds"]

    def set_input(self, name: str, value: torch.Tensor) -> None:
        """Set a named per-step input (for hosts such as the C ABI); takes effect at the next step."""
        if name == "prompt_embeds":
            self.set_prompt(value)
            return
        raise InvalidArgumentError(
            f"session input '{name}' is unknown for {self.engine.spec.preset.name}; inputs: {self.input_names()}"
        )

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
        spec = self.engine.spec
        nf = spec.num_frame_per_block
        first = self.block * nf
        if not self._warned_roll and spec.ring.sink_frames == 0 and first + nf > spec.ring.capacity_frames:
            log.info("session passed the cache's %d frames: the oldest roll out from now on", spec.ring.capacity_frames)
            self._warned_roll = True
        # Per-block inputs go into static buffers, outside any captured graph.
        self.positions.fill(spec.ring, first)
        self._draw(noise, renoise_draws)
        # Graph kinds: the first block (its decode differs) and the rest; a backend whose calls
        # are specialised to the fill level (torch attention slicing the ring) adds that level.
        key = "first" if self.block == 0 else "steady"
        if self._specialized:
            key = f"{key}@{self.positions.valid_tokens}"
        graphs = None
        if self._use_graphs():
            graphs = self._graphs.get(key)
            if graphs is None and key in self._warm:
                graphs = self._graphs[key] = self._capture()
        marks = _Marks(self.device, self.timing)
        if graphs is not None:
            graphs.denoise.replay()
            marks.mark("denoise")
            if graphs.frames is not None:
                graphs.decode.replay()
            ready = marks.mark("decode", always=True)
            graphs.commit.replay()
            marks.mark("commit")
            # The graphs' outputs are overwritten by the next replay: hand out copies.
            x0 = graphs.x0.clone()
            frames = graphs.frames.clone() if graphs.frames is not None else None
        else:
            x0 = self._denoise()
            marks.mark("denoise")
            frames = self._decode(x0)
            ready = marks.mark("decode", always=True)
            self._commit(x0)
            marks.mark("commit")
            self._warm.add(key)
        result = StepResult(self.block, x0, frames, ready, marks if self.timing else None)
        self.block += 1
        return result

    def _call_kw(self) -> dict:
        return {"valid_len_host": self.positions.valid_tokens} if self._specialized else {}

    def _state(self) -> tuple[torch.Tensor, ...]:
        p = self.positions
        return (self.cross_k, self.cross_v, self.ring.k, self.ring.v, p.frame_positions, p.slots, p.valid_len)

    def _denoise(self) -> torch.Tensor:
        """The block's denoising steps, re-noising between them; returns the final x0."""
        sched, backend, state = self.engine.spec.schedule, self.engine.backend, self._state()
        x = self.noise
        for s in range(sched.num_steps):
            flow = backend.denoise(x, self.t_steps[s], *state, **self._call_kw())
            if self.probe is not None:
                self.probe(self.block, s, x, self.t_steps[s], flow)
            x0 = x0_from_flow(x, flow, sched.sigmas[s])
            if s + 1 < sched.num_steps:
                x = renoise(x0, self.renoise[s], sched.sigmas[s + 1])
        return x0

    def _commit(self, x0: torch.Tensor) -> None:
        """The clean forward at `context_noise` that rewrites the block's K/V in the ring."""
        self.engine.backend.commit(x0, self.t_commit, *self._state(), **self._call_kw())
        if self.probe is not None:
            self.probe(self.block, self.engine.spec.schedule.num_steps, x0, self.t_commit, None)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor | None:
        if self.decoder is None:
            return None
        video = self.decoder.decode_block(latents, self.decoder_state)  # [B, T, 3, H, W] in [0, 1]
        return (video.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2)

    # -- CUDA graphs -----------------------------------------------------------------
    def _use_graphs(self) -> bool:
        return self.cuda_graphs and self.probe is None

    def _capture(self) -> _BlockGraphs:
        """Capture this block as three graphs: denoise steps, decode, commit.

        Capture records work without running it; `step` replays right after. Every
        tensor the graphs touch is a session buffer whose address never changes. The
        commit is its own graph so the frames can leave before it runs; the decode is
        its own graph (one extra launch, a few microseconds) so that timing events can
        sit between the stages without entering a graph.
        """
        t0 = time.perf_counter()
        pool = next((g.denoise.pool() for g in self._graphs.values()), None)
        g_denoise, g_decode, g_commit = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.device)
        with torch.cuda.graph(g_denoise, pool=pool):
            x0 = self._denoise()
        frames = None
        if self.decoder is not None:
            with torch.cuda.graph(g_decode, pool=g_denoise.pool()):
                frames = self._decode(x0)
        with torch.cuda.graph(g_commit, pool=g_denoise.pool()):
            self._commit(x0)
        self.capture_s += time.perf_counter() - t0
        log.info("captured block graphs at block %d", self.block)
        return _BlockGraphs(g_denoise, g_decode, g_commit, x0, frames)

    def frames(self, num_blocks: int | None = None) -> Iterator[torch.Tensor]:
        """Iterate over blocks' frames (uint8 [T, H, W, 3] on the host, batch 0), for embedding in an app."""
        n = 0
        while num_blocks is None or n < num_blocks:
            yield self.step().frames_cpu()[0]
            n += 1
