"""What a run reads besides its config values: every bad value refused before a stage runs or is replaced;
the files a config names (bands file, held-out images, TorchScript extractor) keyed by their content; `side run
CONFIG` runs CONFIG; sweeps checked before the main run."""
from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from side_extract import config as cfg
from side_extract.cli.main import app
from side_extract.data import load_image_set
from side_extract.pipeline import run_audit
from side_extract.runs import read_json
from side_extract.sweeps import run_with_sweeps

from test_pipeline import tiny_rc

FIXED = "high=0:0.1,mid=0.1:0.15,low=0.15:0.2"


def _small(model_dir, **evaluate) -> cfg.RunConfig:
    rc = tiny_rc(model_dir, methods=("side", "uncond"))
    return dataclasses.replace(rc, evaluate=dataclasses.replace(rc.evaluate, quality=(), **evaluate))


def _started(run) -> dict[str, float]:
    return {k: v["started_unix"] for k, v in read_json(run / "manifest.json")["stages"].items()}


@pytest.mark.parametrize("section,key", [("sample", "seed"), ("classifier", "seed"), ("extract", "seed"),
                                         ("evaluate", "seed"), ("surrogate", "random_state")])
def test_a_seed_outside_32_bits_is_refused_by_the_config(section, key):
    for bad in (-1, 2**32 + 5):  # 2**32 + 5 collided with seed 5 of another noise stream
        with pytest.raises(ValueError, match=rf"{key}={bad} must be an integer in \[0, 2\*\*32\)"):
            cfg.from_dict(cfg.RunConfig, {section: {key: bad}})
    cfg.from_dict(cfg.RunConfig, {section: {key: 2**32 - 1}})


def test_the_config_refuses_values_that_were_found_late():
    with pytest.raises(ValueError, match="rank='half' must be an integer or must be one of 'full'"):
        cfg.from_dict(cfg.RunConfig, {"lora": {"rank": "half"}})
    with pytest.raises(ValueError, match="give one of them, not both"):
        cfg.EvaluateConfig(bands=FIXED, bands_file="bands.json")
    for alpha in (0, -64):  # 0 made every adapter add nothing (they never trained), < 0 flipped their update
        with pytest.raises(ValueError, match=f"alpha={float(alpha)} must be > 0"):
            cfg.from_dict(cfg.RunConfig, {"lora": {"alpha": alpha}})
    for section in ("classifier", "clean_classifier"):  # torch's own error came at training, naming no key
        with pytest.raises(ValueError, match=r"weight_decay=-0.5 must be >= 0"):
            cfg.from_dict(cfg.RunConfig, {section: {"weight_decay": -0.5}})
    with pytest.raises(ValueError, match=r"weight_decay=-0.5 must be >= 0"):
        cfg.TrainTargetConfig(weight_decay=-0.5)
    with pytest.raises(ValueError, match=r"attention=True adds self-attention .* block_out_channels=\(32,\) has one"):
        cfg.TrainTargetConfig(block_out_channels=(32,), attention=True)  # (left out without a word)
    with pytest.raises(ValueError, match="resize=0 must be a positive image size"):  # (it named resize_to)
        cfg.TrainTargetConfig(resize=0)
    with pytest.raises(ValueError, match=r"scale=\[3.0, 3.0\] must not repeat a value"):  # (one sub-run, two names)
        cfg.from_dict(cfg.RunConfig, {"sweep": {"scale": [3, 3]}})
    # both failed only after the synthetic set was sampled: detect_memorized's own check, torch's BatchNorm
    with pytest.raises(ValueError, match=r"detect_min_size=1 must be >= 2 \(a group is at least a pair\)"):
        cfg.from_dict(cfg.RunConfig, {"evaluate": {"detect_min_size": 1}})
    for section in ("classifier", "clean_classifier"):
        with pytest.raises(ValueError, match=r"batch_size=1: the ResNet classifier's BatchNorm needs at least 2"):
            cfg.from_dict(cfg.RunConfig, {section: {"batch_size": 1}})
    cfg.from_dict(cfg.RunConfig, {"classifier": {"batch_size": 1, "backbone": "unet"}})  # a LayerNorm head


