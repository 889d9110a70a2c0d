import numpy as np
import pytest
import torch

from side_extract import config as cfg
from side_extract.models.classifier import ClassifierArch, NoiseAwareResNet, load_classifier, save_classifier
from side_extract.training import train_classifier

from conftest import tiny_scheduler


@pytest.mark.parametrize("size,channels", [(8, 1), (16, 3), (32, 3), (64, 1), (128, 3)])
def test_shapes_any_size(size, channels):
    m = NoiseAwareResNet(ClassifierArch(num_classes=7, in_channels=channels, image_size=size, depth=10, width=8))
    assert m(torch.randn(2, channels, size, size), torch.tensor([1, 999])).shape == (2, 7)


def test_time_module_is_used_and_none_ignores_t():
    torch.manual_seed(0)
    m = NoiseAwareResNet(ClassifierArch(num_classes=3, in_channels=1, image_size=8, depth=10, width=8)).eval()
    # make the time MLP non-trivial (its last layer starts small, but not zero)
    x = torch.randn(2, 1, 8, 8)
    assert not torch.allclose(m(x, torch.tensor([0, 0])), m(x, torch.tensor([900, 900])))
    clean = NoiseAwareResNet(ClassifierArch(num_classes=3, in_channels=1, image_size=8, depth=10, width=8,
                                            time_mode="none")).eval()
    assert torch.equal(clean(x, torch.tensor([0, 0])), clean(x, torch.tensor([900, 900])))
    assert not any("time" in n for n, _ in clean.named_parameters())


def test_save_load_roundtrip(tmp_path):
    arch = ClassifierArch(num_classes=3, in_channels=1, image_size=8, depth=10, width=8, classes=(4, 7, 9))
    m = NoiseAwareResNet(arch).eval()
    save_classifier(m, tmp_path / "c", extra={"note": 1})
    m2 = load_classifier(tmp_path / "c")
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([5, 50, 500])
    assert torch.equal(m(x, t), m2(x, t))
    assert m2.arch.classes == (4, 7, 9)
    with pytest.raises(ValueError, match="not a saved classifier"):
        load_classifier(tmp_path / "missing")


def test_arch_validation():
    with pytest.raises(ValueError, match="depth=19"):
        ClassifierArch(num_classes=3, in_channels=1, image_size=8, depth=19)
    with pytest.raises(ValueError, match="num_classes=1"):
        ClassifierArch(num_classes=1, in_channels=1, image_size=8)


def separable_toy(n=240, seed=0):
    """Two classes: bright left half vs bright right half (8x8)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = -torch.ones(n, 1, 8, 8)
    x[y == 0, :, :, :4] = 1
    x[y == 1, :, :, 4:] = 1
    return x, y.numpy()


def test_noise_aware_classifier_learns_all_quartiles(tmp_path):
    """Bright vs dark 8x8 images under a cosine schedule: the Bayes accuracy is ~1 in quartiles 0-2 and ~0.85
    in the last (the signal vanishes as t -> T), so the bars are set just below those."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (400,), generator=g)
    x = torch.where(y[:, None, None, None] == 0, 1.0, -1.0).expand(400, 1, 8, 8).clone()
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    arch = ClassifierArch(num_classes=2, in_channels=1, image_size=8, depth=10, width=8)
    c = cfg.ClassifierConfig(steps=150, batch_size=64, lr=5e-3, eval_every=150, eval_fraction=0.3)
    res = train_classifier(arch, x, y.numpy(), c, scheduler=sched, out=tmp_path / "clf")
    acc = res.final_accuracy
    assert acc["q0"] > 0.95 and acc["q1"] > 0.95 and acc["q2"] > 0.95 and acc["q3"] > 0.7, acc
    assert (tmp_path / "clf" / "log.json").exists()


