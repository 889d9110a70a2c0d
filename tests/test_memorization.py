"""Memorization-aware surrogate labels: the denoising-error score, the candidate split, the background class that
guidance never targets, and the stage in the chain (files, resume, fingerprints, preflight)."""
import dataclasses

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from side_extract import config as cfg
from side_extract.data import load_shards
from side_extract.extraction import extract
from side_extract.guidance import ClassifierGuidance
from side_extract.memorization import denoising_error, memorization_candidates, reconstruction_error
from side_extract.models.classifier import load_classifier
from side_extract.models.target import CallableDenoiser
from side_extract.pipeline import run_audit
from side_extract.report import write_report
from side_extract.runs import read_json
from side_extract.surrogate import ClusterLabeler, label_candidates

from test_pipeline import tiny_rc

# the surrogate stage's fingerprint of tiny_rc, computed by the code before memorization-aware labels existed
PAPER_SURROGATE_FP = "c1cf41a31b88b1b32c03ae158e7cb67c381633797dddd59ade520a31c1ab8849"  # by the code before this change


def one_image_model(m: torch.Tensor) -> CallableDenoiser:
    """The exact denoiser of a data distribution that is the single image ``m``: eps(x_t, t) = (x_t - sqrt(abar) m)
    / sqrt(1 - abar), so the denoised estimate is m at every noise level (a perfectly memorized image)."""
    sched = DDPMScheduler(num_train_timesteps=1000)

    def eps(x, t):
        abar = sched.alphas_cumprod[t.long()].view(-1, 1, 1, 1).to(x.dtype)
        return (x - abar.sqrt() * m) / (1 - abar).sqrt()

    return CallableDenoiser(eps, tuple(m.shape), sched)


def test_denoising_error_of_a_memorized_image_by_hand():
    g = torch.Generator().manual_seed(0)
    m = torch.rand((1, 4, 4), generator=g) * 1.6 - 0.8
    other = torch.rand((1, 4, 4), generator=g) * 2 - 1
    den = one_image_model(m)
    s = denoising_error(den, torch.stack([m, other]), t_fraction=0.3, draws=3, seed=5)
    # x0_hat = m whatever the noise: error 0 for m, the mean squared difference for the other image
    assert s[0] == pytest.approx(0.0, abs=1e-10)
    assert s[1] == pytest.approx(float((m - other).pow(2).mean()), rel=1e-5)


def test_reconstruction_error_is_differentiable_by_hand():
    """For the one-image model x0_hat = m at every noise level, so one draw of the score is mean (m - x0)^2 and its
    gradient in x0 is 2 (x0 - m) / (pixels): what memorization guidance follows."""
    g = torch.Generator().manual_seed(2)
    m = torch.rand((1, 4, 4), generator=g) * 1.6 - 0.8
    x0 = (torch.rand((3, 1, 4, 4), generator=g) * 2 - 1).requires_grad_(True)
    z = torch.randn((3, 1, 4, 4), generator=g)
    e = reconstruction_error(one_image_model(m), x0, 100, z, clip_range=None)
    torch.testing.assert_close(e, (m - x0).pow(2).flatten(1).mean(1))
    (grad,) = torch.autograd.grad(e.sum(), x0)
    torch.testing.assert_close(grad, 2 * (x0 - m).detach() / 16)


def test_denoising_error_does_not_depend_on_the_batch(tiny_model_dir):
    from side_extract.models.target import load_target
    den = load_target(tiny_model_dir)
    x = torch.rand((5, 1, 8, 8), generator=torch.Generator().manual_seed(1)) * 2 - 1
    whole = denoising_error(den, x, 0.2, 2, seed=3, batch_size=5)
    np.testing.assert_allclose(denoising_error(den, x, 0.2, 2, seed=3, batch_size=1), whole, rtol=1e-5)
    np.testing.assert_allclose(denoising_error(den, x, 0.2, 2, seed=3, batch_size=2), whole, rtol=1e-5)
    np.testing.assert_allclose(denoising_error(den, x[:1], 0.2, 2, seed=3), whole[:1], rtol=1e-5)
    assert not np.allclose(denoising_error(den, x, 0.2, 2, seed=4, batch_size=5), whole)  # the seed matters
    with pytest.raises(ValueError, match="t_fraction=1.0 must lie strictly between 0 and 1"):
        denoising_error(den, x, 1.0)
    with pytest.raises(ValueError, match="draws=0 must be an integer >= 1"):
        denoising_error(den, x, 0.2, 0)


