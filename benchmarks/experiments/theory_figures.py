"""Figures docs/theory.md and theory/likelihood.py quote, made again with their command (session 38).

1. The probability-flow ODE's error on the fully memorizing empirical optimum of 50 points (exact trace, float64),
   against its exact density log q_sigma_min, at 32 / 64 / 128 steps, in d = 4 and d = 64: mean and largest
   per-point error over 50 points drawn near the data.
2. Hutchinson's noise on the shipped 8x8 digits target (``demo``): log p of 8 training digits with one fresh probe
   per evaluation, 32 steps, under 4 probe seeds; the per-point standard deviation across seeds against the spread
   between the points.

Usage: python benchmarks/experiments/theory_figures.py   (one torch thread; about a minute)
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers import DDPMScheduler

from side_extract.data import load_image_set
from side_extract.models.target import load_target
from side_extract.theory import empirical_optimal_eps, log_q_eps, pf_ode_log_likelihood
from side_extract.theory.likelihood import sigmas

torch.set_num_threads(1)
AC = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod


def optimum_errors() -> None:
    sig = float(sigmas(AC)[0])
    print("1. empirical optimum of 50 points, exact trace: error of log p (nats), mean / largest |error| of 50 points")
    for d in (4, 64):
        g = torch.Generator().manual_seed(d)
        data = torch.rand(50, d, generator=g, dtype=torch.float64) * 2 - 1
        x = data + sig * torch.randn(50, d, generator=g, dtype=torch.float64)
        exact = log_q_eps(x, data, sig)
        for steps in (32, 64, 128):
            got = pf_ode_log_likelihood(empirical_optimal_eps(data, AC), x, AC, n_steps=steps, trace="exact").log_prob
            err = np.asarray(got) - np.asarray(exact)
            print(f"   d = {d:2d}, {steps:3d} steps: mean {err.mean():+.3f}, largest {np.abs(err).max():.3f}")


def hutchinson_noise() -> None:
    den = load_target("demo")
    imgs = load_image_set("digits:100").to_float()[:8].to(torch.float32)
    ac = den.scheduler.alphas_cumprod

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return den(x, t)

    runs = []
    for seed in range(4):
        gens = [torch.Generator().manual_seed(1000 * seed + i) for i in range(len(imgs))]
        runs.append(np.asarray(pf_ode_log_likelihood(eps, imgs, ac, n_steps=32, generator=gens).log_prob))
    lp = np.stack(runs)  # (seeds, points)
    print("2. Hutchinson (1 fresh probe per evaluation, 32 steps), shipped 'demo' target, 8 training digits x 4 "
          "probe seeds:")
    print(f"   per-point sd across probe seeds: mean {lp.std(axis=0, ddof=1).mean():.2f} nats; spread between points "
          f"(sd of their mean log p): {lp.mean(axis=0).std(ddof=1):.2f} nats")


if __name__ == "__main__":
    optimum_errors()
    hutchinson_noise()
