"""The step programs: each step of a streaming Wan session as an nn.Module with explicit tensor I/O.

These are what `torch.export` traces at fixed shapes (batch, resolution, block size and
ring capacity are an engine's identity; nothing else varies):

* `DiTStep`: one causal forward of one block against the KV ring; it serves both
  `denoise` and `commit` (the manifest's schedule says which calls a block makes) and
  writes the block's keys/values into the ring in place. Each layer's ring is its own
  graph input (`ring_k_0` ...), fed with the dim-0 slices of the session's ring tensors,
  so the compiled write touches only the block's rows (see DiTStep).
* `EncodePromptStep`: a prompt embedding (padded to text_len) -> the cross-attention cache.
* `DecodeStep`: a block of latents plus the decoder's state tensors -> RGB frames, updating
  the state in place; two programs (`decode_first`, `decode`), since a stream's first
  block yields fewer frames.

With `functional=True` (ONNX, TensorRT: formats without in-place inputs) a step clones
the state it would mutate and returns the updated state as extra outputs, named
`<input>_out`; the runtime copies them back into the session's buffers.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from flashdreams.export.manifest import TensorSpec
from flashdreams.models.wan_dit import WanAttention, WanDiT

log = logging.getLogger(__name__)

# The DiT graph's call inputs, as a session passes them (ring_k / ring_v: [layers, B, S, N, d]).
DIT_CALL_INPUTS = ["x", "t", "cross_k", "cross_v", "ring_k", "ring_v", "frame_positions", "slots", "valid_len"]

# Graph names of an engine, and which session call each serves.
GRAPH_OF_CALL = {"encode_prompt": "encode_prompt", "denoise": "dit", "commit": "dit", "decode": "decode"}


class DiTStep(nn.Module):
    """x, t, cross_k, cross_v, ring_k_0..L-1, ring_v_0..L-1, frame_positions, slots, valid_len -> flow.

    Each layer's ring is its own graph input (at run time, the dim-0 slices of the
    session's one [layers, B, S, N, d] tensor): Inductor then writes the block's rows in
    place, where a mutated slice of one big input makes it copy the whole ring back
    every call (measured: a 205 MB ring cost 84 ms per call on CPU, 0.1 ms per layer input).
    """

    def __init__(self, model: WanDiT, functional: bool = False) -> None:
        super().__init__()
        self.model = model
        self.functional = functional
        self.num_layers = model.cfg.num_layers

    def forward(self, x, t, cross_k, cross_v, *rest):
        n = self.num_layers
        ring_k, ring_v = list(rest[:n]), list(rest[n : 2 * n])
        frame_positions, slots, valid_len = rest[2 * n :]
        if self.functional:
            ring_k, ring_v = [r.clone() for r in ring_k], [r.clone() for r in ring_v]
        # forward_step indexes ring_k[layer]: a list of per-layer tensors serves as well as one tensor.
        flow = self.model.forward_step(x, t, cross_k, cross_v, ring_k, ring_v, frame_positions, slots, valid_len)
        return (flow, *ring_k, *ring_v) if self.functional else flow


class _CrossKV(nn.Module):
    """One layer's cross-attention K/V projections; reuses WanAttention's own `kv`."""

    heads = WanAttention.heads
    kv = WanAttention.kv

    def __init__(self, attn: WanAttention) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        self.k, self.v, self.norm_k = attn.k, attn.v, attn.norm_k


class EncodePromptStep(nn.Module):
    """context [B, text_len, text_dim] float32 -> cross_k, cross_v [layers, B, text_len, N, d].

    Holds only the weights it uses (text embedding, per-layer k/v/norm_k), so the DiT's
    weights are not stored twice.
    """

    embed_text = WanDiT.embed_text

    def __init__(self, model: WanDiT) -> None:
        super().__init__()
        self.cfg = model.cfg
        self.text_embedding = model.text_embedding
        self.layers = nn.ModuleList([_CrossKV(blk.cross_attn) for blk in model.blocks])

    @property
    def dtype(self) -> torch.dtype:
        return self.text_embedding[0].weight.dtype

    def forward(self, context):
        c = self.embed_text(context)
        kvs = [layer.kv(c) for layer in self.layers]
        return torch.stack([k for k, _ in kvs]), torch.stack([v for _, v in kvs])


# -- decoder ---------------------------------------------------------------------------


def decoder_state_field(state) -> str | None:
    """The one field of a decoder state that holds its tensors (a list), or None if the state
    is not plain tensors plus a host-side `started` flag (then the decoder stays eager)."""
    if not dataclasses.is_dataclass(state):
        return None
    found = None
    for f in dataclasses.fields(state):
        value = getattr(state, f.name)
        if isinstance(value, list | tuple) and value and all(isinstance(t, torch.Tensor) for t in value):
            if found is not None:
                return None
            found = f.name
        elif isinstance(value, torch.Tensor):
            return None
    if found is None or not hasattr(state, "started"):
        return None
    return found


def decoder_module(decoder) -> nn.Module | None:
    """The nn.Module that holds a StreamingDecoder's weights."""
    mods = [v for v in vars(decoder).values() if isinstance(v, nn.Module)]
    return mods[0] if len(mods) == 1 else None