def test_candidates_are_the_lowest_scores():
    s = np.array([0.5, 0.1, 0.9, 0.1, 0.3, 0.7])
    np.testing.assert_array_equal(memorization_candidates(s, 0.5), [1, 3, 4])
    np.testing.assert_array_equal(memorization_candidates(s, 0.01), [1, 3])  # at least 2
    np.testing.assert_array_equal(memorization_candidates(s, 1.0), np.arange(6))
    with pytest.raises(ValueError, match="memorized_fraction=0.0 must lie in"):
        memorization_candidates(s, 0.0)
    with pytest.raises(ValueError, match="finite"):
        memorization_candidates(np.array([0.1, np.nan]), 0.5)


def test_non_candidates_share_one_background_label():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 5
    feats = np.concatenate([centres[i] + rng.normal(size=(10, 8)) * 0.1 for i in range(3)])
    cand = np.arange(0, 30, 2)  # half of each blob
    out = label_candidates(ClusterLabeler(n_clusters=3, tau=-1.0, n_init=2), feats, cand)
    assert out.background == 3
    np.testing.assert_array_equal(out.labels[np.setdiff1d(np.arange(30), cand)], 3)
    assert set(out.labels[cand]) == {0, 1, 2} and list(out.targets) == [0, 1, 2]
    every = label_candidates(ClusterLabeler(n_clusters=3, tau=-1.0, n_init=2), feats, np.arange(30))
    assert every.background is None and set(every.labels) == {0, 1, 2}
    # every row a candidate, in another order: the labels still land on their own rows (they came back in the
    # candidates' order, so rows of one blob got other blobs' labels)
    shuffled = label_candidates(ClusterLabeler(n_clusters=3, tau=-1.0, n_init=2), feats, rng.permutation(30))
    blobs = shuffled.labels.reshape(3, 10)
    assert shuffled.background is None and (blobs == blobs[:, :1]).all() and len(set(blobs[:, 0])) == 3


@pytest.mark.parametrize("bad,said", [
    (np.arange(30) % 2 == 0, "candidates is a boolean mask of 30: give the row numbers"),  # (fitted rows 0 and 1)
    (np.array([-1, -2, 0, 1]), r"row numbers 0..29 of the 30 rows of features, got -2..1"),  # (wrapped around)
    (np.array([0, 30]), r"row numbers 0..29 of the 30 rows of features, got 0..30"),
    (np.array([0, 1, 1, 2]), "names a row more than once"),
    (np.array([0.0, 1.0]), "1-d array of row numbers"),
])
def test_candidates_that_are_not_row_numbers_are_refused(bad, said):
    """A boolean mask of the candidates was read as the rows 0 and 1 (every real candidate got the background label),
    and negative row numbers wrapped around, without a word (a review's find)."""
    feats = np.random.default_rng(0).normal(size=(30, 4))
    with pytest.raises(ValueError, match=said):
        label_candidates(ClusterLabeler(n_clusters=2, tau=-1.0, n_init=1), feats, bad)


class _Fixed(torch.nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x, t):
        return torch.zeros(len(x), self.k) + x.flatten(1)[:, :1]


