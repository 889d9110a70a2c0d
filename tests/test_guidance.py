"""Guidance: the formulas against guided-diffusion's, scale 0 bit for bit, and that guidance guides."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from side_extract.guidance import ClassifierGuidance, guided_eps, log_prob_grad
from side_extract.models.target import load_target
from side_extract.sampling import ddpm_variance, denoise_batch, inference_scheduler, sample, sample_generators

from conftest import tiny_scheduler


class LinearClassifier(torch.nn.Module):
    """logits = W x + b, with a time-dependent bias (so t matters)."""

    def __init__(self, d: int, k: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(k, d, generator=g))
        self.b = torch.nn.Parameter(torch.randn(k, generator=g))

    def forward(self, x, t):
        return x.flatten(1) @ self.w.T + self.b * (t.float()[:, None] / 1000)


def reference_ddim_step(x, eps, grad, scale, abar_t, abar_prev):
    """guided-diffusion: condition_score then ddim_sample (eta = 0), written from its equations."""
    eps = eps - (1 - abar_t).sqrt() * scale * grad
    x0 = (x - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()
    x0 = x0.clamp(-1, 1)
    eps = (x - abar_t.sqrt() * x0) / (1 - abar_t).sqrt()  # guided-diffusion recomputes eps from clipped x0
    return abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps


def reference_ddpm_mean(x, eps, grad, scale, betas, abar, t):
    """guided-diffusion: p_mean_variance (fixed_small, clipped x0) then condition_mean."""
    abar_t, abar_prev = abar[t], abar[t - 1] if t > 0 else torch.tensor(1.0)
    x0 = ((x - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()).clamp(-1, 1)
    coef1 = betas[t] * abar_prev.sqrt() / (1 - abar_t)
    coef2 = (1 - abar_prev) * (1 - betas[t]).sqrt() / (1 - abar_t)
    mean = coef1 * x0 + coef2 * x
    var = betas[t] * (1 - abar_prev) / (1 - abar_t)
    return mean + var * scale * grad


def _double(sched):
    """The scheduler's tables in float64, so the comparison measures formulas, not float32 rounding."""
    sched.betas = sched.betas.double()
    sched.alphas = 1.0 - sched.betas
    sched.alphas_cumprod = torch.cumprod(sched.alphas, dim=0)
    if hasattr(sched, "final_alpha_cumprod"):
        sched.final_alpha_cumprod = torch.as_tensor(sched.final_alpha_cumprod).double()
    return sched


