"""Arena: the project's own small action-conditioned world model, trained on a procedural arena.

The weights ship in the package (weights/arena.safetensors, made by train/train_arena.py; see
weights/TRAINING.md). The model predicts pixels directly, so it needs no decoder; the plan is
row-independent, so batched worlds, fd-serve and the Gymnasium env step it like any family.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.families.arena.model import ArenaConfig, ArenaNet, ArenaStep
from flashdreams.models.families.arena.plan import build_plan
from flashdreams.models.families.arena.presets import PRESETS, Preset
from flashdreams.models.families.arena.world import new_worlds, palette, render
from flashdreams.models.family import Family, InputSpec, LoadedModel, LoadOptions

log = logging.getLogger(__name__)


def load_weights(net: ArenaNet, path, strict: bool = True) -> dict[str, str]:
    """Load a safetensors state dict (any float dtype) into `net`; returns the file's metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        raise InvalidArgumentError(
            f"arena weights '{path}' do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for k, v in state.items():
        if k in own and tuple(v.shape) != tuple(own[k].shape):
            raise InvalidArgumentError(
                f"arena weights '{path}': '{k}' has shape {list(v.shape)}, the model needs {list(own[k].shape)}"
            )
    net.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items() if k in own}, strict=strict)
    return meta


def start_frames(count: int) -> torch.Tensor:
    """The built-in start arenas: world seeds 0 .. count - 1, rendered ([count, 3, 64, 64])."""
    return render(new_worlds(list(range(count))))


def _random_net(cfg: ArenaConfig, seed: int) -> ArenaNet:
    """Seeded random weights, without touching the global generator's state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ArenaNet(cfg)


class ArenaFamily(Family):
    name = "arena"
    description = "the project's trained arena world (W/A/S/D), small enough for a laptop CPU"

    def presets(self) -> list[Preset]:
        return list(PRESETS)

    def preset_from_dict(self, d: Mapping) -> Preset:
        return Preset.from_dict(dict(d))

    def build_net(self, preset: Preset, opts: LoadOptions) -> tuple[ArenaNet, str]:
        """The network with its weights: a given file, the shipped file, or (only if that is missing) seeded random."""
        net = ArenaNet(preset.model)
        if opts.source is not None:
            load_weights(net, opts.source)
            source = str(opts.source)
        elif opts.random_weights:
            net = _random_net(preset.model, opts.weights_seed)
            source = f"random:{preset.name}"
        elif preset.weights_path.is_file():
            load_weights(net, preset.weights_path)
            source = f"builtin:{preset.name}"
        else:
            log.warning(
                "arena: the trained weights %s are missing (a source tree without them?); using seeded random "
                "weights, so the world will not follow the keys. Retrain with train/train_arena.py.",
                preset.weights_path,
            )
            net = _random_net(preset.model, opts.weights_seed)
            source = f"random:{preset.name}"
        # The net computes in the load dtype (float32 on a CPU; bfloat16 by default on a GPU, where many
        # worlds per batch make it compute-bound); frames and state stay float32 either way.
        return net.to(opts.device, opts.dtype).eval().requires_grad_(False), source

    def input_specs(self, preset: Preset, opts: LoadOptions) -> dict[str, InputSpec]:
        preset.latent_size(opts.height, opts.width)
        return build_plan(preset.model, opts.batch, preset.fps, opts.decoder is not None).inputs

    def load(self, preset: Preset, opts: LoadOptions) -> LoadedModel:
        preset.latent_size(opts.height, opts.width)
        if opts.decoder not in (None, "preset", "pixels"):
            raise InvalidArgumentError(
                f"decoder '{opts.decoder}': the {preset.name} world draws pixels itself; use the preset's or none"
            )
        net, source = self.build_net(preset, opts)
        step = ArenaStep(net, start_frames(preset.start_seeds), palette(), preset.settle).to(opts.device)
        decoder = "pixels" if opts.decoder is not None else None
        plan = build_plan(preset.model, opts.batch, preset.fps, decoder is not None)
        return LoadedModel(
            plan=plan,
            graphs={"step": step},
            weights=net,
            decoder=decoder,
            examples=lambda g: example_inputs(plan, opts.device),
            source=source,
            device=opts.device,
            dtype=torch.float32,  # the session's frames and state; the net itself runs in opts.dtype
            describe={"params": sum(p.numel() for p in net.parameters())},
        )


def example_inputs(plan, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Call inputs of the step graph like a session's second block (fd-build traces with these)."""
    gen = torch.Generator().manual_seed(0)
    b, s = plan.batch, plan.meta["height"]
    f = plan.inputs["keyboard"].shape[1]
    return (
        torch.rand(b, 3, s, s, generator=gen).to(device),
        torch.ones(b, dtype=torch.int64, device=device),
        (torch.rand(b, f, 4, generator=gen) > 0.5).float().to(device),
        torch.zeros(b, 3, s, s, device=device),
        torch.randn(b, 1, generator=gen).to(device),
    )


FAMILY = ArenaFamily()
__all__ = ["FAMILY", "ArenaConfig", "Preset"]
