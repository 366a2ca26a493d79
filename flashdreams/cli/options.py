"""The command-line options of loading a model and of building an engine, declared once.

fd-run, fd-build and fd-bench load models the same way; `add_load_options` declares the
flags (names, defaults and help shared by all three) and `load_kwargs` turns parsed
arguments into the keyword arguments of `flashdreams.load`. `add_build_options` and
`build_config` do the same for the engine-build options (`BuildConfig`), whose defaults
come from the environment variables read here, once. `flag_message` rewrites a library
message that names Python arguments (`random_weights=True`) into the flags a user types.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flashdreams.errors import InvalidArgumentError, NotFoundError
from flashdreams.export.build_config import INDUCTOR_MODES, BuildConfig

ATTENTIONS = ("sdpa", "triton", "fa4")
PRECISIONS = ("bf16", "fp8")
# Python argument names that differ from their option's dest: flashdreams.load's `source` is --checkpoint.
ALIASES = {"source": "checkpoint"}


def comma_list(choices: Sequence[str]):
    """An argparse `type` for a comma-separated list of `choices`; the value stays the string given."""

    def parse(value: str) -> str:
        items = split_list(value)
        bad = [v for v in items if v not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"{value!r}: each item must be one of {', '.join(choices)}")
        return value

    return parse


def split_list(value: str) -> list[str]:
    """The items of a comma-separated option value, stripped, empty items dropped."""
    return [v.strip() for v in value.split(",") if v.strip()]


def add_load_options(
    parser: argparse.ArgumentParser,
    *,
    lists: bool = False,
    weights_seed_flags: Sequence[str] = ("--weights-seed",),
) -> argparse._ArgumentGroup:
    """Add the model-loading options to `parser` (in their own help group) and return the group.

    `lists`: --attention and --precision take comma lists (fd-bench runs each combination).
    `weights_seed_flags`: the spellings of the weight seed (fd-build keeps its `--seed`).
    """
    g = parser.add_argument_group("model", "what to load: the model, its weights, decoder, device and precision")
    g.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="DiT weights: a .safetensors file, a sharded index, a directory, or an engine directory "
        "made by fd-build (default: the built-in tiny model, or --preset with --random-weights)",
    )
    g.add_argument(
        "--preset",
        metavar="NAME",
        help="model preset, see fd-run --list-presets (default: fd-run and fd-serve play the arena world, fd-build and "
        "fd-bench the tiny built-in causal Wan; self-forcing-1.3b with --checkpoint)",
    )
    g.add_argument("--device", help="cuda | cpu | cuda:N (default: cuda if torch sees a GPU, else cpu)")
    g.add_argument("--dtype", help="bfloat16 | float16 | float32 (default: bfloat16 on a GPU, float32 on a CPU)")
    if lists:
        g.add_argument(
            "--attention",
            default="sdpa",
            type=comma_list(ATTENTIONS),
            help="comma list of attention/norm kernels: sdpa (torch), triton (ours), fa4 (ours, with the KV-ring "
            "attention by the optional flash-attn-4 package, sm90+); default sdpa",
        )
    else:
        g.add_argument(
            "--attention",
            default="sdpa",
            choices=ATTENTIONS,
            help="attention/norm kernels: sdpa (torch, default), triton (ours, fused) or fa4 (ours, with the KV-ring "
            "attention by the optional flash-attn-4 package, sm90+; eager sessions only)",
        )
    fp8 = (
        "fp8: the DiT blocks' linears and self-attention in float8 e4m3 (needs --attention triton; with "
        "--attention fa4 the linears in float8 and the attention in bf16)"
    )
    if lists:
        g.add_argument(
            "--precision", default="bf16", type=comma_list(PRECISIONS), help=f"comma list of bf16, fp8; {fp8}"
        )
    else:
        g.add_argument("--precision", default="bf16", choices=PRECISIONS, help=f"bf16 (default) or {fp8}")
    g.add_argument(
        "--fp8-keep",
        metavar="REGEX",
        help="with fp8: the linears (a regex over their module names) that stay in bf16, replacing the model's "
        "own choice; '' puts every one in fp8, '\\.cam_' keeps LingBot's camera layers in bf16",
    )
    g.add_argument(
        "--decoder",
        default="preset",
        help="latent-to-pixel decoder: wan-vae | taehv | none (latents only) | preset (default: the preset's)",
    )
    g.add_argument(
        "--decoder-weights",
        metavar="FILE",
        help="decoder weights (.safetensors: Wan2.1_VAE or taew2_1); needed with a real --checkpoint",
    )
    g.add_argument("--height", type=int, metavar="PX", help="video height in pixels (default: the preset's)")
    g.add_argument("--width", type=int, metavar="PX", help="video width in pixels (default: the preset's)")
    g.add_argument(
        "--random-weights",
        action="store_true",
        help="no checkpoint: the full-size --preset with seeded random weights (speed runs)",
    )
    g.add_argument(
        *weights_seed_flags,
        dest="weights_seed",
        type=int,
        metavar="N",
        default=0,
        help="seed of the built-in or --random-weights weights (default 0); not a session's noise seed",
    )
    return g


def load_kwargs(args: argparse.Namespace, **overrides: Any) -> dict[str, Any]:
    """The keyword arguments of `flashdreams.load(...)` for parsed `args` (the source as `source`).

    `overrides` replace single values (fd-bench passes one attention and one precision of its lists).
    """
    kw: dict[str, Any] = {
        "source": args.checkpoint,
        "preset": args.preset,
        "device": args.device,
        "dtype": args.dtype,
        "attention": args.attention,
        "decoder": None if args.decoder == "none" else args.decoder,
        "height": args.height,
        "width": args.width,
        "random_weights": args.random_weights,
        "weights_seed": args.weights_seed,
        "decoder_weights": args.decoder_weights,
        "precision": args.precision,
        "fp8_keep": getattr(args, "fp8_keep", None),
    }
    kw.update(overrides)
    return kw


def is_engine_dir(source: str | None) -> bool:
    """Whether a --checkpoint names a built engine (its manifest.json there): its shapes and inputs are fixed.
    (`flashdreams.engine.is_engine_dir` less the None: that module imports torch, which flag checks do not need.)"""
    return source is not None and (Path(source) / "manifest.json").is_file()


def check_load_args(kw: dict[str, Any]) -> None:
    """Refuse, naming flags and before anything loads, the combinations and values `flashdreams.load`
    would refuse naming Python arguments (or only after loading a model): fp8 without triton, --fp8-keep
    without fp8 or not a regex, a preset that needs a checkpoint, missing files, a resolution that is not
    positive or not a multiple of the model's stride."""
    if kw.get("fp8_keep") is not None:
        from flashdreams.kernels.fp8_linear import fp8_exclusion

        prec = kw.get("precision") or ""
        if "fp8" not in (split_list(prec) if isinstance(prec, str) else prec):
            raise InvalidArgumentError("--fp8-keep needs --precision fp8 (it names the linears fp8 leaves in bf16)")
        fp8_exclusion(kw["fp8_keep"])
    # (an engine directory's attention and precision were fixed by fd-build; loading it checks them)
    if (
        kw.get("precision") == "fp8"
        and kw.get("attention") not in ("triton", "fa4")
        and not is_engine_dir(kw.get("source"))
    ):
        raise InvalidArgumentError(
            "--precision fp8 needs --attention triton or fa4 (the FP8 linears are our kernels; torch has no FP8 "
            "attention)"
        )
    for key, flag in (("source", "--checkpoint"), ("decoder_weights", "--decoder-weights")):
        if kw.get(key) is not None and not Path(kw[key]).exists():
            raise NotFoundError(f"{flag} '{kw[key]}' does not exist")
    for key in ("height", "width"):
        if kw.get(key) is not None and kw[key] <= 0:
            raise InvalidArgumentError(f"--{key} must be a positive number of pixels, got {kw[key]}")
    if is_engine_dir(kw["source"]):
        return  # an engine's shapes are fixed: the engine decides
    if kw["source"] is None and not kw["random_weights"] and kw["preset"] is not None:
        import flashdreams

        preset = flashdreams.get_preset(kw["preset"])
        if not getattr(preset, "builtin", True):  # unknown: let load decide
            raise InvalidArgumentError(
                f"preset '{preset.name}' needs a checkpoint: pass --checkpoint PATH, "
                "or --random-weights for a speed run with random weights"
            )
    if kw.get("height") is not None or kw.get("width") is not None:
        check_resolution(kw)