def test_training_resumes_exactly(tmp_path):
    x, y = separable_toy(64)
    arch = ClassifierArch(num_classes=2, in_channels=1, image_size=8, depth=10, width=8)
    c = cfg.ClassifierConfig(steps=6, batch_size=16, eval_every=3, eval_fraction=0.0)
    full = train_classifier(arch, x, y, c, scheduler=tiny_scheduler(), out=tmp_path / "a").model
    # an interrupted run: the first 3 steps, checkpointed; the step budget is not part of the resume key
    import dataclasses

    train_classifier(arch, x, y, dataclasses.replace(c, steps=3), scheduler=tiny_scheduler(), out=tmp_path / "b")
    resumed = train_classifier(arch, x, y, c, scheduler=tiny_scheduler(), out=tmp_path / "b").model
    xx, tt = torch.randn(4, 1, 8, 8), torch.tensor([1, 200, 400, 800])
    torch.testing.assert_close(full(xx, tt), resumed(xx, tt), rtol=0, atol=0)


def test_checkpoint_past_the_step_budget_is_not_resumed(tmp_path):
    """A checkpoint of a longer run in ``out`` cannot be wound back: asking for fewer steps trains them afresh (it
    used to return the longer-trained model, with its longer history)."""
    import dataclasses

    x, y = separable_toy(64)
    arch = ClassifierArch(num_classes=2, in_channels=1, image_size=8, depth=10, width=8)
    c = cfg.ClassifierConfig(steps=4, batch_size=16, eval_every=2, eval_fraction=0.0)
    train_classifier(arch, x, y, c, scheduler=tiny_scheduler(), out=tmp_path / "run")
    short = dataclasses.replace(c, steps=2)
    reused = train_classifier(arch, x, y, short, scheduler=tiny_scheduler(), out=tmp_path / "run")
    fresh = train_classifier(arch, x, y, short, scheduler=tiny_scheduler(), out=tmp_path / "fresh")
    assert [h["step"] for h in reused.history] == [h["step"] for h in fresh.history] == [2]
    for k, v in fresh.model.state_dict().items():
        assert torch.equal(v, reused.model.state_dict()[k]), k


@pytest.mark.parametrize("change", ["images", "labels", "schedule"])
def test_checkpoint_of_other_data_is_not_resumed(tmp_path, change):
    """A finished checkpoint in ``out`` made from other images, labels or noise schedule is discarded: the
    result equals training from scratch on the new inputs (it used to be the old model, returned as is)."""
    from diffusers import DDPMScheduler

    x, y = separable_toy(64)
    arch = ClassifierArch(num_classes=2, in_channels=1, image_size=8, depth=10, width=8)
    c = cfg.ClassifierConfig(steps=4, batch_size=16, eval_every=2, eval_fraction=0.0)
    train_classifier(arch, x, y, c, scheduler=tiny_scheduler(), out=tmp_path / "run")
    x2, y2, sched2 = x, y, tiny_scheduler()
    if change == "images":
        x2 = x.flip(0)
    elif change == "labels":
        y2 = 1 - y
    else:
        sched2 = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    reused = train_classifier(arch, x2, y2, c, scheduler=sched2, out=tmp_path / "run").model
    fresh = train_classifier(arch, x2, y2, c, scheduler=sched2, out=tmp_path / "fresh").model
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, reused.state_dict()[k]), k


def test_every_class_keeps_a_training_image():
    """A class with few members never lands wholly in the held-out split (its output would be untrained)."""
    from side_extract.training import heldout_split

    y = np.array([0] * 50 + [1] * 30 + [2] * 1 + [3] * 2 + [4] * 9)
    for seed in range(20):
        tr, ev = heldout_split(y, 0.34, seed)
        assert set(y[tr]) == {0, 1, 2, 3, 4}
        assert len(np.intersect1d(tr, ev)) == 0 and len(tr) + len(ev) == len(y)
        assert len(ev) == 17 + 10 + 0 + 0 + 3  # floor(0.34 * n_c) per class


def test_clean_classifier_and_validation():
    x, y = separable_toy(80)
    arch = ClassifierArch(num_classes=2, in_channels=1, image_size=8, depth=10, width=8, time_mode="none")
    res = train_classifier(arch, x, y, cfg.ClassifierConfig(steps=60, lr=3e-3, eval_every=60, eval_fraction=0.25),
                           scheduler=None)
    assert res.final_accuracy["clean"] > 0.9
    with pytest.raises(ValueError, match="labels must lie in 0..1"):
        train_classifier(arch, x, np.full(80, 5), cfg.ClassifierConfig(steps=1), scheduler=None)
    with pytest.raises(ValueError, match="needs the target's scheduler"):
        train_classifier(arch, x, y, cfg.ClassifierConfig(steps=1), scheduler=tiny_scheduler())


