"""The arena's clamp + palette snap as one kernel, against its torch twin and inside the arena step."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from flashdreams.errors import InvalidArgumentError  # noqa: E402
from flashdreams.kernels import triton_available  # noqa: E402
from flashdreams.kernels._common import poisoned_outputs  # noqa: E402
from flashdreams.kernels.palette_snap import palette_snap, palette_snap_reference  # noqa: E402
from flashdreams.models.families.arena import start_frames  # noqa: E402
from flashdreams.models.families.arena.model import ArenaConfig, ArenaNet, ArenaStep  # noqa: E402
from flashdreams.models.families.arena.world import palette  # noqa: E402
from flashdreams.numerics import rel_l2  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not triton_available(DEVICE), reason="needs CUDA or TRITON_INTERPRET=1")
SETTLE = 0.02


def _near_palette(shape, seed):
    """Pixels scattered around the palette colors (some within `settle`, some not) and out of [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    pal = palette()
    n = shape[-1] * shape[-2] * (torch.Size(shape[:-3]).numel())
    pick = pal[torch.randint(0, pal.shape[0], (n,), generator=gen)]  # [n, 3]
    noise = torch.randn(n, 3, generator=gen) * torch.rand(n, 1, generator=gen) * 0.3
    pix = (pick + noise).view(*shape[:-3], shape[-2], shape[-1], 3).movedim(-1, -3)
    return pix.contiguous().to(DEVICE)


@pytest.mark.parametrize("shape", [(2, 4, 3, 64, 64), (1, 3, 5, 7), (3, 2, 3, 33, 31)])
def test_matches_the_twin_exactly(shape):
    x = _near_palette(shape, seed=sum(shape))
    pal = palette().to(DEVICE)
    with poisoned_outputs():
        y = palette_snap(x, pal, SETTLE)
    want = palette_snap_reference(x, pal, SETTLE)
    assert torch.equal(y, want)
    snapped = (y != x.clamp(0, 1)).any(dim=-3)
    assert 0.05 < snapped.float().mean() < 0.95  # the data exercises both branches
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0


def test_agent_colors_are_never_snapped_and_ties_keep_the_first_color():
    pal = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, 0.5, 0.6], [0.5, 0.5, 0.4]])
    x = torch.tensor([[0.999, 0.999, 0.0], [0.5, 0.5, 0.5], [0.5, 0.5, 0.55]]).T.reshape(3, 1, 3)  # [3, H=1, W=3]
    y = palette_snap(x.to(DEVICE), pal.to(DEVICE), SETTLE).cpu()
    assert torch.equal(y[:, 0, 0], x[:, 0, 0])  # nearest is the agent's yellow: kept as drawn
    assert torch.equal(y[:, 0, 1], pal[2])
    assert torch.equal(y[:, 0, 2], pal[2])  # equally near rows 2 and 3: the first (row 2) wins
    assert torch.equal(palette_snap_reference(x, pal, SETTLE), y)


@pytest.mark.parametrize(
    "video, pal, message",
    [
        (torch.zeros(1, 3, 4, 4, dtype=torch.float16), palette(), "dtype"),
        (torch.zeros(1, 4, 4, 4), palette(), "3, H, W"),
        (torch.zeros(1, 3, 4, 4), palette()[:, :2], "palette"),
        (torch.zeros(1, 3, 4, 4), palette()[:1], "agent's two colors"),
    ],
)
def test_bad_arguments_are_refused(video, pal, message):
    with pytest.raises(InvalidArgumentError, match=message):
        palette_snap(video.to(DEVICE), pal.to(DEVICE), SETTLE)


def test_the_arena_step_with_kernels_equals_the_torch_form():
    """impl "triton": the fused residual + norm passes and the palette kernel; "torch": the modules."""
    cfg = ArenaConfig(layers=2)
    torch.manual_seed(0)
    net = ArenaNet(cfg).to(DEVICE).eval()
    with torch.no_grad():
        net.head.weight.normal_(0, 0.05)  # not the zero init: the frames change and some pixels leave [0, 1]
    starts = start_frames(3).to(DEVICE)
    args = (
        torch.rand(2, 3, 64, 64, device=DEVICE),
        torch.tensor([0, 3], device=DEVICE),
        (torch.rand(2, cfg.frames, 4, device=DEVICE) > 0.5).float(),
        torch.zeros(2, 3, 64, 64, device=DEVICE),
        torch.randn(2, 1, device=DEVICE),
    )
    with torch.no_grad():
        fused = ArenaStep(net, starts, palette(), impl="triton").to(DEVICE)(*args)
        plain = ArenaStep(net, starts, palette(), impl="torch").to(DEVICE)(*args)
        raw = net(args[0], args[2])
    assert float(raw.min()) < 0 or float(raw.max()) > 1  # the clamp matters
    for a, b in zip(fused, plain):
        # float32 norms in another summation order; a pixel at the snap threshold could flip
        assert rel_l2(a, b) < 1e-5
        assert ((a - b).abs() > 1e-3).float().mean() < 1e-3
    with pytest.raises(InvalidArgumentError, match="impl 'cuda'"):
        ArenaStep(net, starts, palette(), impl="cuda")