def test_guidance_never_targets_the_background(tiny_model_dir):
    from side_extract.models.target import load_target
    g = ClassifierGuidance(_Fixed(4), np.array([0, 2, 5, 7]), 1.0, background=(5,))
    np.testing.assert_array_equal(g.target_outputs, [0, 1, 3])
    c = cfg.ExtractConfig(methods=("side",), n=40, steps=2, scale=1.0)
    labels = extract(load_target(tiny_model_dir), c, g, 0, 40)["labels"]
    assert set(labels) == {0, 2, 7}  # 40 uniform draws over the three targets, never the background's 5
    with pytest.raises(ValueError, match=r"background=\[3\] must be label values"):
        ClassifierGuidance(_Fixed(2), np.array([0, 1]), 1.0, background=(3,))
    with pytest.raises(ValueError, match="nothing to guide toward"):
        ClassifierGuidance(_Fixed(2), np.array([0, 1]), 1.0, background=(0, 1))


def test_memorization_aware_chain(tiny_model_dir, tmp_path):
    rc = tiny_rc(tiny_model_dir, methods=("side", "uncond"))
    rc = dataclasses.replace(rc, surrogate=dataclasses.replace(rc.surrogate, memorized_fraction=0.5, n_clusters=3))
    run = tmp_path / "run"
    run_audit(run, rc)
    html = write_report(run).read_text()
    assert "only the\n20 samples the target denoises best were clustered" in html and "background\nlabel 3" in html
    scores = np.load(run / "memorization" / "scores.npz")["scores"]
    z = np.load(run / "surrogate" / "labels.npz")
    assert len(scores) == 40 and int(z["background"]) == 3
    np.testing.assert_array_equal(z["candidates"], np.sort(np.argsort(scores, kind="stable")[:20]))
    others = np.setdiff1d(np.arange(40), z["candidates"])
    np.testing.assert_array_equal(z["labels"][others], 3)
    assert 3 in load_classifier(run / "classifier").arch.classes  # the classifier learns the background
    side = load_shards(run / "extraction" / "side")
    assert len(side) == 6 and 3 not in set(side.labels) and (side.labels >= 0).all()
    stamps = {k: v["started_unix"] for k, v in read_json(run / "manifest.json")["stages"].items()}
    run_audit(run, rc)  # unchanged: skipped
    assert {k: v["started_unix"] for k, v in read_json(run / "manifest.json")["stages"].items()} == stamps
    # another noise level rescores and relabels; the synthetic set stays
    other = dataclasses.replace(rc, surrogate=dataclasses.replace(rc.surrogate, memorization_t=0.4))
    run_audit(run, other, until="surrogate")
    after = read_json(run / "manifest.json")["stages"]
    assert after["memorization"]["started_unix"] != stamps["memorization"]
    assert after["surrogate"]["started_unix"] != stamps["surrogate"]
    assert after["synthetic"]["started_unix"] == stamps["synthetic"]


def test_paper_labels_keep_their_fingerprint(tiny_model_dir, tmp_path):
    """memorized_fraction 1 (the default) computes no scores and names the surrogate stage as before the option
    existed, so that cached surrogate labels and classifiers stay valid (the value was computed by the code before
    memorization-aware labels)."""
    rc = tiny_rc(tiny_model_dir, methods=("side",))
    run_audit(tmp_path / "r", rc, until="surrogate")
    stages = read_json(tmp_path / "r" / "manifest.json")["stages"]
    assert "memorization" not in stages
    assert stages["surrogate"]["fingerprint"] == PAPER_SURROGATE_FP


def test_preflight_names_the_candidate_count(tiny_model_dir, tmp_path):
    rc = tiny_rc(tiny_model_dir, methods=("side",))
    rc = dataclasses.replace(rc, surrogate=dataclasses.replace(rc.surrogate, memorized_fraction=0.05, n_clusters=4))
    with pytest.raises(ValueError, match=r"surrogate K=4 must be <= the memorization candidates .*=2"):
        run_audit(tmp_path / "r", rc)
    assert not (tmp_path / "r" / "synthetic").exists()
    with pytest.raises(ValueError, match=r"memorized_fraction=1.5 must lie in \(0, 1\]"):
        cfg.SurrogateConfig(memorized_fraction=1.5)
    with pytest.raises(ValueError, match="memorization_t=0.0 must lie strictly between 0 and 1"):
        cfg.SurrogateConfig(memorization_t=0.0)