def test_side_lora_settings_that_fit_no_target_fail_before_sampling(tiny_model_dir, tmp_path):
    """``lora.target_modules`` naming no layer failed with peft's error (naming no key) after the synthetic set was
    sampled and clustered; a target with its own class embedding likewise."""
    rc = tiny_rc(tiny_model_dir, methods=("side-lora",))
    bad = dataclasses.replace(rc, lora=dataclasses.replace(rc.lora, target_modules=("to_qq", "conv1")))
    with pytest.raises(ValueError, match=r"lora.target_modules: 'to_qq' name no layer of the target UNet"):
        run_audit(tmp_path / "run", bad)
    assert not (tmp_path / "run" / "synthetic").exists()
    from side_extract.finetune import lora_problems
    from side_extract.models.target import load_target

    unet = load_target(tiny_model_dir).unet
    assert lora_problems(unet, rc.lora) == []
    # layers peft cannot adapt: its error came in the lora stage, after sampling and clustering
    odd = dataclasses.replace(rc.lora, target_modules=("conv1", "norm1", "time_embedding"))
    assert lora_problems(unet, odd) == [
        "lora.target_modules: 'norm1' names 'down_blocks.0.resnets.0.norm1', a GroupNorm; LoRA adapts only Linear, "
        "Conv1d, Conv2d, Conv3d, Embedding layers",
        "lora.target_modules: 'time_embedding' names 'time_embedding', a TimestepEmbedding; LoRA adapts only "
        "Linear, Conv1d, Conv2d, Conv3d, Embedding layers"]
    from diffusers import UNet2DModel

    labelled = UNet2DModel(**{**{k: v for k, v in unet.config.items() if not k.startswith("_")}, "num_class_embeds": 3})
    assert lora_problems(labelled, rc.lora) == [
        "the target UNet already has a class embedding; side-lora needs an unconditional target"]


def test_bad_evaluation_inputs_fail_before_any_stage_and_leave_finished_results(tiny_model_dir, tmp_path):
    """Malformed bands, a bands file that is not JSON, a missing TorchScript file: each was found only when the
    evaluation ran, after sampling, training and extraction, and after `begin` had cleared the finished
    evaluation of a run that already had one."""
    run = tmp_path / "run"
    rc = _small(tiny_model_dir, bands=FIXED)
    run_audit(run, rc)
    metrics = (run / "evaluation" / "side" / "metrics.json").read_bytes()
    not_json = tmp_path / "bands.json"
    not_json.write_text("high: 0.1")
    for bad, match in [(dict(bands="high=0:0.1,mid=0.1:oops"), "bands='high=0:0.1,mid=0.1:oops'"),
                       (dict(bands=None, bands_file=str(not_json)), "is not a bands.json"),
                       (dict(similarity="cosine:torchscript:/nowhere/sscd.pt"), "torchscript:/nowhere/sscd.pt: no such"),
                       (dict(quality=("torchscript:/nowhere/q.pt",)), "evaluate.quality: torchscript:/nowhere/q.pt: no such"),
                       (dict(quality=("efficientnet-lite0:x",)), "evaluate.quality: feature extractor 'efficientnet-lite0' "
                                                                 "takes no ':' argument"),
                       # (it listed pixels twice, and unet, which the next check refuses)
                       (dict(quality=("fid",)), r"evaluate.quality: 'fid' is not a feature space; valid: pixels, "
                                                r"pixels-pca, efficientnet-lite0, torchscript:PATH$")]:
        with pytest.raises(ValueError, match=match):
            run_audit(run, dataclasses.replace(rc, evaluate=dataclasses.replace(rc.evaluate, **bad)))
        assert (run / "evaluation" / "side" / "metrics.json").read_bytes() == metrics
        with pytest.raises(ValueError, match=match):
            run_audit(tmp_path / "fresh", dataclasses.replace(rc, evaluate=dataclasses.replace(rc.evaluate, **bad)))
        assert not (tmp_path / "fresh" / "synthetic").exists()
    with pytest.raises(ValueError, match=r"classifier.depth=7 must be one of \[10, 18, 34\]"):  # (was: after sampling)
        run_audit(run, dataclasses.replace(rc, classifier=dataclasses.replace(rc.classifier, depth=7)))
    assert (run / "classifier" / "model.safetensors").exists()  # (was: cleared, then the error)
    with pytest.raises(ValueError, match="features.extractor: torchscript:/nowhere/f.pt: no such file"):
        run_audit(tmp_path / "fresh", dataclasses.replace(rc, features=cfg.FeaturesConfig(
            extractor="torchscript:/nowhere/f.pt")))


