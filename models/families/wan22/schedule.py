"""The two-expert few-step schedule of causal Wan2.2 (FastVideo's `CausalDMDDenosingStage` MoE path).

The timesteps and sigmas are Self-Forcing's (models/scheduler.py: shift-5 tables, warped
steps, sigma = nearest table entry). New here, all fixed when the plan is built:
  * step i runs the high-noise expert if t_i >= boundary = boundary_ratio * 1000, else the
    low-noise one; the high-noise steps form a prefix (the timesteps decrease);
  * a high-noise step predicts the latent at the boundary, x0 = x - (sigma_i - sigma_B) v, and
    re-noises towards it: x = a x0 + c noise, a = (1 - s') / (1 - sigma_B),
    c = sqrt(s'^2 - (a sigma_B)^2), in float32 on the float32 sigmas;
  * the last high-noise step hands its boundary latent to the low-noise expert as is (its
    noise draw is made but not used);
  * a low-noise step is Self-Forcing's: x0 = x - sigma_i v, x = (1 - s') x0 + s' noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.scheduler import NUM_TRAIN_TIMESTEPS, FlowSchedule, flow_match_tables, sigma_of

HIGH, LOW = "high", "low"


def _f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


@dataclass(frozen=True)
class StepRule:
    """One denoising step: its expert, x0 = x - x0_coef * v (float64), and how x for the next step is made.

    `renoise` is None (the last step), "copy" (x = x0) or (a, c): x = a*x0 + c*noise (float32).
    """

    expert: str
    t: float
    x0_coef: float
    renoise: tuple[float, float] | str | None


@dataclass(frozen=True)
class MoESchedule:
    """The denoising steps of one block with their experts and update coefficients, then the commit."""

    base: FlowSchedule
    boundary: float
    sigma_boundary: float
    steps: tuple[StepRule, ...]

    @classmethod
    def from_reference(
        cls,
        denoising_step_list: list[int] | tuple[int, ...],
        shift: float,
        warp: bool,
        boundary_ratio: float,
        context_noise: float = 0.0,
    ) -> MoESchedule:
        base = FlowSchedule.from_reference(denoising_step_list, shift, warp, context_noise)
        ts = base.timesteps
        if any(b > a for a, b in zip(ts, ts[1:])):
            raise InvalidArgumentError(f"schedule: the two-expert loop needs decreasing timesteps, got {list(ts)}")
        boundary = float(boundary_ratio) * NUM_TRAIN_TIMESTEPS
        sigmas, table = flow_match_tables(shift)
        sb = sigma_of(boundary, sigmas, table)
        n_high = sum(1 for t in ts if t >= boundary)
        steps = []
        for i, (t, s) in enumerate(zip(ts, base.sigmas)):
            high = i < n_high
            x0_coef = (s - sb) if high else s  # float64 from the float32 table values, as the reference
            if i == len(ts) - 1:
                rule = None
            elif high and i == n_high - 1:
                rule = "copy"
            elif high:
                sg = torch.tensor(base.sigmas[i + 1], dtype=torch.float32)
                sbt = torch.tensor(sb, dtype=torch.float32)
                a = (1 - sg) / (1 - sbt)
                c = torch.sqrt(sg * sg - (a * sbt) ** 2)
                rule = (float(a), float(c))
            else:
                sg = base.sigmas[i + 1]
                rule = (_f32(1.0 - sg), sg)
            steps.append(StepRule(HIGH if high else LOW, t, x0_coef, rule))
        return cls(base, boundary, sb, tuple(steps))

    @property
    def timesteps(self) -> tuple[float, ...]:
        return self.base.timesteps

    @property
    def sigmas(self) -> tuple[float, ...]:
        return self.base.sigmas

    @property
    def context_noise(self) -> float:
        return self.base.context_noise

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def num_high(self) -> int:
        return sum(1 for s in self.steps if s.expert == HIGH)

    def to_dict(self) -> dict:
        return {
            **self.base.to_dict(),
            "boundary_timestep": self.boundary,
            "sigma_boundary": self.sigma_boundary,
            "experts": [s.expert for s in self.steps],
        }
