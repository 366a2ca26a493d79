"""Engines: a loaded model (eager or compiled) plus everything fixed for its sessions.

`flashdreams.load()` is the one entry point: the built-in default, a checkpoint, a full-size
preset with random weights, or a built engine directory. The model comes from its family in
the registry as a `BlockPlan` plus graphs; the engine pairs the plan with a backend that runs
the graphs by name, and sessions run the plan. Nothing here knows a model family.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flashdreams import registry
from flashdreams.backend import EagerBackend
from flashdreams.errors import EngineIncompatibleError, InvalidArgumentError, NotFoundError
from flashdreams.models.family import BlockPlan, InputSpec, LoadOptions
from flashdreams.models.input_rules import sample_valid
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
    """The static shapes every session of an engine shares (read from its plan)."""

    preset: Any
    plan: BlockPlan

    @property
    def height(self) -> int:
        return self.plan.meta["height"]

    @property
    def width(self) -> int:
        return self.plan.meta["width"]

    @property
    def latent_h(self) -> int:
        return self.plan.latents.shape[3]

    @property
    def latent_w(self) -> int:
        return self.plan.latents.shape[4]

    @property
    def latent_channels(self) -> int:
        return self.plan.latents.shape[1]

    @property
    def num_frame_per_block(self) -> int:
        return self.plan.latents.shape[2]

    @property
    def frames_per_block(self) -> int:
        """Video frames of a steady-state block."""
        return self.plan.meta.get("video_frames_steady") or 4 * self.num_frame_per_block

    def block_flops(self, block: int) -> float | None:
        """Matmul FLOPs of block `block` (from the plan), or None when the family does not count them."""
        flops = self.plan.meta.get("block_flops")
        if not flops:
            return None
        return flops[min(block, len(flops) - 1)]


class Engine:
    """A model ready to run sessions. Engines may be shared; a session belongs to one thread."""

    def __init__(
        self,
        backend,
        plan: BlockPlan,
        preset,
        source: str = "",
        decoder=None,
        stand_in_inputs: bool = False,
        model=None,
        precision: str = "bf16",
    ) -> None:
        self.backend = backend
        self.precision = precision  # "bf16" (the model's dtype) or "fp8" (FP8 linears and ring attention)
        self.plan = plan
        self.spec = EngineSpec(preset, plan)
        self.decoder = decoder
        self.source = source
        self.model = model  # the family's LoadedModel (eager engines; fd-build traces it)
        # Built-in and random-weight models get seeded stand-ins for required inputs (no text encoder).
        self.stand_in_inputs = stand_in_inputs

    @property
    def device(self) -> torch.device:
        return self.backend.device

    @property
    def makes_frames(self) -> bool:
        """Whether its blocks hand out frames (a decoder, eager or compiled into the engine, or a
        network that draws pixels itself), not latents only."""
        return self.plan.meta.get("decoder") is not None

    @property
    def preset_name(self) -> str:
        return getattr(self.spec.preset, "name", "?")

    def input_specs(self):
        return list(self.plan.inputs.values())

    def default_inputs(self, seed: int = 0, batch: int | None = None) -> dict[str, torch.Tensor]:
        """Deterministic stand-ins for the required inputs (seeded draws in each input's range), for
        models whose encoders are not loaded; `batch` overrides the engine's batch."""
        out = {}
        for n, s in self.plan.inputs.items():
            if not (s.required and s.torch_dtype().is_floating_point):
                continue
            # Each input from its own stream, keyed by name: the stand-ins do not depend on the order
            # the inputs are listed in (a manifest may store them in another order).
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(n.encode()))
            shape = (batch or s.shape[0], *s.shape[1:])
            out[n] = sample_valid(s, shape, gen)
        return out

    def default_prompt(self, batch: int = 1, seed: int = 0) -> torch.Tensor:
        """A deterministic stand-in prompt embedding, for models whose text encoder is not loaded."""
        return self.default_inputs(seed, batch)["prompt_embeds"]

    def session(
        self,
        prompt_embeds: torch.Tensor | None = None,
        seed: int = 0,
        cuda_graphs: bool | None = None,
        inputs: dict[str, torch.Tensor] | None = None,
    ) -> Session:
        """A new session with its own state. `inputs` are named session inputs (see `input_specs()`);
        `prompt_embeds` is the same as inputs={"prompt_embeds": ...}.

        `cuda_graphs` (default: on with CUDA) replays each block as captured graphs after
        one eager warm-up of its kind.
        """
        return Session(self, self.session_inputs(inputs, prompt_embeds), seed, cuda_graphs=cuda_graphs)

    def session_inputs(
        self, inputs: dict[str, torch.Tensor] | None = None, prompt_embeds: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The inputs a new session starts with: `inputs`, `prompt_embeds`, and (an engine with seeded
        random weights) stand-ins for the required ones not given."""
        given = dict(inputs or {})
        if prompt_embeds is not None:
            given["prompt_embeds"] = prompt_embeds
        if self.stand_in_inputs:
            given = {**{k: v for k, v in self.default_inputs().items() if k not in given}, **given}
        return given

    def worlds(
        self,
        n: int,
        seeds: Sequence[int] | None = None,
        inputs: dict[str, torch.Tensor] | None = None,
        capacity: int | None = None,
        cuda_graphs: bool | None = None,
    ):
        """n independent worlds stepped in one batch (`flashdreams.batched.Worlds`), world i seeded
        with seeds[i] (default i); `capacity` (default: the bucket that holds n) bounds later add()s."""
        from flashdreams.batched import Worlds

        return Worlds(self, n, seeds=seeds, inputs=inputs, capacity=capacity, cuda_graphs=cuda_graphs)

    def __repr__(self) -> str:
        s = self.spec
        return (
            f"Engine({self.preset_name}, backend={self.backend.name}, {s.height}x{s.width}, "
            f"device={self.device}, dtype={self.backend.dtype}{', precision=fp8' if self.precision == 'fp8' else ''})"
        )


def looks_like_engine_dir(path: Path) -> bool:
    """A directory holding what fd-build writes (graphs/, an engine weights file, a kernel bundle)."""
    return path.is_dir() and ((path / "graphs").is_dir() or (path / "kernels.tar").is_file())


def resolve_device_dtype(device: str | torch.device | None, dtype: str | torch.dtype | None):
    """Defaults: the GPU in bfloat16 when there is one, else the CPU in float32."""
    try:
        dev = torch.device(device) if device is not None else None
    except (RuntimeError, TypeError):
        raise InvalidArgumentError(f"device '{device}' is unknown; use cpu or cuda (cuda:N)") from None
    if dev is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type not in ("cpu", "cuda"):
        raise InvalidArgumentError(f"device '{device}' is not supported; use cpu or cuda")
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


def check_attention(attention: str, device: torch.device) -> None:
    """Refuse attention="fa4" where FlashAttention-4 cannot run on `device` (as `resolve_device_dtype` gives
    it): the package or an sm90+ GPU missing."""
    if attention != "fa4":
        return
    from flashdreams.kernels.fa4_attention import fa4_unavailable_reason

    reason = fa4_unavailable_reason(device)
    if reason:
        raise InvalidArgumentError(f"attention 'fa4' cannot run here: {reason}; use attention='triton'")


def check_fp8_keep(precision: str, fp8_keep: str | None) -> None:
    """Refuse an `fp8_keep` that is not a regular expression, or one given without precision 'fp8'."""
    if fp8_keep is None:
        return
    if precision != "fp8":
        raise InvalidArgumentError(
            f"fp8_keep names the linears precision 'fp8' leaves in bf16; it means nothing with precision '{precision}'"
        )
    from flashdreams.kernels.fp8_linear import fp8_exclusion

    fp8_exclusion(fp8_keep)


def check_kernel_environment(precision: str, attention: str) -> None:
    """Refuse a malformed kernel knob by name before anything loads, not in the middle of a first block:
    FD_RING_ATTN_KERNEL / FD_ATTN_SPLITS / FD_ATTN_STAGGER where our attention kernels run, FD_FP8_ATTN_KERNEL /
    FD_FP8_ATTN_SPLITS with precision 'fp8' (benchmark knobs the attention reads per call)."""
    import importlib

    from flashdreams.kernels._common import env_key_splits

    if attention in ("triton", "fa4"):
        importlib.import_module("flashdreams.kernels.ring_attention").kernel_choice()
        configs = importlib.import_module("flashdreams.kernels.ring_attention_configs")
        env_key_splits(configs.SPLITS_ENV)
        configs.env_stagger()
    if precision == "fp8":
        fp8_attention = importlib.import_module("flashdreams.kernels.ring_attention_fp8")  # the module
        fp8_attention._kernel_choice()
        env_key_splits(fp8_attention.SPLITS_ENV)


def check_batch(batch: Any) -> None:
    """Refuse a batch (worlds an engine steps together) that is not an integer >= 1."""
    if not isinstance(batch, int) or batch < 1:
        raise InvalidArgumentError(f"batch must be an integer >= 1, got {batch!r}")


def is_engine_dir(source: str | os.PathLike) -> bool:
    """Whether `source` names a built engine: its manifest.json is there. (`cli.options.is_engine_dir` is the
    CLI's twin: the CLI checks its flags before it imports torch, which this module imports.)"""
    return (Path(source) / "manifest.json").is_file()


def input_specs(
    preset: str | os.PathLike | Any,
    *,
    height: int | None = None,
    width: int | None = None,
    batch: int = 1,
    decoder: str | None = "preset",
) -> list[InputSpec] | None:
    """The inputs a session of `preset` at this size takes (what `load(...).input_specs()` returns), known
    without loading a weight, so a host can check a control script before a multi-GB load; None where the
    preset's family learns its inputs only at load. Bad sizes are refused as `load` refuses them.

    `preset` may also be a built engine's directory: its manifest records them (its size and batch are
    fixed at build, so none is given here)."""
    if isinstance(preset, (str, os.PathLike)) and is_engine_dir(preset):
        return _engine_dir_input_specs(Path(preset), height, width, batch)
    if isinstance(preset, os.PathLike):
        raise NotFoundError(f"'{preset}' is not an engine directory (no manifest.json there)")
    if isinstance(preset, str):
        preset = registry.get_preset(preset)
    check_batch(batch)
    opts = LoadOptions(height=height, width=width, batch=batch, decoder=decoder)
    specs = registry.family(preset.family).input_specs(preset, opts)
    return None if specs is None else list(specs.values())


def _engine_dir_input_specs(path: Path, height: int | None, width: int | None, batch: int) -> list[InputSpec]:
    """A built engine's inputs from its manifest's plan (read only: the load validates the rest)."""
    from flashdreams.export.manifest import read_manifest

    given = [n for n, v in (("height", height), ("width", width)) if v is not None] + (["batch"] if batch != 1 else [])
    if given:
        fixed = ", ".join(given)
        raise InvalidArgumentError(f"engine '{path}': its size and batch are fixed at build; give no {fixed}")
    m = read_manifest(path)
    try:
        return list(BlockPlan.from_dict(m["plan"]).inputs.values())
    except (KeyError, TypeError, ValueError) as exc:
        raise EngineIncompatibleError(
            f"engine '{path}': its manifest's plan cannot be read ({type(exc).__name__}: {exc}); rebuild it"
        ) from None


def load(
    source: str | os.PathLike | None = None,
    *,
    preset: str | Any | None = None,
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
    batch: int = 1,
    fp8_keep: str | None = None,
) -> Engine:
    """Load an engine.

    `decoder` is "wan-vae", "taehv", None (latents only) or "preset" (the preset's choice);
    a real checkpoint needs `decoder_weights` (Wan2.1_VAE / taew2_1 as safetensors) for it.
    `weights_seed` picks the random weights of the built-in and `random_weights` models; a
    session's own `seed` (engine.session) only drives its noise. `precision="fp8"` (with
    attention="triton") runs the blocks' linears and self-attention in float8 (opt-in); with
    attention="fa4" the linears run in float8 and FlashAttention-4 runs the attention in bf16. `fp8_keep`
    (with precision="fp8"): a regex over the linears' names that stay in bf16, replacing the model's own
    choice ("" quantizes all of them; r"\\.cam_" keeps LingBot's camera layers in bf16).
    `attention` is "sdpa" (torch), "triton" (our kernels) or "fa4" (our kernels, with the KV-ring
    attention run by the optional flash-attn-4 package on sm90+ GPUs).

    * `load()`: the built-in tiny model (deterministic random weights, no download).
    * `load(preset="self-forcing-1.3b", random_weights=True)`: full size, random weights (speed runs).
    * `load("ckpt.safetensors" | "ckpt_dir", preset=...)`: a real checkpoint, run eagerly.
    * `load("engine_dir")`: a built engine (manifest.json), see `fd-build`.
    """
    if source is not None:
        path = Path(source)
        if is_engine_dir(path):
            from flashdreams.engine_runtime import load_engine_dir

            if fp8_keep is not None:
                raise InvalidArgumentError(
                    "fp8_keep: a built engine keeps the linears it was built with; pass it to fd-build instead"
                )

            if attention == "fa4":
                raise InvalidArgumentError(
                    "attention 'fa4' runs in eager sessions only: a built engine keeps the attention it was built "
                    "with (sdpa or triton); load the checkpoint instead of the engine directory to use fa4"
                )

            return load_engine_dir(source, device=device, attention=attention, decoder=decoder, precision=precision)
        if not path.exists():
            raise NotFoundError(f"checkpoint '{source}' does not exist")
        if looks_like_engine_dir(path):
            raise NotFoundError(
                f"'{source}' is an engine directory missing its manifest.json (an interrupted copy or build?); "
                "rebuild it with fd-build, or copy the whole directory again"
            )
    dev, dt = resolve_device_dtype(device, dtype)
    check_attention(attention, dev)
    check_fp8_keep(precision, fp8_keep)
    check_kernel_environment(precision, attention)
    if isinstance(preset, str):
        preset = registry.get_preset(preset)
    if preset is None:
        preset = registry.get_preset("tiny" if source is None else "self-forcing-1.3b")
    check_batch(batch)
    set_workspace = False
    if precision == "fp8":
        from flashdreams.kernels.fp8_linear import prefer_workspace_free_gemms

        set_workspace = prefer_workspace_free_gemms()  # before the load's first GEMM (the FP8 linears' bias probe)
    opts = LoadOptions(
        source=None if source is None else str(source),
        device=dev,
        dtype=dt,
        attention=attention,
        precision=precision,
        fp8_keep=fp8_keep,
        height=height,
        width=width,
        batch=batch,
        random_weights=random_weights,
        weights_seed=weights_seed,
        decoder=decoder,
        decoder_weights=None if decoder_weights is None else str(decoder_weights),
    )
    try:
        model = registry.family(preset.family).load(preset, opts)
    except BaseException:
        if set_workspace:  # a refused load leaves the process as it found it
            from flashdreams.kernels.fp8_linear import WORKSPACE_ENV

            os.environ.pop(WORKSPACE_ENV, None)
        raise
    stand_in = source is None and (preset.builtin or random_weights)
    return Engine(EagerBackend(model), model.plan, preset, model.source, model.decoder, stand_in, model, precision)
