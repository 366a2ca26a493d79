"""Reading parity fixtures (the fixture set's README.md ($FD_FIXTURES)) and comparing against them.

A fixture is a directory with `fixture.json`, `io.safetensors` and either
`weights.safetensors` or `weights.recipe.json`; a recipe is materialised once
into a cache folder with the fixture set's own `materialize.py`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from flashdreams.errors import InvalidArgumentError, NotFoundError
from flashdreams.numerics import rel_l2  # re-exported: export/build.py and the runners import it from here

ROLES = ("input", "input, random draws", "expected", "debug", "info")


@dataclass(frozen=True)
class Check:
    """One compared tensor: its rel. L2 error against the reference and the bound.

    `reason` is set on a check that failed without a comparison (an `[expected]` tensor that the
    runner did not compare); its `rel_l2` is NaN.
    """

    name: str
    rel_l2: float
    tolerance: float
    role: str = "expected"
    reason: str = ""

    @property
    def passed(self) -> bool:
        # NaN compares false, so a NaN output never passes.
        return self.rel_l2 <= self.tolerance

    @property
    def tensor(self) -> str:
        """The fixture tensor compared: the name without a qualifier such as `[denoise calls]`."""
        return self.name.partition("[")[0]


@dataclass
class Fixture:
    """A loaded fixture: metadata, every io tensor, and where its weights are."""

    path: Path
    meta: dict
    tensors: dict[str, torch.Tensor]
    weights_path: Path
    roles: dict[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def config(self) -> dict:
        return self.meta["config"]

    @property
    def params(self) -> dict:
        return self.meta.get("params", {})

    @property
    def tolerance(self) -> float:
        return float(self.meta["tolerance"]["rel_l2"])

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise InvalidArgumentError(
                f"fixture '{self.path}': io.safetensors has no tensor '{name}' "
                f"(has {sorted(self.tensors)[:8]}...); is the fixture malformed?"
            ) from None

    def has(self, name: str) -> bool:
        """Whether io.safetensors holds `name` (runners compare only the outputs a fixture has)."""
        return name in self.tensors

    def declared(self, role: str) -> list[str]:
        """The tensors fixture.json gives `role` ("expected", "debug", ...), in its order."""
        return [name for name, r in self.roles.items() if r == role]

    def check_present(self, outputs: dict[str, Callable[[], torch.Tensor]]) -> list[Check]:
        """One Check per output the fixture holds; `outputs[name]()` runs only for those.

        A fixture may leave an output out (a TAEHV fixture without the demo stream): the runner
        then skips it instead of failing on the missing reference.
        """
        return [self.check(name, make()) for name, make in outputs.items() if self.has(name)]

    def weights(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.weights_path))

    def check(self, name: str, out: torch.Tensor) -> Check:
        """Compare `out` with the stored tensor `name` under the fixture's tolerance."""
        ref = self[name]
        if tuple(out.shape) != tuple(ref.shape):
            raise InvalidArgumentError(
                f"fixture '{self.path.name}': output '{name}' has shape {tuple(out.shape)}, "
                f"the reference {tuple(ref.shape)}"
            )
        return Check(name, rel_l2(out, ref), self.tolerance, self.roles.get(name, "expected"))


def fixtures_root() -> Path | None:
    """Where the shared fixtures are: $FD_FIXTURES, else ../shared/fixtures beside the repo."""
    env = os.environ.get("FD_FIXTURES")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    candidate = repo.parent / "shared" / "fixtures"
    return candidate if candidate.is_dir() else None


def _role_of(description: str) -> str:
    if description.startswith("["):
        return description[1 : description.index("]")]
    return "info"


def _materialize_recipe(path: Path) -> Path:
    """Materialise a recipe fixture into a cache folder; returns the folder."""
    script = path.parent / "materialize.py"
    if not script.is_file():
        raise NotFoundError(
            f"fixture '{path}' stores its weights as a recipe, but '{script}' "
            "(the fixture set's materializer) is missing"
        )
    recipe = json.loads((path / "weights.recipe.json").read_text())
    cache = Path(os.environ.get("FD_FIXTURE_CACHE", Path(tempfile.gettempdir()) / "flashdreams-fixtures"))
    out = cache / f"{path.name}-{recipe['sha256'][:16]}"
    if not (out / "weights.safetensors").is_file():
        spec = importlib.util.spec_from_file_location("_fd_fixture_materialize", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.materialize(str(path), str(out))
    return out


def load_fixture(path: str | os.PathLike) -> Fixture:
    """Load a fixture directory; refuses a malformed one with a named error."""
    path = Path(path)
    meta_path = path / "fixture.json"
    if not meta_path.is_file():
        raise NotFoundError(f"'{path}' is not a fixture directory: it has no fixture.json")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(f"fixture '{path}': fixture.json is not valid JSON ({exc})") from None
    for key in ("kind", "config", "tensors", "tolerance"):
        if key not in meta:
            raise InvalidArgumentError(f"fixture '{path}': fixture.json has no '{key}' entry")
    if (path / "weights.safetensors").is_file():
        weights = path / "weights.safetensors"
    elif (path / "weights.recipe.json").is_file():
        weights = _materialize_recipe(path) / "weights.safetensors"
    else:
        raise NotFoundError(f"fixture '{path}': neither weights.safetensors nor weights.recipe.json")
    io_path = path / "io.safetensors"
    if not io_path.is_file():
        raise NotFoundError(f"fixture '{path}': io.safetensors is missing")
    tensors = load_file(str(io_path))
    roles = {name: _role_of(desc) for name, desc in meta["tensors"].items()}
    missing = [n for n in roles if n not in tensors]
    if missing:
        raise InvalidArgumentError(f"fixture '{path}': fixture.json lists tensors not in io.safetensors: {missing}")
    return Fixture(path=path, meta=meta, tensors=tensors, weights_path=weights, roles=roles)


def uncompared_expected(fixture: Fixture, checks: list[Check]) -> list[Check]:
    """A failed Check, with a reason, for each `[expected]` tensor that no check in `checks` compared.

    Every `[expected]` tensor must match within the tolerance (the fixture set's README.md ($FD_FIXTURES),
    "File format"), so one the runner skipped is a failure, not a silent pass.
    """
    compared = {c.tensor for c in checks}
    return [
        Check(
            name,
            math.nan,
            fixture.tolerance,
            "expected",
            reason=f"the {fixture.kind} runner does not compare this [expected] tensor",
        )
        for name in fixture.declared("expected")
        if name not in compared
    ]


Runner = Callable[..., list[Check]]
RUNNERS: dict[str, Runner] = {}


def register(kind: str) -> Callable[[Runner], Runner]:
    """Register the runner of one fixture kind: `fn(fixture, **options) -> [Check]`."""

    def deco(fn: Runner) -> Runner:
        RUNNERS[kind] = fn
        return fn

    return deco