class DecodeStep(nn.Module):
    """latents [B, C, nf, h, w] float32, *state -> video [B, T, 3, H, W] float32 in [0, 1].

    Runs the decoder's own `decode_block` on a state object rebuilt from the given
    tensors, so the exported program computes exactly what the eager decoder does; the
    state tensors are updated in place (or returned, when functional).
    """

    def __init__(self, decoder, template_state, first: bool, functional: bool = False) -> None:
        super().__init__()
        self.net = decoder_module(decoder)
        self.decoder = decoder
        self.field = decoder_state_field(template_state)
        self.template = template_state
        self.first = first
        self.functional = functional

    def forward(self, latents, *state):
        tensors = [t.clone() for t in state] if self.functional else list(state)
        st = dataclasses.replace(self.template, **{self.field: tensors})
        st.started = not self.first
        video = self.decoder.decode_block(latents, st)
        return (video, *tensors) if self.functional else video


# -- step programs with their I/O --------------------------------------------------------


@dataclass
class StepProgram:
    """A step module ready to trace: example inputs, typed I/O, mutated inputs, eager references.

    A caller (the session) passes *call inputs*; a call input listed in `groups` is one
    tensor whose dim-0 slices are separate graph inputs (the per-layer rings). `inputs`
    are the graph's flat inputs.
    """

    name: str
    module: nn.Module
    call_names: list[str]
    call_inputs: tuple[torch.Tensor, ...]
    groups: dict[str, list[str]]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    mutates: list[str]
    serves: list[str]
    state_outputs: dict[str, str] = field(default_factory=dict)  # functional: output name -> input name
    attention: str = "sdpa"
    # Eager results on the example inputs: every output, and (in-place form) each mutated input after the call.
    reference_outputs: tuple[torch.Tensor, ...] = ()
    reference_state: dict[str, torch.Tensor] = field(default_factory=dict)

    def flatten(self, call_args) -> tuple[torch.Tensor, ...]:
        return flatten_call(self.call_names, self.groups, call_args)

    def fresh_inputs(self) -> tuple[torch.Tensor, ...]:
        """Graph inputs from copies of the example call inputs (a call mutates its state inputs)."""
        return self.flatten(tuple(t.clone() for t in self.call_inputs))

    def to_dict(self) -> dict:
        # Small integer inputs (positions, slots, valid length) keep their example values: the
        # loader's warm-up call uses them, so it runs on meaningful indices, not zeros.
        warmup = {
            n: t.reshape(-1).tolist()
            for n, t in zip(self.call_names, self.call_inputs)
            if not t.is_floating_point() and t.numel() <= 64
        }
        return {
            "call_inputs": list(self.call_names),
            "groups": {k: list(v) for k, v in self.groups.items()},
            "warmup_values": warmup,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "mutates": list(self.mutates),
            "serves": list(self.serves),
            "state_outputs": dict(self.state_outputs),
            "attention": self.attention,
        }


def flatten_call(call_names, groups, call_args) -> tuple[torch.Tensor, ...]:
    """Call inputs -> graph inputs: a grouped call input contributes its dim-0 slices (views)."""
    out: list[torch.Tensor] = []
    for name, t in zip(call_names, call_args):
        if name in groups:
            out.extend(t.unbind(0))
        else:
            out.append(t)
    return tuple(out)


def _spec(name: str, t: torch.Tensor) -> TensorSpec:
    return TensorSpec(name, tuple(t.shape), t.dtype)


@torch.no_grad()
def _finish(
    name, module, call_names, call_inputs, groups, mutates, serves, functional, output_names, attention
) -> StepProgram:
    """Run the module once eagerly on copies of the inputs: its I/O specs and reference results."""
    input_names = []
    for n in call_names:
        input_names.extend(groups.get(n, [n]))
    copies = flatten_call(call_names, groups, tuple(t.clone() for t in call_inputs))
    outs = module(*copies)
    outs = outs if isinstance(outs, tuple) else (outs,)
    reference_state = {} if functional else {n: copies[input_names.index(n)] for n in mutates}
    state_outputs = {}
    names = list(output_names)
    if functional:
        names += [f"{m}_out" for m in mutates]
        state_outputs = {f"{m}_out": m for m in mutates}
    if len(names) != len(outs):
        raise AssertionError(f"step {name}: {len(outs)} outputs for names {names}")
    return StepProgram(
        name=name,
        module=module,
        call_names=list(call_names),
        call_inputs=tuple(call_inputs),
        groups=groups,
        inputs=[_spec(n, t) for n, t in zip(input_names, copies)],
        outputs=[_spec(n, t) for n, t in zip(names, outs)],
        mutates=list(mutates),
        serves=list(serves),
        state_outputs=state_outputs,
        attention=attention,
        reference_outputs=tuple(outs),
        reference_state=reference_state,
    )


