"""When a run's finished stages are refused, kept or made again under ``replace=False`` (``side extract`` without
``--force``): refusals said before any work, named, and never for settings nothing reads (faults an independent review
of the pipeline's orchestration found, each reproduced on the code before these fixes)."""
import dataclasses
import json

import numpy as np
import pytest
import yaml

from side_extract import config as cfg
from side_extract.data import load_image_set
from side_extract.evaluation import incomparable
from side_extract.pipeline import run_audit
from side_extract.runs import StageWouldBeReplaced, read_json

from test_pipeline import tiny_rc


def _rc(model_dir, methods=("uncond",), **evaluate):
    rc = tiny_rc(model_dir, methods=methods)
    return dataclasses.replace(rc, evaluate=dataclasses.replace(rc.evaluate, quality=(), **evaluate))


def _stages(run):
    return read_json(run / "manifest.json")["stages"]


def test_a_refused_calibration_is_said_before_an_extraction_grows(tiny_model_dir, tmp_path):
    """Other calibration quantiles and a larger N_G without --force: the calibration's refusal came after the
    extraction had grown from 6 to 12, and config.yaml was then put back to n 6, so that a rerun with the run's own
    config was refused too. Now nothing grows and the config stands."""
    run = tmp_path / "run"
    rc = _rc(tiny_model_dir)
    run_audit(run, rc)
    more = dataclasses.replace(rc, extract=dataclasses.replace(rc.extract, n=12),
                               evaluate=dataclasses.replace(rc.evaluate, calibration_quantiles=(0.01, 0.05)))
    with pytest.raises(StageWouldBeReplaced, match=r"calibration holds finished results.*calibration_quantiles"):
        run_audit(run, more, replace=False)
    assert _stages(run)["extraction/uncond"]["n"] == 6 and "grown_from" not in _stages(run)["extraction/uncond"]
    assert yaml.safe_load((run / "config.yaml").read_text())["extract"]["n"] == 6
    run_audit(run, rc, replace=False)  # the run's own settings: nothing to refuse