def test_a_replaced_bands_file_or_held_out_set_redoes_what_read_it(tiny_model_dir, tmp_path):
    """The fingerprints held the file's path only: the same path with other bands, or other held-out images,
    reused the stale calibration and evaluations."""
    bands = tmp_path / "bands.json"
    bands.write_text(json.dumps({"similarity": "rms-l2", "bands": {"low": [0.15, 0.2], "mid": [0.1, 0.15],
                                                                   "high": [0.0, 0.1]}}))
    run = tmp_path / "run"
    rc = _small(tiny_model_dir, bands_file=str(bands))
    run_audit(run, rc)
    first = _started(run)
    run_audit(run, rc)
    assert _started(run) == first  # unchanged: skipped
    bands.write_text(json.dumps({"similarity": "rms-l2", "bands": {"low": [0.2, 0.3], "mid": [0.15, 0.2],
                                                                   "high": [0.0, 0.15]}}))
    res = run_audit(run, rc)
    again = _started(run)
    assert again["evaluation/side"] > first["evaluation/side"] and again["extraction/side"] == first["extraction/side"]
    assert res.metrics["side"]["bands"]["high"] == [0.0, 0.15]

    held = tmp_path / "held.npz"
    np.savez(held, images=load_image_set("digits:200").images[:100])
    cal = dataclasses.replace(rc, evaluate=dataclasses.replace(
        rc.evaluate, bands_file=None, heldout=str(held), calibration_quantiles=(0.05, 0.1, 0.2)))
    run_audit(run, cal)
    before = _started(run)
    edges = read_json(run / "evaluation" / "bands.json")["bands"]
    np.savez(held, images=load_image_set("digits:200").images[100:])
    run_audit(run, cal)
    after = _started(run)
    assert after["calibration"] > before["calibration"] and after["evaluation/side"] > before["evaluation/side"]
    assert read_json(run / "evaluation" / "bands.json")["bands"] != edges


def test_a_replaced_quality_torchscript_file_redoes_the_evaluations(tiny_model_dir, tmp_path):
    """The evaluations were keyed by the similarity's TorchScript file, not by a quality feature space's: the same
    path holding another network kept the stale Frechet distance and KID."""
    import torch

    script = tmp_path / "q.pt"

    def save(seed):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        torch.jit.script(net).save(str(script))

    save(0)
    run = tmp_path / "run"
    rc = _small(tiny_model_dir, bands=FIXED)
    rc = dataclasses.replace(rc, extract=dataclasses.replace(rc.extract, methods=("uncond",)), evaluate=dataclasses.replace(
        rc.evaluate, quality=(f"torchscript:{script}",), quality_max_reference=40))
    first = run_audit(run, rc).metrics["uncond"]["quality"][f"torchscript:{script}"]["frechet"]
    before = _started(run)
    run_audit(run, rc)
    assert _started(run) == before  # the same file: skipped
    save(1)
    second = run_audit(run, rc).metrics["uncond"]["quality"][f"torchscript:{script}"]["frechet"]
    after = _started(run)
    assert after["evaluation/uncond"] > before["evaluation/uncond"] and second != first
    assert after["extraction/uncond"] == before["extraction/uncond"]


