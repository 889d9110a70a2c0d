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
from side_extract.runs import read_json, read_model
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
    assert denoiser.prediction == kind and denoiser.scheduler.config.prediction_type == kind  # the model as trained
    ours = inference_scheduler(denoiser.scheduler, sampler, 10)
    assert ours.config.prediction_type == "epsilon"  # what the denoiser returns
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
    with pytest.raises(ValueError, match=r"ends with no signal at all \(alphas_cumprod\[T-1\] = 0"):
        as_target(unet, scheduler=_scheduler("v_prediction", rescale_betas_zero_snr=True))
    unet.register_to_config(prediction_type="v_prediction")
    with pytest.raises(ValueError, match="the UNet's config says prediction_type='v_prediction', its scheduler's "
                                         "prediction_type='epsilon'"):
        as_target(unet, scheduler=_scheduler("epsilon"))


def test_reading_epsilon_survives_bf16_and_a_wrapped_callable():
    """Under bf16 autocast abar near t = 0 rounded to 1 in the model's dtype: an x0 model's eps was a division by
    zero. A callable already wrapped as a denoiser is read once, not converted twice."""
    unet = tiny_unet()
    x = torch.randn(2, 1, 8, 8)
    for kind in KINDS:
        d = UNetDenoiser(unet, _scheduler(kind))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            low = d(x, torch.tensor(1))
        with torch.no_grad():
            full = d(x, torch.tensor(1))
        assert torch.isfinite(low).all()
        assert (low - full).abs().max() < 0.05 * full.abs().max()
        fn = lambda x, t: unet(x, t).sample  # noqa: E731
        wrapped = as_target(fn, scheduler=_scheduler(kind), sample_shape=(1, 8, 8)).denoiser
        twice = as_target(wrapped)
        with torch.no_grad():
            torch.testing.assert_close(twice.denoiser(x, torch.tensor(500)), d(x, torch.tensor(500)))


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
    again = as_target(target)  # an in-memory denoiser is identified by the scheduler it was given
    assert again.denoiser.prediction == "v_prediction" and again.fingerprint == model_fingerprint(v_model_dir)
    save_target(target.unet, target.scheduler, tmp_path / "copy")  # the README's recipe keeps what it predicts
    assert load_target(tmp_path / "copy").prediction == "v_prediction"
    rc = dataclasses.replace(tiny_rc(v_model_dir, methods=("side", "side-lora", "memguide", "uncond")), lora=TINY)
    res = run_audit(tmp_path / "run", rc)
    assert set(res.metrics) == {"side", "side-lora", "memguide", "uncond"}
    for e in res.extractions.values():
        assert np.isfinite(e.images.astype(float)).all() and len(e.images) == rc.extract.n
    side_extract.audit(target, "digits:30", config=rc, out=tmp_path / "api", methods=["uncond"])
    assert read_model(tmp_path / "api") == model_fingerprint(v_model_dir)
    from side_extract.report import write_report  # the report says what the target predicts

    html = write_report(tmp_path / "run").read_text()
    assert "trained to predict v; its output read as the noise it means" in html
    assert read_json(tmp_path / "run" / "report" / "report.json")["summary"]["prediction"] == "v_prediction"


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


def test_train_target_learns_v_or_x0_and_keeps_earlier_targets_keys(tmp_path):
    """`side train-target --prediction-type`: the saved scheduler says what the UNet outputs, the first step's loss
    is on v (diffusers' velocity) or x0, and the default keeps every earlier target's key (the benchmark cache's
    names and a checkpoint's resume key): prediction_type is left out of them at epsilon."""
    from diffusers import UNet2DModel

    from side_extract import config as cfg
    from side_extract.bench.extraction import full_target_template
    from side_extract.data import load_image_set
    from side_extract.models.target import train_target
    from side_extract.runs import fingerprint_of

    from test_target import TINY as TINY_TARGET

    digits = load_image_set("digits:20")
    np.savez(tmp_path / "one.npz", images=np.repeat(digits.images[:1], 20, axis=0))  # one image: each row's x0
    data = load_image_set(tmp_path / "one.npz")
    image = torch.as_tensor(data.to_float()[:1])
    for kind in KINDS:
        seen, losses = [], []
        hook = torch.nn.modules.module.register_module_forward_hook(
            lambda m, args, out: seen.append((args[0].detach(), args[1].detach(), out.sample.detach()))
            if isinstance(m, UNet2DModel) and m.training else None)
        try:
            res = train_target(dataclasses.replace(TINY_TARGET, prediction_type=kind, steps=1), data, tmp_path / kind,
                               report=lambda step, steps, loss, sec: losses.append(loss), report_every=1)
        finally:
            hook.remove()
        model = load_target(tmp_path / kind)
        assert model.prediction == kind and model.scheduler.config.prediction_type == kind and res.steps == 1
        xt, t, out = seen[0]
        s = model.scheduler
        abar = s.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        noise = (xt - abar.sqrt() * image) / (1 - abar).sqrt()
        want = s.get_velocity(image.expand_as(xt), noise, t) if kind == "v_prediction" else image.expand_as(xt)
        assert losses[0] == pytest.approx(float((out - want).pow(2).flatten(1).mean(1).mean()), rel=1e-4)
    c = full_target_template()
    assert fingerprint_of(cfg.keyed_settings(dataclasses.replace(c, data="digits:300", resize=16)))[:12] == \
        "fa27d08e5a17"  # benchmarks/results/fair16/*-n300: digits300-16px-fa27d08e5a17
    assert "prediction_type" not in cfg.keyed_settings(c)
    assert cfg.keyed_settings(dataclasses.replace(c, prediction_type="v_prediction"))["prediction_type"] == \
        "v_prediction"


