"""The whole chain on a tiny model in seconds: files, skip on rerun, equal noise across methods, sweeps."""
import dataclasses
import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from side_extract import config as cfg
from side_extract.cli.main import app
from side_extract.data import ImageSet, load_image_set, load_shards
from side_extract.models.target import load_target
from side_extract.pipeline import method_guidance, run_audit
from side_extract.runs import read_json
from side_extract.sweeps import run_with_sweeps

from conftest import interrupt_at

TINY_CLF = cfg.ClassifierConfig(depth=10, width=8, steps=4, batch_size=16, eval_every=2)


def tiny_rc(model_dir, **extract) -> cfg.RunConfig:
    return cfg.RunConfig(
        model=str(model_dir), train="digits:30",
        sample=cfg.SampleConfig(n=40, steps=2, shard_size=16),
        surrogate=cfg.SurrogateConfig(n_clusters=4, tau=-1.0, n_init=1),
        classifier=TINY_CLF, clean_classifier=TINY_CLF,
        extract=cfg.ExtractConfig(**{"methods": ("side", "side-teacher", "cond", "uncond"), "n": 6, "steps": 2,
                                     "scale": 1.0, **extract}),
        evaluate=cfg.EvaluateConfig(carlini_n=5, quality=("pixels",), quality_max_reference=200),
    )


def test_whole_chain_and_skip(tiny_model_dir, tmp_path):
    rc = tiny_rc(tiny_model_dir)
    res = run_audit(tmp_path / "run", rc)
    run = tmp_path / "run"
    for f in ["config.yaml", "manifest.json", "synthetic/shard-00000.npz", "features/features.npz",
              "surrogate/labels.npz", "surrogate/clusters.json", "classifier/model.safetensors",
              "classifier-clean/config.json", "teacher/labels.npz", "classifier-teacher/model.safetensors",
              "evaluation/bands.json"]:
        assert (run / f).exists(), f
    assert set(res.metrics) == {"side", "side-teacher", "cond", "uncond"}
    for m, metrics in res.metrics.items():
        assert metrics["n_generated"] == 6 and metrics["n_train"] == 30
        s = load_shards(run / "extraction" / m)
        assert len(s) == 6 and ((s.labels == -1) == (m == "uncond")).all()
    side = load_shards(run / "extraction" / "side")
    kept = set(np.flatnonzero(np.load(run / "surrogate" / "labels.npz")["kept"]))
    assert set(side.labels) <= kept  # targets are kept clusters
    assert yaml.safe_load((run / "config.yaml").read_text())["extract"]["n"] == 6
    stamps = {k: v["started_unix"] for k, v in read_json(run / "manifest.json")["stages"].items()}
    run_audit(run, rc)  # unchanged: every stage skipped
    assert {k: v["started_unix"] for k, v in read_json(run / "manifest.json")["stages"].items()} == stamps
    # a changed extraction setting reruns extraction and evaluation only
    run_audit(run, dataclasses.replace(rc, extract=dataclasses.replace(rc.extract, scale=2.0)))
    after = read_json(run / "manifest.json")["stages"]
    assert after["classifier"]["started_unix"] == stamps["classifier"]
    assert after["extraction/side"]["started_unix"] != stamps["extraction/side"]
    assert after["extraction/uncond"]["started_unix"] == stamps["extraction/uncond"]  # lambda is not its input
    # dropping methods from the list redoes none of the others
    run_audit(run, dataclasses.replace(rc, extract=dataclasses.replace(rc.extract, scale=2.0, methods=("side", "uncond"))))
    again = read_json(run / "manifest.json")["stages"]
    assert again["extraction/side"]["started_unix"] == after["extraction/side"]["started_unix"]
    # SIDE's temperature reruns the SIDE methods only; Cond has its own (cond_temperature)
    run_audit(run, dataclasses.replace(rc, extract=dataclasses.replace(rc.extract, scale=2.0, temperature=3.0)))
    hot = read_json(run / "manifest.json")["stages"]
    assert hot["extraction/side"]["started_unix"] != after["extraction/side"]["started_unix"]
    assert hot["extraction/side-teacher"]["started_unix"] != after["extraction/side-teacher"]["started_unix"]
    assert hot["extraction/cond"]["started_unix"] == after["extraction/cond"]["started_unix"]
    run_audit(run, dataclasses.replace(rc, extract=dataclasses.replace(rc.extract, scale=2.0, temperature=3.0,
                                                                       cond_temperature=3.0)))
    cold = read_json(run / "manifest.json")["stages"]
    assert cold["extraction/cond"]["started_unix"] != hot["extraction/cond"]["started_unix"]
    assert cold["extraction/side"]["started_unix"] == hot["extraction/side"]["started_unix"]
    with pytest.raises(ValueError, match="cond_temperature=0.0 must be > 0"):
        cfg.ExtractConfig(cond_temperature=0.0)
    # SIDE-teacher's own lambda and temperature (None: SIDE's), so one config holds both methods' tuned settings:
    # only its extraction reruns, and it guides with them
    teach = dataclasses.replace(rc, extract=dataclasses.replace(rc.extract, scale=2.0, temperature=3.0,
                                                                cond_temperature=3.0, teacher_scale=5.0,
                                                                teacher_temperature=1.5))
    run_audit(run, teach)
    own = read_json(run / "manifest.json")["stages"]
    assert own["extraction/side"]["started_unix"] == cold["extraction/side"]["started_unix"]
    assert own["extraction/side-teacher"]["started_unix"] != cold["extraction/side-teacher"]["started_unix"]
    assert own["extraction/side-teacher"]["scale"] == 5.0 and own["extraction/side"]["scale"] == 2.0
    g = method_guidance(run, teach, "side-teacher", load_target(tiny_model_dir))[1]
    assert (g.scale, g.temperature) == (5.0, 1.5)
    with pytest.raises(ValueError, match="teacher_temperature=0.0 must be > 0"):
        cfg.ExtractConfig(teacher_temperature=0.0)


def test_methods_share_noise(tiny_model_dir, tmp_path):
    """With lambda = 0 every method's generation i is the same image: only guidance differs."""
    res = run_audit(tmp_path / "r", tiny_rc(tiny_model_dir, scale=0.0, methods=("side", "uncond")), until="extraction")
    np.testing.assert_array_equal(res.extractions["side"].images, res.extractions["uncond"].images)
    res2 = run_audit(tmp_path / "r2", tiny_rc(tiny_model_dir, scale=50.0, methods=("side", "uncond")), until="extraction")
    assert not np.array_equal(res2.extractions["side"].images, res2.extractions["uncond"].images)


def test_sweeps_share_unchanged_stages(tiny_model_dir, tmp_path, caplog):
    rc = tiny_rc(tiny_model_dir, methods=("side", "uncond"))
    rc = dataclasses.replace(rc, sweep=cfg.SweepConfig(scale=(0.0, 3.0), tau=(0.0,)),
                             extract=dataclasses.replace(rc.extract, rounds=rc.extract.rounds + 1))
    assert cfg.inert_settings(rc)  # (no method here generates in rounds)
    with caplog.at_level("WARNING", logger="side_extract.pipeline"):
        main, subs = run_with_sweeps(tmp_path / "run", rc)
    said = [r for r in caplog.records if "settings that change nothing" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]  # once for the sweep, not 7 times (3 checks, 4 runs)
    assert set(subs) == {"scale=0", "scale=3", "tau=0"}
    m = read_json(tmp_path / "run" / "sweeps" / "scale=3" / "manifest.json")["stages"]
    assert m["classifier"].get("shared_from")  # the classifier was reused, not retrained
    assert "shared_from" not in m["extraction/side"]
    t = read_json(tmp_path / "run" / "sweeps" / "tau=0" / "manifest.json")["stages"]
    assert "shared_from" not in t["surrogate"] and t["features"].get("shared_from")
    assert (tmp_path / "run" / "sweeps" / "scale=3" / "evaluation" / "side" / "metrics.json").exists()
    assert "uncond" in main.metrics and set(subs["scale=3"].metrics) == {"side"}


def test_a_sweeps_sub_runs_warn_only_the_settings_their_main_run_has_not(tiny_model_dir, tmp_path, caplog):
    """Sub-runs drop the methods the sweep does not move (memguide here), so their list of settings that change
    nothing differed, and each said its whole list again: sample.eta under DDPM was warned of once per sweep value
    and once more (a review's find). A sub-run now says only what the main run has not."""
    rc = tiny_rc(tiny_model_dir, methods=("side", "memguide"), memguide_avoid_h=0.1)
    rc = dataclasses.replace(rc, sample=dataclasses.replace(rc.sample, scheduler="ddpm", eta=0.5),
                             sweep=cfg.SweepConfig(scale=(2.0,)))
    with caplog.at_level("WARNING", logger="side_extract.pipeline"):
        run_with_sweeps(tmp_path / "run", rc)
    said = [r.getMessage() for r in caplog.records if "settings that change nothing" in r.getMessage()]
    assert sum("sample.eta=0.5" in m for m in said) == 1, said
    assert all("memguide_avoid_h" in m for m in said), said  # (said again where its reason differs)