def check_resolution(kw: dict[str, Any]) -> None:
    """Refuse --height/--width the preset cannot take (multiples of 16 for the Wan families), before the
    model is built; the preset (`kw["preset"]`, or the default load picks) decides through its `latent_size`."""
    import flashdreams

    name = kw["preset"] or ("tiny" if kw["source"] is None else "self-forcing-1.3b")
    preset = flashdreams.get_preset(name) if isinstance(name, str) else name
    latent_size = getattr(preset, "latent_size", None)
    if latent_size is None:
        return
    try:
        latent_size(kw.get("height"), kw.get("width"))
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"--height/--width: {exc}") from None


def add_build_options(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add the engine-build options (fields of `BuildConfig`) to `parser` and return their group.

    Each defaults to its environment variable (FD_INDUCTOR_AUTOTUNE=1, FD_INDUCTOR_MODE,
    FD_AOTI_FORCE=1), read once by `build_config`; the flag wins.
    """
    g = parser.add_argument_group("build", "how engines are compiled (recorded in the manifest)")
    g.add_argument(
        "--autotune",
        action="store_true",
        default=None,
        help="inductor on CUDA: autotune the DiT's GEMMs (max-autotune; minutes more build time); "
        "default: FD_INDUCTOR_AUTOTUNE=1 or off",
    )
    g.add_argument(
        "--inductor-mode",
        choices=INDUCTOR_MODES,
        help="inductor: precompiled (loads with no trace or compile) or cache (the older path: Dynamo "
        "re-trace at load from Inductor's cache); default: FD_INDUCTOR_MODE or precompiled",
    )
    g.add_argument(
        "--aoti-force",
        action="store_true",
        default=None,
        help="aoti on CUDA: load the packages for the build check even where the loader is known to "
        "crash (torch 2.11); default: FD_AOTI_FORCE=1 or off",
    )
    return g


def build_config(args: argparse.Namespace, backend: str) -> BuildConfig:
    """The `BuildConfig` of `backend` from the build flags, with defaults from the environment."""
    return BuildConfig.from_env(
        backend, autotune=args.autotune, inductor_mode=args.inductor_mode, aoti_force=args.aoti_force
    )


_ASSIGNMENT = re.compile(r"\b([a-z_]+)=(True|None|'[^']*'|\"[^\"]*\"|[\w.-]+)")


def parser_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Python name -> flag, for every option of `parser` (its dest, and the aliases of load's arguments)."""
    flags = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings and a.dest != "help"}
    flags.update({alias: flags[dest] for alias, dest in ALIASES.items() if dest in flags})
    return flags


