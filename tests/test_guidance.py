"""Guidance: our sampler against guided-diffusion's published formulas (written here from
``gaussian_diffusion.py``: ``p_mean_variance``, ``condition_mean``, ``condition_score``, ``p_sample``,
``ddim_sample``, with the linear beta schedule of ``get_named_beta_schedule`` and ``respace.py``), including
high-noise steps where x0 saturates; a hand-computed step; scale 0 bit for bit; the ``g(x, t, y)`` contract."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from side_extract.guidance import ClassifierGuidance, log_prob_grad
from side_extract.models.target import load_target
from side_extract.sampling import denoise_batch, guided_step, inference_scheduler, sample, sample_generators

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


# ------------------------------------------------------------------------------------------------
# guided-diffusion, in float64 numpy, from its equations (no code of ours)

T = 1000
GD_BETAS = np.linspace(1000 / T * 0.0001, 1000 / T * 0.02, T, dtype=np.float64)  # "linear"
GD_ABAR = np.cumprod(1.0 - GD_BETAS)


def gd_respaced(use_timesteps):
    """respace.py: the alphas_cumprod of the kept timesteps, and their betas."""
    abar = GD_ABAR[sorted(use_timesteps)]
    prev = np.append(1.0, abar[:-1])
    return abar, prev, 1 - abar / prev


def gd_xstart_from_eps(x, t_abar, eps):
    return np.sqrt(1 / t_abar) * x - np.sqrt(1 / t_abar - 1) * eps


def gd_eps_from_xstart(x, t_abar, xstart):
    return (np.sqrt(1 / t_abar) * x - xstart) / np.sqrt(1 / t_abar - 1)


def gd_ddim_sample(x, eps, grad, abar, abar_prev, eta, noise, is_last, clip=1.0):
    """p_mean_variance(clip_denoised=True) -> condition_score -> ddim_sample's update (guided-diffusion clips to
    [-1, 1]; ``clip``: a scheduler's other clip_sample_range r, x0 clipped to [-r, r] at the same place)."""
    xstart = np.clip(gd_xstart_from_eps(x, abar, eps), -clip, clip)
    if grad is not None:  # condition_score: eps from the clipped xstart, minus sqrt(1 - abar) * grad
        e = gd_eps_from_xstart(x, abar, xstart) - np.sqrt(1 - abar) * grad
        xstart = gd_xstart_from_eps(x, abar, e)  # not clipped again
    e = gd_eps_from_xstart(x, abar, xstart)
    sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar)) * np.sqrt(1 - abar / abar_prev)
    mean = xstart * np.sqrt(abar_prev) + np.sqrt(1 - abar_prev - sigma ** 2) * e
    return mean + (0.0 if is_last else sigma) * noise


def gd_p_sample(x, eps, grad, abar, abar_prev, beta, noise, is_last, clip=1.0):
    """p_mean_variance(clip_denoised=True, fixed_small) -> condition_mean -> p_sample."""
    xstart = np.clip(gd_xstart_from_eps(x, abar, eps), -clip, clip)
    coef1 = beta * np.sqrt(abar_prev) / (1 - abar)
    coef2 = (1 - abar_prev) * np.sqrt(1 - beta) / (1 - abar)
    var = beta * (1 - abar_prev) / (1 - abar)
    mean = coef1 * xstart + coef2 * x
    if grad is not None:
        mean = mean + var * grad
    return mean + (0.0 if is_last else np.sqrt(var)) * noise


def _noise(seeds, shape):
    return torch.cat([torch.randn((1, *shape[1:]), generator=torch.Generator().manual_seed(s)) for s in seeds])