def test_a_bad_sweep_value_fails_before_the_main_run(tiny_model_dir, tmp_path):
    rc = dataclasses.replace(_small(tiny_model_dir, bands=FIXED), sweep=cfg.SweepConfig(n_clusters=(2, 1000)))
    with pytest.raises(ValueError, match=r"(?s)sweep n_clusters=1000: .*surrogate K=1000 must be <="):
        run_with_sweeps(tmp_path / "run", rc)
    assert not (tmp_path / "run").exists()
    rc = dataclasses.replace(rc, sweep=cfg.SweepConfig(tau=(5.0,)))
    with pytest.raises(ValueError, match=r"sweep tau=5.0: tau=5.0"):
        run_with_sweeps(tmp_path / "run", rc)
    assert not (tmp_path / "run").exists()
    # a fault of the run's own config is the run's (it was said as "sweep tau=0.25: the run cannot start: ...": the
    # sub-runs were checked before the run itself)
    rc = dataclasses.replace(rc, sweep=cfg.SweepConfig(tau=(0.25,)),
                             extract=dataclasses.replace(rc.extract, steps=5000))
    with pytest.raises(ValueError, match=r"^the run cannot start:\n.*extract.steps=5000"):
        run_with_sweeps(tmp_path / "run", rc)
    assert not (tmp_path / "run").exists()


def test_a_sweep_that_would_change_nothing_is_refused(tiny_model_dir, tmp_path):
    """A sweep of a value no enabled method reads used to be ignored silently (no guided method) or to make sub-runs
    that repeat the main run (K with select_k, which picks K itself); both are refused before anything is written."""
    rc = _small(tiny_model_dir, bands=FIXED)
    cases = [(dict(sweep=cfg.SweepConfig(scale=(1.0, 3.0)),
                   extract=dataclasses.replace(rc.extract, methods=("memguide", "uncond"))),
              r"sweep\.scale: no method in extract\.methods \(memguide, uncond\) reads extract\.scale"),
             (dict(sweep=cfg.SweepConfig(n_clusters=(2, 3)),
                   extract=dataclasses.replace(rc.extract, methods=("cond", "uncond"))),
              r"sweep\.n_clusters: .* it moves side, side-lora"),
             (dict(sweep=cfg.SweepConfig(n_clusters=(2, 3)),
                   extract=dataclasses.replace(rc.extract, methods=("side", "uncond")),
                   surrogate=dataclasses.replace(rc.surrogate, select_k=(2, 3))),
              r"sweep\.n_clusters with surrogate\.select_k=\[2, 3\]")]
    for changes, message in cases:
        with pytest.raises(ValueError, match=message):
            run_with_sweeps(tmp_path / "run", dataclasses.replace(rc, **changes))
        assert not (tmp_path / "run").exists()


def test_side_run_runs_its_config_and_side_sample_keeps_the_runs_settings(tiny_model_dir, tmp_path):
    """`side run CONFIG --out RUN` merged CONFIG over RUN's saved config, so a key deleted from CONFIG kept the
    old run's value; `side sample --out RUN` on an existing run wrote every other setting back to its default."""
    rc = _small(tiny_model_dir, bands=FIXED)
    conf = cfg.to_dict(rc)
    conf["extract"]["scale"] = 5.0
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(conf))
    run = tmp_path / "run"
    runner = CliRunner()
    args = ["--threads", "1", "--no-progress", "run", str(path), "--out", str(run), "--no-report"]
    assert runner.invoke(app, args).exit_code == 0
    del conf["extract"]["scale"]
    path.write_text(yaml.safe_dump(conf))
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "extract.scale 5.0 -> 3.0" in r.output
    assert yaml.safe_load((run / "config.yaml").read_text())["extract"]["scale"] == cfg.ExtractConfig().scale
    r = runner.invoke(app, ["--threads", "1", "--no-progress", "sample", "--out", str(run), "--n", "48"])
    assert r.exit_code == 0, r.output
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["sample"]["n"] == 48 and saved["extract"]["methods"] == ["side", "uncond"]
    assert saved["train"] == "digits:30" and saved["sample"]["steps"] == 2


