"""A streaming decoder as two step graphs (`decode_first`, `decode`) over named state tensors.

Every family that streams frames through the Wan VAE or TAEHV uses these: the decoder's
carried caches become named session state (`dec_0`, `dec_1`, ...), and the host-side
"first block?" flag becomes the choice of graph, so eager sessions, captured CUDA graphs and
compiled engines run the same program.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.family import GraphSig, TensorDecl, dtype_name


def decoder_state_field(state) -> str | None:
    """The one field of a decoder state that holds its tensors (a list), or None if the state is
    not plain tensors plus a host-side `started` flag."""
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

    Runs the decoder's own `decode_block` on a state object rebuilt from the given tensors,
    so every backend computes exactly what the eager decoder does; the state tensors are
    updated in place.
    """

    def __init__(self, decoder, template_state, first: bool) -> None:
        super().__init__()
        self.net = decoder_module(decoder)
        self.decoder = decoder
        self.field = decoder_state_field(template_state)
        self.template = template_state
        self.first = first

    def forward(self, latents: torch.Tensor, *state: torch.Tensor) -> torch.Tensor:
        st = dataclasses.replace(self.template, **{self.field: list(state)})
        st.started = not self.first
        return self.decoder.decode_block(latents, st)


@dataclasses.dataclass
class DecoderGraphs:
    """What a family adds to its plan for a streaming decoder."""

    graphs: dict[str, nn.Module]
    sigs: dict[str, GraphSig]
    state: dict[str, TensorDecl]
    state_names: list[str]
    frames_first: int
    frames_steady: int
    name: str


def decoder_graphs(decoder, batch: int, latent_h: int, latent_w: int, num_latents: int) -> DecoderGraphs:
    """The `decode_first` / `decode` graphs of `decoder` and the state they carry."""
    state = decoder.new_state(batch, latent_h, latent_w)
    fld = decoder_state_field(state)
    if fld is None or decoder_module(decoder) is None:
        raise InvalidArgumentError(f"decoder '{decoder.name}' keeps state that is not plain tensors")
    tensors = list(getattr(state, fld))
    names = [f"dec_{i}" for i in range(len(tensors))]
    decls = {
        n: TensorDecl(n, tuple(t.shape), dtype_name(t.dtype), f"{decoder.name} streaming cache {i}", rollback=True)
        for i, (n, t) in enumerate(zip(names, tensors))
    }
    graphs, sigs = {}, {}
    for gname, first in (("decode_first", True), ("decode", False)):
        graphs[gname] = DecodeStep(decoder, state, first)
        sigs[gname] = GraphSig(gname, ("latents", *names), ("video",), tuple(names))
    return DecoderGraphs(
        graphs,
        sigs,
        decls,
        names,
        decoder.num_frames(num_latents, True),
        decoder.num_frames(num_latents, False),
        decoder.name,
    )