def test_side_lora_learns_the_background_and_never_targets_it(tiny_model_dir, tmp_path, one_thread):
    """side-lora with memorization-aware labels: the background is one more class of the fine-tune (recorded in
    classes.json, restored on load) and no generation is drawn toward it (the old code drew among all classes)."""
    from side_extract.finetune import load_finetuned
    from side_extract.models.target import load_target
    rc = tiny_rc(tiny_model_dir, methods=("side-lora",))
    rc = dataclasses.replace(rc, surrogate=dataclasses.replace(rc.surrogate, memorized_fraction=0.5, n_clusters=2),
                             lora=cfg.LoraConfig(rank=4, steps=4, batch_size=8, checkpoint_every=2, lr=1e-2),
                             extract=dataclasses.replace(rc.extract, n=30))
    run = tmp_path / "run"
    run_audit(run, rc)
    assert read_json(run / "lora" / "classes.json")["background"] == 2
    model = load_finetuned(load_target(tiny_model_dir), run / "lora")
    np.testing.assert_array_equal(model.classes, [0, 1, 2])
    assert model.background == 2 and model.target_outputs.tolist() == [0, 1]
    labels = load_shards(run / "extraction" / "side-lora").labels
    assert set(labels) == {0, 1}  # 30 uniform draws over the two clusters, never the background's 2


def test_memorization_inputs_misstated_are_named():
    """An independent review's finds: denoising_error with batch_size -1 returned np.empty's memory as scores (0
    failed inside range); memory images of 0-255 pixels turned avoidance off without a word (every kernel
    exp(-huge) = 0) and another shape failed mid-sampling; 2-D scores gave 2-D column indices as candidates."""
    from side_extract.memorization import MemorizationGuidance

    m = torch.zeros((1, 4, 4))
    den = one_image_model(m)
    x = torch.zeros((3, 1, 4, 4))
    for bad in (-1, 0, 2.5):
        with pytest.raises(ValueError, match=f"batch_size={bad} must be a positive number of images per batch"):
            denoising_error(den, x, batch_size=bad)
    g = MemorizationGuidance(den, 5.0, avoid=1.0)
    with pytest.raises(ValueError, match=r"memory images .* must lie in \[-1, 1\], got values 0\.\.255"):
        g.remembering(torch.full((2, 1, 4, 4), 255.0).index_fill_(0, torch.tensor([0]), 0.0))
    with pytest.raises(ValueError, match=r"memory images .* are \(3, 4, 4\) \(C, H, W\) but the model's are "
                                         r"\(1, 4, 4\)"):
        g.remembering(torch.zeros((2, 3, 4, 4)))
    assert len(g.remembering(torch.zeros((2, 1, 4, 4))).memory) == 2
    with pytest.raises(ValueError, match=r"one per sample, shape \(n,\); got shape \(3, 4\)"):
        memorization_candidates(np.arange(12.0).reshape(3, 4), 0.5)


def test_denoising_error_names_its_settings_of_the_wrong_kind(tiny_model_dir):
    """seed=1.5 was taken as seed 1, seed=-1 was numpy's "expected non-negative integer", draws=2.5 a TypeError
    of torch.randn and t_fraction="0.2" a comparison's: each is refused naming the setting."""
    from side_extract.models.target import load_target
    den = load_target(tiny_model_dir)
    x0 = torch.zeros(2, 1, 8, 8)
    for kw, said in [(dict(seed=1.5), "seed=1.5 must be an integer >= 0"), (dict(seed=-1), "seed=-1 must be"),
                     (dict(draws=2.5), "draws=2.5 must be an integer >= 1"), (dict(draws=True), "draws=True must"),
                     (dict(t_fraction="0.2"), "t_fraction='0.2' must be a number")]:
        with pytest.raises(ValueError, match=said):
            denoising_error(den, x0, **kw)