def test_time_in_every_block_is_used_and_saved(tmp_path):
    """time_blocks='every' (guided-diffusion's classifier): t changes every block's features; save/load round trip."""
    arch = ClassifierArch(num_classes=3, in_channels=1, image_size=8, depth=10, width=8, time_blocks="every")
    torch.manual_seed(0)
    m = NoiseAwareResNet(arch).eval()
    assert len([n for n, _ in m.named_parameters() if ".emb." in n]) == 2 * len(m.layers)
    x = torch.randn(2, 1, 8, 8)
    # zero the stem's time module: only the per-block conditioning can make t matter now
    for p in m.time_mlp.parameters():
        torch.nn.init.zeros_(p)
    assert not torch.allclose(m(x, torch.tensor([10, 10])), m(x, torch.tensor([900, 900])))
    save_classifier(m, tmp_path / "c")
    back = load_classifier(tmp_path / "c")
    assert back.arch.time_blocks == "every"
    torch.testing.assert_close(back(x, torch.tensor([5, 700])), m(x, torch.tensor([5, 700])))
    first = NoiseAwareResNet(ClassifierArch(num_classes=3, in_channels=1, image_size=8, depth=10, width=8)).eval()
    for p in first.time_mlp.parameters():
        torch.nn.init.zeros_(p)
    torch.testing.assert_close(first(x, torch.tensor([10, 10])), first(x, torch.tensor([900, 900])))


def test_unet_feature_classifier_trains_its_head_only_and_guides(tmp_path):
    """backbone='unet': the target's UNet features at t feed a trained head; the target's weights are neither
    changed nor given gradients, the saved file holds the head only, the loaded classifier gives the same
    logits with the same UNet, and its gradient w.r.t. x_t (what guidance uses) flows through the UNet."""
    from conftest import tiny_unet

    from side_extract.models.classifier import UNetFeatureClassifier, build_classifier

    unet = tiny_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    arch = ClassifierArch(num_classes=3, in_channels=1, image_size=8, width=8, backbone="unet")
    x0 = torch.rand(30, 1, 8, 8) * 2 - 1
    y = np.arange(30) % 3
    c = cfg.ClassifierConfig(backbone="unet", width=8, steps=6, batch_size=8, eval_every=3, eval_fraction=0.0)
    res = train_classifier(arch, x0, y, c, scheduler=tiny_scheduler(), out=tmp_path / "w", unet=unet)
    model = res.model
    assert isinstance(model, UNetFeatureClassifier)
    assert all(k.startswith("head.") for k in model.state_dict())
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert all(p.grad is None for p in unet.parameters())
    save_classifier(model, tmp_path / "clf")
    again = load_classifier(tmp_path / "clf", unet=unet)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([10, 300, 600, 900])
    torch.testing.assert_close(again(x, t), model.eval()(x, t))
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(again(xg, t)[:, 1].sum(), xg)
    assert g.abs().sum() > 0
    with pytest.raises(ValueError, match="UNet2DModel"):
        load_classifier(tmp_path / "clf")
    with pytest.raises(ValueError, match="clean"):
        ClassifierArch(num_classes=3, in_channels=1, image_size=8, time_mode="none", backbone="unet")
    with pytest.raises(ValueError, match="guidance_input"):
        cfg.ClassifierConfig(backbone="unet", guidance_input="x0_hat")
    assert build_classifier(ClassifierArch(num_classes=3, in_channels=1, image_size=8)).arch.backbone == "resnet"


def test_the_most_common_held_out_labels_share_is_recorded():
    """30 images of class 0 and 10 of class 1, a quarter of each held out (rounded down): 7 and 2, so always answering
    0 scores 7/9 on the held-out images."""
    from side_extract import config as cfg
    from side_extract.training import fit_label_classifier

    x = torch.rand(40, 1, 8, 8) * 2 - 1
    y = np.array([0] * 30 + [1] * 10)
    c = cfg.ClassifierConfig(depth=10, width=8, steps=1, eval_fraction=0.25)
    res = fit_label_classifier(x, y, c, scheduler=None)
    assert res.majority_rate == pytest.approx(7 / 9)