def test_a_config_file_with_a_key_twice_or_not_utf8_is_refused_by_name(tmp_path):
    """yaml.safe_load kept the last of two keys without a word (a second ``sample:`` section replaced the first,
    a second ``classifier:`` block dropped the first one's keys); a file that is not UTF-8 failed with "'utf-8' codec
    can't decode byte 0xff", naming no file. YAML's merge keys (<<: *anchor) still merge."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("sample:\n  n: 4\nclassifier:\n  steps: 3\nsample:\n  n: 5\n")
    with pytest.raises(ValueError, match=r"twice.yaml' is not valid YAML: the key 'sample' is given twice"):
        cfg.load_yaml(twice)
    inner = tmp_path / "inner.yaml"
    inner.write_text("sample:\n  n: 4\n  n: 5\n")
    with pytest.raises(ValueError, match="the key 'n' is given twice"):
        cfg.load_yaml(inner)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"a: 1\n\x00\x01\xff\xfe")
    with pytest.raises(ValueError, match=r"binary.yaml' is not UTF-8 text"):
        cfg.load_yaml(binary)
    res = CliRunner().invoke(app, ["--no-progress", "run", str(twice), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "given twice" in res.output and not (tmp_path / "r").exists(), res.output
    merged = tmp_path / "merged.yaml"
    merged.write_text("base: &b\n  n: 4\nsample:\n  <<: *b\n  steps: 3\n")
    assert cfg.load_yaml(merged)["sample"] == {"n": 4, "steps": 3}


def test_a_config_built_in_python_is_stored_as_its_yaml_reads_back():
    """Values were checked but not converted: eta=0 stayed an int (fingerprinted apart from the 0.0 read back from
    the run's config.yaml, so a rerun from it made the extraction again), a list stayed a list (the config could not
    be hashed), and a numpy integer reached yaml's writer (a RepresenterError after the run directory was begun)."""
    from side_extract.pipeline import extraction_fingerprint

    py = cfg.RunConfig(sample=cfg.SampleConfig(n=np.int64(16)), extract=cfg.ExtractConfig(eta=0, methods=["uncond"]))
    back = cfg.from_dict(cfg.RunConfig, yaml.safe_load(cfg.dump_yaml(py)))
    assert type(py.extract.eta) is float and py.extract.methods == ("uncond",) and type(py.sample.n) is int
    assert py == back and hash(py.extract) == hash(back.extract)
    assert extraction_fingerprint(py, "uncond", None, "m", None) == extraction_fingerprint(back, "uncond", None, "m", None)


def test_an_exponent_without_a_dot_reads_as_a_number(tmp_path):
    """PyYAML (YAML 1.1) reads 1e-4 as text: `lr: 1e-4`, as configs/own-model.yaml's comment writes it, was refused as
    "must be a number", though the user wrote one."""
    (tmp_path / "c.yaml").write_text("classifier:\n  lr: 1e-4\nextract:\n  scale: 3E+1\n")
    rc = cfg.from_dict(cfg.RunConfig, cfg.load_yaml(tmp_path / "c.yaml"))
    assert rc.classifier.lr == 1e-4 and rc.extract.scale == 30.0
    assert cfg.yaml_value("1e-4") == 1e-4  # as side bench fair --form NAME=METHOD,key=value reads its values
    # a text setting that looks like one is written quoted, and reads back as text (the run's own config.yaml wrote
    # train: 1e4 and refused itself: "train=10000.0 must be a string")
    rc = cfg.RunConfig(train="1e4")
    assert cfg.from_dict(cfg.RunConfig, cfg.yaml_value(cfg.dump_yaml(rc))) == rc


