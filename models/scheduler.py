"""Few-step flow-matching schedule of the causal Wan models (Self-Forcing's FlowMatchScheduler).

Exactly as the reference wrapper configures it: 1000 training steps, sigma_max 1,
sigma_min 0, `extra_one_step`, a `shift`, float32 tables. The sigma of any timestep
is the nearest table entry (first index on ties), never t/1000.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashdreams.errors import InvalidArgumentError

NUM_TRAIN_TIMESTEPS = 1000


def flow_match_tables(shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas, timesteps), float32 [1000] each, as `set_timesteps(1000, training=True)` builds them."""
    s = torch.linspace(1.0, 0.0, NUM_TRAIN_TIMESTEPS + 1, dtype=torch.float32)[:-1]
    sigmas = shift * s / (1 + (shift - 1) * s)
    return sigmas, sigmas * NUM_TRAIN_TIMESTEPS


def sigma_of(t: float, sigmas: torch.Tensor, timesteps: torch.Tensor) -> float:
    """sigma of the table entry nearest to t (differences in float64, first index on ties)."""
    k = int(torch.argmin((timesteps.double() - float(t)).abs()))
    return float(sigmas[k])


@dataclass(frozen=True)
class FlowSchedule:
    """What one block runs: the denoising timesteps and their sigmas, then the commit timestep."""

    timesteps: tuple[float, ...]
    sigmas: tuple[float, ...]
    context_noise: float
    shift: float

    @classmethod
    def from_reference(
        cls,
        denoising_step_list: list[int] | tuple[int, ...],
        shift: float,
        warp: bool,
        context_noise: float = 0.0,
    ) -> FlowSchedule:
        """The schedule `CausalInferencePipeline` derives from its config."""
        if not denoising_step_list:
            raise InvalidArgumentError("schedule: denoising_step_list is empty")
        sigmas, table = flow_match_tables(shift)
        if warp:
            ext = torch.cat([table, torch.zeros(1)])
            bad = [s for s in denoising_step_list if not 0 < int(s) <= NUM_TRAIN_TIMESTEPS]
            if bad:
                raise InvalidArgumentError(f"schedule: warped steps must lie in (0, 1000]; got {bad}")
            ts = [float(ext[NUM_TRAIN_TIMESTEPS - int(s)]) for s in denoising_step_list]
        else:
            ts = [float(torch.tensor(float(s), dtype=torch.float32)) for s in denoising_step_list]
        return cls(
            timesteps=tuple(ts),
            sigmas=tuple(sigma_of(t, sigmas, table) for t in ts),
            context_noise=float(context_noise),
            shift=float(shift),
        )

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def to_dict(self) -> dict:
        return {
            "timesteps": list(self.timesteps),
            "sigmas": list(self.sigmas),
            "context_noise": self.context_noise,
            "shift": self.shift,
        }


def x0_from_flow(x: torch.Tensor, flow: torch.Tensor, sigma: float) -> torch.Tensor:
    """x0 = x - sigma * flow, computed in float64 and returned as float32 (the reference's rule)."""
    return (x.double() - sigma * flow.double()).float()


def renoise(x0: torch.Tensor, noise: torch.Tensor, sigma_next: float) -> torch.Tensor:
    """x = (1 - sigma') x0 + sigma' noise, in float32."""
    return (1 - sigma_next) * x0 + sigma_next * noise