@pytest.mark.parametrize("eta", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("with_grad", [True, False])
@pytest.mark.parametrize("clip", [1.0, 0.5])
@pytest.mark.parametrize("spacing,steps", [("leading", 10), ("linspace", 10), ("trailing", 30)])
def test_ddim_steps_match_guided_diffusion_at_every_noise_level(eta, with_grad, clip, spacing, steps):
    """Every step of a 10-step DDIM, from t = 900 (where most x0 pixels saturate) to t = 0; also for a target whose
    scheduler clips x0 to [-0.5, 0.5] (``clip_sample_range``), which every step must clip to. Also for the
    target's other timestep spacings, whose strides are not 1000 // steps (linspace: 999, 888, ..., 111, 0;
    trailing with 30 steps: 33 or 34 apart): guided-diffusion's respaced DDIM steps from each kept timestep to the
    next kept one (diffusers' DDIMScheduler.step went back 1000 // steps instead)."""
    base = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample_range=clip,
                         timestep_spacing=spacing)
    sched = inference_scheduler(base, "ddim", steps)
    assert (np.diff(sched.timesteps.numpy()) == -(T // steps)).all() == (spacing == "leading")
    assert sched.config.clip_sample_range == clip
    kept = [int(t) for t in sched.timesteps]
    abar_r, prev_r, _ = gd_respaced(kept)
    rng = np.random.default_rng(0)
    saturated = 0
    for i, t in enumerate(sched.timesteps):
        j = sorted(kept).index(int(t))
        x = rng.normal(size=(4, 1, 8, 8)) * 1.5
        eps = rng.normal(size=x.shape)
        grad = rng.normal(size=x.shape) * 3.0 if with_grad else None
        seeds = [10 * i + b for b in range(4)]
        noise = _noise(seeds, x.shape).double().numpy()
        ref = gd_ddim_sample(x, eps, grad, abar_r[j], prev_r[j], eta, noise, is_last=j == 0, clip=clip)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        ours = guided_step(sched, torch.tensor(x, dtype=torch.float32), t, torch.tensor(eps, dtype=torch.float32),
                           gens, eta=eta, g=None if grad is None else torch.tensor(grad, dtype=torch.float32))
        np.testing.assert_allclose(ours.double().numpy(), ref, atol=2e-3, rtol=1e-4)
        saturated += int((np.abs(gd_xstart_from_eps(x, abar_r[j], eps)) > 1).mean() > 0.5)
    assert saturated >= 5  # most of the steps tested have mostly saturated x0 predictions


@pytest.mark.parametrize("with_grad", [True, False])
@pytest.mark.parametrize("clip", [1.0, 0.5])
def test_ddpm_steps_match_guided_diffusion(with_grad, clip):
    base = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample_range=clip)
    sched = inference_scheduler(base, "ddpm", 20)
    kept = [int(t) for t in sched.timesteps]
    abar_r, prev_r, beta_r = gd_respaced(kept)
    rng = np.random.default_rng(1)
    for i, t in enumerate(sched.timesteps):
        j = sorted(kept).index(int(t))
        x = rng.normal(size=(3, 1, 8, 8))
        eps = rng.normal(size=x.shape)
        grad = rng.normal(size=x.shape) * 2.0 if with_grad else None
        seeds = [100 + 10 * i + b for b in range(3)]
        noise = _noise(seeds, x.shape).double().numpy()
        ref = gd_p_sample(x, eps, grad, abar_r[j], prev_r[j], beta_r[j], noise, is_last=j == 0, clip=clip)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        ours = guided_step(sched, torch.tensor(x, dtype=torch.float32), t, torch.tensor(eps, dtype=torch.float32),
                           gens, g=None if grad is None else torch.tensor(grad, dtype=torch.float32))
        np.testing.assert_allclose(ours.double().numpy(), ref, atol=2e-4, rtol=1e-4)


def test_hand_computed_step_with_saturated_x0():
    """abar 0.1 -> 0.15, one pixel whose x0 prediction saturates, g = 1. By hand: the guided x0 moves by
    (1 - abar) / sqrt(abar) = 2.8460, eps by -sqrt(1 - abar) = -0.9487, so x_{t-1} moves by
    sqrt(0.15) * 2.8460 - sqrt(0.85) * 0.9487 = +0.2276. Guidance applied before the clip moves it by 0."""
    betas = torch.tensor([1 - 0.15, 1 - 0.1 / 0.15], dtype=torch.float64)
    sched = DDIMScheduler(num_train_timesteps=2, trained_betas=betas.numpy(), clip_sample=True)
    sched.set_timesteps(2)
    t = sched.timesteps[0]
    assert int(t) == 1 and abs(float(sched.alphas_cumprod[1]) - 0.1) < 1e-6
    x, eps = torch.full((1, 1, 1, 1), 0.5), torch.full((1, 1, 1, 1), -1.0)  # x0 = 4.58: saturated
    plain = guided_step(sched, x, t, eps, [torch.Generator()], clip_eps=True)
    guided = guided_step(sched, x, t, eps, [torch.Generator()], g=torch.ones_like(x))
    assert float(guided - plain) == pytest.approx(0.2276, abs=2e-4)


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_scale_zero_is_unguided_bit_for_bit(tiny_model_dir, kind):
    d = load_target(tiny_model_dir)
    g = ClassifierGuidance(LinearClassifier(64, 3), np.arange(3), 0.0)
    y = np.array([0, 1, 2, 0, 1])
    ddim = {"clip_eps": True} if kind == "ddim" else {}  # (DDPM reads no clip_eps, and refuses it)
    guided = sample(d, 5, seed=2, scheduler=kind, steps=4, guidance=g, labels=y, **ddim)
    plain = sample(d, 5, seed=2, scheduler=kind, steps=4, **ddim)
    assert torch.equal(guided, plain)


def test_nonzero_scale_changes_output(tiny_model_dir):
    d = load_target(tiny_model_dir)
    g = ClassifierGuidance(LinearClassifier(64, 3), np.arange(3), 5.0)
    y = np.array([0, 1, 2])
    assert not torch.allclose(sample(d, 3, steps=4, guidance=g, labels=y, clip_eps=True),
                              sample(d, 3, steps=4, clip_eps=True))


def test_guided_ddim_refuses_the_unclipped_sampler(tiny_model_dir):
    """A guided DDIM step always took eps from the clipped x0; with clip_eps=False its unguided steps (and an
    unguided baseline) did not, so lambda -> 0 did not give the baseline back (0.16 apart at lambda 1e-9)."""
    d = load_target(tiny_model_dir)
    g = ClassifierGuidance(LinearClassifier(64, 3), np.arange(3), 1e-9)
    with pytest.raises(ValueError, match="pass clip_eps=True"):
        sample(d, 3, steps=4, guidance=g, labels=np.array([0, 1, 2]))
    sample(d, 3, steps=4, scheduler="ddpm", guidance=g, labels=np.array([0, 1, 2]))  # (DDPM has no such switch)


def test_guidance_at_high_noise_alone_changes_images(tiny_model_dir):
    """Guidance only for t >= 800, where x0 saturates: guided-diffusion's order keeps its effect."""
    d = load_target(tiny_model_dir)
    g = ClassifierGuidance(LinearClassifier(64, 3, seed=3), np.arange(3), 0.5, t_range=(0.8, 1.0))
    y = np.array([0, 1, 2, 0, 1, 2])
    plain = sample(d, 6, seed=4, steps=10, clip_eps=True)
    guided = sample(d, 6, seed=4, steps=10, guidance=g, labels=y, clip_eps=True)
    change = (guided - plain).abs().flatten(1).mean(1)
    assert change.mean() > 0.1 and (change > 0.02).sum() >= 3


def test_guidance_covers_a_target_of_other_than_1000_training_timesteps(tiny_model_dir):
    """t_range is a fraction of the target's T: a guidance left at the default T = 1000 on a target of T = 2000
    guided only t <= 1000 (26 of 50 DDIM steps) without a word. The sampler refuses the mismatch; a guidance
    through x0_hat takes its denoiser's T."""
    from side_extract.guidance import DenoisedGuidance
    from side_extract.models.target import UNetDenoiser

    d = load_target(tiny_model_dir)
    d2000 = UNetDenoiser(d.unet, DDPMScheduler.from_config(d.scheduler.config, num_train_timesteps=2000))
    g = ClassifierGuidance(LinearClassifier(64, 3), np.arange(3), 1.0)
    with pytest.raises(ValueError, match=r"ClassifierGuidance\(num_train_timesteps=1000\) guides a target of 2000 "
                                         "training timesteps: give num_train_timesteps=2000"):
        sample(d2000, 3, steps=4, guidance=g, labels=np.array([0, 1, 2]), clip_eps=True)
    through = DenoisedGuidance(LinearClassifier(64, 3), np.arange(3), 1.0, denoiser=d2000)
    assert through.num_train_timesteps == 2000 and through.guides_at(1500)
    with pytest.raises(ValueError, match="num_train_timesteps=500, but the denoiser's scheduler has 2000"):
        DenoisedGuidance(LinearClassifier(64, 3), np.arange(3), 1.0, num_train_timesteps=500, denoiser=d2000)


def test_labels_travel_with_the_batch(tiny_model_dir):
    """Batch size 2 vs 6: each sample's guidance uses its own label, wherever it lands in a batch."""
    d = load_target(tiny_model_dir)
    g = ClassifierGuidance(LinearClassifier(64, 3, seed=1), np.arange(3), 2.0)
    y = np.array([2, 0, 1, 1, 0, 2])
    a = sample(d, 6, seed=7, steps=4, guidance=g, labels=y, batch_size=6, clip_eps=True)
    b = sample(d, 6, seed=7, steps=4, guidance=g, labels=y, batch_size=2, clip_eps=True)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    c = sample(d, 6, seed=7, steps=4, guidance=g, labels=np.roll(y, 1), batch_size=6, clip_eps=True)
    assert (a - c).abs().max() > 1e-3


def test_log_prob_grad_matches_finite_difference():
    clf = LinearClassifier(16, 4).double().eval()
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


class BNClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.bn = torch.nn.BatchNorm1d(16)
        self.fc = torch.nn.Linear(16, 3)

    def forward(self, x, t):
        return self.fc(self.bn(x.flatten(1)))


def test_guidance_puts_the_classifier_in_eval_mode():
    """In training mode BatchNorm mixes a batch's samples: a sample's guidance must not depend on its batch."""
    clf = BNClassifier().train()
    g = ClassifierGuidance(clf, np.arange(3), 1.0)
    assert not clf.training
    x = torch.randn(4, 1, 4, 4)
    y = torch.tensor([0, 1, 2, 0])
    full = g(x, torch.tensor(10), y)
    single = torch.cat([g(x[i:i + 1], torch.tensor(10), y[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(full, single, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="training mode"):
        log_prob_grad(BNClassifier().train(), x, torch.tensor(10), y)


def test_one_guided_step_raises_log_p(tiny_model_dir):
    """From the same x_t, the guided DDIM step lands where the classifier finds the target more likely."""
    d = load_target(tiny_model_dir)
    clf = LinearClassifier(64, 3, seed=4)
    sched = inference_scheduler(d.scheduler, "ddim", 10)
    x = 0.2 * torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    sched.timesteps = sched.timesteps[-2:-1]  # exactly one step, from t = 100 to t = 0
    gens = sample_generators(0, np.arange(6))
    plain = denoise_batch(d, sched, x, gens)
    guided = denoise_batch(d, sched, x, gens, guidance=ClassifierGuidance(clf, np.arange(3), 0.02), y=y)
    with torch.no_grad():
        lp = lambda z: torch.log_softmax(clf(z, torch.zeros(6, dtype=torch.long)), -1)[torch.arange(6), y]
        assert (lp(guided) > lp(plain)).all()


def test_guidance_validation():
    with pytest.raises(ValueError, match="scale=-1"):
        ClassifierGuidance(LinearClassifier(4, 2), np.arange(2), -1)
    with pytest.raises(ValueError, match="scale=nan"):
        ClassifierGuidance(LinearClassifier(4, 2), np.arange(2), float("nan"))
    with pytest.raises(ValueError, match="t_range"):
        ClassifierGuidance(LinearClassifier(4, 2), np.arange(2), 1, t_range=(0.5, 0.2))
    with pytest.raises(ValueError, match="target labels"):
        sample(None, 2, guidance=ClassifierGuidance(LinearClassifier(4, 2), np.arange(2), 1.0))  # type: ignore[arg-type]


def test_target_labels_and_the_classifiers_outputs_are_checked(tiny_model_dir):
    """A label of -1 guided toward the last class without a word (negative indexing), 1.5 was truncated to 1, 99
    was an IndexError at the first guided step; a guidance naming 7 classes over a 2-output classifier ran."""
    d = load_target(tiny_model_dir)
    g = ClassifierGuidance(LinearClassifier(64, 2), np.arange(2), 1.0)
    for labels, says in ((np.array([0, -1]), r"output indices 0..1 .* got -1..0"), (np.array([0, 99]), "got 0..99"),
                         (np.array([0.0, 1.5]),
                          r"target labels \(integer output indices\) must hold integers, got float64")):
        with pytest.raises(ValueError, match=says):
            sample(d, 2, steps=2, guidance=g, labels=labels)
    seven = ClassifierGuidance(LinearClassifier(64, 2), np.arange(7), 1.0)
    with pytest.raises(ValueError, match="has 2 outputs but the guidance names 7 classes"):
        seven(torch.randn(2, 1, 8, 8), torch.tensor(10), torch.tensor([0, 1]))
    assert g(torch.randn(2, 1, 8, 8), torch.tensor(10), torch.tensor([0, 1])) is not None


def test_t_range_turns_guidance_off_outside():
    g = ClassifierGuidance(LinearClassifier(64, 2), np.arange(2), 3.0, t_range=(0.0, 0.5))
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 1])
    assert g(x, torch.tensor(900), y) is None
    assert g(x, torch.tensor(100), y).abs().sum() > 0


def test_guidance_at_the_edges_of_t_range_is_on():
    g = ClassifierGuidance(LinearClassifier(64, 2), np.arange(2), 1.0, t_range=(0.2, 0.5), num_train_timesteps=1000)
    assert g.guides_at(200) and g.guides_at(500) and not g.guides_at(199) and not g.guides_at(501)


def test_temperature_divides_the_logits_by_hand():
    """For logits W x + b, grad_x log softmax((W x + b) / T)[y] = (W[y] - p W) / T, p = softmax((W x + b) / T);
    the guidance is lambda times that (the finite-difference test uses T = 1 only)."""
    torch.manual_seed(0)
    w, b = torch.randn(3, 16, dtype=torch.float64), torch.randn(3, dtype=torch.float64)

    class Lin(torch.nn.Module):
        def forward(self, x, t):
            return x.flatten(1) @ w.T + b

    x, y = torch.randn(2, 1, 4, 4, dtype=torch.float64), torch.tensor([2, 0])
    g = ClassifierGuidance(Lin(), np.arange(3), 1.5, temperature=2.0)(x, torch.tensor(10), y)
    p = torch.softmax((x.flatten(1) @ w.T + b) / 2.0, -1)
    torch.testing.assert_close(g.flatten(1), 1.5 * (w[y] - p @ w) / 2.0)


def test_denoised_guidance_by_hand():
    """eps(x, t) = a x makes x0_hat = c x with c = (1 - sqrt(1 - abar) a) / sqrt(abar), so
    grad_x log p(y | x0_hat) = c (W[y] - sum_k p_k W[k]) / T at x0_hat, for logits W z + b (written out here)."""
    from side_extract.guidance import DenoisedGuidance
    from side_extract.models.target import CallableDenoiser

    sched = tiny_scheduler()
    a, t, temp = 0.3, 600, 2.0
    den = CallableDenoiser(lambda x, tt: a * x, (1, 4, 4), sched)
    clf = LinearClassifier(16, 3, seed=5).double().eval()
    g = DenoisedGuidance(clf, np.arange(3), 1.5, temp, denoiser=den)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    y = torch.tensor([2, 0])
    abar = float(sched.alphas_cumprod[t])
    c = (1 - np.sqrt(1 - abar) * a) / np.sqrt(abar)
    z = c * x.flatten(1)
    w = clf.w.detach()  # the classifier's time-dependent bias is zero for the clean call (t = 0)
    p = torch.softmax((z @ w.T) / temp, -1)
    expect = 1.5 * c * (w[y] - p @ w) / temp
    torch.testing.assert_close(g(x, torch.tensor(t), y).flatten(1), expect, rtol=1e-5, atol=1e-9)  # abar is float32
    with pytest.raises(ValueError, match="needs the target denoiser"):
        DenoisedGuidance(clf, np.arange(3), 1.0)


def test_malformed_guidance_settings_are_named(tiny_model_dir):
    """From Python: a malformed t_range, nested or repeated classes, and memguide settings of the wrong type were
    numpy's or Python's own errors ("not enough values to unpack", "unhashable type: 'list'", "ufunc 'isfinite' not
    supported"), or accepted (repeated classes credited every generation of that label to one output; seed 1.5
    was taken as 1); each is now refused naming the setting."""
    from side_extract.memorization import MemorizationGuidance
    d = load_target(tiny_model_dir)
    clf = torch.nn.Linear(1, 2)
    for kw, said in [(dict(t_range=(0.5,)), r"t_range=\(0.5,\) must be a pair"),
                     (dict(t_range=("a", 1)), "t_range='a' must be a number"),
                     (dict(classes=[[1, 2]]), r"classes=\[\[1, 2\]\] must be distinct label values"),
                     (dict(classes=[3, 3]), r"classes=\[3, 3\] must be distinct")]:
        with pytest.raises(ValueError, match=said):
            ClassifierGuidance(**{"classifier": clf, "classes": [0, 1], "scale": 1.0, **kw})
    for kw, said in [(dict(scale="1"), "memguide scale='1' must be a number"),
                     (dict(scale=None), "memguide scale=None must be a number"),
                     (dict(t_hi="0.2"), "memguide t_hi='0.2' must be a number"),
                     (dict(seed=1.5), "memguide seed=1.5 must be an integer"),
                     (dict(seed=-1), "memguide seed=-1 must be an integer >= 0"),
                     (dict(avoid_window=(0.2,)), r"memguide avoid_window=\(0.2,\) must be a pair")]:
        with pytest.raises(ValueError, match=said):
            MemorizationGuidance(**{"denoiser": d.denoiser if hasattr(d, "denoiser") else d, "scale": 1.0, **kw})


def test_sample_names_a_device_torch_cannot_use(tiny_model_dir):
    with pytest.raises(ValueError, match="device='gpu' is not a torch device"):
        sample(load_target(tiny_model_dir), 2, steps=2, device="gpu")