def test_a_choice_given_as_numpys_str_is_stored_as_pythons():
    # numpy's str_ for a choice is stored as Python's str (yaml could not write it: a RepresenterError)
    assert type(cfg.SampleConfig(scheduler=np.str_("ddpm")).scheduler) is str
    assert "scheduler: ddpm" in cfg.dump_yaml(cfg.SampleConfig(scheduler=np.str_("ddpm")))


def test_config_faults_of_a_review(tiny_model_dir, tmp_path, monkeypatch):
    """An independent review's finds: a --config section left empty (its keys commented out) reset the run's
    section to every default; -0.0 keyed another run than 0.0; 1.5e2 was text, 010 the octal 8 and 1:30 the
    base-60 90; the quantiles of bands not calibrated keyed the evaluations without a warning; a bands file was
    recorded as typed (from another folder it named nothing; ./bands.json and bands.json were two settings)."""
    assert cfg.merge({"extract": {"n": 4}}, {"extract": None, "train": None}) == {"extract": {"n": 4}, "train": None}
    assert cfg.yaml_value("1.5e2") == 150.0 and cfg.yaml_value(".5e1") == 5.0
    assert cfg.from_dict(cfg.RunConfig, cfg.yaml_value("extract: {seed: 010}")).extract.seed == 10  # (YAML 1.2's)
    with pytest.raises(ValueError, match=r"extract.seed='1:30' must be an integer"):
        cfg.from_dict(cfg.RunConfig, cfg.yaml_value("extract: {seed: 1:30}"))
    with pytest.raises(ValueError, match=r"extract.eta='1:30.0' must be a number"):
        cfg.from_dict(cfg.RunConfig, cfg.yaml_value("extract: {eta: 1:30.0}"))
    for text in ("010", "0o17", "1.5e2", "1:30"):  # text that a YAML reader could take for a number: quoted
        assert cfg.yaml_value(cfg.dump_yaml(cfg.RunConfig(train=text))).get("train") == text
    zero = cfg.from_dict(cfg.RunConfig, {"extract": {"eta": -0.0}})
    assert str(zero.extract.eta) == "0.0" and cfg.to_dict(zero) == cfg.to_dict(cfg.RunConfig(
        extract=cfg.ExtractConfig(eta=0.0)))
    fixed = cfg.EvaluateConfig(bands="high=0:0.1,mid=0.1:0.15,low=0.15:0.2", calibration_quantiles=(0.02, 0.05, 0.1))
    assert any(s.startswith("evaluate.calibration_quantiles=") for s in cfg.inert_settings(cfg.RunConfig(
        evaluate=fixed)))
    assert any(s.startswith("surrogate.memorization_t=") for s in cfg.inert_settings(cfg.RunConfig(
        surrogate=cfg.SurrogateConfig(memorization_t=0.3))))
    # a bands file: recorded absolute, keyed by its contents
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bands.json").write_text(json.dumps({"similarity": "rms-l2", "bands": {
        "low": [0.15, 0.2], "mid": [0.1, 0.15], "high": [0.0, 0.1]}}))
    rc = dataclasses.replace(_small(tiny_model_dir), extract=dataclasses.replace(_small(tiny_model_dir).extract,
                                                                                methods=("uncond",)))
    rc = dataclasses.replace(rc, evaluate=dataclasses.replace(rc.evaluate, bands_file="bands.json"))
    run_audit("run", rc)
    assert cfg.load_yaml(tmp_path / "run" / "config.yaml")["evaluate"]["bands_file"] == str(tmp_path / "bands.json")
    first = _started(tmp_path / "run")
    again = dataclasses.replace(rc, evaluate=dataclasses.replace(rc.evaluate, bands_file="./bands.json",
                                                                 calibration_quantiles=(0.02, 0.05, 0.1)))
    run_audit("run", again, replace=False)  # another spelling of the file, quantiles no band is made of: skipped
    assert _started(tmp_path / "run") == first


