"""Multistep samplers as block-program ops: UniPC (order 2, bh2, data prediction, flow) with CFG.

The bidirectional Wan2.1 pipelines sample with `FlowUniPCMultistepScheduler`. Every scalar of
that solver (lambdas, h, expm1, the corrector's 2x2 solve) depends only on the sigma table,
so it is computed here on the host, once, in the reference's float32 arithmetic; what is left
per step are linear combinations of latent-sized buffers, emitted as `lincomb` ops next to the
two model `call`s of classifier-free guidance. The same ops run in a parity runner (through
`models.family.run_ops`) and inside a session. the fixture set's wan21.md ($FD_FIXTURES), "The UniPC solver".

Buffers (names per step k with `history=True`; rolling names otherwise):
  x_k       the model input (x_0 = the initial noise, which the caller provides)
  cond_k / uncond_k   the model outputs with the prompt / the negative prompt
  m_k       the data prediction x_k - sigma_k * v_k (v_k the guided prediction)
  xc_k      the corrected sample x'_k (x'_0 = x_0)
  t_k       the integer timestep of step k, an int64 [1] constant (`timestep_constants`)
  cfg_delta, cfg_v   temporaries: c - u and the guided prediction u + g*(c - u)
  out       the result (`latents` unless told otherwise)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.family import GraphSig, call, lincomb

NUM_TRAIN_TIMESTEPS = 1000
SOLVER_ORDER = 2


def unipc_schedule(steps: int, shift: float) -> tuple[list[int], list[float]]:
    """(timesteps, sigmas): S truncated integer timesteps and the S+1 float32 solver sigmas (last 0).

    As `set_timesteps(S, shift)` of the pipelines' scheduler: sigma_max = float32(0.999),
    u = linspace(sigma_max, 0, S+1)[:S] and sigma = s*u / (1 + (s-1)*u) in float64, t = int(1000*sigma).
    """
    if steps < 1:
        raise InvalidArgumentError(f"UniPC: need at least 1 sampling step; got {steps}")
    if not shift > 0:
        raise InvalidArgumentError(f"UniPC: shift must be positive; got {shift}")
    sigma_max = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))
    u = np.linspace(sigma_max, 0.0, steps + 1)[:-1]
    sigma = shift * u / (1 + (shift - 1) * u)
    timesteps = (sigma * NUM_TRAIN_TIMESTEPS).astype(np.int64)
    table = np.concatenate([sigma, [0.0]]).astype(np.float32)
    return [int(t) for t in timesteps], [float(s) for s in table]


def karras_schedule(
    steps: int, sigma_max: float = 200.0, sigma_min: float = 0.01, rho: float = 7.0
) -> tuple[list[int], list[float]]:
    """(timesteps, sigmas) of the Karras override (Cosmos-Predict2.5's `use_kerras_sigma_at_inference`).

    In float64: k_i = (sigma_max^(1/rho) + i/S * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho for
    i = 0..S (S + 1 evaluations), sigma_i = k_i / (1 + k_i), t_i = int(1000*sigma_i) (truncated);
    the sigma table [sigma_0..sigma_S, 0] is float32. `shift` does not apply here.
    """
    if steps < 1:
        raise InvalidArgumentError(f"Karras schedule: need at least 1 step; got {steps}")
    if not 0 < sigma_min < sigma_max or rho <= 0:
        raise InvalidArgumentError(
            f"Karras schedule: need 0 < sigma_min < sigma_max and rho > 0; got {sigma_min}, {sigma_max}, {rho}"
        )
    u = np.arange(steps + 1, dtype=np.float64) / steps
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    k = (hi + u * (lo - hi)) ** rho
    sigma = k / (1 + k)
    timesteps = (sigma * NUM_TRAIN_TIMESTEPS).astype(np.int64)
    table = np.concatenate([sigma, [0.0]]).astype(np.float32)
    return [int(t) for t in timesteps], [float(s) for s in table]


def solver_orders(steps: int) -> list[int]:
    """The predictor order of each step: 1, 2, ..., 2, 1 (lower order first and last)."""
    return [min(SOLVER_ORDER, steps - k, k + 1) for k in range(steps)]


def _f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    """log(alpha) - log(sigma) with alpha = 1 - sigma, float32 (+inf at sigma 0)."""
    return torch.log(1 - sigma) - torch.log(sigma)


class _Coefs:
    """The float32 scalars of one UniP / UniC update from sigma_s0 (previous) to sigma_t."""

    def __init__(self, sig: list[torch.Tensor], t: int, s0: int) -> None:
        self.sigma_t, self.sigma_s0 = sig[t], sig[s0]
        self.alpha_t = 1 - self.sigma_t
        self.lambda_s0 = _lambda(self.sigma_s0)
        self.h = _lambda(self.sigma_t) - self.lambda_s0
        self.hh = -self.h
        self.phi = torch.expm1(self.hh)  # h*phi_1(h) = e^hh - 1
        self.b_h = torch.expm1(self.hh)  # bh2
        self.ratio = self.sigma_t / self.sigma_s0
        self.a_phi = self.alpha_t * self.phi
        self.a_b = self.alpha_t * self.b_h

    def rk(self, sig: list[torch.Tensor], si: int) -> torch.Tensor:
        return (_lambda(sig[si]) - self.lambda_s0) / self.h

    def corrector_rhos(self, rk: torch.Tensor) -> torch.Tensor:
        """Solve [[1, 1], [r, 1]] rho = b (the order-2 UniC weights), float32 like the reference."""
        h_phi_k = self.phi / self.hh - 1
        b1 = h_phi_k * 1 / self.b_h
        h_phi_k = h_phi_k / self.hh - 1 / 2
        b2 = h_phi_k * 2 / self.b_h
        rks = torch.stack([rk, torch.ones((), dtype=torch.float32)])
        r = torch.stack([torch.ones(2, dtype=torch.float32), rks])
        return torch.linalg.solve(r, torch.stack([b1, b2]))


def _terms(coefs: Mapping[str, float]) -> list[tuple[float, str]]:
    """Drop zero coefficients (0 * x' at the last step), keep the order given."""
    return [(c, n) for n, c in coefs.items() if c != 0.0]


def _add(d: dict[str, float], name: str, c: float) -> None:
    d[name] = d.get(name, 0.0) + c


class _Names:
    """Buffer names: one per step (history) or a small rolling set (what a session keeps)."""

    def __init__(self, history: bool) -> None:
        self.history = history

    def _n(self, base: str, k: int, period: int) -> str:
        return f"{base}_{k if self.history else k % period}"

    def x(self, k: int) -> str:
        return self._n("x", k, 2)

    def m(self, k: int) -> str:
        return self._n("m", k, 3)

    def xc(self, k: int) -> str:
        return self._n("xc", k, 2)

    def cond(self, k: int) -> str:
        return self._n("cond", k, 1)

    def uncond(self, k: int) -> str:
        return self._n("uncond", k, 1)


def timestep_name(k: int) -> str:
    return f"t_{k}"


def timestep_constants(timesteps: Sequence[int], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The `t_k` buffers the ops read: int64 [1] each (the model is conditioned on the integer)."""
    return {timestep_name(k): torch.tensor([int(t)], dtype=torch.int64, device=device) for k, t in enumerate(timesteps)}


def dit_graph_sig(graph: str = "dit", args: Sequence[str] = ("x", "t", "context"), out: str = "flow") -> GraphSig:
    """The signature of the model call the ops use (one output: the flow prediction)."""
    return GraphSig(graph, tuple(args), (out,))


def unipc_cfg_ops(
    sigmas: Sequence[float],
    guide_scale: float,
    *,
    graph: str = "dit",
    cond_args: Mapping[str, str] | None = None,
    uncond_args: Mapping[str, str] | None = None,
    latent_arg: str = "x",
    timestep_arg: str = "t",
    output: str = "flow",
    out: str = "latents",
    history: bool = True,
    batched_outs: tuple[str, str] | None = None,
    guidance_base: str = "uncond",
    keep_velocity: bool = False,
) -> list[list[dict]]:
    """The ops of each of the S = len(sigmas) - 1 steps (UniPC order 2, bh2, with CFG).

    Step k: two calls of `graph` on x_k at t_k (with `cond_args` / `uncond_args`, the
    non-latent inputs such as the contexts), v = u + g*(c - u), m_k = x_k - sigma_k*v, the
    corrector x'_k (k >= 1), then the predictor x_{k+1} (`out` at the last step, where it
    equals m_{S-1}). The caller provides x_0 and the `t_k` constants.

    With `batched_outs` (two output names of `graph`) the guidance pair is one call with
    `cond_args` that returns both predictions (the cond and uncond rows of one batch);
    `uncond_args` is then unused.

    `guidance_base`: "uncond" gives Wan's v = u + g*(c - u); "cond" gives Cosmos' v = c + g*(c - u).
    `keep_velocity` (with `history`) keeps each step's guided velocity as `v_k` (else the
    temporary `cfg_v`).
    """
    if guidance_base not in ("uncond", "cond"):
        raise InvalidArgumentError(f"UniPC: guidance_base must be 'uncond' or 'cond'; got {guidance_base!r}")
    if len(sigmas) < 2:
        raise InvalidArgumentError(f"UniPC: the sigma table needs S+1 >= 2 entries; got {len(sigmas)}")
    if sigmas[-1] != 0.0 or any(not 0 < s < 1 for s in sigmas[:-1]):
        raise InvalidArgumentError("UniPC: sigmas must lie in (0, 1) and end with 0 (final_sigmas_type 'zero')")
    cond_args = dict(cond_args if cond_args is not None else {"context": "context"})
    uncond_args = dict(uncond_args if uncond_args is not None else {"context": "context_null"})
    steps = len(sigmas) - 1
    sig = [_f32(s) for s in sigmas]
    g = float(torch.tensor(guide_scale, dtype=torch.float32))
    orders = solver_orders(steps)
    nm = _Names(history)
    program: list[list[dict]] = []
    for k in range(steps):
        ops: list[dict] = []
        x = nm.x(k)
        if batched_outs is not None:
            call_args = {latent_arg: x, timestep_arg: timestep_name(k), **cond_args}
            ops.append(call(graph, call_args, dict(zip(batched_outs, (nm.cond(k), nm.uncond(k))))))
        else:
            for args, dst in ((cond_args, nm.cond(k)), (uncond_args, nm.uncond(k))):
                call_args = {latent_arg: x, timestep_arg: timestep_name(k), **args}
                ops.append(call(graph, call_args, {output: dst}))
        # CFG as the reference evaluates it: base + g * (c - u), then m = x - sigma * v.
        v = f"v_{k}" if keep_velocity and history else "cfg_v"
        base = nm.uncond(k) if guidance_base == "uncond" else nm.cond(k)
        ops.append(lincomb("cfg_delta", [(1.0, nm.cond(k)), (-1.0, nm.uncond(k))]))
        ops.append(lincomb(v, [(1.0, base), (g, "cfg_delta")]))
        ops.append(lincomb(nm.m(k), [(1.0, x), (-float(sig[k]), v)]))
        if k == 0:
            ops.append({"op": "copy", "src": x, "out": nm.xc(k)})
        else:
            ops.append(lincomb(nm.xc(k), _terms(_corrector(sig, k, orders[k - 1], nm))))
        dst = out if k == steps - 1 else nm.x(k + 1)
        ops.append(lincomb(dst, _terms(_predictor(sig, k, orders[k], nm))))
        program.append(ops)
    return program


def _corrector(sig: list[torch.Tensor], k: int, order: int, nm: _Names) -> dict[str, float]:
    """x'_k = ratio*x'_{k-1} - a*phi*m_{k-1} - a*B*([rho_0*D] + rho_last*(m_k - m_{k-1}))."""
    c = _Coefs(sig, k, k - 1)
    terms: dict[str, float] = {}
    _add(terms, nm.xc(k - 1), float(c.ratio))
    _add(terms, nm.m(k - 1), -float(c.a_phi))
    a_b = float(c.a_b)
    if order == 1:
        rho_last = float(torch.tensor(0.5, dtype=torch.float32))
    else:
        rk = c.rk(sig, k - 2)
        rhos = c.corrector_rhos(rk)
        rho0, rho_last, r = float(rhos[0]), float(rhos[1]), float(rk)
        # D = (m_{k-2} - m_{k-1}) / r
        _add(terms, nm.m(k - 2), -a_b * rho0 / r)
        _add(terms, nm.m(k - 1), a_b * rho0 / r)
    _add(terms, nm.m(k), -a_b * rho_last)
    _add(terms, nm.m(k - 1), a_b * rho_last)
    return terms


def _predictor(sig: list[torch.Tensor], k: int, order: int, nm: _Names) -> dict[str, float]:
    """x_{k+1} = ratio*x'_k - a*phi*m_k [- a*B*0.5*(m_{k-1} - m_k)/r for order 2]."""
    c = _Coefs(sig, k + 1, k)
    terms: dict[str, float] = {}
    _add(terms, nm.xc(k), float(c.ratio))
    _add(terms, nm.m(k), -float(c.a_phi))
    if order == 2:
        r = float(c.rk(sig, k - 1))
        w = float(c.a_b) * 0.5 / r
        _add(terms, nm.m(k - 1), -w)
        _add(terms, nm.m(k), w)
    return terms