def test_a_refused_clean_classifier_is_said_before_the_synthetic_set_is_drawn(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    rc = _rc(tiny_model_dir, methods=("cond", "uncond"))
    run_audit(run, rc, until="extraction")
    more = dataclasses.replace(rc, extract=dataclasses.replace(rc.extract, methods=("side", "cond", "uncond")),
                               clean_classifier=dataclasses.replace(rc.clean_classifier, steps=6))
    with pytest.raises(StageWouldBeReplaced, match=r"classifier-clean holds finished results.*steps 4 -> 6"):
        run_audit(run, more, until="extraction", replace=False)
    assert not {"synthetic", "features", "surrogate", "classifier"} & set(_stages(run))


def test_adding_side_to_a_run_measures_the_others_again_with_the_copy_guard(tiny_model_dir, tmp_path):
    """``side extract --method side --method uncond`` on a run of uncond: uncond's evaluation, made before the run
    held a synthetic set, was refused ("see manifest.json"), after every SIDE stage. It differs only in the copy
    guard it now has, so it is measured again."""
    run = tmp_path / "run"
    rc = _rc(tiny_model_dir)
    run_audit(run, rc)
    res = run_audit(run, dataclasses.replace(rc, extract=dataclasses.replace(rc.extract, methods=("side", "uncond"))),
                    replace=False)
    assert set(res.metrics) == {"side", "uncond"}
    assert _stages(run)["evaluation/uncond"]["data"]["synthetic set"] == _stages(run)["synthetic"]["fingerprint"]


def test_a_refusal_names_the_training_set_that_changed(tiny_model_dir, tmp_path):
    """Other images at the same training path: the refusal named nothing."""
    run, train = tmp_path / "run", tmp_path / "train.npz"
    d = load_image_set("digits:60")
    np.savez(train, images=d.images[:30], labels=d.labels[:30])
    rc = dataclasses.replace(_rc(tiny_model_dir, calibration_quantiles=(0.1, 0.2, 0.3)), train=str(train))
    run_audit(run, rc)
    np.savez(train, images=d.images[30:], labels=d.labels[30:])
    with pytest.raises(StageWouldBeReplaced, match=r"calibration holds .*changed: the training set changed"):
        run_audit(run, rc, replace=False)


def test_settings_nothing_reads_key_no_evaluation(tiny_model_dir, tmp_path):
    """detect_min_size without detect_threshold, and sample quality's settings without a quality metric: the run
    warns that they change nothing, yet the evaluations were keyed by them (refused without --force, else made
    again)."""
    run = tmp_path / "run"
    rc = _rc(tiny_model_dir)
    run_audit(run, rc)
    before = _stages(run)["evaluation/uncond"]["fingerprint"]
    inert = dataclasses.replace(rc, evaluate=dataclasses.replace(rc.evaluate, detect_min_size=5, quality_k=5))
    assert {"evaluate.detect_min_size", "evaluate.quality_k"} <= set(cfg.inert_keys(inert))
    run_audit(run, inert, replace=False)
    assert _stages(run)["evaluation/uncond"]["fingerprint"] == before


def test_evaluations_under_other_metric_settings_are_not_compared():
    """An evaluation redone under another Carlini alpha beside one made before: the summary set them against each
    other as if comparable."""
    def metrics(alpha):
        return {"similarity": "rms-l2", "orientation": "lower", "bands": {"mid": [0, 1]}, "n_train": 30,
                "config": {"carlini_alpha": alpha, "carlini_n": 5, "carlini_centering": "generation",
                           "gu_threshold": 0.5}}
    assert incomparable({"memguide": metrics(0.5), "uncond": metrics(0.5)}) == {}
    said = incomparable({"memguide": metrics(0.5), "uncond": metrics(0.999)})
    assert set(said) == {"uncond"} and "carlini_alpha" in said["uncond"]


def test_the_feature_batch_size_keys_only_what_reads_it(tiny_model_dir, tmp_path):
    """evaluate.feature_batch_size on pixel RMS-L2 (no network runs): no warning, yet the calibration and every
    evaluation were keyed by it (refused without --force, made again the same with it). On a network's features
    (cosine:unet) the training features were not keyed by it, though its batches round apart: a rerun mixed them
    with the evaluations' features of the new size (an independent review's finds)."""
    run = tmp_path / "run"
    rc = _rc(tiny_model_dir)
    run_audit(run, rc)
    before = {k: v["fingerprint"] for k, v in _stages(run).items()}
    other = dataclasses.replace(rc, evaluate=dataclasses.replace(rc.evaluate, feature_batch_size=3))
    assert "evaluate.feature_batch_size" in cfg.inert_keys(other)
    run_audit(run, other, replace=False)
    assert {k: v["fingerprint"] for k, v in _stages(run).items()} == before
    unet = _rc(tiny_model_dir, similarity="cosine:unet", bands="high=0.99:1,mid=0.98:0.99,low=0.97:0.98")
    run_audit(tmp_path / "u", unet)
    first = _stages(tmp_path / "u")["train-features"]["fingerprint"]
    run_audit(tmp_path / "u", dataclasses.replace(unet, evaluate=dataclasses.replace(unet.evaluate,
                                                                                      feature_batch_size=3)))
    assert _stages(tmp_path / "u")["train-features"]["fingerprint"] != first


def test_a_run_killed_after_its_evaluations_keeps_them(tiny_model_dir, tmp_path):
    """Killed after every method's metrics.json was written but before the manifest said so: the rerun measured
    every method again (the whole evaluation phase; an independent review of interruptions). Each whole one is kept
    now."""
    import json

    run = tmp_path / "run"
    rc = _rc(tiny_model_dir, methods=("uncond", "memguide"))
    run_audit(run, rc)
    manifest = json.loads((run / "manifest.json").read_text())
    for m in ("uncond", "memguide"):
        manifest["stages"][f"evaluation/{m}"]["status"] = "running"
    (run / "manifest.json").write_text(json.dumps(manifest))
    made = {m: (run / "evaluation" / m / "metrics.json").stat().st_mtime_ns for m in ("uncond", "memguide")}
    run_audit(run, rc)
    assert {m: (run / "evaluation" / m / "metrics.json").stat().st_mtime_ns for m in made} == made
    assert all(_stages(run)[f"evaluation/{m}"]["status"] == "complete" for m in made)


def test_an_interrupted_folder_swap_or_clearing_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
    """Ctrl-C between atomic_directory's two renames left the old folder under a temporary name and none at the path
    (a finished classifier was trained again); a kill while a stage's old folder was removed left the manifest saying
    its results stood (the report showed "no image")."""
    import os
    import shutil

    import side_extract.runs as runs

    (tmp_path / "clf").mkdir()
    (tmp_path / "clf" / "model.safetensors").write_text("trained")
    real, calls = os.replace, []

    def cut(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(src, dst)
    monkeypatch.setattr(os, "replace", cut)
    with pytest.raises(KeyboardInterrupt):
        with runs.atomic_directory(tmp_path / "clf") as tmp:
            (tmp / "model.safetensors").write_text("new")
    monkeypatch.undo()
    assert (tmp_path / "clf" / "model.safetensors").read_text() == "trained"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clf"]
    run = runs.RunDir(tmp_path / "run")
    run.begin("extraction/side", "a")
    (run.path / "extraction" / "side").mkdir(parents=True)
    (run.path / "extraction" / "side" / "shard-00000.npz").write_text("x")
    run.complete("extraction/side", n=6)
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run.begin("extraction/side", "b")
    monkeypatch.setattr(shutil, "rmtree", shutil.rmtree)
    assert _stages(run.path)["extraction/side"]["status"] != "complete"


def test_a_run_made_under_the_earlier_fingerprint_rule_is_resumed_as_it_is(tiny_model_dir, tmp_path, monkeypatch):
    """Session 46's rule keyed the evaluations and the calibration by settings found unread since (detection's
    without its threshold, feature_batch_size on pixels). A run made then with such a setting off its default was
    refused by the new rule with nothing named, or had its calibration and evaluations redone (a review of this
    session's diff). Its entries are now taken as they are, their fingerprints rewritten."""
    import side_extract.config as config

    unread = config.unread_keys
    monkeypatch.setattr(config, "unread_keys",  # (the earlier rule: nothing of the evaluate section unread)
                        lambda c, **kw: {} if isinstance(c, cfg.EvaluateConfig) else unread(c, **kw))
    monkeypatch.setattr(config, "batches_features", lambda name: True)
    run = tmp_path / "run"
    rc = _rc(tiny_model_dir)
    rc = dataclasses.replace(rc, evaluate=dataclasses.replace(rc.evaluate, detect_min_size=5, feature_batch_size=64))
    run_audit(run, rc)
    monkeypatch.undo()
    started = {k: v["started_unix"] for k, v in _stages(run).items()}
    run_audit(run, rc, replace=False)
    assert {k: v["started_unix"] for k, v in _stages(run).items()} == started
    assert "rekeyed_from" in _stages(run)["evaluation/uncond"] and "rekeyed_from" in _stages(run)["calibration"]
    run_audit(run, rc, replace=False)  # (and again, under the new fingerprints)
    assert {k: v["started_unix"] for k, v in _stages(run).items()} == started


def test_resuming_a_finished_run_hashes_the_training_set_once(tiny_model_dir, tmp_path, monkeypatch):
    """Resuming a finished four-method run hashed the training set's pixels 28 times (12 before this session's
    fixes): every method's fingerprint, the data recorded beside it and the early refusals each hashed it again."""
    from side_extract.data import ImageSet

    run = tmp_path / "run"
    rc = tiny_rc(tiny_model_dir)
    run_audit(run, rc)
    calls = []
    real = ImageSet.fingerprint
    monkeypatch.setattr(ImageSet, "fingerprint", lambda self: calls.append(len(self)) or real(self))
    run_audit(run, rc)
    assert calls.count(30) == 1, calls  # (the 30 training digits; the held-out ones once too)


def test_k_under_select_k_keys_no_stage(tiny_model_dir, tmp_path):
    """With surrogate.select_k the run warns that n_clusters changes nothing, yet it keyed the surrogate stage:
    changing it redid the labels, the classifier and every extraction (--force), or refused them. A run made under
    the earlier rule keeps its key (nothing it holds is redone)."""
    from side_extract.pipeline import surrogate_settings
    from side_extract.runs import stage_fingerprint

    rc = tiny_rc(tiny_model_dir, methods=("side",))
    rc = dataclasses.replace(rc, surrogate=cfg.SurrogateConfig(n_clusters=4, tau=-1.0, n_init=1, select_k=(2, 3)))
    run = tmp_path / "run"
    run_audit(run, rc, until="surrogate")
    other = dataclasses.replace(rc, surrogate=dataclasses.replace(rc.surrogate, n_clusters=5))
    assert "surrogate.n_clusters=5 (surrogate.select_k picks K by silhouette)" in cfg.inert_settings(other)
    before = read_json(run / "manifest.json")["stages"]["surrogate"]
    run_audit(run, other, until="surrogate", replace=False)  # (it was StageWouldBeReplaced)
    assert read_json(run / "manifest.json")["stages"]["surrogate"] == before
    # an entry keyed by the earlier rule (K in the key) stands, under its own key
    m = read_json(run / "manifest.json")
    inputs = list(m["stages"]["surrogate"]["inputs"].values())
    old = stage_fingerprint("surrogate", surrogate_settings(other.surrogate, legacy=True), *inputs)
    m["stages"]["surrogate"]["fingerprint"] = old
    (run / "manifest.json").write_text(json.dumps(m))
    run_audit(run, other, until="surrogate", replace=False)
    assert read_json(run / "manifest.json")["stages"]["surrogate"]["fingerprint"] == old
    # and K changed on such a run (its config.yaml records the K its key holds): still nothing redone
    six = dataclasses.replace(rc, surrogate=dataclasses.replace(rc.surrogate, n_clusters=6))
    for _ in range(2):  # (the second rerun, its config.yaml now saying 6, was refused)
        run_audit(run, six, until="surrogate", replace=False)
        assert read_json(run / "manifest.json")["stages"]["surrogate"]["fingerprint"] == old


def test_evaluation_faults_of_a_review(tiny_model_dir, tmp_path):
    """digits:1700's null (the 97 other digits) too small for the 0.001 quantile was refused by the calibration after
    every extraction (the docs promise it before the first stage); training images among the held-out images were
    left out of the null but kept in the sample-quality reference; a method's quality measured against other held-out
    images (evaluate.heldout changed between calls) was set beside the others with a best named."""
    from side_extract.report import _quality

    big = dataclasses.replace(_rc(tiny_model_dir), train="digits:1700")
    with pytest.raises(ValueError, match=r"a null of 97 images \(the digits outside train='digits:1700'\), too few"):
        run_audit(tmp_path / "big", big)
    assert not (tmp_path / "big" / "manifest.json").exists()

    train = load_image_set("digits:30")
    outside = load_image_set("digits:200").images[100:140]  # 40 digits outside digits:30's first three per class
    assert not (outside[:, None] == train.images[None]).all(axis=(2, 3, 4)).any()
    np.savez(tmp_path / "held.npz", images=np.concatenate([outside, train.images]))
    rc = dataclasses.replace(_rc(tiny_model_dir), evaluate=dataclasses.replace(
        _rc(tiny_model_dir).evaluate, heldout=str(tmp_path / "held.npz"), quality=("pixels",),
        bands="high=0:0.1,mid=0.1:0.15,low=0.15:0.2"))
    res = run_audit(tmp_path / "run", rc)
    q = res.metrics["uncond"]["quality"]["pixels"]
    assert q["n_reference"] == 40 and q["reference"]["source"] == str(tmp_path / "held.npz")

    rows = {m: {"quality": {"pixels": {"frechet": f, "kid": k, "kid_se": 0.0, "precision": 0.5, "recall": 0.5,
                                       "n_generated": 6, "n_reference": 40, "k": 3,
                                       "reference": {"fingerprint": ref}}}}
            for m, f, k, ref in (("uncond", 1.0, 0.01, "a"), ("memguide", 2.0, 0.5, "b"))}
    assert _quality(rows)["best"]["pixels"] == {"frechet": None, "kid": None, "precision": None, "recall": None}
    assert _quality(rows)["other_references"] == ["pixels"]
    rows["memguide"]["quality"]["pixels"]["reference"]["fingerprint"] = "a"
    assert _quality(rows)["best"]["pixels"]["frechet"] == "uncond" and _quality(rows)["other_references"] == []