def test_an_empty_model_or_training_set_is_named_by_its_key():
    """A review's find: `model: ""` was refused as "spec='' is empty", and `train: ""` ran into "folder ... holds no
    images" of the current folder."""
    for key in ("model", "train"):
        with pytest.raises(ValueError, match=f"{key}='' is empty: give a path"):
            cfg.from_dict(cfg.RunConfig, {key: ""})


def test_a_bands_file_changed_under_its_path_is_named_in_the_refusal(tiny_model_dir, tmp_path):
    """A review's find: a bands file (or a torchscript extractor) changed under the same path was refused with
    nothing named ("see manifest.json")."""
    from side_extract.runs import StageWouldBeReplaced

    bands = tmp_path / "bands.json"
    bands.write_text(json.dumps({"similarity": "rms-l2", "bands": {"low": [0.15, 0.2], "mid": [0.1, 0.15],
                                                                   "high": [0.0, 0.1]}}))
    rc = _small(tiny_model_dir, bands_file=str(bands))
    rc = dataclasses.replace(rc, extract=dataclasses.replace(rc.extract, methods=("uncond",)))
    run_audit(tmp_path / "run", rc)
    bands.write_text(json.dumps({"similarity": "rms-l2", "bands": {"low": [0.2, 0.3], "mid": [0.15, 0.2],
                                                                   "high": [0.0, 0.15]}}))
    with pytest.raises(StageWouldBeReplaced, match="changed: the bands file changed"):
        run_audit(tmp_path / "run", rc, replace=False)


def test_a_feature_extractor_the_target_cannot_run_is_refused_before_sampling(tiny_model_dir, tmp_path):
    """features.extractor (and evaluate's similarity) was checked by name only: UNet features of a callable target,
    of a UNet2DModel without a mid block, or a TorchScript file torch cannot load failed after the synthetic set was
    sampled ('NoneType' object has no attribute 'register_forward_hook', for one). A review's finds."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    import side_extract

    digits = load_image_set("digits:30")
    small = {"sample.n": 16, "sample.steps": 2, "surrogate.n_clusters": 2, "surrogate.tau": -1.0,
             "evaluate.bands": "high=0:0.1,mid=0.1:0.15,low=0.15:0.2"}

    def eps(x, t):
        return torch.zeros_like(x)

    no_mid = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(4, 8), layers_per_block=1,
                         norm_num_groups=4, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                         mid_block_type=None)
    for k, (model, kw, key, says) in enumerate((
            (eps, {"sample_shape": (1, 8, 8)}, "features.extractor", "this target is a callable"),
            (eps, {"sample_shape": (1, 8, 8)}, "evaluate.similarity", "this target is a callable"),
            (no_mid, {}, "features.extractor", "this UNet2DModel has none (mid_block_type=None)"))):
        value = "unet" if key == "features.extractor" else "cosine:unet"
        out = tmp_path / f"run{k}"
        with pytest.raises(ValueError, match=re.escape(says)):
            side_extract.audit(model, digits.images, scheduler=DDPMScheduler(num_train_timesteps=1000), out=out,
                               methods=["side"], config={**small, key: value}, **kw)
        assert not (out / "synthetic").exists()
    bad = tmp_path / "bad.pt"
    bad.write_text("not a model")
    rc = tiny_rc(tiny_model_dir, methods=("side",))
    rc = dataclasses.replace(rc, features=dataclasses.replace(rc.features, extractor=f"torchscript:{bad}"))
    with pytest.raises(ValueError, match="is not a loadable TorchScript file"):
        run_audit(tmp_path / "ts", rc)
    assert not (tmp_path / "ts" / "synthetic").exists()
