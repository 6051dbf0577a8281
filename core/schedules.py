"""Embedding schedules: which conditioning the denoiser sees at each timestep.

A schedule maps an integer DDPM timestep t ∈ [0, 999] to either a stage index s ∈ {0..9} (use the MSI stage
conditioning c_s, s = ⌊t/100⌋) or ``None`` (use the null-text conditioning ∅). Stage conditionings are used
for t > ``switch_timestep``; ∅ for t ≤ ``switch_timestep``. ``switch_timestep = -1`` uses stages everywhere.

The same schedule is also expressed as ComfyUI percent ranges, p = 1 − t/999, which tile [0, 1] with no gap
and no overlap. Range boundaries sit at half-integer timesteps so that every integer timestep falls into
exactly one range.
"""
from __future__ import annotations

from dataclasses import dataclass

from .diffusion import NUM_STAGES, NUM_TRAIN_TIMESTEPS, STAGE_WIDTH, stage_of_timestep

MAX_T = NUM_TRAIN_TIMESTEPS - 1  # 999

#: Official switch points (docs/method.md §3). Recovery uses stage conditionings at every step.
PRESET_SWITCH_TIMESTEPS = {"anonymize": 400, "hide": 600, "recover": -1}


def percent_of_timestep(t: float) -> float:
    """ComfyUI's sampling percent of a (possibly fractional) timestep: p = 1 − t/999, clamped to [0, 1]."""
    return min(max(1.0 - t / MAX_T, 0.0), 1.0)


@dataclass(frozen=True)
class PercentRange:
    """One conditioning entry's active range. ``stage`` None means the null conditioning.

    ``start_percent`` < ``end_percent``; the entry is active for timesteps in (t_low, t_high] with
    t_high = (1 − start)·999 and t_low = (1 − end)·999.
    """

    stage: int | None
    start_percent: float
    end_percent: float


@dataclass(frozen=True)
class EmbeddingSchedule:
    """Stage conditionings for t > switch_timestep, null text at and below it."""

    switch_timestep: int = 400
    stage_width: int = STAGE_WIDTH

    def __post_init__(self):
        if not -1 <= self.switch_timestep <= MAX_T:
            raise ValueError(f"switch_timestep must be in [-1, {MAX_T}], got {self.switch_timestep}")
        if self.stage_width * NUM_STAGES != NUM_TRAIN_TIMESTEPS:
            raise ValueError("stage_width × 10 stages must cover the 1000 training timesteps")

    @classmethod
    def preset(cls, task: str) -> "EmbeddingSchedule":
        """``anonymize`` (t_sw = 400), ``hide`` (600) or ``recover`` (stages at every step)."""
        try:
            return cls(PRESET_SWITCH_TIMESTEPS[task])
        except KeyError:
            raise ValueError(f"unknown task {task!r}; expected one of {sorted(PRESET_SWITCH_TIMESTEPS)}") from None

    def stage_for(self, t: int) -> int | None:
        """Stage index to use at integer timestep t, or None for the null conditioning."""
        if t <= self.switch_timestep:
            return None
        return stage_of_timestep(t, self.stage_width)

    def percent_ranges(self) -> list[PercentRange]:
        """Ranges ordered from high noise (percent 0) to low noise (percent 1); they tile [0, 1].

        Stages wholly at or below the switch are omitted; the null range is omitted for recovery.
        """
        ranges: list[PercentRange] = []
        for s in reversed(range(NUM_STAGES)):
            t_high = s * self.stage_width + self.stage_width - 1 + 0.5
            t_low = max(s * self.stage_width - 0.5, self.switch_timestep + 0.5)
            if t_low >= t_high:
                continue
            ranges.append(PercentRange(s, percent_of_timestep(t_high), percent_of_timestep(t_low)))
        if self.switch_timestep >= 0:
            ranges.append(PercentRange(None, percent_of_timestep(self.switch_timestep + 0.5), 1.0))
        return ranges


def check_tiling(ranges: list[PercentRange], tol: float = 1e-9) -> None:
    """Raise ValueError unless the ranges, sorted by start, tile [0, 1] with no gap and no overlap."""
    if not ranges:
        raise ValueError("empty schedule: at least one conditioning range is required")
    ordered = sorted(ranges, key=lambda r: r.start_percent)
    edge = 0.0
    for r in ordered:
        if abs(r.start_percent - edge) > tol:
            kind = "gap" if r.start_percent > edge else "overlap"
            raise ValueError(f"schedule has a {kind} at percent {edge:.6f} (next range starts at {r.start_percent:.6f})")
        if r.end_percent <= r.start_percent:
            raise ValueError(f"empty range for stage {r.stage}: [{r.start_percent}, {r.end_percent}]")
        edge = r.end_percent
    if abs(edge - 1.0) > tol:
        raise ValueError(f"schedule stops at percent {edge:.6f}; it must reach 1.0")