def test_train_target_cli_takes_and_checks_the_prediction_type(tmp_path, one_thread):
    from typer.testing import CliRunner

    from side_extract.cli.main import app

    bad = CliRunner().invoke(app, ["--threads", "1", "train-target", "--out", str(tmp_path / "x"), "--prediction-type",
                                   "flow", "--steps", "1"])
    assert bad.exit_code == 2 and "--prediction-type='flow' must be one of 'epsilon', 'v_prediction', 'sample'" in \
        bad.output and not (tmp_path / "x").exists()
    ok = CliRunner().invoke(app, ["--threads", "1", "--no-progress", "train-target", "--out", str(tmp_path / "v"),
                                  "--data", "digits:20", "--prediction-type", "v_prediction", "--steps", "1",
                                  "--block-out-channels", "4,8", "--norm-num-groups", "4", "--batch-size", "4"])
    assert ok.exit_code == 0, ok.output
    assert load_target(tmp_path / "v").prediction == "v_prediction"


def test_a_schedule_the_samplers_rebuild_otherwise_is_refused():
    """Euler's zero-SNR rescaling keeps 2^-24 at the last timestep where the DDIM and DDPM schedules the samplers
    rebuild from the same config put 0: the check on the given scheduler passed, and the model's v was read with one
    schedule and stepped with the other (0.1 from diffusers' DDIM, or 'diverged'). An Euler scheduler of an ordinary
    schedule is one the samplers rebuild exactly, and stays accepted."""
    from diffusers import EulerDiscreteScheduler
    zero_snr = EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                      prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                      timestep_spacing="trailing")
    with pytest.raises(ValueError, match=r"EulerDiscreteScheduler's noise schedule is not the one its config gives "
                                         r"the DDIM and DDPM samplers here \(alphas_cumprod at timestep 999: 5.96e-08 "
                                         r"in the scheduler, 0 from its config"):
        as_target(tiny_unet(), scheduler=zero_snr)
    as_target(tiny_unet(), scheduler=EulerDiscreteScheduler(num_train_timesteps=1000, prediction_type="v_prediction"))


@pytest.mark.parametrize("form", [np.asarray, torch.tensor])
def test_schedules_apart_in_the_middle_of_their_betas_are_other_targets(form):
    """A scheduler built in memory keeps trained_betas as an array, whose str elides the middle of more than 1,000
    values: two schedules apart only there had one fingerprint, and a run reused the other's stages."""
    b1 = np.linspace(1e-4, 0.02, 2000)
    b2 = b1.copy()
    b2[800:1200] *= 1.3
    unet = tiny_unet()
    one, two = (as_target(unet, scheduler=DDPMScheduler(num_train_timesteps=2000, trained_betas=form(b)))
                for b in (b1, b2))
    assert one.fingerprint != two.fingerprint


def test_a_scheduler_built_with_its_own_defaults_is_sampled_with_its_own_schedule():
    """diffusers records the arguments a scheduler built in Python left at their defaults, and from_config fills those
    with the new class's defaults: a HeunDiscreteScheduler() (betas 0.00085..0.012) was sampled with DDPM's
    0.0001..0.02 (alpha_bar 0.184 for its 0.281 at timestep 406), and once checked, refused with a message that
    contradicted itself. A beta_schedule DDPM lacks is said, not raised as NotImplementedError."""
    from diffusers import HeunDiscreteScheduler

    heun = HeunDiscreteScheduler()
    target = as_target(tiny_unet(), scheduler=heun)
    for kind in ("ddim", "ddpm"):
        torch.testing.assert_close(inference_scheduler(target.denoiser.scheduler, kind, 10).alphas_cumprod,
                                   heun.alphas_cumprod, rtol=1e-6, atol=0)
    from diffusers import EulerDiscreteScheduler  # its own timestep spacing too (linspace; DDIM's default: leading)
    assert inference_scheduler(EulerDiscreteScheduler(), "ddim", 10).config.timestep_spacing == "linspace"
    with pytest.raises(ValueError, match=r"HeunDiscreteScheduler's noise schedule cannot be stepped .*exp"):
        as_target(tiny_unet(), scheduler=HeunDiscreteScheduler(beta_schedule="exp"))
