"""Device placement: the chain on a simulated second device (``fake_device.FakeDevice``), where any op that
mixes device and host tensors, or ``.numpy()`` of a device tensor, fails as it would on a GPU."""
import dataclasses

import numpy as np
import pytest
import torch

from side_extract import config as cfg
from side_extract.api import Audit
from side_extract.data import load_image_set
from side_extract.features import _imagenet_preprocess
from side_extract.models.classifier import ClassifierArch
from side_extract.models.target import train_target
from side_extract.pipeline import run_audit
from side_extract.theory.measure import measure_run
from side_extract.training import train_classifier

from conftest import tiny_scheduler
from fake_device import FAKE, DeviceMismatch, FakeDevice, on_device
from test_pipeline import TINY_CLF, tiny_rc


def test_the_checker_catches_mixing_and_numpy():
    with FakeDevice():
        a = torch.ones(3).to(FAKE)
        b = torch.ones(3)
        assert on_device(a) and not on_device(b) and a.device == FAKE
        assert on_device(a * 2) and on_device(torch.zeros(2, device=a.device)) and not on_device(a.cpu())
        with pytest.raises(DeviceMismatch):
            a + b
        with pytest.raises(DeviceMismatch):
            a.numpy()
        a + torch.tensor(2.0)  # 0-dim host scalars are fine, as on CUDA
        a.cpu().numpy()


def test_whole_chain_on_a_device(tiny_model_dir, tmp_path):
    """Sampling, features, clustering, every classifier, teacher labels, guided extraction and evaluation."""
    with FakeDevice() as mode:
        res = run_audit(tmp_path / "run", tiny_rc(tiny_model_dir), device=FAKE)
    assert set(res.metrics) == {"side", "side-teacher", "cond", "uncond"} and mode.ops > 1000
    host = run_audit(tmp_path / "host", tiny_rc(tiny_model_dir), until="extraction")
    for m, s in res.extractions.items():  # the same computation, so the same images
        np.testing.assert_array_equal(s.images, host.extractions[m].images)


def test_every_other_method_and_signal_on_a_device(tiny_model_dir, tmp_path):
    """The methods and guidance signals the chain above leaves out: memorization guidance (label-free, with
    avoidance of earlier rounds under adaptive allocation), side-lora's fine-tuned conditional model, and the
    noise-aware classifier on the target's UNet features and the clean classifier guiding through the denoised
    estimate. memguide's denoiser calls passed host timesteps on CUDA (found by ``side demo --device cuda`` on an
    H200)."""
    rc = tiny_rc(tiny_model_dir, methods=("side", "side-lora", "memguide", "cond"), memguide_avoid=1.0,
                 memguide_avoid_t_lo=0.0, memguide_avoid_t_hi=1.0, memguide_t_hi=1.0, allocation="adaptive", rounds=2)
    rc = dataclasses.replace(rc, lora=cfg.LoraConfig(rank=4, steps=2, batch_size=8, checkpoint_every=2, lr=1e-2),
                             classifier=dataclasses.replace(TINY_CLF, backbone="unet"),
                             clean_classifier=dataclasses.replace(TINY_CLF, guidance_input="x0_hat"))
    with FakeDevice() as mode:
        res = run_audit(tmp_path / "run", rc, device=FAKE)
    assert set(res.metrics) == {"side", "side-lora", "memguide", "cond"} and mode.ops > 1000
    host = run_audit(tmp_path / "host", rc, until="extraction")
    for m, s in res.extractions.items():
        np.testing.assert_allclose(s.images, host.extractions[m].images, atol=1e-6)
    with FakeDevice():  # what `side demo` does after the chain, and `side verify`, on the device
        measure_run(tmp_path / "run", device=FAKE, n_points=4)
        checks = [c for m in ("memguide", "side-lora") for c in Audit.load(tmp_path / "run").verify(m, top=2,
                                                                                                   device=FAKE)]
    assert len(checks) == 4 and all(c.pixels_differ == 0 for c in checks)


def test_classifier_resume_on_a_device(tmp_path):
    """Resuming loads the optimizer state onto the model's device (it used to stay on the host)."""
    x = torch.randn(40, 1, 8, 8).clamp(-1, 1)  # images as the stages give them, in [-1, 1]
    y = np.arange(40) % 2
    arch = ClassifierArch(num_classes=2, in_channels=1, image_size=8, depth=10, width=8)
    c = dataclasses.replace(TINY_CLF, steps=4)
    with FakeDevice():
        train_classifier(arch, x, y, dataclasses.replace(c, steps=2), scheduler=tiny_scheduler(), out=tmp_path, device=FAKE)
        train_classifier(arch, x, y, c, scheduler=tiny_scheduler(), out=tmp_path, device=FAKE)


def test_target_training_resume_with_ema_on_a_device(tmp_path):
    c = cfg.TrainTargetConfig(data="digits:20", block_out_channels=(16, 32), norm_num_groups=16, steps=2,
                              batch_size=8, checkpoint_every=1, ema=True)
    data = load_image_set("digits:20")
    with FakeDevice():
        train_target(dataclasses.replace(c, steps=1), data, tmp_path / "t", device=FAKE)
        train_target(c, data, tmp_path / "t", device=FAKE)


def test_imagenet_preprocessing_on_a_device():
    with FakeDevice():
        out = _imagenet_preprocess(torch.rand(2, 1, 8, 8).to(FAKE) * 2 - 1, 16)
        assert on_device(out) and out.shape == (2, 3, 16, 16)


def test_noise_streams_are_drawn_on_the_cpu_for_every_device(tiny_model_dir, monkeypatch):
    """CUDA's generator draws other numbers than the CPU's for the same seed: generation i's noise must come from
    CPU streams on every device, or a run resumed or regenerated on another device type mixes two noise families
    (the streams were built on the sampling device)."""
    from side_extract import sampling
    from side_extract.models.target import load_target

    made = []
    real = sampling.randn_tensor

    def spy(shape, generator=None, **kwargs):  # the generators the sampler draws each batch's noise from
        made.extend(str(g.device) for g in (generator if isinstance(generator, list) else [generator]))
        return real(shape, generator=generator, **kwargs)

    monkeypatch.setattr(sampling, "randn_tensor", spy)
    target = load_target(tiny_model_dir)
    with FakeDevice():
        target.unet.to(FAKE)
        on_dev = sampling.sample(target, 3, seed=4, steps=2, batch_size=2, device=FAKE).cpu()
    target.unet.to("cpu")
    assert made and set(made) == {"cpu"}
    np.testing.assert_array_equal(on_dev.numpy(), sampling.sample(target, 3, seed=4, steps=2, batch_size=2).numpy())