def test_ddim_guided_step_matches_guided_diffusion():
    torch.manual_seed(0)
    sched = _double(DDIMScheduler.from_config(tiny_scheduler().config))
    sched.set_timesteps(10)
    x, eps, grad = (torch.randn(4, 1, 8, 8, dtype=torch.float64) for _ in range(3))
    scale = 3.0
    for t in sched.timesteps[:-1]:
        t = int(t)
        # guided-diffusion's DDIM recomputes eps from the clipped x0: diffusers' use_clipped_model_output=True
        ours = sched.step(guided_eps(eps, scale * grad, sched.alphas_cumprod[t]), t, x, eta=0.0,
                          use_clipped_model_output=True).prev_sample
        prev = t - 1000 // 10
        ref = reference_ddim_step(x, eps, grad, scale, sched.alphas_cumprod[t], sched.alphas_cumprod[prev])
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_ddpm_guided_mean_matches_guided_diffusion():
    torch.manual_seed(1)
    sched = _double(DDPMScheduler.from_config(tiny_scheduler().config))
    sched.set_timesteps(1000)
    x, eps, grad = (torch.randn(3, 1, 8, 8, dtype=torch.float64) for _ in range(3))
    scale = 2.5
    for t in (999, 500, 10, 1):
        # diffusers' step gives the clipped x0; its posterior mean is rebuilt from it, then our shift is added
        pred_x0 = sched.step(eps, t, x, generator=None).pred_original_sample
        abar_t, abar_prev = sched.alphas_cumprod[t], sched.alphas_cumprod[t - 1]
        beta_t = 1 - abar_t / abar_prev
        mean = (abar_prev.sqrt() * beta_t / (1 - abar_t)) * pred_x0 + ((1 - beta_t).sqrt() * (1 - abar_prev) / (1 - abar_t)) * x
        ours = mean + ddpm_variance(sched, t) * scale * grad
        ref = reference_ddpm_mean(x, eps, grad, scale, sched.betas, sched.alphas_cumprod, t)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_ddpm_variance_equals_diffusers_noise_scale():
    sched = inference_scheduler(tiny_scheduler(), "ddpm", 20)
    for t in sched.timesteps:
        torch.testing.assert_close(ddpm_variance(sched, int(t)), sched._get_variance(int(t)), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_scale_zero_is_unguided_bit_for_bit(tiny_model_dir, kind):
    d = load_target(tiny_model_dir)
    clf = LinearClassifier(64, 3)
    g = ClassifierGuidance(clf, 0.0, np.array([0, 1, 2, 0, 1]), 1000)
    guided = sample(d, 5, seed=2, scheduler=kind, steps=4, guidance=g.for_indices)
    plain = sample(d, 5, seed=2, scheduler=kind, steps=4)
    assert torch.equal(guided, plain)


def test_nonzero_scale_changes_output(tiny_model_dir):
    d = load_target(tiny_model_dir)
    g = ClassifierGuidance(LinearClassifier(64, 3), 5.0, np.array([0, 1, 2]), 1000)
    assert not torch.allclose(sample(d, 3, steps=4, guidance=g.for_indices), sample(d, 3, steps=4))


def test_log_prob_grad_matches_finite_difference():
    clf = LinearClassifier(16, 4).double()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    t, y = torch.tensor(300), torch.tensor([1, 3])
    g = log_prob_grad(clf, x, t, y)
    eps = 1e-6
    for b in range(2):
        for j in (0, 7):
            xp, xm = x.clone(), x.clone()
            xp.view(2, -1)[b, j] += eps
            xm.view(2, -1)[b, j] -= eps
            lp = lambda z: torch.log_softmax(clf(z, t.expand(2)), -1)[b, y[b]]
            fd = (lp(xp) - lp(xm)) / (2 * eps)
            assert abs(fd.item() - g.view(2, -1)[b, j].item()) < 1e-6


def test_one_guided_step_raises_log_p(tiny_model_dir):
    """From the same x_t, the guided DDIM step lands where the classifier finds the target more likely.

    (At a low noise level, where x0-clipping is inactive; see docs on clip_sample at high t.)
    """
    d = load_target(tiny_model_dir)
    clf = LinearClassifier(64, 3, seed=4)
    sched = inference_scheduler(d.scheduler, "ddim", 10)
    x = 0.2 * torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = np.array([0, 1, 2, 0, 1, 2])
    sched.timesteps = sched.timesteps[-2:-1]  # exactly one step, from t = 100 to t = 0
    t_next = torch.tensor(0)
    gens = sample_generators(0, np.arange(6))
    plain = denoise_batch(d, sched, x, gens)
    g = ClassifierGuidance(clf, 0.02, y, 1000).for_indices(np.arange(6))
    guided = denoise_batch(d, sched, x, gens, guidance=g)
    with torch.no_grad():
        lp = lambda z: torch.log_softmax(clf(z, t_next.expand(6)), -1)[torch.arange(6), torch.from_numpy(y)]
        assert (lp(guided) > lp(plain)).all()


def test_guidance_validation():
    with pytest.raises(ValueError, match="scale=-1"):
        ClassifierGuidance(LinearClassifier(4, 2), -1, np.zeros(1), 1000)
    with pytest.raises(ValueError, match="t_range"):
        ClassifierGuidance(LinearClassifier(4, 2), 1, np.zeros(1), 1000, t_range=(0.5, 0.2))


def test_t_range_turns_guidance_off_outside(tiny_model_dir):
    g = ClassifierGuidance(LinearClassifier(64, 2), 3.0, np.array([0, 1]), 1000, t_range=(0.0, 0.5)).for_indices(np.arange(2))
    x = torch.randn(2, 1, 8, 8)
    assert g(x, torch.tensor(900)).abs().sum() == 0
    assert g(x, torch.tensor(100)).abs().sum() > 0