def test_only_the_sweeps_the_config_asks_for_now_are_read_back(tiny_model_dir, tmp_path, caplog):
    """A rerun with another sweep and another temperature left sweeps/scale=2 (and scale=3, made at the old
    temperature) on disk, and the report's sweep curve and Audit.sweeps drew them in beside the new run's."""
    from side_extract.api import Audit
    from side_extract.report import build_report

    rc = tiny_rc(tiny_model_dir, methods=("side", "uncond"), n=4)
    run = tmp_path / "run"
    run_with_sweeps(run, dataclasses.replace(rc, sweep=cfg.SweepConfig(scale=(2.0, 3.0))))
    assert set(Audit.load(run).sweeps) == {"scale=2", "scale=3"}
    assert build_report(run)["sweeps"]["scale"]["side"]["values"] == sorted([2.0, 3.0, rc.extract.scale])
    hotter = dataclasses.replace(rc, extract=dataclasses.replace(rc.extract, temperature=5.0),
                                 sweep=cfg.SweepConfig(scale=(5.0,)))
    with caplog.at_level("WARNING", logger="side_extract.sweeps"):
        run_with_sweeps(run, hotter)
    assert any("sweeps/ also holds scale=2, scale=3" in r.getMessage() for r in caplog.records)
    assert set(Audit.load(run).sweeps) == {"scale=5"}
    assert build_report(run)["sweeps"]["scale"]["side"]["values"] == sorted([rc.extract.scale, 5.0])
    # a parent stage made again under the same config (other training images at the same path): the sub-run's
    # copy of the old one is not this run's (it was drawn into the curve, measured against the old bands)
    manifest = run / "manifest.json"
    before = manifest.read_text()
    shared = [k for k, e in json.loads((run / "sweeps" / "scale=5" / "manifest.json").read_text())["stages"].items()
              if e.get("shared_from")]
    assert "calibration" in shared
    m = json.loads(before)
    m["stages"]["calibration"]["fingerprint"] = "made-again"
    manifest.write_text(json.dumps(m))
    assert Audit.load(run).sweeps == {} and build_report(run)["sweeps"] == {}
    manifest.write_text(before)
    # the same value under other settings of the run (the run redone without its sweeps): not this run's
    cooler = dataclasses.replace(hotter, extract=dataclasses.replace(hotter.extract, temperature=4.0))
    run_audit(run, cooler)
    assert Audit.load(run).sweeps == {} and build_report(run)["sweeps"] == {}
    assert (run / "sweeps" / "scale=5" / "evaluation" / "side" / "metrics.json").is_file()  # left as it is


def test_sweeps_of_relative_paths_and_close_values_are_each_their_own(tiny_model_dir, tmp_path, caplog, monkeypatch):
    """A config of relative paths (side run rel.yaml): every fresh sub-run was called an earlier config's ("sweeps/
    also holds scale=3 ...", inviting its deletion), the sub-runs recording the paths absolute. Two values alike to 6
    digits shared one folder, the first lost."""
    from side_extract.sweeps import sweep_configs

    monkeypatch.chdir(tiny_model_dir.parent)
    rc = tiny_rc(tiny_model_dir.name, methods=("side", "uncond"), n=4)
    with caplog.at_level("WARNING", logger="side_extract.sweeps"):
        _, subs = run_with_sweeps(tmp_path / "run", dataclasses.replace(rc, sweep=cfg.SweepConfig(scale=(3.0,))))
    assert set(subs) == {"scale=3"} and not any("also holds" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match=r"two values are both named tau=-0.5 \(their first 6 significant digits"):
        sweep_configs(dataclasses.replace(rc, sweep=cfg.SweepConfig(tau=(-0.5000001, -0.5000004))))
    # a value its folder name rounds (1234567 -> scale=1.23457e+06) is plotted at its own value
    from side_extract.report import build_report

    big = dataclasses.replace(rc, sweep=cfg.SweepConfig(scale=(1234567.0,)))
    run_with_sweeps(tmp_path / "big", big)
    assert 1234567.0 in build_report(tmp_path / "big")["sweeps"]["scale"]["side"]["values"]


def test_a_sweep_cut_short_while_sharing_its_parents_stages_resumes(tiny_model_dir, tmp_path, monkeypatch):
    """A kill while the parent's stages were linked into a new sub-run left a folder of stages and no manifest,
    which every later run refused as 'no run directory' until it was deleted by hand."""
    import side_extract.sweeps as sweeps

    rc = dataclasses.replace(tiny_rc(tiny_model_dir, methods=("side", "uncond"), n=4),
                             sweep=cfg.SweepConfig(scale=(2.0,)))
    links, real = [], sweeps._link_or_copy

    def cut(src, dst):
        if len(links) == 3:
            raise KeyboardInterrupt  # the kill, after three files
        links.append(dst)
        real(src, dst)

    monkeypatch.setattr(sweeps, "_link_or_copy", cut)
    with pytest.raises(KeyboardInterrupt):
        run_with_sweeps(tmp_path / "run", rc)
    assert len(links) == 3 and (tmp_path / "run" / "sweeps" / "scale=2" / "synthetic").is_dir()
    monkeypatch.setattr(sweeps, "_link_or_copy", real)
    main, subs = run_with_sweeps(tmp_path / "run", rc)
    fresh = run_with_sweeps(tmp_path / "fresh", rc)[1]["scale=2"]
    assert subs["scale=2"].metrics["side"]["ams"] == fresh.metrics["side"]["ams"]