def flag_message(message: str, parser: argparse.ArgumentParser) -> str:
    """`message` with the Python arguments of `parser`'s options spelled as its flags.

    `random_weights=True` -> `--random-weights`, `attention='triton'` -> `--attention triton`,
    `decoder=None` -> `--decoder none`, a bare `decoder_weights` -> `--decoder-weights`. Library
    messages name Python arguments; a command-line user needs the flags.
    """
    flags = parser_flags(parser)

    def assignment(m: re.Match) -> str:
        flag = flags.get(m.group(1))
        if flag is None:
            return m.group(0)
        value = m.group(2).strip("'\"")
        if value == "True":
            return flag
        return f"{flag} {'none' if value == 'None' else value}"

    out = _ASSIGNMENT.sub(assignment, message)
    # Bare argument names with an underscore (single words like `preset` are ordinary English).
    names = sorted((k for k in flags if "_" in k), key=len, reverse=True)
    if names:
        # Not inside quotes: 'prompt_embeds' there names a tensor or an input, not an argument.
        pattern = r"(?<![-\w'\"])(" + "|".join(names) + r")\b(?![=./\w'\"-])"
        out = re.sub(pattern, lambda m: flags[m.group(1)], out)
    # "pass --force (force=True)" became "pass --force (--force)": say it once.
    return re.sub(r"(--[\w-]+(?: [^\s()]+)?) \(\1\)", r"\1", out)
