"""Targets trained to predict v or x0 (diffusers' ``prediction_type``): read as the epsilon their output means.

Before, such a target was refused. The references are diffusers' own schedulers, which step a model of each kind
on its raw output (``DDIMScheduler.step`` / ``DDPMScheduler.step``) and give its velocity (``get_velocity``)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

import side_extract
from side_extract.finetune import ConditionalDenoiser, conditional_unet, finetune, load_finetuned
from side_extract.models.forms import as_target
from side_extract.models.target import (UNetDenoiser, as_epsilon, load_target, model_fingerprint, prediction_target,
                                        save_target)
from side_extract.pipeline import run_audit
from side_extract.runs import read_model
from side_extract.sampling import denoise_batch, inference_scheduler

from conftest import tiny_unet
from test_finetune import TINY
from test_pipeline import tiny_rc

KINDS = ("v_prediction", "sample")


def _scheduler(kind: str, **kw) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=kind, **kw)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_sampling_a_v_or_x0_model_steps_as_diffusers_does_on_its_raw_output(kind, sampler, eta):
    unet = tiny_unet()
    denoiser = UNetDenoiser(unet, _scheduler(kind))
    assert denoiser.prediction == kind and denoiser.scheduler.config.prediction_type == "epsilon"
    assert denoiser.model_scheduler.config.prediction_type == kind
    ours = inference_scheduler(denoiser.scheduler, sampler, 10)
    ref = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}[sampler].from_config(_scheduler(kind).config)
    ref.set_timesteps(10)
    start = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(1))

    def generators():
        return [torch.Generator().manual_seed(10 + i) for i in range(3)]

    got = denoise_batch(denoiser, ours, start.clone(), generators(), eta=eta, clip_eps=True)
    x, g = start.clone(), generators()
    with torch.no_grad():
        for t in ref.timesteps:
            out = unet(x, t).sample  # v or x0, stepped by the scheduler made for it
            step = ref.step(out, t, x, eta=eta, use_clipped_model_output=True, generator=g) if sampler == "ddim" \
                else ref.step(out, t, x, generator=g)
            x = step.prev_sample
    torch.testing.assert_close(got, x, atol=2e-4, rtol=1e-4)
    assert not torch.allclose(got, denoise_batch(UNetDenoiser(unet, _scheduler("epsilon")), ours, start.clone(),
                                                 generators(), eta=eta, clip_eps=True), atol=1e-2)  # not read as eps


def test_the_training_target_and_the_epsilon_it_means_are_diffusers_own():
    s = _scheduler("v_prediction")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand((4, 1, 8, 8), generator=g) * 2 - 1, torch.randn((4, 1, 8, 8), generator=g)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(prediction_target(s, "v_prediction", x0, noise, t), s.get_velocity(x0, noise, t))
    xt = s.add_noise(x0, noise, t)
    for kind in ("epsilon", *KINDS):
        out = prediction_target(s, kind, x0, noise, t)
        torch.testing.assert_close(as_epsilon(s, kind, xt, t, out), noise, atol=2e-3, rtol=0)  # (x0: /sqrt(beta_0))
        for i in range(4):  # one timestep for the batch, as the samplers call it
            torch.testing.assert_close(as_epsilon(s, kind, xt[i:i + 1], t[i], out[i:i + 1]), noise[i:i + 1],
                                       atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="prediction_type='flow'"):
        as_epsilon(s, "flow", xt, t, xt)


def test_prediction_types_that_cannot_be_read_are_refused(tmp_path):
    unet = tiny_unet()
    with pytest.raises(ValueError, match="prediction_type='flow': a model must predict one of epsilon, v_prediction, "
                                         "sample"):
        as_target(unet, scheduler=_scheduler("flow"))
    with pytest.raises(ValueError, match="prediction_type='flow'"):
        as_target(lambda x, t: unet(x, t).sample, scheduler=_scheduler("flow"), sample_shape=(1, 8, 8))
    unet.register_to_config(prediction_type="v_prediction")
    with pytest.raises(ValueError, match="the UNet's config says prediction_type='v_prediction', its scheduler's "
                                         "prediction_type='epsilon'"):
        as_target(unet, scheduler=_scheduler("epsilon"))


@pytest.fixture(scope="module")
def v_model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "tiny-v"
    save_target(tiny_unet(), _scheduler("v_prediction"), out)
    return out


def test_a_v_model_is_audited_and_known_by_its_prediction_type(v_model_dir, tmp_path, one_thread):
    """Every method runs on a v-predicting target, and its stages are keyed apart from the same weights read as
    epsilon."""
    target = load_target(v_model_dir)
    assert target.prediction == "v_prediction"
    eps_dir = tmp_path / "tiny-eps"
    save_target(target.unet, _scheduler("epsilon"), eps_dir)
    assert model_fingerprint(eps_dir) != model_fingerprint(v_model_dir)
    again = as_target(target)  # an in-memory denoiser is identified by the scheduler it was given, not its eps view
    assert again.denoiser.prediction == "v_prediction" and again.fingerprint == model_fingerprint(v_model_dir)
    rc = dataclasses.replace(tiny_rc(v_model_dir, methods=("side", "side-lora", "memguide", "uncond")), lora=TINY)
    res = run_audit(tmp_path / "run", rc)
    assert set(res.metrics) == {"side", "side-lora", "memguide", "uncond"}
    for e in res.extractions.values():
        assert np.isfinite(e.images.astype(float)).all() and len(e.images) == rc.extract.n
    side_extract.audit(target, "digits:30", config=rc, out=tmp_path / "api", methods=["uncond"])
    assert read_model(tmp_path / "api") == model_fingerprint(v_model_dir)


def test_the_fine_tuned_copy_of_a_v_model_returns_epsilon_and_trains_on_v(v_model_dir, tmp_path):
    """side-lora's conditional model outputs what the target does (v here): it is read as epsilon too (before
    fine-tuning exactly the target's), and its loss is on v, as the target was trained (diffusers' velocity)."""
    from diffusers import UNet2DModel

    target = load_target(v_model_dir)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor(400)
    before = ConditionalDenoiser(conditional_unet(target.unet, 3), target, np.arange(3), 1.0)
    with torch.no_grad():
        for y in (None, torch.tensor([0, 1, 2, 0])):
            torch.testing.assert_close(before(x, t, y), target(x, t), rtol=0, atol=0)
    # one image, repeated: each row's noise follows from its x_t and t, so the loss can be recomputed from what
    # the UNet saw and returned at the first step (torch's global forward hook; nothing in finetune replaced)
    image = torch.rand((1, 1, 8, 8), generator=torch.Generator().manual_seed(3)) * 2 - 1
    x0, y = image.repeat(24, 1, 1, 1), np.arange(24) % 3
    seen = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, args, out: seen.append((args[0].detach(), args[1].detach(), out.sample.detach()))
        if isinstance(m, UNet2DModel) and len(args) >= 2 else None)
    try:
        run = finetune(target, x0, y, dataclasses.replace(TINY, lr=1e-3), tmp_path / "lora")
    finally:
        hook.remove()
    xt, tt, out = seen[0]
    s = target.scheduler
    abar = s.alphas_cumprod[tt].reshape(-1, 1, 1, 1)
    noise = (xt - abar.sqrt() * image) / (1 - abar).sqrt()
    v = s.get_velocity(image.expand_as(xt), noise, tt)
    assert run.losses[0] == pytest.approx(float((out - v).pow(2).flatten(1).mean(1).mean()), rel=1e-4, abs=1e-6)
    tuned = load_finetuned(target, tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(tuned(x, t), as_epsilon(s, "v_prediction", x, t, tuned.model(
            x, t, class_labels=torch.full((4,), tuned.null)).sample))