def test_cli_run_and_unknown_key(tiny_model_dir, tmp_path):
    rc = tiny_rc(tiny_model_dir, methods=("side", "uncond"))
    path = tmp_path / "run.yaml"
    path.write_text(cfg.dump_yaml(rc))
    r = CliRunner().invoke(app, ["--no-progress", "run", str(path), "--out", str(tmp_path / "run"), "--no-report"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "evaluation" / "side" / "metrics.json").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: demo\nextract: {n: 5, lamda: 3}\n")
    r = CliRunner().invoke(app, ["run", str(bad), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2
    assert "unknown config key(s) in section 'extract': lamda" in r.output and "scale" in r.output


@pytest.mark.parametrize("method", ["side", "side-lora"])
@pytest.mark.parametrize("tau, min_size, filtered, remedy", [
    (1.0, 1, "cohesion filter", "set surrogate.tau <="),
    # 40 images in 4 clusters, none of 20 (a min_size past 20 leaves fewer than 2 clusters of any 40: refused before
    # sampling, cluster_problems)
    (-1.0, 20, "size filter", r"set surrogate.min_size <= \d+ "),
])
def test_all_clusters_dropped_is_a_clear_error(tiny_model_dir, tmp_path, tau, min_size, filtered, remedy, method):
    """The classifier's error (and side-lora's) names the filter that dropped the clusters, as the labeler's warning
    does (they said "lower surrogate.tau" when the size filter had dropped them with tau already at its least, -1)."""
    rc = tiny_rc(tiny_model_dir, methods=(method,))
    k = 4
    rc = dataclasses.replace(rc, surrogate=cfg.SurrogateConfig(n_clusters=k, tau=tau, min_size=min_size, n_init=1))
    with pytest.warns(RuntimeWarning, match=f"all {k} clusters were dropped by the {filtered}"):
        with pytest.raises(ValueError, match=f"0 labelled (class|cluster).*too few clusters pass the {filtered}.*"
                                             f"{remedy}"):
            run_audit(tmp_path / "r", rc)


def test_a_teacher_of_one_class_names_the_teachers_remedy(tiny_model_dir, tmp_path, monkeypatch):
    """A classifier stage left with one class says what to change for that classifier: the teacher's labels come
    from its confidence filter, not from SIDE's clusters (the message advised surrogate.tau for every classifier)."""
    from side_extract import pipeline

    def one_class_teacher(ctx, clean, synthetic):  # the teacher put every synthetic image in class 0
        ctx.fp["teacher"] = "one-class"
        return np.zeros(len(synthetic), np.int64)

    monkeypatch.setattr(pipeline.chain, "teacher_stage", one_class_teacher)
    with pytest.raises(ValueError, match="classifier-teacher: 1 labelled class.*surrogate.teacher_min_confidence"):
        run_audit(tmp_path / "r", tiny_rc(tiny_model_dir, methods=("side-teacher",)))


def _weights(path):
    return (path / "model.safetensors").read_bytes()


@pytest.mark.parametrize("change,stage", [
    ({"sample": {"seed": 2}}, "classifier"),
    ({"sample": {"n": 48}}, "classifier"),
    ({"features": {"extractor": "pixels"}}, "classifier"),
    ({"train": "digits:40"}, "classifier-clean"),
])
def test_changed_upstream_input_retrains_the_classifier(tiny_model_dir, tmp_path, change, stage):
    """Rerunning a run directory with a changed upstream input gives the classifier a fresh run with that
    input would train: never the old model (it used to be reused byte for byte from its work directory)."""
    base = tiny_rc(tiny_model_dir, methods=("side", "cond"))
    changed = cfg.from_dict(cfg.RunConfig, cfg.merge(cfg.to_dict(base), change))
    run_audit(tmp_path / "run", base, until="classifier")
    old = _weights(tmp_path / "run" / stage)
    run_audit(tmp_path / "run", changed, until="classifier")
    run_audit(tmp_path / "fresh", changed, until="classifier")
    assert _weights(tmp_path / "run" / stage) == _weights(tmp_path / "fresh" / stage) != old
    assert not list((tmp_path / "run").glob("*-work")) and not (tmp_path / "run" / stage / "work").exists()


def test_calibration_resizes_the_heldout_digits_like_the_training_set(tmp_path):
    """With train_resize, the held-out digits the bands are calibrated on are resized too (calibration used
    to fail, blaming the generated images)."""
    from conftest import tiny_scheduler, tiny_unet
    from side_extract.models.target import save_target

    save_target(tiny_unet(size=16), tiny_scheduler(), tmp_path / "m16")
    rc = cfg.RunConfig(model=str(tmp_path / "m16"), train="digits:30", train_resize=16,
                       extract=cfg.ExtractConfig(methods=("uncond",), n=4, steps=2),
                       evaluate=cfg.EvaluateConfig(carlini_n=5, quality=("pixels",), quality_max_reference=200))
    res = run_audit(tmp_path / "run", rc)
    assert res.metrics["uncond"]["n_generated"] == 4
    assert (tmp_path / "run" / "evaluation" / "bands.json").exists()


def test_side_through_the_denoised_estimate(tiny_model_dir, tmp_path):
    """classifier.guidance_input: x0_hat trains a clean classifier on the surrogate labels and guides through
    the target's denoised estimate; lambda 0 still equals plain sampling."""
    from side_extract.models.classifier import load_classifier

    rc = tiny_rc(tiny_model_dir, methods=("side", "uncond"))
    rc = dataclasses.replace(rc, classifier=dataclasses.replace(rc.classifier, guidance_input="x0_hat"))
    res = run_audit(tmp_path / "run", rc, until="extraction")
    assert load_classifier(tmp_path / "run" / "classifier").arch.time_mode == "none"
    plain = run_audit(tmp_path / "plain", tiny_rc(tiny_model_dir, methods=("side", "uncond")), until="extraction")
    assert not np.array_equal(res.extractions["side"].images, plain.extractions["side"].images)
    zero = dataclasses.replace(rc, extract=dataclasses.replace(rc.extract, scale=0.0))
    z = run_audit(tmp_path / "zero", zero, until="extraction")
    np.testing.assert_array_equal(z.extractions["side"].images, z.extractions["uncond"].images)


def test_cond_through_the_denoised_estimate(tiny_model_dir, tmp_path):
    """clean_classifier.guidance_input: x0_hat makes Cond guide through the target's denoised estimate with the same
    clean classifier (it used to be accepted and ignored): a rerun with it keeps the classifier-clean stage and makes
    other Cond generations; lambda 0 still equals plain sampling."""
    from side_extract.guidance import ClassifierGuidance, DenoisedGuidance
    from side_extract.pipeline import extraction_settings

    rc = tiny_rc(tiny_model_dir, methods=("cond", "uncond"))
    run = tmp_path / "run"
    plain = run_audit(run, rc, until="extraction")
    stages = read_json(run / "manifest.json")["stages"]
    x0 = dataclasses.replace(rc, clean_classifier=dataclasses.replace(rc.clean_classifier, guidance_input="x0_hat"))
    res = run_audit(run, x0, until="extraction")
    again = read_json(run / "manifest.json")["stages"]
    assert again["classifier-clean"] == stages["classifier-clean"]  # not trained again
    assert again["extraction/cond"]["fingerprint"] != stages["extraction/cond"]["fingerprint"]
    assert not np.array_equal(res.extractions["cond"].images, plain.extractions["cond"].images)
    np.testing.assert_array_equal(res.extractions["uncond"].images, plain.extractions["uncond"].images)
    _, guidance = method_guidance(run, x0, "cond", load_target(rc.model))
    assert isinstance(guidance, DenoisedGuidance)
    # SIDE's classifier through x0_hat is a stage of its own already: its extraction's settings stay as they were
    # (a run made before Cond read the key is rebuilt and verified from them)
    plain = ClassifierGuidance(**{f.name: getattr(guidance, f.name) for f in dataclasses.fields(ClassifierGuidance)})
    assert extraction_settings(x0.extract, "side", guidance) == extraction_settings(x0.extract, "side", plain)
    assert extraction_settings(x0.extract, "cond", guidance) != extraction_settings(x0.extract, "cond", plain)
    zero = dataclasses.replace(x0, extract=dataclasses.replace(x0.extract, cond_scale=0.0))
    z = run_audit(tmp_path / "zero", zero, until="extraction")
    np.testing.assert_array_equal(z.extractions["cond"].images, z.extractions["uncond"].images)


def test_time_keys_of_a_classifier_without_time_are_named_and_train_nothing_again(tiny_model_dir, tmp_path, caplog):
    """The clean classifier (Cond's, the teacher's) has no time input: setting its time keys used to retrain the same
    classifier as another stage (and make Cond's generations again under another fingerprint); now the run keeps
    the stage and warns, naming the keys. SIDE's noise-aware classifier does read them."""
    rc = tiny_rc(tiny_model_dir, methods=("cond", "uncond"))
    run = tmp_path / "run"
    run_audit(run, rc, until="extraction")
    stages = read_json(run / "manifest.json")["stages"]
    timed = dataclasses.replace(rc.clean_classifier, time_blocks="first", time_embed_dim=64)
    inert = dataclasses.replace(rc, clean_classifier=timed)
    with caplog.at_level("WARNING", logger="side_extract.pipeline"):
        run_audit(run, inert, until="extraction")
    again = read_json(run / "manifest.json")["stages"]
    for stage in ("classifier-clean", "extraction/cond"):
        assert again[stage] == stages[stage], stage
    assert "clean_classifier.time_blocks='first' (the clean classifier has no time input); " in caplog.text
    named = [s.split(" (")[0] for s in cfg.inert_settings(inert)]
    assert named == ["clean_classifier.time_blocks='first'", "clean_classifier.time_embed_dim=64"]
    # the same keys on SIDE's noise-aware classifier are no such thing; through x0_hat or on the UNet they are
    side = dataclasses.replace(rc, classifier=timed, extract=dataclasses.replace(rc.extract, methods=("side",)))
    assert cfg.inert_settings(side) == []
    time_keys = ["classifier.time_blocks='first'", "classifier.time_embed_dim=64"]
    for c, expected in ((dataclasses.replace(timed, guidance_input="x0_hat"), time_keys),
                        (dataclasses.replace(timed, backbone="unet"), [*time_keys, "classifier.depth=10"])):
        named = [s.split(" (")[0] for s in cfg.inert_settings(dataclasses.replace(side, classifier=c))]
        assert named == expected


def test_settings_that_change_nothing_are_named():
    """Each listed setting is set away from its default where the run does not read it; its method's absence is
    not such a case (the key is merely unused)."""
    rc = cfg.from_dict(cfg.RunConfig, {
        "features": {"batch_size": 8},
        "classifier": {"backbone": "unet", "depth": 10},
        "sample": {"scheduler": "ddpm", "eta": 0.5, "clip_eps": False},
        "extract": {"methods": ["side", "side-lora", "uncond"], "scheduler": "ddpm", "eta": 0.0},
        "lora": {"rank": "full", "alpha": 8.0},
        "evaluate": {"resize": 16, "detect_mode": "components"}})
    named = [s.split(" (")[0] for s in cfg.inert_settings(rc)]
    assert named == ["classifier.depth=10", "features.batch_size=8", "sample.eta=0.5", "sample.clip_eps=False",
                     "extract.eta=0.0", "lora.alpha=8.0", "evaluate.resize=16", "evaluate.detect_mode='components'"]
    used = cfg.from_dict(cfg.RunConfig, {
        "train": "digits:30", "classifier": {"depth": 10}, "sample": {"eta": 0.5}, "extract": {"methods": ["side", "uncond"], "eta": 0.0},
        "lora": {"rank": "full", "alpha": 8.0}, "evaluate": {"detect_threshold": 0.1, "detect_mode": "components"}})
    assert cfg.inert_settings(used) == []  # DDIM reads eta; no side-lora; detection runs
    teacher = cfg.from_dict(cfg.RunConfig, {"clean_classifier": {"guidance_input": "x0_hat"},
                                            "surrogate": {"n_clusters": 40, "select_k": [10, 20]},
                                            "extract": {"methods": ["side", "side-teacher"]}})
    assert [s.split(" (")[0] for s in cfg.inert_settings(teacher)] == ["clean_classifier.guidance_input='x0_hat'",
                                                                      "surrogate.n_clusters=40"]


def test_extraction_keys_nothing_reads_are_named():
    """memguide's avoidance kernel and window without avoidance, ``rounds`` where no method generates in rounds,
    and the near-duplicate distance without dedup-driven stopping or adaptive allocation change nothing, and are
    named; the switch that reads each one silences it. (They were accepted in silence: a user who set
    ``memguide_avoid_h`` believing avoidance on got plain memguide.)"""
    base = {"methods": ["memguide", "uncond"], "memguide_avoid_h": 0.1, "memguide_avoid_t_hi": 0.8, "rounds": 8,
            "dedup_threshold": 0.1}

    def named(**extract):
        rc = cfg.from_dict(cfg.RunConfig, {"extract": {**base, **extract}})
        return [s.split(" (")[0] for s in cfg.inert_settings(rc)]

    avoid_keys = ["extract.memguide_avoid_h=0.1", "extract.memguide_avoid_t_hi=0.8"]
    assert named() == [*avoid_keys, "extract.rounds=8", "extract.dedup_threshold=0.1"]
    assert named(memguide_avoid=1.0) == ["extract.dedup_threshold=0.1"]  # avoidance reads rounds, not the distance
    assert named(stop_unseen=0.05) == avoid_keys  # stopping reads rounds and the distance, for every method
    # adaptive allocation is read by the methods that draw target classes only
    assert named(allocation="adaptive") == [*avoid_keys, "extract.allocation='adaptive'", "extract.rounds=8",
                                            "extract.dedup_threshold=0.1"]
    assert named(allocation="adaptive", methods=["side", "uncond"]) == []  # no memguide: its keys merely unused
    # a single round is the whole budget: adaptive allocation gave the uniform policy's images, and avoidance plain
    # memguide's, exactly, in silence (stop_unseen is refused there)
    assert named(allocation="adaptive", methods=["side", "uncond"], rounds=1) == ["extract.allocation='adaptive'"]
    for one_round in ({"rounds": 1}, {"rounds": 2, "n": 1}):
        assert named(memguide_avoid=1.0, **one_round) == ["extract.memguide_avoid=1.0", "extract.dedup_threshold=0.1"]
    assert named(methods=["side", "uncond"]) == ["extract.rounds=8", "extract.dedup_threshold=0.1"]


def test_ddims_settings_under_ddpm_make_nothing_again(tiny_model_dir, tmp_path):
    """DDPM reads neither eta nor the clipped eps: changing the synthetic set's under DDPM keeps it and what was made
    from it (they used to be made again, the same images under another fingerprint). The extraction's eta stays in
    its fingerprint, which `side verify` checks a run against (runs made before would fail it), and is warned of."""
    rc = tiny_rc(tiny_model_dir, methods=("side", "uncond"), scheduler="ddpm")
    rc = dataclasses.replace(rc, sample=dataclasses.replace(rc.sample, scheduler="ddpm"))
    run = tmp_path / "run"
    run_audit(run, rc, until="extraction")
    stages = read_json(run / "manifest.json")["stages"]
    ddim_keys = dataclasses.replace(rc, sample=dataclasses.replace(rc.sample, eta=0.5, clip_eps=False))
    run_audit(run, ddim_keys, until="extraction")
    # nor do the pixel features (pixels-pca, the default) batch their images
    run_audit(run, dataclasses.replace(ddim_keys, features=dataclasses.replace(rc.features, batch_size=7)),
              until="extraction")
    again = read_json(run / "manifest.json")["stages"]
    for stage in ("synthetic", "features", "classifier", "extraction/side", "extraction/uncond"):
        assert again[stage] == stages[stage], stage


def test_a_metric_setting_re_evaluates_without_calibrating_again(tiny_model_dir, tmp_path):
    """The calibration reads the similarity, the quantiles and the null's images, not the metrics' own settings:
    changing Carlini's n redoes the evaluations and keeps the bands (it used to calibrate again)."""
    rc = tiny_rc(tiny_model_dir, methods=("uncond",))
    run = tmp_path / "run"
    run_audit(run, rc)
    stages = read_json(run / "manifest.json")["stages"]
    run_audit(run, dataclasses.replace(rc, evaluate=dataclasses.replace(rc.evaluate, carlini_n=4, gu_threshold=0.3)))
    again = read_json(run / "manifest.json")["stages"]
    assert again["calibration"] == stages["calibration"]
    assert again["evaluation/uncond"]["fingerprint"] != stages["evaluation/uncond"]["fingerprint"]
    quantiles = dataclasses.replace(rc.evaluate, calibration_quantiles=(0.01, 0.05, 0.1))
    run_audit(run, dataclasses.replace(rc, evaluate=quantiles))
    recalibrated = read_json(run / "manifest.json")["stages"]["calibration"]
    assert recalibrated["fingerprint"] != stages["calibration"]["fingerprint"]


def test_the_same_training_pixels_with_another_null_calibrate_again(tiny_model_dir, tmp_path):
    """The calibration was keyed by the training pixels and a *given* held-out set only: the same 30 digits given as
    an .npz (no held-out set: the training images against each other) and then as digits:30 (the digits outside
    them) reused the first null's bands, and every method was evaluated in them."""
    digits = load_image_set("digits:30")
    np.savez(tmp_path / "train.npz", images=digits.images)
    rc = tiny_rc(tiny_model_dir, methods=("uncond",), n=4)
    rc = dataclasses.replace(rc, evaluate=dataclasses.replace(rc.evaluate, calibration_quantiles=(0.1, 0.2, 0.3)))
    specs = {"digits": "digits:30", "npz": str(tmp_path / "train.npz")}

    def made(run) -> tuple:
        return (read_json(run / "evaluation" / "bands.json")["bands"],
                read_json(run / "evaluation" / "uncond" / "metrics.json")["ums"])

    for name, spec in specs.items():
        run_audit(tmp_path / f"fresh-{name}", dataclasses.replace(rc, train=spec))
    assert made(tmp_path / "fresh-digits") != made(tmp_path / "fresh-npz")
    for first, then in (("npz", "digits"), ("digits", "npz")):
        run = tmp_path / f"{first}-then-{then}"
        run_audit(run, dataclasses.replace(rc, train=specs[first]))
        run_audit(run, dataclasses.replace(rc, train=specs[then]))
        assert made(run) == made(tmp_path / f"fresh-{then}"), (first, then)


def test_settings_no_stage_reads_leave_the_run_as_it_was(tiny_model_dir, tmp_path):
    """``surrogate.teacher_min_confidence`` (read by the teacher's stage only) clustered the synthetic set again and
    retrained SIDE's classifier; ``evaluate.resize`` (side evaluate's: a run reads its own images, and warns that it
    changes nothing) redid every evaluation. Both are left out of those stages' fingerprints."""
    rc = tiny_rc(tiny_model_dir, methods=("side", "uncond"), n=4)
    run = tmp_path / "run"
    run_audit(run, rc)
    stages = read_json(run / "manifest.json")["stages"]
    run_audit(run, dataclasses.replace(rc, surrogate=dataclasses.replace(rc.surrogate, teacher_min_confidence=0.5),
                                       evaluate=dataclasses.replace(rc.evaluate, resize=8)))
    assert read_json(run / "manifest.json")["stages"] == stages


def test_a_unet_feature_classifier_takes_any_depth():
    """The UNet's features have no depth: ``depth`` 50 used to pass the run's checks and fail in the classifier
    stage, after the synthetic set and the clustering."""
    from side_extract.models.classifier import ClassifierArch

    assert ClassifierArch(num_classes=3, in_channels=1, image_size=8, depth=50, backbone="unet").depth == 50
    with pytest.raises(ValueError, match="depth=50"):
        ClassifierArch(num_classes=3, in_channels=1, image_size=8, depth=50)


def test_training_set_features_are_extracted_once_per_run(tiny_model_dir, tmp_path, monkeypatch):
    """With a feature similarity, the training set's features are a stage of their own (keyed by extractor,
    training set and model): the calibration and every method's evaluation reuse them, and a rerun with
    another method reads them from the run directory instead of extracting them again."""
    import side_extract.features as features_module
    from side_extract.pipeline import evaluations, labelling

    calls = []
    real = features_module.extract_features

    def counting(name, images, **kw):
        calls.append(len(images))
        return real(name, images, **kw)

    for module in (evaluations, labelling, features_module):
        monkeypatch.setattr(module, "extract_features", counting)
    rc = tiny_rc(tiny_model_dir, methods=("cond", "uncond"))
    rc = dataclasses.replace(rc, evaluate=dataclasses.replace(rc.evaluate, similarity="cosine:unet", quality=()))
    run_audit(tmp_path / "run", rc)
    assert calls.count(30) == 1  # the 30 training images: once, for the calibration and both evaluations
    entry = read_json(tmp_path / "run" / "manifest.json")["stages"]["train-features"]
    assert entry["status"] == "complete" and entry["n"] == 30
    calls.clear()
    rc2 = dataclasses.replace(rc, extract=dataclasses.replace(rc.extract, methods=("cond", "uncond", "side")))
    run_audit(tmp_path / "run", rc2)
    assert 30 not in calls  # side's evaluation read the cached features


def test_side_with_the_unet_feature_classifier(tiny_model_dir, tmp_path):
    rc = tiny_rc(tiny_model_dir, methods=("side", "uncond"))
    rc = dataclasses.replace(rc, classifier=dataclasses.replace(rc.classifier, backbone="unet"))
    res = run_audit(tmp_path / "run", rc)
    cfg_json = read_json(tmp_path / "run" / "classifier" / "config.json")
    assert cfg_json["arch"]["backbone"] == "unet" and set(res.metrics) == {"side", "uncond"}
    bad = dataclasses.replace(rc, clean_classifier=dataclasses.replace(rc.clean_classifier, backbone="unet"))
    with pytest.raises(ValueError, match="clean_classifier.backbone"):
        run_audit(tmp_path / "bad", bad)


def test_a_finished_extraction_grows_to_a_larger_n_keeping_its_whole_shards(tiny_model_dir, tmp_path):
    """Raising extract.n on a finished run makes only the generations it lacks (plus the old short last shard):
    the grown run equals a fresh run at the larger N_G, and its evaluation is redone. A method in rounds, or a
    smaller N_G, is a changed stage as before (another layout; refused without replace): nothing is kept that would
    differ."""
    from side_extract.runs import StageWouldBeReplaced

    methods = ("side", "memguide", "uncond")
    rc = tiny_rc(tiny_model_dir, methods=methods, n=6, shard_size=4, memguide_t_hi=0.5)
    run = tmp_path / "run"
    run_audit(run, rc)
    first = read_json(run / "manifest.json")["stages"]
    kept = {m: (run / "extraction" / m / "shard-00000.npz").stat().st_mtime_ns for m in methods}
    grown = dataclasses.replace(rc, extract=dataclasses.replace(rc.extract, n=10))
    res = run_audit(run, grown, replace=False)  # as `side extract --run RUN --n 10`: no --force needed
    stages = read_json(run / "manifest.json")["stages"]
    fresh = tmp_path / "fresh"
    run_audit(fresh, grown, until="extraction")
    for m in methods:
        e = stages[f"extraction/{m}"]
        assert e["status"] == "complete" and e["grown_from"] == 6 and e["n"] == 10 and e["shards_written_now"] == 2
        assert (run / "extraction" / m / "shard-00000.npz").stat().st_mtime_ns == kept[m]  # [0, 4) kept
        np.testing.assert_array_equal(load_shards(run / "extraction" / m).images,
                                      load_shards(fresh / "extraction" / m).images, err_msg=m)
        assert e["fingerprint"] == read_json(fresh / "manifest.json")["stages"][f"extraction/{m}"]["fingerprint"]
        assert stages[f"evaluation/{m}"]["started_unix"] > first[f"evaluation/{m}"]["started_unix"]
        assert res.metrics[m]["n_generated"] == 10
    assert stages["classifier"]["started_unix"] == first["classifier"]["started_unix"]
    with pytest.raises(StageWouldBeReplaced, match="extraction/side"):
        run_audit(run, rc, replace=False)  # fewer generations: another layout, refused (the CLI without --force)
    rounds = dataclasses.replace(rc, extract=dataclasses.replace(rc.extract, methods=("side",), allocation="adaptive",
                                                                 rounds=2))
    run_audit(tmp_path / "r", rounds, until="extraction")
    with pytest.raises(StageWouldBeReplaced, match="extraction/side"):
        run_audit(tmp_path / "r", dataclasses.replace(rounds, extract=dataclasses.replace(rounds.extract, n=10)),
                  until="extraction", replace=False)


def test_an_interrupted_extraction_grows_to_a_larger_n_keeping_its_whole_shards(tiny_model_dir, tmp_path):
    """An extraction cut short and then run with a larger N_G started afresh, its whole shards lost (a finished one
    grew). It now grows from what it had: the shards whose ranges are the same in both layouts are kept, and the
    result equals a fresh run at the larger N_G."""
    rc = tiny_rc(tiny_model_dir, methods=("uncond",), n=8, shard_size=2)
    run = tmp_path / "run"

    with pytest.raises(KeyboardInterrupt):
        run_audit(run, rc, until="extraction", progress=interrupt_at("extract uncond", 4))
    made = sorted(p.name for p in (run / "extraction" / "uncond").glob("shard-*.npz"))
    assert "shard-00000.npz" in made and len(made) < 4
    kept = (run / "extraction" / "uncond" / "shard-00000.npz").stat().st_mtime_ns
    grown = dataclasses.replace(rc, extract=dataclasses.replace(rc.extract, n=12))
    run_audit(run, grown, until="extraction", replace=False)
    e = read_json(run / "manifest.json")["stages"]["extraction/uncond"]
    assert e["status"] == "complete" and e["grown_from"] == 8 and e["shards_written_now"] == 6 - len(made)
    assert (run / "extraction" / "uncond" / "shard-00000.npz").stat().st_mtime_ns == kept
    run_audit(tmp_path / "fresh", grown, until="extraction")
    np.testing.assert_array_equal(load_shards(run / "extraction" / "uncond").images,
                                  load_shards(tmp_path / "fresh" / "extraction" / "uncond").images)


def test_a_growth_cut_short_and_run_at_an_n_between_keeps_its_whole_shards(tiny_model_dir, tmp_path):
    """A finished extraction of 6 grown to 12 and cut short, then run at 10: it was written afresh (its whole shards
    lost: grows_from read only the N it was begun with, 12) and its evaluation was then refused without --force (the
    finished stage it replaced was no longer named as grown from). It now keeps the shards whose ranges are the
    same in both layouts and equals a fresh run at 10; run again at the N it grew from, it is the finished stage it
    was. Below that N, it is a changed stage as before: refused without replace."""
    from side_extract.runs import StageWouldBeReplaced

    rc = tiny_rc(tiny_model_dir, methods=("uncond",), n=6, shard_size=2)
    run = tmp_path / "run"
    run_audit(run, rc)
    first = read_json(run / "manifest.json")["stages"]["extraction/uncond"]
    at = lambda n: dataclasses.replace(rc, extract=dataclasses.replace(rc.extract, n=n))  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        run_audit(run, at(12), progress=interrupt_at("extract uncond", 10), replace=False)
    made = sorted(p.name for p in (run / "extraction" / "uncond").glob("shard-*.npz"))
    assert "shard-00003.npz" in made and "shard-00005.npz" not in made, made
    kept = {p: (run / "extraction" / "uncond" / p).stat().st_mtime_ns for p in made}
    run_audit(run, at(10), replace=False)  # as `side extract --run RUN --n 10`: no --force needed
    stages = read_json(run / "manifest.json")["stages"]
    e = stages["extraction/uncond"]
    assert e["status"] == "complete" and e["n"] == 10 and e["shards_written_now"] == 5 - len(made)
    assert {p: (run / "extraction" / "uncond" / p).stat().st_mtime_ns for p in made} == kept
    assert stages["evaluation/uncond"]["status"] == "complete"
    run_audit(tmp_path / "fresh", at(10), until="extraction")
    np.testing.assert_array_equal(load_shards(run / "extraction" / "uncond").images,
                                  load_shards(tmp_path / "fresh" / "extraction" / "uncond").images)
    # cut short again, then back at the N it grew from: the stage it was (its fingerprint), nothing made again
    with pytest.raises(KeyboardInterrupt):
        run_audit(run, at(16), progress=interrupt_at("extract uncond", 12), replace=False)
    run_audit(run, at(10), replace=False)
    assert read_json(run / "manifest.json")["stages"]["extraction/uncond"]["shards_written_now"] == 0
    with pytest.raises(KeyboardInterrupt):
        run_audit(run, at(16), progress=interrupt_at("extract uncond", 12), replace=False)
    with pytest.raises(StageWouldBeReplaced, match="extraction/uncond"):
        run_audit(run, at(6), replace=False)
    assert first["fingerprint"] != e["fingerprint"]
    # cut short twice at two N's, never finished: no floor (the N it was cut short making was taken for one, and a
    # third run at an N below it wrote every shard again)
    fresh = tmp_path / "twice"
    with pytest.raises(KeyboardInterrupt):
        run_audit(fresh, at(12), until="extraction", progress=interrupt_at("extract uncond", 6))
    with pytest.raises(KeyboardInterrupt):
        run_audit(fresh, at(10), until="extraction", progress=interrupt_at("extract uncond", 8))
    made = sorted(p.name for p in (fresh / "extraction" / "uncond").glob("shard-*.npz"))
    run_audit(fresh, at(9), until="extraction")
    e = read_json(fresh / "manifest.json")["stages"]["extraction/uncond"]
    assert e["status"] == "complete" and e["shards_written_now"] == 5 - len(made), (made, e)
    np.testing.assert_array_equal(load_shards(fresh / "extraction" / "uncond").images,
                                  load_shards(tmp_path / "fresh" / "extraction" / "uncond").images[:9])


def test_a_run_of_side_teacher_alone_is_not_held_to_the_clusterings_settings(tiny_model_dir, tmp_path):
    """side-teacher labels the synthetic set by a clean classifier and clusters nothing, but a run of it alone with
    sample.n 10 was refused for surrogate K=25 > 10 (and checked the feature extractor it never builds)."""
    rc = tiny_rc(tiny_model_dir, methods=("side-teacher",), n=4)
    rc = dataclasses.replace(rc, sample=dataclasses.replace(rc.sample, n=10),
                             surrogate=dataclasses.replace(rc.surrogate, n_clusters=25),
                             features=dataclasses.replace(rc.features, extractor="torchscript:nowhere.pt"))
    run_audit(tmp_path / "run", rc, until="classifier")
    assert not (tmp_path / "run" / "surrogate").exists() and (tmp_path / "run" / "classifier-teacher").is_dir()


def test_clustering_alone_does_not_need_the_training_set(tiny_model_dir, tmp_path):
    """`side cluster --run RUN` with the default methods (Cond among them) on a run without `train`: the
    preflight asked for the training set that only Cond's classifier, a later stage, needs."""
    rc = dataclasses.replace(tiny_rc(tiny_model_dir, methods=("side", "cond", "uncond")), train=None)
    run_audit(tmp_path / "run", rc, until="surrogate")
    assert (tmp_path / "run" / "surrogate" / "labels.npz").exists()
    with pytest.raises(ValueError, match="methods cond need the training set"):
        run_audit(tmp_path / "run", rc, until="classifier")


def test_clustering_stops_at_the_surrogate_labels(tiny_model_dir, tmp_path):
    """`side cluster` (until=surrogate) with Cond or side-teacher among the methods went on to train their
    classifiers and teacher labels; with no method that clusters it trained them and printed a path never made."""
    rc = tiny_rc(tiny_model_dir, methods=("side", "side-teacher", "cond"))
    run_audit(tmp_path / "run", rc, until="surrogate")
    stages = set(read_json(tmp_path / "run" / "manifest.json")["stages"])
    assert stages == {"synthetic", "features", "surrogate"} | ({"memorization"} & stages), stages
    with pytest.raises(ValueError, match=r"extract.methods \(side-teacher, uncond\) has neither"):
        run_audit(tmp_path / "r2", tiny_rc(tiny_model_dir, methods=("side-teacher", "uncond")), until="surrogate")
    assert not (tmp_path / "r2").exists()


def test_a_changed_parent_stage_is_shared_into_its_sweeps_again(tiny_model_dir, tmp_path):
    """After the parent's synthetic set changes, a lambda sweep takes the parent's new stages (before: it kept its
    entries shared from the old ones and retrained the classifier itself)."""
    rc = dataclasses.replace(tiny_rc(tiny_model_dir, methods=("side",)), sweep=cfg.SweepConfig(scale=(3.0,)))
    run_with_sweeps(tmp_path / "run", rc)
    rc2 = dataclasses.replace(rc, sample=dataclasses.replace(rc.sample, seed=9))
    run_with_sweeps(tmp_path / "run", rc2)
    parent = read_json(tmp_path / "run" / "manifest.json")["stages"]
    child = read_json(tmp_path / "run" / "sweeps" / "scale=3" / "manifest.json")["stages"]
    for stage in ("synthetic", "surrogate", "classifier", "calibration"):
        assert child[stage].get("shared_from") and child[stage]["fingerprint"] == parent[stage]["fingerprint"], stage
    assert (tmp_path / "run" / "sweeps" / "scale=3" / "evaluation" / "bands.json").read_bytes() == \
        (tmp_path / "run" / "evaluation" / "bands.json").read_bytes()


def test_a_run_path_that_is_a_file_is_named_before_the_model_loads(tmp_path):
    (tmp_path / "file").write_text("x")
    rc = dataclasses.replace(tiny_rc(tmp_path / "no-model", methods=("uncond",)))
    with pytest.raises(ValueError, match="exists and is not a directory"):
        run_audit(tmp_path / "file", rc)


def test_an_evaluation_reports_done_when_its_metrics_are_written(tiny_model_dir, tmp_path):
    """The evaluation's progress ends when its metrics.json is written, after the quality metrics and the copy
    guard: it ended at the nearest-neighbour search, so `--no-progress` said "evaluate side: ... done in 0 s"
    before most of the stage's work."""
    run = tmp_path / "run"
    finished = {}

    def factory(name):
        def update(done, total):
            if name.startswith("evaluate ") and done >= total:
                what = name.split()[1]
                out = run / ("synthetic-evaluation" if what == "synthetic" else f"evaluation/{what}")
                finished[name] = (out / "metrics.json").exists()
        return update

    run_audit(run, tiny_rc(tiny_model_dir, methods=("side", "uncond")), progress=factory)
    assert finished == {"evaluate side": True, "evaluate uncond": True, "evaluate synthetic": True}


def test_too_few_generations_for_sample_quality_skip_it_with_the_reason(tiny_model_dir, tmp_path):
    """N_G below 3 (or a method that dedup-driven stopping ended that early) leaves the kernel distance nothing to
    measure: the evaluation failed after the whole extraction ("the kernel distance needs at least 3 samples per
    set"); the memorization metrics stand, and the quality says why it is missing."""
    res = run_audit(tmp_path / "run", tiny_rc(tiny_model_dir, methods=("uncond",), n=2))
    m = res.metrics["uncond"]
    assert m["n_generated"] == 2 and "ums" in m
    assert "at least 3 images per set, got 2 generations" in m["quality"]["skipped"]


def test_a_training_set_of_one_class_is_refused_before_any_stage_for_cond(tiny_model_dir, tmp_path):
    """Cond's and side-teacher's classifiers learn the training set's labels: one class was found only when the
    clean classifier's stage began, with advice about SIDE's clusters (surrogate.tau) that did not apply."""
    data = load_image_set("digits:30")
    one = tmp_path / "one-class.npz"
    np.savez(one, images=data.images, labels=np.zeros(len(data), dtype=np.int64))
    rc = tiny_rc(tiny_model_dir, methods=("cond", "uncond"))
    fixed_bands = dataclasses.replace(rc.evaluate, bands="high=0:0.1,mid=0.1:0.2")  # only the labels are wrong
    rc = dataclasses.replace(rc, train=str(one), evaluate=fixed_bands)
    with pytest.raises(ValueError, match=r"cannot start:\n  - methods cond and side-teacher .* has 1 labelled class"):
        run_audit(tmp_path / "run", rc)
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_a_training_set_of_images_in_zero_to_one_is_refused_by_every_entry_not_only_audit(tiny_model_dir, tmp_path):
    """Images in [0, 1] cast to uint8 (every pixel 0 or 1) were refused by ``audit`` only: a run config naming such an
    .npz ran every stage and found "nothing memorized", evaluate() and calibrate() measured against near-black images,
    and train_target trained a model on them. Now each refuses the training set at once; a model's generations may
    still be all black (evaluate takes them)."""
    from side_extract.evaluation import calibrate, evaluate
    from side_extract.models.target import train_target

    data = load_image_set("digits:30")
    slip = ImageSet((data.images / 255.0).astype(np.uint8), data.labels)  # every pixel 0 (or 1)
    np.savez(tmp_path / "slip.npz", images=slip.images, labels=slip.labels)
    rc = dataclasses.replace(tiny_rc(tiny_model_dir, methods=("uncond",)), train=str(tmp_path / "slip.npz"))
    with pytest.raises(ValueError, match=r"cannot start:\n  - train='.*slip.npz': every pixel is 0 or 1"):
        run_audit(tmp_path / "run", rc)
    assert not (tmp_path / "run" / "manifest.json").exists()
    res = CliRunner().invoke(app, ["--no-progress", "evaluate", "--generated", str(tmp_path / "slip.npz"), "--train",
                                   str(tmp_path / "slip.npz"), "--out", str(tmp_path / "ev")])
    assert res.exit_code == 2 and "every pixel is 0 or 1" in res.output, res.output
    for call in (lambda: evaluate(data, slip), lambda: calibrate(slip)):
        with pytest.raises(ValueError, match="train: every pixel is 0 or 1"):
            call()
    with pytest.raises(ValueError, match="every pixel is 0 or 1"):
        train_target(cfg.TrainTargetConfig(steps=1), slip, tmp_path / "target")
    assert not (tmp_path / "target").exists()
    black = ImageSet(np.zeros_like(data.images))  # a collapsed model's generations: measured, not refused
    fixed = dataclasses.replace(rc.evaluate, bands="high=0:0.1,mid=0.1:0.2")
    assert evaluate(black, data, fixed).n_generated == len(data)


def test_held_out_images_in_zero_to_one_are_refused_too(tiny_model_dir, tmp_path):
    """Only the training set was checked for [0, 1] images cast to uint8: such held-out images calibrated bands
    around 0.42 (pixel RMS) and a run said plain sampling reached every training image with 8 generations. A run's
    preflight, evaluate() and calibrate() (given or by path) refuse them; calibrate() names an array given for an
    ImageSet (an AttributeError before) and checks the held-out set before the training set's null."""
    from side_extract.evaluation import calibrate, evaluate

    data = load_image_set("digits:60")
    train, heldout = data.subset(np.arange(30)), data.subset(np.arange(30, 60))
    slip = ImageSet((heldout.images / 255.0).astype(np.uint8))  # every pixel 0 (or 1)
    np.savez(tmp_path / "slip.npz", images=slip.images)
    np.savez(tmp_path / "train.npz", images=train.images)
    rc = dataclasses.replace(tiny_rc(tiny_model_dir, methods=("uncond",)), train=str(tmp_path / "train.npz"))
    rc = dataclasses.replace(rc, evaluate=dataclasses.replace(rc.evaluate, heldout=str(tmp_path / "slip.npz"),
                                                              calibration_quantiles=(0.1, 0.2, 0.3)))
    with pytest.raises(ValueError, match=r"evaluate.heldout='.*slip.npz': its images: every pixel is 0 or 1"):
        run_audit(tmp_path / "run", rc)
    assert not (tmp_path / "run" / "manifest.json").exists()
    by_path = cfg.EvaluateConfig(heldout=str(tmp_path / "slip.npz"))
    for call in (lambda: evaluate(train, train, heldout=slip), lambda: calibrate(train, slip),
                 lambda: evaluate(train, train, by_path)):
        with pytest.raises(ValueError, match="every pixel is 0 or 1"):
            call()
    with pytest.raises(ValueError, match="train must be an ImageSet .* got ndarray"):
        calibrate(train.images)
    with pytest.raises(ValueError, match="config must be an EvaluateConfig .* got str"):
        calibrate(train, heldout, "rms-l2")
    coarse = cfg.EvaluateConfig(calibration_quantiles=(0.1, 0.2, 0.3))
    assert calibrate(train, heldout, coarse).null_source == "heldout"


def test_float_images_with_nan_are_refused():
    """NaN failed both sides of the [-1, 1] check and passed (denoising_error and the classifiers took it)."""
    import torch

    from side_extract.data import check_float_images

    x = torch.zeros(2, 1, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x: images hold NaN or infinite values"):
        check_float_images(x, "x")
    check_float_images(torch.zeros(2, 1, 8, 8), "x")


def test_a_training_set_without_held_out_images_says_where_its_bands_came_from(tiny_model_dir, tmp_path, caplog):
    """A user's own training set with no evaluate.heldout was calibrated on the training images against each other
    without a word, while the docs said held-out images; now the run warns and the report says which null the bands
    came from. An unlabelled set with the default methods (Cond) is refused with the way out named."""
    from side_extract.report import write_report

    digits = load_image_set("digits:60")
    np.savez(tmp_path / "train.npz", images=digits.images[:30])
    np.savez(tmp_path / "heldout.npz", images=digits.images[30:])
    rc = dataclasses.replace(tiny_rc(tiny_model_dir, methods=("uncond",), n=4), train=str(tmp_path / "train.npz"))
    rc = dataclasses.replace(rc, evaluate=dataclasses.replace(rc.evaluate, calibration_quantiles=(0.1, 0.2, 0.3)))
    with caplog.at_level("WARNING", logger="side_extract.pipeline"):
        run_audit(tmp_path / "run", rc)
    assert "evaluate.heldout is not set" in caplog.text
    assert read_json(tmp_path / "run" / "evaluation" / "bands.json")["null_source"] == "train"
    html = write_report(tmp_path / "run").read_text()
    assert "The bands come from the training images against each other" in " ".join(html.split())

    caplog.clear()
    given = dataclasses.replace(rc, evaluate=dataclasses.replace(rc.evaluate, heldout=str(tmp_path / "heldout.npz")))
    with caplog.at_level("WARNING", logger="side_extract.pipeline"):
        run_audit(tmp_path / "given", given)
    assert "evaluate.heldout is not set" not in caplog.text
    assert "The bands come from the heldout null" in " ".join(write_report(tmp_path / "given").read_text().split())

    with pytest.raises(ValueError, match="has no labels .* or leave them out of extract.methods"):
        run_audit(tmp_path / "cond", dataclasses.replace(rc, extract=dataclasses.replace(rc.extract,
                                                                                          methods=("side", "cond"))))


def test_training_ids_changed_alone_are_evaluated_again(tiny_model_dir, tmp_path):
    """A training npz whose index alone changed (the same pixels) left the evaluation skipped, naming the training
    images by their old ids in the pairs and the findings."""
    from side_extract.data import load_image_set

    d = load_image_set("digits:30")
    rc = tiny_rc(tiny_model_dir, methods=("side", "uncond"))  # (side: the run holds a synthetic set to measure)
    rc = dataclasses.replace(rc, evaluate=dataclasses.replace(rc.evaluate, bands="high=0:0.1,mid=0.1:0.15,low=0.15:0.2"))
    for offset in (0, 5000, 0):
        np.savez(tmp_path / "train.npz", images=d.images, labels=d.labels, index=np.arange(30) + offset)
        run_audit(tmp_path / "run", dataclasses.replace(rc, train=str(tmp_path / "train.npz")))
        for d_ in (tmp_path / "run" / "evaluation" / "uncond", tmp_path / "run" / "synthetic-evaluation"):
            ids = np.load(d_ / "per_generation.npz")["nearest_train_id"]
            assert ((ids >= 5000) == bool(offset)).all(), (offset, d_)


def test_a_run_reads_its_sets_once(tiny_model_dir, tmp_path):
    """A run read its training and held-out sets twice (the preflight, then the stage that uses them), so a set's
    warning, here that its non-square images are stretched, was said twice."""
    import warnings

    from PIL import Image

    rng = np.random.default_rng(0)
    for name, n in (("train", 12), ("heldout", 10)):
        (tmp_path / name).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (8, 10), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    rc = tiny_rc(tiny_model_dir, methods=("uncond",))
    rc = dataclasses.replace(rc, train=str(tmp_path / "train"), train_resize=8,
                             evaluate=dataclasses.replace(rc.evaluate, heldout=str(tmp_path / "heldout"),
                                                          quality=("pixels",),  # (the held-out set's reader here)
                                                          bands="high=0:0.1,mid=0.1:0.15,low=0.15:0.2"))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        res = run_audit(tmp_path / "run", rc)
    stretched = sorted(str(w.message).split(" are not square")[0] for w in said if "stretched" in str(w.message))
    assert stretched == [f"10 image(s) of {str(tmp_path / 'heldout')!r}",
                         f"12 image(s) of {str(tmp_path / 'train')!r}"], stretched
    assert res.metrics["uncond"]["n_train"] == 12


def test_the_copy_guard_measures_no_partial_or_other_targets_synthetic_set(tiny_model_dir, tmp_path):
    """A review's finds: with a synthetic shard lost, a call of methods that need no synthetic set measured the copy
    guard against what was left (24 of 40), keyed as the whole set; after the target changed, a call of uncond
    measured its copy guard against the old target's synthetic set, and the findings counted that set as this run's."""
    import os

    from conftest import tiny_scheduler, tiny_unet
    from side_extract.models.target import save_target
    from side_extract.runs import evaluated_synthetic

    rc = tiny_rc(tiny_model_dir, methods=("side", "uncond"))
    rc = dataclasses.replace(rc, sample=dataclasses.replace(rc.sample, shard_size=8))
    run = tmp_path / "run"
    run_audit(run, rc)
    assert read_json(run / "evaluation" / "uncond" / "metrics.json")["copy_guard"]["n_synthetic"] == 40
    os.unlink(run / "synthetic" / "shard-00001.npz")
    grown = dataclasses.replace(rc, extract=dataclasses.replace(rc.extract, methods=("uncond",), n=12))
    run_audit(run, grown)
    assert "copy_guard" not in read_json(run / "evaluation" / "uncond" / "metrics.json")
    # another target: its uncond measured with no copy guard, the old synthetic set out of the findings
    run2 = tmp_path / "run2"
    run_audit(run2, rc)
    assert evaluated_synthetic(run2) is not None
    save_target(tiny_unet(seed=5), tiny_scheduler(), tmp_path / "other")
    run_audit(run2, dataclasses.replace(grown, model=str(tmp_path / "other")))
    assert "copy_guard" not in read_json(run2 / "evaluation" / "uncond" / "metrics.json")
    assert evaluated_synthetic(run2) is None


def test_every_neighbour_search_of_an_evaluation_takes_its_backend_and_chunks(tiny_model_dir, tmp_path, monkeypatch):
    """evaluate.backend / query_chunk / ref_chunk hold for every search an evaluation makes: the detection's
    verification against the training set and side-lora's copy guard searched with the defaults (faiss where
    importable, 8,192-row chunks), past a user's choice of torch or of smaller chunks for memory (a review's find)."""
    from side_extract.neighbors import NearestNeighborIndex

    fitted = []
    real_fit = NearestNeighborIndex.fit

    def fit(self, X):
        fitted.append((self.metric, self.backend, self.query_chunk, self.ref_chunk))
        return real_fit(self, X)

    def no_faiss(*a, **k):
        raise AssertionError("faiss searched, though evaluate.backend is torch")

    monkeypatch.setattr(NearestNeighborIndex, "fit", fit)
    monkeypatch.setattr(NearestNeighborIndex, "_faiss_knn", no_faiss)
    rc = tiny_rc(tiny_model_dir, methods=("side", "uncond"))
    rc = dataclasses.replace(rc, evaluate=dataclasses.replace(rc.evaluate, backend="torch", query_chunk=4, ref_chunk=8,
                                                                detect_threshold=0.2, detect_min_size=2))
    run_audit(tmp_path / "run", rc)
    metrics = read_json(tmp_path / "run" / "evaluation" / "uncond" / "metrics.json")
    assert "copy_guard" in metrics and "detection" in metrics
    assert fitted and {f[1:] for f in fitted} == {("torch", 4, 8)}, fitted


def test_evaluate_keys_a_run_cannot_use_are_said_before_any_stage(tiny_model_dir, tmp_path, monkeypatch):
    """evaluate.backend 'faiss' where faiss is not installed failed at the calibration, after every extraction, in
    words that did not name the key; evaluate.heldout under fixed bands and no quality metric, and the evaluate keys
    and train_resize of a run with no training set, were read by nothing and said by nothing."""
    import sys

    rc = tiny_rc(tiny_model_dir, methods=("uncond",))
    faiss = dataclasses.replace(rc, evaluate=dataclasses.replace(rc.evaluate, backend="faiss"))
    monkeypatch.setitem(sys.modules, "faiss", None)  # (import faiss raises ImportError: not installed)
    with pytest.raises(ValueError, match=r"evaluate\.backend='faiss': faiss is not importable here"):
        run_audit(tmp_path / "run", faiss)
    assert not (tmp_path / "run" / "extraction").exists()
    # a held-out set named as read by nothing is not loaded (it was warned of, then refused as missing)
    from side_extract.models.target import load_target
    from side_extract.pipeline import preflight

    unread = dataclasses.replace(rc, evaluate=dataclasses.replace(
        rc.evaluate, bands="high=0:0.05,mid=0.05:0.1,low=0.1:0.15", heldout=str(tmp_path / "missing.npz"), quality=()))
    assert "heldout" not in preflight(unread, load_target(tiny_model_dir))
    fixed = cfg.from_dict(cfg.RunConfig, {"train": "digits:30", "evaluate": {
        "bands": "high=0:0.05,mid=0.05:0.1,low=0.1:0.15", "heldout": "/x/held.npz", "quality": []}})
    assert [s.split(" (")[0] for s in cfg.inert_settings(fixed)] == ["evaluate.heldout='/x/held.npz'"]
    quality = dataclasses.replace(fixed, evaluate=dataclasses.replace(fixed.evaluate, quality=("pixels",)))
    assert cfg.inert_settings(quality) == []  # quality is measured against the held-out images
    untrained = dataclasses.replace(fixed, train=None, train_resize=16)
    assert [s.split(" (")[0] for s in cfg.inert_settings(untrained)] == [
        "evaluate.heldout='/x/held.npz'", "train_resize=16", "evaluate.bands='high=0:0.05,mid=0.05:0.1,low=0.1:0.15'",
        "evaluate.quality=()"]


def test_a_reshare_cut_short_leaves_no_entry_vouching_for_the_parents_new_files(tmp_path, monkeypatch):
    """Sharing a parent's remade stage into a sub-run replaced the sub-run's folder before its manifest: cut short
    between the two, the sub-run's manifest still said 'complete' under the old fingerprint for the parent's new
    files, and a rerun skipped them as its own."""
    import side_extract.sweeps as sweeps
    from side_extract.runs import RunDir

    parent, child = RunDir(tmp_path / "run"), RunDir(tmp_path / "run" / "sweeps" / "scale=2")
    for k, fingerprint in enumerate(("a" * 64, "b" * 64)):
        parent.begin("synthetic", fingerprint)
        (parent.path / "synthetic").mkdir(exist_ok=True)
        for shard in range(2):
            (parent.path / "synthetic" / f"shard-{shard:05d}.npz").write_bytes(f"{fingerprint}{shard}".encode())
        parent.complete("synthetic")
        if k == 0:
            sweeps.share_stages(parent, child)
    real, links = sweeps._link_or_copy, []

    def cut(src, dst):
        if links:
            raise KeyboardInterrupt  # the kill, after the first file of the new share
        links.append(dst)
        real(src, dst)

    monkeypatch.setattr(sweeps, "_link_or_copy", cut)
    with pytest.raises(KeyboardInterrupt):
        sweeps.share_stages(parent, child)
    entry = read_json(child.path / "manifest.json")["stages"].get("synthetic")
    assert entry is None or entry["fingerprint"] == "b" * 64, entry
    monkeypatch.setattr(sweeps, "_link_or_copy", real)
    assert sweeps.share_stages(parent, child) == ["synthetic"]
    assert read_json(child.path / "manifest.json")["stages"]["synthetic"]["fingerprint"] == "b" * 64
    assert (child.path / "synthetic" / "shard-00001.npz").read_bytes() == ("b" * 64 + "1").encode()


def test_a_growth_cut_short_between_its_record_and_its_unlinking_resumes_to_the_right_images(tmp_path, monkeypatch):
    """Growing a finished stage of 5 images (shards [0,2) [2,4) [4,5)) to 9 unlinked the short last shard before
    the manifest said the stage was being remade: cut short between the two, the manifest called the stage complete
    at 5 with a shard gone. Recorded first, a cut leaves that short shard in a running stage of 9, where [4,6) is
    its place: it is written again, not taken as whole."""
    from pathlib import Path

    from side_extract.runs import RunDir, read_json, shard_stage

    def make(lo, hi, _progress):
        return {"images": np.arange(lo, hi, dtype=np.uint8).reshape(-1, 1, 1) * np.ones((1, 2, 2), np.uint8),
                "index": np.arange(lo, hi)}

    def fp(m):
        return f"fp-{m}"

    run = RunDir(tmp_path / "run")
    assert len(shard_stage(run, "extraction/x", fp(5), 5, 2, make, fingerprint_at=fp)) == 5
    unlink = Path.unlink

    def unlinked_then_cut(self, *a, **k):  # the cut, at the short shard's unlinking
        unlink(self, *a, **k)
        if self.name.startswith("shard-"):
            raise KeyboardInterrupt

    monkeypatch.setattr(Path, "unlink", unlinked_then_cut)
    with pytest.raises(KeyboardInterrupt):
        shard_stage(run, "extraction/x", fp(9), 9, 2, make, fingerprint_at=fp)
    monkeypatch.setattr(Path, "unlink", unlink)
    entry = read_json(run.path / "manifest.json")["stages"]["extraction/x"]
    assert entry["status"] != "complete", entry  # (complete at 5, with its last shard gone)
    assert len(shard_stage(RunDir(run.path), "extraction/x", fp(5), 5, 2, make, fingerprint_at=fp)) == 5
    real = RunDir.grow

    def recorded_then_cut(self, *a, **k):
        real(self, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "grow", recorded_then_cut)
    with pytest.raises(KeyboardInterrupt):
        shard_stage(run, "extraction/x", fp(9), 9, 2, make, fingerprint_at=fp)
    assert read_json(run.path / "manifest.json")["stages"]["extraction/x"]["status"] != "complete"
    monkeypatch.setattr(RunDir, "grow", real)
    got = shard_stage(RunDir(run.path), "extraction/x", fp(9), 9, 2, make, fingerprint_at=fp)
    assert np.array_equal(got.ids, np.arange(9)) and np.array_equal(got.images[:, 0, 0, 0], np.arange(9))


def test_a_reshare_cut_short_after_the_calibration_leaves_its_bands_with_its_entry(tmp_path, monkeypatch):
    """The calibration's files lie outside its folder and were linked after the loop over the stages, while a later
    stage's manifest write already recorded the calibration's new entry: cut short in between, the sub-run kept the
    old bands under the new fingerprint, and no rerun linked them again."""
    import side_extract.sweeps as sweeps
    from side_extract.runs import RunDir

    parent, child = RunDir(tmp_path / "run"), RunDir(tmp_path / "run" / "sweeps" / "scale=2")
    for k, fingerprint in enumerate(("a" * 64, "b" * 64)):
        parent.begin("calibration", fingerprint)
        (parent.path / "evaluation").mkdir(exist_ok=True)
        (parent.path / "evaluation" / "bands.json").unlink(missing_ok=True)
        (parent.path / "evaluation" / "bands.json").write_text(json.dumps({"v": fingerprint[0]}))
        parent.complete("calibration")
        parent.begin("evaluation/uncond", fingerprint)
        (parent.path / "evaluation" / "uncond").mkdir(exist_ok=True)
        for shard in range(2):
            (parent.path / "evaluation" / "uncond" / f"f{shard}").write_text(fingerprint + str(shard))
        parent.complete("evaluation/uncond")
        if k == 0:
            sweeps.share_stages(parent, child)
    real, links = sweeps._link_or_copy, []

    def cut(src, dst):
        if "uncond" in str(dst):
            if links:
                raise KeyboardInterrupt  # the kill, inside the evaluation's copy
            links.append(dst)
        real(src, dst)

    monkeypatch.setattr(sweeps, "_link_or_copy", cut)
    with pytest.raises(KeyboardInterrupt):
        sweeps.share_stages(parent, child)
    monkeypatch.setattr(sweeps, "_link_or_copy", real)
    sweeps.share_stages(parent, child)
    entry = read_json(child.path / "manifest.json")["stages"]["calibration"]
    assert read_json(child.path / "evaluation" / "bands.json")["v"] == entry["fingerprint"][0] == "b"