def dit_program(engine, batch: int, functional: bool = False) -> StepProgram:
    """The DiT step at the engine's shapes, with inputs like a session's first block."""
    spec, backend = engine.spec, engine.backend
    model: WanDiT = backend.model
    dev, dt = backend.device, backend.dtype
    nf, fs = spec.num_frame_per_block, spec.ring.frame_seq_length
    layers, heads, hd = backend.num_layers, backend.num_heads, backend.head_dim
    gen = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *shape, dtype=torch.float32: torch.randn(shape, generator=gen, device=dev, dtype=dtype)  # noqa: E731
    ring_shape = (layers, batch, spec.ring.capacity_tokens, heads, hd)
    cross_shape = (layers, batch, backend.text_len, heads, hd)
    inputs = (
        rnd(batch, spec.latent_channels, nf, spec.latent_h, spec.latent_w),
        torch.full((batch, nf), float(spec.schedule.timesteps[0]), device=dev),
        rnd(*cross_shape, dtype=dt),
        rnd(*cross_shape, dtype=dt),
        rnd(*ring_shape, dtype=dt),
        rnd(*ring_shape, dtype=dt),
        torch.arange(nf, dtype=torch.int64, device=dev),
        torch.tensor(spec.ring.block_slots(0, nf), dtype=torch.int64, device=dev),
        torch.tensor([spec.ring.valid_tokens(nf)], dtype=torch.int64, device=dev),
    )
    if fs * nf > spec.ring.capacity_tokens:  # pragma: no cover - RingSpec refuses this earlier
        raise AssertionError("block larger than the ring")
    groups = {g: [f"{g}_{i}" for i in range(layers)] for g in ("ring_k", "ring_v")}
    return _finish(
        "dit",
        DiTStep(model, functional),
        DIT_CALL_INPUTS,
        inputs,
        groups,
        groups["ring_k"] + groups["ring_v"],
        ["denoise", "commit"],
        functional,
        ["flow"],
        model.attention_impl,
    )


def encode_program(engine, batch: int) -> StepProgram:
    backend = engine.backend
    model: WanDiT = backend.model
    gen = torch.Generator(device=backend.device).manual_seed(1)
    ctx = torch.randn((batch, backend.text_len, engine.spec.text_dim), generator=gen, device=backend.device)
    return _finish(
        "encode_prompt",
        EncodePromptStep(model),
        ["context"],
        (ctx,),
        {},
        (),
        ["encode_prompt"],
        False,
        ["cross_k", "cross_v"],
        "none",
    )


def decode_programs(engine, batch: int, functional: bool = False) -> list[StepProgram] | None:
    """`decode_first` and `decode`, or None when the engine's decoder cannot be exported."""
    decoder, spec = engine.decoder, engine.spec
    if decoder is None:
        return None
    state = decoder.new_state(batch, spec.latent_h, spec.latent_w)
    fld = decoder_state_field(state)
    if fld is None or decoder_module(decoder) is None:
        log.warning("decoder '%s' keeps state that is not plain tensors; it stays eager", decoder.name)
        return None
    tensors = list(getattr(state, fld))
    dev = engine.backend.device
    gen = torch.Generator(device=dev).manual_seed(2)
    shape = (batch, spec.latent_channels, spec.num_frame_per_block, spec.latent_h, spec.latent_w)
    latents = torch.randn(shape, generator=gen, device=dev)
    names = [f"state_{i}" for i in range(len(tensors))]
    progs = []
    for name, first in (("decode_first", True), ("decode", False)):
        step = DecodeStep(decoder, state, first, functional)
        # Non-zero state for the steady-state program, as after a first block.
        st = [
            torch.zeros_like(t) if first else torch.randn(t.shape, generator=gen, device=t.device, dtype=t.dtype)
            for t in tensors
        ]
        progs.append(
            _finish(
                name,
                step,
                ["latents", *names],
                (latents, *st),
                {},
                names,
                ["decode"],
                functional,
                ["video"],
                "none",
            )
        )
    return progs
