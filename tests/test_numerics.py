"""flashdreams.numerics: the one rel_l2 / max_abs_err / psnr, and that it stays free of runtime imports."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

from flashdreams.numerics import max_abs_err, psnr, rel_l2


def test_rel_l2_is_float64_over_the_whole_tensor():
    ref = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    out = ref + torch.tensor([[0.0, 0.5], [0.0, 0.0]])
    assert rel_l2(out, ref) == pytest.approx(0.5 / 5.0, rel=1e-15)
    # bf16 inputs are widened before the subtraction: 1 + 2^-7 vs 1 is not lost to rounding.
    a, b = torch.full((4,), 1 + 2**-7, dtype=torch.bfloat16), torch.ones(4, dtype=torch.bfloat16)
    assert rel_l2(a, b) == pytest.approx(2**-7, rel=1e-12)


def test_rel_l2_edge_cases():
    zero = torch.zeros(3)
    assert rel_l2(zero, zero) == 0.0
    assert rel_l2(torch.tensor([0.0, 3.0, 4.0]), zero) == 5.0  # zero reference: the absolute error
    assert math.isnan(rel_l2(torch.tensor([1.0, float("nan")]), torch.ones(2)))
    assert not rel_l2(torch.tensor([1.0, float("nan")]), torch.ones(2)) <= 1.0  # never passes a bound


def test_max_abs_err_and_psnr():
    ref = torch.tensor([0.0, 10.0, 20.0])
    out = torch.tensor([1.0, 7.0, 20.0])
    assert max_abs_err(out, ref) == 3.0
    assert max_abs_err(torch.empty(0), torch.empty(0)) == 0.0
    assert math.isnan(max_abs_err(torch.tensor([float("nan"), 0.0]), torch.zeros(2)))
    assert psnr(ref, ref) == math.inf
    mse = (1.0 + 9.0 + 0.0) / 3
    assert psnr(out, ref) == pytest.approx(10 * math.log10(255.0**2 / mse))
    assert psnr(out, ref, peak=1.0) == pytest.approx(10 * math.log10(1.0 / mse))


def test_parity_common_re_exports_the_same_function():
    from flashdreams.parity.common import rel_l2 as parity_rel_l2

    assert parity_rel_l2 is rel_l2


def test_numerics_imports_only_torch_and_the_standard_library():
    """Static check of the module's own imports (the package root's laziness is not its concern)."""
    import flashdreams.numerics as numerics

    tree = ast.parse(Path(numerics.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0] if node.level == 0 else ".")
    assert imported - {"__future__", "math"} == {"torch"}, f"flashdreams.numerics imports {sorted(imported)}"
