#!/usr/bin/env python3
"""Reference noise schedules and timesteps from diffusers' DDIMScheduler.

Run by hand, never in CI (needs torch + diffusers):

    python3 -m venv .venv-oracle && .venv-oracle/bin/pip install torch diffusers numpy
    .venv-oracle/bin/python scripts/make_schedule_refs.py

Writes tests/fixtures/schedule_refs.json, read by tests/schedule_refs.rs. Each case records the
timesteps diffusers' `set_timesteps` returns, verbatim (including the spurious trailing -1 it
yields for some trailing step counts); alphas_cumprod are stored once per noise schedule, twice:

- `alphas_cumprod`: what DDIMScheduler holds, computed in f32. Near a zero-SNR terminal timestep
  its f32 cancellation in sqrt(a) - sqrt(a_T) leaves it up to ~4e-5 (relative) off the exact value.
- `alphas_cumprod_f64`: the same algorithm in f64: the betas by diffusers' formulas (one line each,
  below) and diffusers' own `rescale_zero_terminal_snr`, which is dtype-agnostic.
"""

import json
import math
import pathlib

import diffusers
import numpy as np
import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "schedule_refs.json"

NOISE_SCHEDULES = [
    # (beta_schedule, beta_start, beta_end, num_train_timesteps)
    ("scaled_linear", 0.00085, 0.012, 1000),  # Stable Diffusion 1.x / 2.x
    ("linear", 0.0001, 0.02, 1000),  # DDPM
    ("squaredcos_cap_v2", 0.0001, 0.02, 1000),  # improved DDPM (range unused)
    ("scaled_linear", 0.001, 0.015, 200),  # a short, non-standard T
]
STEPS = [1, 2, 3, 7, 10, 20, 25, 30, 50, 61, 100, 103, 121, 199, 200, 250, 333, 999, 1000]
SPACINGS = ["leading", "linspace", "trailing"]
OFFSETS = [0, 1]


def betas_f64(beta_schedule: str, beta_start: float, beta_end: float, train_timesteps: int) -> torch.Tensor:
    """DDIMScheduler.__init__'s betas, in f64 instead of f32."""
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, train_timesteps, dtype=torch.float64)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, train_timesteps, dtype=torch.float64) ** 2
    # betas_for_alpha_bar(alpha_transform_type="cosine", max_beta=0.999), before its f32 cast.
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor(
        [min(1 - alpha_bar((i + 1) / train_timesteps) / alpha_bar(i / train_timesteps), 0.999) for i in range(train_timesteps)],
        dtype=torch.float64,
    )


def main() -> None:
    schedules = []
    cases = []
    for beta_schedule, beta_start, beta_end, train_timesteps in NOISE_SCHEDULES:
        for zero_snr in (False, True):
            base = dict(
                beta_schedule=beta_schedule,
                beta_start=beta_start,
                beta_end=beta_end,
                num_train_timesteps=train_timesteps,
                rescale_betas_zero_snr=zero_snr,
                clip_sample=False,
            )
            scheduler = DDIMScheduler(**base)
            exact = betas_f64(beta_schedule, beta_start, beta_end, train_timesteps)
            if zero_snr:
                exact = rescale_zero_terminal_snr(exact)
            exact_cumprod = torch.cumprod(1.0 - exact, dim=0)
            schedule_id = len(schedules)
            schedules.append(
                dict(
                    id=schedule_id,
                    beta_schedule=beta_schedule,
                    beta_start=beta_start,
                    beta_end=beta_end,
                    num_train_timesteps=train_timesteps,
                    rescale_betas_zero_snr=zero_snr,
                    alphas_cumprod=[float(a) for a in scheduler.alphas_cumprod],
                    alphas_cumprod_f64=[float(a) for a in exact_cumprod],
                )
            )
            for spacing in SPACINGS:
                for offset in OFFSETS:
                    if offset and spacing != "leading":
                        continue  # diffusers applies steps_offset to leading only
                    for steps in STEPS:
                        if steps > train_timesteps:
                            continue
                        # Timesteps do not depend on set_alpha_to_one: alternate it for coverage.
                        set_alpha_to_one = steps % 2 == 0
                        s = DDIMScheduler(
                            **base,
                            timestep_spacing=spacing,
                            steps_offset=offset,
                            set_alpha_to_one=set_alpha_to_one,
                        )
                        s.set_timesteps(steps)
                        cases.append(
                            dict(
                                schedule=schedule_id,
                                set_alpha_to_one=set_alpha_to_one,
                                spacing=spacing,
                                steps=steps,
                                steps_offset=offset,
                                timesteps=[int(t) for t in s.timesteps],
                                final_alpha_cumprod=float(s.final_alpha_cumprod),
                            )
                        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    refs = dict(
        generator="scripts/make_schedule_refs.py",
        versions=dict(diffusers=diffusers.__version__, torch=torch.__version__, numpy=np.__version__),
        schedules=schedules,
        cases=cases,
    )
    OUT.write_text(json.dumps(refs, separators=(",", ":")) + "\n")
    print(f"wrote {len(schedules)} schedules and {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
