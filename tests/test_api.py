"""The public API: docs/api.md runs as written; an in-memory UNet2DModel, a pipeline object and a callable
go through the whole chain without a model directory; the typed results match the run's files."""
from __future__ import annotations

import dataclasses
import importlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDPMPipeline

import side_extract
from side_extract import config as cfg
from side_extract.api import Audit, as_target
from side_extract.data import load_shards
from side_extract.extraction import extract
from side_extract.models.forms import module_fingerprint
from side_extract.models.target import load_target
from side_extract.runs import read_stages
from side_extract.pipeline import method_guidance, run_audit

from conftest import tiny_scheduler, tiny_unet

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
SMALL = {"sample.n": 40, "sample.steps": 2, "sample.shard_size": 16, "surrogate.n_clusters": 4, "surrogate.tau": -1.0,
         "surrogate.n_init": 1, "classifier.depth": 10, "classifier.width": 8, "classifier.steps": 4,
         "classifier.batch_size": 16, "clean_classifier.depth": 10, "clean_classifier.width": 8,
         "clean_classifier.steps": 4, "clean_classifier.batch_size": 16, "extract.n": 6, "extract.steps": 2,
         "extract.scale": 1.0, "evaluate.carlini_n": 5, "evaluate.quality": ["pixels"], "evaluate.bands": "high=0:0.1,mid=0.1:0.15,low=0.15:0.2"}


def test_docs_example_runs(tmp_path, one_thread, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)  # the page's relative paths (workdir = Path("runs")) land here
    scope: dict = {}
    for code in blocks:
        exec(compile(code, str(DOC), "exec"), scope)
    assert (tmp_path / "runs" / "audit" / "report" / "report.html").is_file()
    assert scope["result"].to_csv().splitlines()[0].startswith("method,band,lo,hi,ams,ums")


def test_readmes_python_example_runs(tmp_path, one_thread, monkeypatch):
    """README's "From Python" block, run as written on a tiny in-memory target (its config made small enough for a
    test: N_G 20 instead of its 500, so that its generation 17 exists); it was never run before."""
    readme = DOC.parents[1] / "README.md"
    (code,) = re.findall(r"## From Python\n\n```python\n(.*?)```", readme.read_text(), flags=re.S)
    real = side_extract.audit
    monkeypatch.setattr(side_extract, "audit", lambda *a, config=None, **k: real(
        *a, config={**(config or {}), **SMALL, "extract.n": 20}, **k))
    monkeypatch.chdir(tmp_path)
    digits = side_extract.load_image_set("digits:30")
    scope = {"unet": tiny_unet(), "scheduler": tiny_scheduler(), "train_images": digits.images,
             "train_labels": digits.labels}
    exec(compile(code, str(readme), "exec"), scope)
    assert (tmp_path / "audit.csv").is_file() and (tmp_path / "runs" / "audit" / "report" / "report.html").is_file()
    assert scope["result"].verify("side", top=2, model=scope["unet"], scheduler=scope["scheduler"])[0].equal


def test_in_memory_unet_end_to_end_without_a_model_directory(tmp_path, one_thread):
    unet = tiny_unet()
    digits = side_extract.load_image_set("digits:30")
    res = side_extract.audit(unet, digits.images, labels=digits.labels, scheduler=tiny_scheduler(), config=SMALL,
                             out=tmp_path / "run", methods=["side", "cond", "uncond"])
    assert isinstance(res, Audit) and set(res.methods) == {"side", "cond", "uncond"}
    shards = load_shards(tmp_path / "run" / "extraction" / "side")
    for p in res.pairs("side", top=3):  # each generation's SIDE target cluster, as its shard holds it
        assert p.target_label == int(shards.labels[list(shards.ids).index(p.generation_id)])
    assert not list(tmp_path.rglob("unet"))  # no model directory was written anywhere
    assert res.config.model.startswith("in-memory UNet2DModel")
    assert len(list((tmp_path / "run" / "inputs").glob("train-*.npz"))) == 1
    side = res.methods["side"]
    assert side.n_generated == 6 and side.n_train == 30 and set(side.bands) == {"high", "mid", "low"}
    # typed results are the run's metrics.json
    import json

    raw = json.loads((tmp_path / "run" / "evaluation" / "side" / "metrics.json").read_text())
    assert side.bands["high"].ams == raw["ams"]["high"] and side.carlini_extracted == raw["carlini"]["extracted_fraction"]
    rows = res.table()
    assert len(rows) == 9 and {r["method"] for r in rows} == {"side", "cond", "uncond"}
    pairs = res.pairs("uncond")
    assert len(pairs) == 6 and pairs[0].generation.shape == pairs[0].nearest.shape == (8, 8, 1)
    sims = [p.similarity for p in pairs]
    assert sims == sorted(sims)  # distances: closest first
    np.testing.assert_array_equal(pairs[0].nearest, digits.images[list(digits.ids).index(pairs[0].train_id)])
    # the same model again: every stage is reused (its fingerprint is its weights)
    again = side_extract.audit(unet, digits.images, labels=digits.labels, scheduler=tiny_scheduler(), config=SMALL,
                               out=tmp_path / "run", methods=["side", "cond", "uncond"])
    assert again.methods["side"] == res.methods["side"]


def test_pipeline_objects_and_callables_are_targets(tmp_path):
    unet, sched = tiny_unet(), tiny_scheduler()
    a = as_target(DDPMPipeline(unet=unet, scheduler=sched))
    b = as_target(unet, scheduler=sched)
    assert a.fingerprint == b.fingerprint
    c = as_target(DDIMPipeline(unet=tiny_unet(seed=1), scheduler=sched))
    assert c.fingerprint != a.fingerprint
    fn = lambda x, t: unet(x, t).sample  # noqa: E731
    d = as_target(fn, scheduler=sched, sample_shape=(1, 8, 8))
    assert d.fingerprint == as_target(fn, scheduler=sched, sample_shape=(1, 8, 8)).fingerprint
    res = side_extract.audit(fn, "digits:30", scheduler=sched, sample_shape=(1, 8, 8), config=SMALL,
                             out=tmp_path / "run", methods=["uncond"])
    assert res.methods["uncond"].n_generated == 6
    with pytest.raises(ValueError, match="needs the scheduler"):
        as_target(unet)
    with pytest.raises(ValueError, match="sample_shape"):
        as_target(fn, scheduler=sched)
    with pytest.raises(ValueError, match="uint8"):
        side_extract.audit(unet, np.zeros((4, 8, 8), np.float32), scheduler=sched, out=tmp_path / "x")


def test_a_scheduler_given_with_a_pipeline_object_replaces_its_own_and_says_so(caplog):
    """A pipeline object with ``scheduler=`` took the given scheduler without a word (an API review's find): still
    taken (the caller named it), with a warning where it is another class or config than the pipeline's own."""
    from diffusers import DDIMScheduler, DDPMScheduler

    unet, sched = tiny_unet(), tiny_scheduler()
    other = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_end=0.03)
    with caplog.at_level("WARNING", logger="side_extract.models.forms"):
        replaced = as_target(DDPMPipeline(unet=unet, scheduler=sched), scheduler=other)
    assert "scheduler=DDPMScheduler replaces the DDPMPipeline's own DDPMScheduler" in caplog.text
    assert replaced.fingerprint == as_target(unet, scheduler=other).fingerprint != as_target(unet, scheduler=sched).fingerprint
    caplog.clear()
    with caplog.at_level("WARNING", logger="side_extract.models.forms"):
        as_target(DDPMPipeline(unet=unet, scheduler=sched), scheduler=tiny_scheduler())  # the same config: silent
        as_target(DDPMPipeline(unet=unet, scheduler=sched))
    assert caplog.text == ""
    with caplog.at_level("WARNING", logger="side_extract.models.forms"):
        as_target(DDPMPipeline(unet=unet, scheduler=sched), scheduler=DDIMScheduler.from_config(sched.config))
    assert "scheduler=DDIMScheduler replaces the DDPMPipeline's own DDPMScheduler" in caplog.text


def test_to_pandas_says_what_it_needs(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_pandas(name, *a, **k):
        if name == "pandas":
            raise ImportError("no pandas")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_pandas)
    from side_extract.config import RunConfig

    with pytest.raises(ImportError, match="pip install pandas"):
        Audit(tmp_path, RunConfig(), {}).to_pandas()


def test_regenerate_reproduces_every_methods_generations_bit_for_bit(tiny_model_dir, tmp_path, one_thread):
    """Audit.regenerate makes a finished run's generations again from its files alone: SIDE with adaptive rounds,
    memguide with avoidance (rounds that read the earlier rounds back), Cond, UnCond and side-lora, in shards of 4
    cut into batches of 3 (the run's batches, not the shard's), in any order and with repeats."""
    from test_finetune import TINY
    from test_pipeline import tiny_rc

    methods = ("side", "memguide", "cond", "uncond", "side-lora")
    rc = tiny_rc(tiny_model_dir, methods=methods, n=12, shard_size=4, batch_size=3, allocation="adaptive", rounds=2,
                 memguide_t_hi=0.5, memguide_avoid=1.0, memguide_avoid_h=0.2, memguide_avoid_t_lo=0.0,
                 memguide_avoid_t_hi=1.0)
    rc = dataclasses.replace(rc, lora=TINY)
    run = tmp_path / "run"
    run_audit(run, rc, until="extraction")
    audit = Audit.load(run)
    wanted = [11, 0, 7, 7, 4]
    for m in methods:
        stored = load_shards(run / "extraction" / m)
        again = audit.regenerate(m, wanted)
        assert again.dtype == np.uint8 and again.shape == (5, *stored.images.shape[1:])
        np.testing.assert_array_equal(again, stored.images[wanted], err_msg=m)
    # memguide's later round depends on the earlier one: it is the avoiding round, not memguide alone
    plain = dataclasses.replace(rc.extract, memguide_avoid=0.0)
    den, g = method_guidance(run, dataclasses.replace(rc, extract=plain), "memguide", load_target(tiny_model_dir))
    alone = extract(den, plain, g, 6, 9, batch_size=3)["images"]
    assert (alone != load_shards(run / "extraction" / "memguide").images[6:9]).any()
    with pytest.raises(ValueError, match="not one of this run's methods"):
        audit.regenerate("side-teacher", [0])
    with pytest.raises(ValueError, match=r"0 \.\. 11"):
        audit.regenerate("side", [12])
    with pytest.raises(ValueError, match="non-empty"):
        audit.regenerate("side", [])


def test_regenerate_needs_the_runs_own_in_memory_model(tmp_path, one_thread):
    unet = tiny_unet()
    digits = side_extract.load_image_set("digits:30")
    res = side_extract.audit(unet, digits.images, scheduler=tiny_scheduler(), config=SMALL, out=tmp_path / "run",
                             methods=["side", "uncond"])
    with pytest.raises(ValueError, match="pass it as model="):
        res.regenerate("side", [0])
    with pytest.raises(ValueError, match="is not the run's target"):
        res.regenerate("side", [0], model=tiny_unet(seed=1), scheduler=tiny_scheduler())
    again = res.regenerate("side", [5, 2], model=unet, scheduler=tiny_scheduler())
    np.testing.assert_array_equal(again, load_shards(tmp_path / "run" / "extraction" / "side").images[[5, 2]])
    # the run's config.yaml rewritten by a later call that ran memguide alone at another lambda (as the benchmarks'
    # replicates do): each extraction is made again from the config it was made with (its stage's config.yaml)
    side_extract.audit(unet, digits.images, scheduler=tiny_scheduler(), out=tmp_path / "run", methods=["memguide"],
                       config={**SMALL, "extract.scale": 4.0, "extract.memguide_scale": 7.0})
    later = Audit.load(tmp_path / "run")
    assert later.config.extract.methods == ("memguide",) and later.config.extract.scale == 4.0
    assert list(later.methods) == ["memguide", "side", "uncond"]  # every evaluation it holds, the config's first
    for m in ("side", "uncond", "memguide"):
        np.testing.assert_array_equal(later.regenerate(m, [5, 0], model=unet, scheduler=tiny_scheduler()),
                                      load_shards(tmp_path / "run" / "extraction" / m).images[[5, 0]], err_msg=m)
    checks = later.verify("side", top=2, model=unet, scheduler=tiny_scheduler())  # its evaluation picks them
    assert [c.equal for c in checks] == [True, True] and len(later.pairs("side")) == 6
    # a config that no longer describes the stage (its lambda edited after the run) is refused, not run
    conf = tmp_path / "run" / "extraction" / "side" / "config.yaml"
    edited = re.sub(r"(?m)^  scale: .*$", "  scale: 7.5", conf.read_text(), count=1)
    assert edited != conf.read_text()
    conf.write_text(edited)
    with pytest.raises(ValueError, match="does not describe side's extraction as the run made it"):
        later.regenerate("side", [0], model=unet, scheduler=tiny_scheduler())
    later.regenerate("uncond", [0], model=unet, scheduler=tiny_scheduler())  # its own settings
    conf.unlink()  # a run made before the stage kept its config: the run's, which now says lambda 4
    with pytest.raises(ValueError, match="is not one of this run's methods"):
        later.regenerate("side", [0], model=unet, scheduler=tiny_scheduler())


def test_regenerate_makes_each_generation_in_the_runs_batch(tmp_path, one_thread):
    """On the embedded demo target memguide's images move by a uint8 level with the batch they are made in (batched
    convolutions round differently), so the run's own batches (batch size 6 within shards of 8) are what make them
    equal; made one by one, some pixels differ here."""
    rc = cfg.RunConfig(model="demo", extract=cfg.ExtractConfig(methods=("memguide",), n=12, steps=10, shard_size=8,
                                                               batch_size=6, memguide_t_hi=0.5))
    run_audit(tmp_path / "early", rc, until="classifier")  # (memguide trains nothing: no extraction yet)
    with pytest.raises(ValueError, match="has not finished memguide's extraction"):
        Audit.load(tmp_path / "early").regenerate("memguide", [0])
    run_audit(tmp_path / "run", rc, until="extraction")
    stored = load_shards(tmp_path / "run" / "extraction" / "memguide").images
    np.testing.assert_array_equal(Audit.load(tmp_path / "run").regenerate("memguide", range(12)), stored)


def test_recorded_batches_where_shards_have_them_the_configured_cut_elsewhere(tmp_path):
    """A run grown from one made before shards recorded their batches: the old shard's generations take the
    configured cut (its shard in batches of batch_size), the new shard's the batches it recorded (halved here)."""
    from side_extract.extraction import batch_of, stored_batches

    c = cfg.ExtractConfig(n=12, shard_size=8, batch_size=6)
    images = np.zeros((4, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "shard-00000.npz", images=np.zeros((8, 8, 8, 1), dtype=np.uint8), index=np.arange(8))
    assert stored_batches(tmp_path) is None  # nothing recorded: the cut everywhere
    np.savez(tmp_path / "shard-00001.npz", images=images, index=np.arange(8, 12), batch=np.array([8, 8, 8, 11]))
    starts = stored_batches(tmp_path)
    assert starts.tolist() == [-1] * 8 + [8, 8, 8, 11]
    assert [batch_of(c, None, i, starts, denoiser=None) for i in (0, 5, 6, 7, 8, 10, 11)] == \
        [(0, 6), (0, 6), (6, 8), (6, 8), (8, 11), (8, 11), (11, 12)]
    assert batch_of(c, None, 9, denoiser=None) == (8, 12)  # the configured cut, had the stage recorded nothing
    with pytest.raises(ValueError, match="recorded the batches of 12 generations, not the run's 13"):
        batch_of(dataclasses.replace(c, n=13), None, 0, starts, denoiser=None)


class _OutOfMemoryAbove:
    """A denoiser raising torch's out-of-memory error for batches larger than ``limit``, as a GPU would."""

    def __init__(self, inner, limit):
        self.inner, self.limit = inner, limit

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, x, t, *args, **kwargs):
        if len(x) > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (fake: batch {len(x)} > {self.limit})")
        return self.inner(x, t, *args, **kwargs)


def test_regenerate_and_verify_follow_a_batch_halved_on_out_of_memory(tmp_path, one_thread, monkeypatch):
    """A run whose denoiser ran out of memory at batches above 3 made its generations in the halved batches
    ([0, 3), [3, 6), [6, 8), [8, 11), [11, 12) instead of [0, 6), [6, 8), [8, 12)); its shards record them, and
    regenerate / verify make each generation in its own batch again: bit for bit, where the configured
    batches would move pixels."""
    import side_extract.pipeline as pipeline

    rc = cfg.RunConfig(model="demo", train="digits:100", train_resize=8,
                       evaluate=cfg.EvaluateConfig(carlini_n=5, quality=()),
                       extract=cfg.ExtractConfig(methods=("memguide",), n=12, steps=10, shard_size=8, batch_size=6,
                                                 memguide_t_hi=0.5))
    build = pipeline.method_guidance
    with monkeypatch.context() as m:  # the run's sampler runs out of memory above 3 images
        m.setattr(pipeline.chain, "method_guidance",
                  lambda *a, **k: (lambda den, g: (_OutOfMemoryAbove(den, 3), g))(*build(*a, **k)))
        run_audit(tmp_path / "run", rc)
    stage = tmp_path / "run" / "extraction" / "memguide"
    with np.load(stage / "shard-00000.npz") as z0, np.load(stage / "shard-00001.npz") as z1:
        assert np.concatenate([z0["batch"], z1["batch"]]).tolist() == [0] * 3 + [3] * 3 + [6] * 2 + [8] * 3 + [11]
    stored = load_shards(stage).images
    audit = Audit.load(tmp_path / "run")
    np.testing.assert_array_equal(audit.regenerate("memguide", range(12)), stored)
    checks = audit.verify("memguide", top=4)
    assert len(checks) == 4 and all(c.equal and c.method == "memguide" for c in checks)
    # the configured batches, which the run did not use, give other pixels
    den, g = method_guidance(tmp_path / "run", rc, "memguide", load_target("demo"))
    configured = np.concatenate([extract(den, rc.extract, g, lo, hi, batch_size=6)["images"]
                                 for lo, hi in ((0, 6), (6, 8), (8, 12))])
    assert (configured != stored).any()
    assert [c.pixels_differ > 0 for c in audit.verify("memguide", [0, 5, 11])] == [False] * 3


def test_api_input_mistakes_are_named_and_leave_nothing_behind(tmp_path, one_thread):
    """labels= with a spec or a labelled ImageSet was dropped without a word; methods="uncond" was split into
    letters; pairs(top=-1) returned all but one pair; a refused audit left out/.lock and out/inputs/ behind;
    loading a classifier moved the caller's torch RNG."""
    digits = side_extract.load_image_set("digits:30")
    kw = dict(scheduler=tiny_scheduler(), config=SMALL)
    with pytest.raises(ValueError, match="carries its own labels"):
        side_extract.audit(tiny_unet(), "digits:30", labels=digits.labels, out=tmp_path / "a", **kw)
    with pytest.raises(ValueError, match="has labels already"):
        side_extract.audit(tiny_unet(), digits, labels=digits.labels, out=tmp_path / "a", **kw)
    with pytest.raises(ValueError, match="unknown-method"):
        side_extract.audit(tiny_unet(), digits.images, out=tmp_path / "a", methods=["unknown-method"], **kw)
    with pytest.raises(ValueError, match="needs labels|has no labels"):  # Cond without labels: refused in preflight
        side_extract.audit(tiny_unet(), digits.images, out=tmp_path / "a", methods=["cond"], **kw)
    # a review's finds: each a traceback, a silent truncation, an ignored argument, or a file the user never named
    for call, says in ((dict(labels=digits.labels + 0.7), "labels must hold integers, got float64"),
                       (dict(config={1: 2}), r"config: keys must be strings .*\[1\]"),
                       (dict(scheduler="ddpm"), "scheduler='ddpm' must be a diffusers scheduler object"),
                       (dict(sample_shape=(3, 32, 32)), r"sample_shape=\(3, 32, 32\) is not the UNet2DModel's own")):
        with pytest.raises(ValueError, match=says):
            side_extract.audit(tiny_unet(), digits.images, out=tmp_path / "a", methods=["uncond"], **(kw | call))
    with pytest.raises(ValueError, match=r"train: the array holds no images \(shape \(0, 8, 8, 1\)\)"):
        side_extract.audit(tiny_unet(), digits.images[:0], out=tmp_path / "a", methods=["uncond"], **kw)
    assert not (tmp_path / "a").exists()
    (tmp_path / "empty").mkdir()  # a folder the caller made: refused, it is left as it was (it kept .lock, inputs/)
    with pytest.raises(ValueError, match="needs labels|has no labels"):
        side_extract.audit(tiny_unet(), digits.images, out=tmp_path / "empty", methods=["cond"], **kw)
    assert [p.name for p in (tmp_path / "empty").iterdir()] == [".lock"]  # (the run lock: not removed, another
    # writer may be waiting on it)
    unlabelled = dataclasses.replace(digits, labels=None)
    res = side_extract.audit(tiny_unet(), unlabelled, labels=digits.labels, out=tmp_path / "b", methods="uncond", **kw)
    assert list(res.methods) == ["uncond"]
    (saved,) = (tmp_path / "b" / "inputs").glob("train-*.npz")
    assert (np.load(saved)["labels"] == digits.labels).all()
    with pytest.raises(ValueError, match="top=-1"):
        res.pairs("uncond", top=-1)
    with pytest.raises(ValueError, match=r"indices=\[1.7\] must be integers"):  # (it made generation 1)
        res.regenerate("uncond", [1.7], model=tiny_unet(), scheduler=tiny_scheduler())
    from side_extract.models.classifier import load_classifier

    res = side_extract.audit(tiny_unet(), digits.images, labels=digits.labels, out=tmp_path / "c", methods=["side"], **kw)
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    load_classifier(tmp_path / "c" / "classifier")
    assert torch.equal(torch.random.get_rng_state(), before)


def test_a_callable_is_checked_like_a_unet(tmp_path, one_thread):
    """A UNet's scheduler of a prediction type side-extract cannot read was refused, a callable's was not (its
    output then read as eps); a callable returning the wrong shape failed in the first stage with torch's error,
    leaving a run behind. (v and x0: tests/test_predictions.py.)"""
    from diffusers import DDPMScheduler

    unet = tiny_unet()
    fn = lambda x, t: unet(x, t).sample  # noqa: E731
    unknown = DDPMScheduler(num_train_timesteps=1000, prediction_type="flow")
    with pytest.raises(ValueError, match="prediction_type='flow': a model must predict one of"):
        as_target(fn, scheduler=unknown, sample_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="prediction_type='flow': a model must predict one of"):
        as_target(unet, scheduler=unknown)
    with pytest.raises(ValueError, match=r"must return eps shaped like its input \(2, 1, 8, 8\); it returned \(2, 1, 8, 4\)"):
        side_extract.audit(lambda x, t: fn(x, t)[..., :4], "digits:30", scheduler=tiny_scheduler(),
                           sample_shape=(1, 8, 8), config=SMALL, out=tmp_path / "run", methods=["uncond"])
    assert not (tmp_path / "run").exists()
    bf16 = as_target(tiny_unet().to(torch.bfloat16), scheduler=tiny_scheduler())  # numpy has no bfloat16
    assert bf16.fingerprint != as_target(tiny_unet(), scheduler=tiny_scheduler()).fingerprint
    # a callable that takes one t only failed with torch's "only one element tensors can be converted" inside the
    # memorization score, after the run's folder and first stages were written (a review's find)
    with pytest.raises(ValueError, match=r"the callable eps\(x, t\) failed with t a tensor of one timestep per "
                                         r"sample, shape \(2,\) \((RuntimeError|ValueError): only one element"):
        side_extract.audit(lambda x, t: unet(x, int(t)).sample, "digits:30", scheduler=tiny_scheduler(),
                           sample_shape=(1, 8, 8), config=SMALL, out=tmp_path / "run", methods=["memguide"])
    assert not (tmp_path / "run").exists()


def test_a_callable_module_is_put_in_eval_mode_and_keeps_its_fingerprint():
    """A callable torch.nn.Module was left in training mode: its dropout made the probe fingerprint random, so every
    rerun made every stage again and verify refused the model (a review's find); audit's docstring says a model
    object is put in eval mode."""
    unet = tiny_unet()

    class Dropped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet, self.drop = unet, torch.nn.Dropout(0.5)

        def forward(self, x, t):
            return self.drop(self.unet(x, t).sample)

    m = Dropped()
    first = as_target(m, scheduler=tiny_scheduler(), sample_shape=(1, 8, 8)).fingerprint
    assert not m.training
    m.train()
    assert as_target(m, scheduler=tiny_scheduler(), sample_shape=(1, 8, 8)).fingerprint == first


def test_a_callable_modules_dtype_and_a_sample_shape_string_are_named():
    """A callable module in float16 failed inside the fingerprint probe in torch's words ("Input type (float) and
    bias type (c10::Half)"), naming no setting; sample_shape="1,8,8" in int()'s ("invalid literal for int() with base
    10: ','"), naming no argument (a review's finds)."""
    half = tiny_unet().half()

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = half

        def forward(self, x, t):
            return self.unet(x, t).sample

    with pytest.raises(ValueError, match=r"the callable module's weights are float16 .*model.float\(\)"):
        as_target(Wrapped(), scheduler=tiny_scheduler(), sample_shape=(1, 8, 8))
    fn = lambda x, t: x  # noqa: E731
    for bad in ("1,8,8", (1, 8), (1, 8.5, 8), (0, 8, 8), 8):
        with pytest.raises(ValueError, match=r"sample_shape=.* must be \(C, H, W\): three integers, each at least 1"):
            as_target(fn, scheduler=tiny_scheduler(), sample_shape=bad)
    with pytest.raises(ValueError, match=r"sample_shape=.* must be \(C, H, W\)"):
        as_target(tiny_unet(), scheduler=tiny_scheduler(), sample_shape="1,8,8")
    for good in (np.array([1, 8, 8]), torch.Size([1, 8, 8]), torch.tensor([1, 8, 8]), (1.0, 8.0, 8.0),
                 np.array([1.0, 8.0, 8.0])):  # (each taken before, and by int())
        assert as_target(fn, scheduler=tiny_scheduler(), sample_shape=good).denoiser.sample_shape == (1, 8, 8), good


def test_a_callable_without_gradient_is_refused_where_a_method_differentiates_through_it(tmp_path, one_thread):
    """A callable under @torch.no_grad passed as the target gave memguide a memorization gradient of 0 (its
    generations were UnCond's, bit for bit) and a classifier guided through x0_hat a wrong one, without a word; it
    had the fingerprint of the same callable with gradients, so once fixed, a rerun reused the wrong stages (an API
    review's find). It is refused before any work for those methods, kept for the others, and known apart."""
    from side_extract.theory import measure

    unet, sched = tiny_unet(), tiny_scheduler()
    fn = lambda x, t: unet(x, t).sample  # noqa: E731
    frozen = torch.no_grad()(lambda x, t: unet(x, t).sample)
    detached = lambda x, t: unet(x.detach(), t).sample  # noqa: E731  (parameters' gradient only)
    with_grad = as_target(fn, scheduler=sched, sample_shape=(1, 8, 8))
    assert with_grad.denoiser.differentiable
    for f in (frozen, detached):
        t = as_target(f, scheduler=sched, sample_shape=(1, 8, 8))
        assert not t.denoiser.differentiable and t.fingerprint != with_grad.fingerprint
        assert (as_target(f, scheduler=sched, sample_shape=(1, 8, 8), model_id="m").fingerprint
                != as_target(fn, scheduler=sched, sample_shape=(1, 8, 8), model_id="m").fingerprint)
    for methods, config, says in ((["memguide", "uncond"], SMALL, "memguide differentiate"),
                                  (["side", "uncond"], {**SMALL, "classifier.guidance_input": "x0_hat"},
                                   r"side \(classifier.guidance_input x0_hat\) differentiate")):
        with pytest.raises(ValueError, match=r"the callable eps\(x, t\) returns no gradient with respect to x "
                           r".*" + says):
            side_extract.audit(frozen, "digits:30", scheduler=sched, sample_shape=(1, 8, 8), config=config,
                               out=tmp_path / "run", methods=methods)
        assert not (tmp_path / "run").exists()
    side_extract.audit(frozen, "digits:30", scheduler=sched, sample_shape=(1, 8, 8), config=SMALL,
                       out=tmp_path / "run", methods=["uncond"])  # (no method differentiates through it)

    class Forward(torch.autograd.Function):  # (an exported engine: no backward; it failed the probe, a review's find)
        @staticmethod
        def forward(ctx, x, t):
            return unet(x, t).sample

    forward_only = lambda x, t: Forward.apply(x, t)  # noqa: E731
    assert not as_target(forward_only, scheduler=sched, sample_shape=(1, 8, 8)).denoiser.differentiable
    with pytest.raises(ValueError, match=r"returns no gradient with respect to x \(its backward failed: "
                       r"NotImplementedError"):  # (its own error, not torch.no_grad it does not have: a review's)
        side_extract.audit(forward_only, "digits:30", scheduler=sched, sample_shape=(1, 8, 8), config=SMALL,
                           out=tmp_path / "fwd", methods=["memguide"])
    # a run made with the gradient is not verified by the callable without it (it was, once: other pixels), and
    # the refusal says why
    from side_extract.models.forms import run_target

    made = as_target(fn, scheduler=sched, sample_shape=(1, 8, 8)).fingerprint
    with pytest.raises(ValueError, match=r"is not the run's target .*returns no gradient with respect to x, and is "
                       "known apart from the same callable with its gradient"):
        run_target("callable", made, frozen, scheduler=sched, sample_shape=(1, 8, 8))
    train = torch.rand(4, 1, 8, 8) * 2 - 1
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    for f in (frozen, forward_only):
        with pytest.raises(ValueError, match="the target returns no gradient with respect to its input"):
            measure(as_target(f, scheduler=sched, sample_shape=(1, 8, 8)).denoiser, lambda x, t: clf(x), train,
                    n_points=2)


def test_a_pipeline_loaded_from_a_directory_is_that_directorys_target(tiny_model_dir, tmp_path, one_thread):
    """audit(DDPMPipeline.from_pretrained(DIR)) into a run made from DIR made every stage again, the same weights
    known as an in-memory model, after which verify without model= was refused (an API review's find). Into a run
    made from DIR it is DIR (a run made in memory stays so: test_a_run_of_a_directory_is_verified_with_its_weights_
    in_memory). The embedded target is known by its name, as a run of it records it (its path was "settings
    changed"). A pipeline changed in memory since is the model in memory."""
    from side_extract.models.target import demo_model_path

    run = tmp_path / "run"
    side_extract.audit(str(tiny_model_dir), "digits:30", config=SMALL, out=run, methods=["uncond"])
    stages = read_stages(run)
    pipe = DDPMPipeline.from_pretrained(tiny_model_dir)
    again = side_extract.audit(pipe, "digits:30", config=SMALL, out=run, methods=["uncond"])
    assert read_stages(run) == stages and again.config.model == str(tiny_model_dir)  # (every stage reused)
    assert [c.equal for c in again.verify("uncond", [0, 1])] == [True, True]
    assert as_target(load_target("demo")).description == "demo"  # (not its path: "settings changed")
    demo = DDPMPipeline.from_pretrained(demo_model_path("demo"))
    side_extract.audit("demo", "digits:30", config=SMALL, out=tmp_path / "demo", methods=["uncond"])
    stages = read_stages(tmp_path / "demo")
    assert side_extract.audit(demo, "digits:30", config=SMALL, out=tmp_path / "demo", methods=["uncond"]
                              ).config.model == "demo" and read_stages(tmp_path / "demo") == stages
    with torch.no_grad():  # (changed in memory since: the model in memory, known by its weights)
        next(pipe.unet.parameters()).add_(0.01)
    changed = side_extract.audit(pipe, "digits:30", config=SMALL, out=run, methods=["uncond"])
    assert changed.config.model.startswith("in-memory UNet2DModel") and read_stages(run) != stages


def test_a_callable_whose_output_is_random_is_refused():
    """A model left in training mode behind a lambda (its dropout on) was accepted without a word: the generations
    were sampled with dropout, a rerun redid every stage, and verify blamed rounding (an API review's find; a module
    passed itself is put in eval mode). Called twice on the probe, it is refused, naming eval mode."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       norm_num_groups=16, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), dropout=0.1).train()
    fn = lambda x, t: unet(x, t).sample  # noqa: E731
    with pytest.raises(ValueError, match=r"returns another eps for the same x and t when called again "
                       r".*model.eval\(\)"):
        as_target(fn, scheduler=tiny_scheduler(), sample_shape=(1, 8, 8))
    unet.eval()
    assert as_target(fn, scheduler=tiny_scheduler(), sample_shape=(1, 8, 8)).denoiser.differentiable
    bn = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 1, 1))
    with pytest.raises(ValueError, match=r"eps for an image depends on the other images of its batch .*BatchNorm"):
        as_target(lambda x, t: bn(x), scheduler=tiny_scheduler(), sample_shape=(1, 8, 8))  # (train mode: a review's)
    bn.eval()
    as_target(lambda x, t: bn(x), scheduler=tiny_scheduler(), sample_shape=(1, 8, 8))
    bn1 = torch.nn.BatchNorm1d(64)  # (training mode fails on one image: torch's words, naming no model)
    with pytest.raises(ValueError, match=r"the callable failed on a batch of one image .*model.eval\(\)"):
        as_target(lambda x, t: bn1(x.flatten(1)).view_as(x), scheduler=tiny_scheduler(), sample_shape=(1, 8, 8))


def test_a_moved_run_of_in_memory_sets_is_not_told_its_settings_changed(tmp_path, one_thread, caplog):
    """A run made from in-memory images, moved, then audited again with the same images was told "settings changed"
    for train and evaluate.heldout: only the paths of its own inputs/ files had moved (an API review's find).
    Nothing is said, nothing redone; other images are still said."""
    import logging
    import shutil

    digits = side_extract.load_image_set("digits:30")
    held = side_extract.load_image_set("digits").images[500:540]
    kw = dict(labels=digits.labels, heldout=held, scheduler=tiny_scheduler(), config=SMALL, methods=["uncond"])
    unet = tiny_unet()
    side_extract.audit(unet, digits.images, out=tmp_path / "a", **kw)
    shutil.move(tmp_path / "a", tmp_path / "b")
    stages = read_stages(tmp_path / "b")
    with caplog.at_level(logging.WARNING):
        side_extract.audit(unet, digits.images, out=tmp_path / "b", **kw)
    assert "settings changed" not in caplog.text and read_stages(tmp_path / "b") == stages
    with caplog.at_level(logging.WARNING):
        side_extract.audit(unet, digits.images[::-1].copy(), out=tmp_path / "b",
                           **{**kw, "labels": digits.labels[::-1]})
    assert "settings changed since the last run" in caplog.text and "train '" in caplog.text


def test_a_callable_named_by_model_id_keeps_its_run_across_rounding(tmp_path, one_thread):
    """A callable is known by its outputs on probe inputs rounded to 5 decimals: the same model on another device
    or thread count can move a value across a rounding step, and the run then redid every stage (and refused
    regenerate/verify). With ``model_id`` its stages are keyed on the name the user gives its weights."""
    import json

    unet, sched = tiny_unet(), tiny_scheduler()
    fn = lambda x, t: unet(x, t).sample  # noqa: E731
    moved = lambda x, t: unet(x, t).sample + 4e-6  # noqa: E731  (the same model, computed elsewhere)
    assert (as_target(fn, scheduler=sched, sample_shape=(1, 8, 8)).fingerprint
            != as_target(moved, scheduler=sched, sample_shape=(1, 8, 8)).fingerprint)  # the fragility
    a = as_target(fn, scheduler=sched, sample_shape=(1, 8, 8), model_id="ckpt-sha256-0123")
    assert a.fingerprint == as_target(moved, scheduler=sched, sample_shape=(1, 8, 8), model_id="ckpt-sha256-0123").fingerprint
    assert a.fingerprint != as_target(fn, scheduler=sched, sample_shape=(1, 8, 8), model_id="ckpt-sha256-4567").fingerprint
    from side_extract.api import identity_fingerprint
    assert identity_fingerprint("m", (1, 8, 8), sched) != identity_fingerprint("m", (1, 16, 4), sched)
    assert identity_fingerprint("m", (1, 8, 8), sched) != identity_fingerprint(
        "m", (1, 8, 8), tiny_scheduler().__class__(num_train_timesteps=500))

    run = tmp_path / "run"
    first = side_extract.audit(fn, "digits:30", scheduler=sched, sample_shape=(1, 8, 8), config=SMALL, out=run,
                               methods=["uncond"], model_id="ckpt-sha256-0123")
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    again = side_extract.audit(moved, "digits:30", scheduler=sched, sample_shape=(1, 8, 8), config=SMALL, out=run,
                               methods=["uncond"], model_id="ckpt-sha256-0123")
    assert json.loads((run / "manifest.json").read_text())["stages"] == stages  # every stage reused, none redone
    assert again.methods["uncond"] == first.methods["uncond"]
    checks = again.verify("uncond", [0, 3], model=fn, scheduler=sched, sample_shape=(1, 8, 8),
                          model_id="ckpt-sha256-0123")
    assert [c.equal for c in checks] == [True, True]
    with pytest.raises(ValueError, match="pass the same model_id="):
        again.regenerate("uncond", [0], model=fn, scheduler=sched, sample_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=r"model_id='x' is for a callable eps\(x, t\); a UNet2DModel"):
        as_target(unet, scheduler=sched, model_id="x")
    with pytest.raises(ValueError, match="model_id=' ' must be a non-empty string"):
        side_extract.audit(fn, "digits:30", scheduler=sched, sample_shape=(1, 8, 8), config=SMALL,
                           out=tmp_path / "bad", methods=["uncond"], model_id=" ")
    assert not (tmp_path / "bad").exists()


def test_an_in_memory_training_set_is_found_from_any_working_directory(tmp_path, one_thread, monkeypatch):
    """audit(out="run") with an array recorded the saved set as 'run/inputs/train.npz', relative to the caller's
    working directory: read from elsewhere, the run's pairs and report lost the training images."""
    digits = side_extract.load_image_set("digits:30")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    side_extract.audit(tiny_unet(), digits.images, scheduler=tiny_scheduler(), config=SMALL, out="run",
                       methods=["uncond"])
    monkeypatch.chdir(tmp_path)
    res = Audit.load(tmp_path / "work" / "run")
    assert Path(res.config.train).is_absolute()
    assert len(res.pairs("uncond")) > 0


def test_held_out_images_and_the_summary_from_python(tmp_path, one_thread):
    """audit() could not take held-out images in memory (only a path in the config), so the bands of an in-memory
    training set came from the set against itself; and the summary side run prints had no accessor."""
    digits = side_extract.load_image_set("digits:60")
    train, held = digits.images[:30], digits.images[30:]
    config = {**SMALL, "evaluate.bands": None, "evaluate.calibration_quantiles": [0.1, 0.2, 0.3]}
    res = side_extract.audit(tiny_unet(), train, heldout=held, scheduler=tiny_scheduler(), config=config,
                             out=tmp_path / "run", methods=["uncond"])
    (saved_path,) = (tmp_path / "run" / "inputs").glob("heldout-*.npz")  # named by its images
    np.testing.assert_array_equal(np.load(saved_path)["images"].reshape(held.shape), held)
    assert res.config.evaluate.heldout == str(saved_path.resolve())
    bands = json.loads((tmp_path / "run" / "evaluation" / "bands.json").read_text())
    assert bands["null_source"] == "heldout" and bands["null"]["heldout"]["n"] == 30
    summary = res.summary
    assert summary["methods"]["uncond"]["n_generated"] == res.methods["uncond"].n_generated
    assert summary["verdict"] == json.loads((tmp_path / "run" / "summary.json").read_text())["verdict"]
    with pytest.raises(ValueError, match="heldout: an array must be uint8"):
        side_extract.audit(tiny_unet(), train, heldout=held.astype(np.float32), scheduler=tiny_scheduler(),
                           out=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    # a call refused at the pre-run checks leaves the existing run's inputs as they were (it wrote them first): a
    # held-out set of another size, and another training set without the labels Cond needs
    inputs = {p.name: p.read_bytes() for p in (tmp_path / "run" / "inputs").iterdir()}
    with pytest.raises(ValueError, match=r"evaluate.heldout=.* images are \(1, 16, 16\)"):
        side_extract.audit(tiny_unet(), train, heldout=np.full((30, 16, 16), 128, np.uint8),
                           scheduler=tiny_scheduler(), config=config, out=tmp_path / "run", methods=["uncond"])
    with pytest.raises(ValueError, match="has no labels"):
        side_extract.audit(tiny_unet(), train[::-1], heldout=held, scheduler=tiny_scheduler(), config=config,
                           out=tmp_path / "run", methods=["cond"])
    assert {p.name: p.read_bytes() for p in (tmp_path / "run" / "inputs").iterdir()} == inputs
    assert Audit.load(tmp_path / "run").pairs("uncond")[0].nearest.shape == (8, 8, 1)
    # the run moved: the same call reuses every stage (the held-out images are keyed, not where they were saved)
    stages = read_stages(tmp_path / "run")
    (tmp_path / "run").rename(tmp_path / "moved")
    side_extract.audit(tiny_unet(), train, heldout=held, scheduler=tiny_scheduler(), config=config,
                       out=tmp_path / "moved", methods=["uncond"])
    again = read_stages(tmp_path / "moved")
    assert {k: v["fingerprint"] for k, v in again.items()} == {k: v["fingerprint"] for k, v in stages.items()}
    # the summary follows the evaluations the run holds now, not the file an earlier run wrote
    rc = Audit.load(tmp_path / "moved").config
    run_audit(tmp_path / "moved", dataclasses.replace(rc, extract=dataclasses.replace(rc.extract, n=4)),
              until="extraction", target=as_target(tiny_unet(), scheduler=tiny_scheduler()))
    # (the run rewrites the file too: new generations without their evaluation leave no summary of the old ones)
    assert json.loads((tmp_path / "moved" / "summary.json").read_text())["methods"] == {}
    assert Audit.load(tmp_path / "moved").summary["methods"] == {}


def test_a_rerun_into_an_audit_names_what_changed_and_marks_what_it_cannot_compare(tmp_path, one_thread, caplog):
    """A review's finds: a second audit() into a run (another training set, fewer methods) said nothing, and the
    Audit it returned listed the earlier call's method beside the new one without a word; its pairs() showed
    training images of the new set at the old set's rows (the wrong images)."""
    digits = side_extract.load_image_set("digits:30")
    kw = dict(scheduler=tiny_scheduler(), config=SMALL)
    first = side_extract.audit(tiny_unet(), digits.images, out=tmp_path / "run", methods=["uncond", "memguide"], **kw)
    assert first.methods["memguide"].not_compared is None
    with caplog.at_level("WARNING", logger="side_extract.api"):
        res = side_extract.audit(tiny_unet(), digits.images[::-1].copy(), out=tmp_path / "run", methods=["uncond"],
                                 **kw)
    said = [r.getMessage() for r in caplog.records if "settings changed since the last run" in r.getMessage()]
    assert len(said) == 1 and "train '" in said[0] and "extract.methods ['uncond', 'memguide'] -> ['uncond']" in said[0]
    assert res.methods["uncond"].not_compared is None
    assert "training set" in res.methods["memguide"].not_compared  # (measured on the first set)
    rows = {r["method"]: r["not_compared"] for r in res.table()}
    assert rows["uncond"] == "" and "training set" in rows["memguide"]
    assert res.to_csv().splitlines()[0].endswith(",n_train,not_compared")
    with pytest.raises(ValueError, match=r"is a folder: give the CSV file's path"):  # (named a temporary file)
        res.to_csv(tmp_path)
    with pytest.raises(ValueError, match="memguide's evaluation was measured against another training set"):
        res.pairs("memguide")
    train = side_extract.load_image_set(res.config.train)
    for p in res.pairs("uncond"):  # the row of the nearest image in the run's training set, beside its id
        np.testing.assert_array_equal(p.nearest, train.images[p.train_index])
        assert p.target_label is None  # (unguided)
    assert len(res.pairs("uncond", top=np.int64(2))) == 2  # (a numpy integer was refused)


def test_a_second_audit_of_fewer_methods_is_the_reference_and_the_summary_agrees_with_itself(tmp_path, one_thread):
    """A review's find: a second audit() on another training set for one of three methods marked its own new results
    "not compared" (the earlier call's two agreed, the larger group), its verdict was of the old ones, and the
    findings of the same summary.json took the other side (the synthetic set, measured again, tipped the count).
    The run's config (the last call's) names the reference now, everywhere."""
    digits = side_extract.load_image_set("digits:30")
    kw = dict(scheduler=tiny_scheduler(), config=SMALL)
    side_extract.audit(tiny_unet(), digits.images, out=tmp_path / "run", methods=["uncond", "memguide", "side"], **kw)
    res = side_extract.audit(tiny_unet(), digits.images[::-1].copy(), out=tmp_path / "run", methods=["memguide"],
                             **kw)
    assert res.methods["memguide"].not_compared is None
    assert all("training set" in res.methods[m].not_compared for m in ("uncond", "side"))
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert sorted(s["not_compared"]) == ["side", "uncond"] and "memguide" in s["verdict"].split("Not compared")[0]
    assert s["findings"]["methods"][0] == "memguide" and sorted(s["findings"]["left_out"]) == ["side", "uncond"]
    from side_extract.report import write_report

    data = json.loads((write_report(tmp_path / "run").parent / "report.json").read_text())
    assert data["audit_summary"]["not_compared"] == s["not_compared"]


def test_an_audits_ids_paths_and_equality_are_the_callers(tmp_path, one_thread, monkeypatch):
    """An ImageSet's own ids were dropped (findings and pairs said rows 0..N-1); Audit.run was relative, so a chdir
    lost the run; runs equal bit for bit in two folders compared unequal (raw holds the paths)."""
    digits = side_extract.load_image_set("digits:30")
    ids = np.arange(1000, 1030)
    kw = dict(scheduler=tiny_scheduler(), config=SMALL, methods=["uncond"])
    monkeypatch.chdir(tmp_path)
    a = side_extract.audit(tiny_unet(), side_extract.ImageSet(digits.images, ids=ids), out="a", **kw)
    assert a.run == tmp_path / "a"  # absolute
    pairs = a.pairs("uncond")
    assert all(p.train_id == 1000 + p.train_index for p in pairs)
    b = side_extract.audit(tiny_unet(), side_extract.ImageSet(digits.images, ids=ids), out="b", **kw)
    assert a.methods["uncond"] == b.methods["uncond"]
    plain = side_extract.audit(tiny_unet(), digits.images, out="c", **kw)  # default ids: the file is named as before
    assert len(list((tmp_path / "c" / "inputs").glob("train-*.npz"))) == 1
    named = {p.name for p in (tmp_path / "a" / "inputs").iterdir()}
    assert named != {p.name for p in (tmp_path / "c" / "inputs").iterdir()}
    assert [p.train_id for p in plain.pairs("uncond")] == [p.train_index for p in plain.pairs("uncond")]


def test_images_in_zero_to_one_cast_to_uint8_and_a_bad_progress_are_refused(tmp_path):
    digits = side_extract.load_image_set("digits:30")
    slip = (digits.images / 255.0).astype(np.uint8)  # every pixel 0 (or 1): audited, it found "nothing memorized"
    for train in (slip, side_extract.ImageSet(slip)):
        with pytest.raises(ValueError, match="train: every pixel is 0 or 1"):
            side_extract.audit(tiny_unet(), train, scheduler=tiny_scheduler(), out=tmp_path / "a")
    with pytest.raises(ValueError, match="progress=True must be a factory"):  # (a TypeError after the run began)
        side_extract.audit(tiny_unet(), digits.images, scheduler=tiny_scheduler(), out=tmp_path / "a", progress=True)
    # a stage's callback given as the factory: a TypeError once the first stage had begun, leaving the run behind it
    # marked failed; methods=3: "'int' object is not iterable" (a review's finds)
    with pytest.raises(ValueError, match="must be a factory name -> callback"):
        side_extract.audit(tiny_unet(), digits.images, scheduler=tiny_scheduler(), out=tmp_path / "a",
                           progress=lambda done, total: None)
    with pytest.raises(ValueError, match=r"methods=3 must be a method name or a list of them"):
        side_extract.audit(tiny_unet(), digits.images, scheduler=tiny_scheduler(), out=tmp_path / "a", methods=3)
    assert not (tmp_path / "a").exists()


def test_the_pieces_refuse_images_they_cannot_read(tmp_path):
    """A review's finds: 0-255 floats or uint8 went into the classifier's training and the memorization score
    (scores around 3e4, or a conv error), float labels were truncated, an array into evaluate() was an
    AttributeError, a Target into sample() too."""
    target = as_target(tiny_unet(), scheduler=tiny_scheduler())
    x = side_extract.sample(target.denoiser, 4, steps=2)
    c = side_extract.ClassifierConfig(depth=10, width=8, steps=1)
    for bad, says in (((x + 1) * 127.5, r"must lie in \[-1, 1\], got values 0"),
                      ((x > 0).to(torch.uint8), "float torch tensor .* got a torch.uint8 tensor"),
                      (x.permute(0, 2, 3, 1).numpy(), "got ndarray")):
        with pytest.raises(ValueError, match=says):
            side_extract.fit_label_classifier(bad, np.array([0, 1, 0, 1]), c, scheduler=tiny_scheduler())
        with pytest.raises(ValueError, match=says):
            side_extract.denoising_error(target.denoiser, bad)
    with pytest.raises(ValueError, match="images are \\(1, 4, 4\\) .* but the model's are \\(1, 8, 8\\)"):
        side_extract.denoising_error(target.denoiser, x[:, :, :4, :4])
    with pytest.raises(ValueError, match="labels must hold integers, got float64"):
        side_extract.fit_label_classifier(x, np.array([0.0, 1.7, 0.0, 1.0]), c, scheduler=tiny_scheduler())
    # float64, float16 and bfloat16 images are the same images: trained as float32 (they met a bare dtype error)
    y = np.array([0, 1, 0, 1])
    want = side_extract.fit_label_classifier(x, y, c, scheduler=tiny_scheduler()).history
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        for sched in (tiny_scheduler(), None):
            got = side_extract.fit_label_classifier(x.to(dtype), y, c, scheduler=sched)
            assert got.model is not None, dtype
    assert side_extract.fit_label_classifier(x.double(), y, c, scheduler=tiny_scheduler()).history == want
    digits = side_extract.load_image_set("digits:30")
    with pytest.raises(ValueError, match="generated must be an ImageSet"):
        side_extract.evaluate(digits.images, digits)
    with pytest.raises(ValueError, match="a Target: pass target.denoiser"):
        side_extract.sample(target, 2, steps=2)


def test_sweeps_read_back_and_a_short_repr(tmp_path, one_thread):
    config = {**SMALL, "sweep.scale": [0.0]}
    res = side_extract.audit(tiny_unet(), side_extract.load_image_set("digits:30").images, scheduler=tiny_scheduler(),
                             config=config, out=tmp_path / "run", methods=["side"])
    assert list(res.sweeps) == ["scale=0"] and res.sweeps["scale=0"].run == tmp_path / "run" / "sweeps" / "scale=0"
    assert list(res.sweeps["scale=0"].methods) == ["side"] and res.sweeps["scale=0"].sweeps == {}
    assert len(repr(res)) < 1000 and "RunConfig" not in repr(res)


def test_a_setting_given_twice_or_ignored_is_refused():
    with pytest.raises(ValueError, match=r"extract.n is given twice \(as 'extract.n' and as 'extract'\)"):
        side_extract.api._run_config({"extract.n": 16, "extract": {"n": 8}})
    assert side_extract.api._run_config({"extract.n": 16, "extract": {"steps": 8}}).extract.n == 16
    with pytest.raises(ValueError, match="scheduler= and sample_shape= are for a model object"):
        as_target("demo", scheduler=tiny_scheduler())


def test_errors_name_what_the_caller_passed():
    """A refusal named the file an in-memory set was saved to (out/inputs/train-<hash>.npz), which the caller never
    named, and told them to give an .npz with labels; seed=None and stop < start were a TypeError and "n=-3"."""
    import tempfile

    digits = side_extract.load_image_set("digits:30")
    with tempfile.TemporaryDirectory() as tmp:
        with pytest.raises(ValueError) as e:
            side_extract.audit(tiny_unet(), digits.images, scheduler=tiny_scheduler(), config=SMALL,
                               out=Path(tmp) / "a", methods=["cond"])
    said = str(e.value)
    assert "train= (the images passed in memory, saved as train-" in said and "/inputs/" not in said
    assert "audit(..., labels=...)" in said
    target = as_target(tiny_unet(), scheduler=tiny_scheduler())
    with pytest.raises(ValueError, match="seed=None must be an integer >= 0"):
        side_extract.sample(target.denoiser, 2, steps=2, seed=None)
    with pytest.raises(ValueError, match="start=5, stop=2: generations start .. stop - 1 need start < stop"):
        extract(target.denoiser, cfg.ExtractConfig(steps=2), None, 5, 2)


def test_api_md_lists_every_exported_name():
    """Twenty exported names were in neither api.md nor the README (a review's find): its reference table now lists
    every one, and a new export fails here until it is listed."""
    table = DOC.read_text().split("## 3. Reference", 1)[1]
    rows = [row.split("|")[1] for row in table.splitlines() if row.startswith("| `")]
    listed = {n for first in rows for n in re.findall(r"`(\w+)`", first)}
    assert listed == set(side_extract.__all__), (set(side_extract.__all__) - listed, listed - set(side_extract.__all__))
    # "Each names its module": the module column is where each name is defined (as_target was listed under api)
    wrong = {}
    for row in table.splitlines():
        if row.startswith("| `"):
            names, module = re.findall(r"`(\w+)`", row.split("|")[1]), row.split("|")[2].strip()
            wrong |= {n: (module, getattr(side_extract, n).__module__) for n in names
                      if getattr(side_extract, n).__module__ != f"side_extract.{module}"}
    assert not wrong, wrong


def test_help_on_sample_shows_its_options():
    """``help(side_extract.sample)`` showed ``sample(denoiser, n, **options)``, though api.md says each name's help
    gives its parameters: it now shows sample_batches' keywords with their defaults, and takes each of them."""
    import inspect

    params = inspect.signature(side_extract.sample).parameters
    assert {"seed", "steps", "eta", "guidance", "labels", "clip_eps", "stream"} <= set(params)
    assert params["eta"].default == 0.0 and params["clip_eps"].default is False
    from side_extract.sampling import sample_batches

    assert list(params) == list(inspect.signature(sample_batches).parameters)


def test_every_exported_name_resolves_and_the_return_types_are_exported():
    """What ``evaluate``, ``calibrate``, ``fit_label_classifier`` and ``train_classifier`` return was named in api.md
    but importable only from the submodules."""
    for name in side_extract.__all__:
        assert getattr(side_extract, name) is not None, name
    from side_extract.evaluation import Calibration, Evaluation
    from side_extract.training import ClassifierTrainResult

    assert (side_extract.Evaluation, side_extract.Calibration) == (Evaluation, Calibration)
    assert side_extract.ClassifierTrainResult is ClassifierTrainResult


def test_api_inputs_that_went_wrong_silently_or_late_are_refused_at_once(tmp_path, one_thread):
    """Each was accepted: labels below -1 (all taken for unlabelled: half a class set dropped without a word), an
    ImageSet with float labels (refused later, in a garbled message) or repeated ids (every pair's train_id the
    same), sample(n=2.5) (3 samples), labels without guidance (ignored), steps=2.5 or guidance=5 (errors deep in
    diffusers or at the first step), surrogate K = 1 (found after the synthetic set was sampled and embedded), a UNet
    whose out_channels differ from its in_channels (a conv error while sampling), a callable returning NaN (found
    after the run directory was written); and load_target's own result was refused as "a callable"."""
    from diffusers import UNet2DModel

    d = side_extract.load_image_set("digits:30")
    with pytest.raises(ValueError, match=r"labels hold -5: classes are 0, 1, \.\.\. and -1 marks an unlabelled image"):
        side_extract.audit("demo", d.images, labels=d.labels - 5, out=tmp_path / "a")
    with pytest.raises(ValueError, match="train: the ImageSet's labels must hold integers, got float64"):
        side_extract.audit("demo", side_extract.ImageSet(d.images, d.labels.astype(float)), out=tmp_path / "a")
    with pytest.raises(ValueError, match="train: the ImageSet's ids must be distinct integers .* 29 repeated"):
        side_extract.audit("demo", side_extract.ImageSet(d.images, None, np.zeros(30, dtype=np.int64)),
                           out=tmp_path / "a")
    den = load_target("demo")
    for kw, says in ((dict(n=2.5), "n=2.5 must be an integer >= 1"),
                     (dict(n=2, labels=np.array([0, 1])), "labels= given, but nothing here reads them"),
                     (dict(n=2, steps=2.5), "steps=2.5 must be an integer >= 1"),
                     (dict(n=2, guidance=5), "guidance=5 must be a guidance")):
        with pytest.raises(ValueError, match=says):
            side_extract.sample(den, **{"steps": 2, **kw})
    with pytest.raises(ValueError, match=r"surrogate.n_clusters=1 must be >= 2"):
        side_extract.audit("demo", d.images, labels=d.labels, out=tmp_path / "a", config={"surrogate.n_clusters": 1})
    two = UNet2DModel(sample_size=8, in_channels=1, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
                      norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "UpBlock2D"))
    with pytest.raises(ValueError, match="maps 1 channels to 2; a noise-predicting UNet's out_channels equal"):
        side_extract.audit(two, d.images, scheduler=tiny_scheduler(), out=tmp_path / "a")
    with pytest.raises(ValueError, match="the callable returns non-finite eps"):
        side_extract.audit(lambda x, t: x * float("nan"), d.images, scheduler=tiny_scheduler(), sample_shape=(1, 8, 8),
                           out=tmp_path / "a")
    assert not (tmp_path / "a").exists()
    target = side_extract.as_target(den)  # load_target's result: the same target as its directory
    assert target.fingerprint == side_extract.as_target("demo").fingerprint
    # changed in memory after the load: that model, known by its weights (the directory's was audited in its place)
    changed = load_target("demo")
    with torch.no_grad():
        next(changed.unet.parameters()).mul_(0.5)
    moved = side_extract.as_target(changed)
    assert moved.fingerprint not in (target.fingerprint, module_fingerprint(den.unet, den.scheduler))
    assert moved.fingerprint == module_fingerprint(changed.unet, changed.scheduler)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor(500)
    with torch.no_grad():
        assert torch.equal(moved.denoiser(x, t), changed(x, t)) and not torch.equal(moved.denoiser(x, t), den(x, t))


def test_lower_level_calls_name_what_is_wrong(tmp_path, one_thread):
    """Each was a raw exception from Python, numpy, torch or sklearn that named no argument (an AttributeError on a
    dict given as a config, numpy's "expected non-negative integer", torch's list of device types, sklearn's words
    on KMeans, "'int' object is not iterable"), or was accepted and failed at the first sampling step."""
    from side_extract.extraction import draw_targets

    d = side_extract.load_image_set("digits:20")
    den = load_target("demo")
    cases = [
        (lambda: side_extract.evaluate(d, d, {"bands": "high=0:0.1"}), "config must be an EvaluateConfig"),
        (lambda: side_extract.evaluate(d, d, bands=["high"]), "bands must be Band objects"),
        (lambda: side_extract.evaluate(d, d, device="gpu"), "gpu"),
        (lambda: side_extract.extract(den, {"steps": 2}, None, 0, 2), "c must be an ExtractConfig"),
        (lambda: side_extract.extract(den, cfg.ExtractConfig(steps=2), None, -2, 2),
         "start=-2 must be an integer >= 0"),
        (lambda: draw_targets(-1, np.arange(3), 4), "seed=-1 must be an integer >= 0"),
        (lambda: draw_targets(1, np.array([-1, 2]), 4), "indices must be generation numbers"),
        (lambda: side_extract.fit_label_classifier(torch.zeros(4, 1, 8, 8), np.array([0, 1, 0, 1]), {"depth": 10},
                                                   scheduler=None), "c must be a ClassifierConfig"),
        (lambda: side_extract.fit_label_classifier(torch.zeros(4, 1, 8, 8), np.array([0, 1, 0, 1]),
                                                   cfg.ClassifierConfig(), scheduler="ddpm"),
         "scheduler='ddpm' must be the target's diffusers scheduler"),
        (lambda: side_extract.ClusterLabeler(n_clusters="4"), "n_clusters='4' must be an integer >= 2"),
        (lambda: side_extract.ClusterLabeler(n_init=0), "n_init=0 must be an integer >= 1"),
        (lambda: side_extract.ClusterLabeler(n_clusters=2).fit(np.array([[0.0, 1.0], [np.nan, 1.0], [1.0, 0.0]])),
         "features hold NaN or inf"),
        (lambda: side_extract.ClassifierGuidance("not a model", np.arange(3), scale=1.0),
         "classifier must be a module"),
        (lambda: side_extract.ClassifierGuidance(torch.nn.Identity(), np.arange(3), scale="3"),
         "guidance scale='3' must be a number"),
    ]
    for call, says in cases:
        with pytest.raises(ValueError, match=re.escape(says)):
            call()
    one = side_extract.ClassifierGuidance(torch.nn.Identity(), np.arange(3), scale=1.0, background=2)
    assert one.background == (2,)
    listed = side_extract.ImageSet(list(d.images), list(d.labels))  # lists as the arrays they are
    assert listed.images.shape == d.images.shape and listed.labels.tolist() == d.labels.tolist()


def test_a_path_argument_given_something_else_is_named(tmp_path):
    """None or a number where a path goes was pathlib's "expected str, bytes or os.PathLike object, not int",
    naming neither the argument nor what it takes (``audit(out=None)`` said so only after reading the model and the
    data)."""
    cases = [
        (lambda: side_extract.audit("demo", "digits:20", out=None), "out=None must be a path"),
        (lambda: side_extract.Audit.load(5), "run=5 must be a path"),
        (lambda: side_extract.write_report(5), "run_dir=5 must be a path"),
        (lambda: side_extract.run_audit(None, cfg.RunConfig()), "path=None must be a path"),
        (lambda: side_extract.load_target(5), "spec=5 must be a path"),
        (lambda: side_extract.load_image_set(5), "spec=5 must be a path"),
        (lambda: side_extract.train_target(cfg.TrainTargetConfig(), side_extract.load_image_set("digits:4"), out=None),
         "out=None must be a path"),
    ]
    for call, says in cases:
        with pytest.raises(ValueError, match=re.escape(says)):
            call()
    assert list(tmp_path.iterdir()) == []


def test_wrong_types_in_python_are_named_before_any_work(tmp_path):
    """From Python a wrong type was an AttributeError or TypeError that named nothing: a dict or an array given to
    train_target, a list as audit's config, SampleConfig(n="5") (a comparison's TypeError), n=5.5 (accepted, then a
    TypeError after the run directory was begun), RunConfig(sample={...}) (an AttributeError later), a resize of
    "a" or 2.5 (inside torch)."""
    from side_extract import config as cfg
    from side_extract.data import load_image_set
    from side_extract.models.target import train_target

    digits = load_image_set("digits:20")
    for call, said in ((lambda: train_target({"steps": 1}, digits, tmp_path / "t"), "c must be a TrainTargetConfig"),
                       (lambda: train_target(cfg.TrainTargetConfig(steps=1), digits.images, tmp_path / "t"),
                        "data must be an ImageSet .* got ndarray"),
                       (lambda: train_target(cfg.TrainTargetConfig(steps=1), "digits:20", tmp_path / "t"),
                        "data must be an ImageSet .* got str"),
                       (lambda: side_extract.audit("demo", "digits:20", out=tmp_path / "a", config=[1, 2]),
                        "config must be a RunConfig, a dict of settings or the path of a run YAML, got list"),
                       (lambda: cfg.SampleConfig(n="5"), "n='5' must be an integer"),
                       (lambda: cfg.SampleConfig(n=5.5), "n=5.5 must be an integer"),
                       (lambda: cfg.ExtractConfig(scale="3"), "scale='3' must be a number"),
                       (lambda: cfg.RunConfig(sample={"n": 4}), "sample must be a SampleConfig .* got dict"),
                       (lambda: load_image_set("digits:20", "a"), "resize_to='a' must be a positive image size"),
                       (lambda: load_image_set("digits:20", 2.5), "resize_to=2.5 must be a positive image size")):
        with pytest.raises(ValueError, match=said):
            call()
    assert not (tmp_path / "t").exists() and not (tmp_path / "a").exists()
    assert cfg.SampleConfig(n=np.int64(5)).n == 5 and cfg.ExtractConfig(scale=3).scale == 3  # numbers of any kind


def test_a_failed_first_call_removes_its_folder_while_it_still_holds_the_lock(tmp_path, monkeypatch):
    """The removal ran after the lock was let go: a writer that had waited for the lock could begin in the folder
    and lose its files to it (tests/test_reliability.py has the waiter's side)."""
    import shutil

    import side_extract.api as api
    from side_extract import runs

    held, rmtree = [], shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree",
                        lambda p, **k: (held.append(Path(p).resolve() in runs.lock._HELD), rmtree(p, **k)))

    def fail(*args, **kwargs):
        raise ValueError("a check that failed after the lock was taken")

    monkeypatch.setattr(api, "run_with_sweeps", fail)
    with pytest.raises(ValueError, match="a check that failed"):
        side_extract.audit(tiny_unet(), side_extract.load_image_set("digits:30").images, scheduler=tiny_scheduler(),
                           config=SMALL, out=tmp_path / "run", methods=["uncond"])
    assert held == [True] and not (tmp_path / "run").exists()


def test_an_audit_read_before_a_later_call_refuses_its_stale_pairs(tmp_path, one_thread):
    """An Audit kept from before a later audit() into the same folder sorted the new cosine scores as distances
    (the least similar first) and put another training set's images beside them: its snapshot's orientation and
    training set, the files' scores (a review's find). It now refuses, and a fresh read serves them."""
    digits = side_extract.load_image_set("digits:30")
    kw = dict(labels=digits.labels, scheduler=tiny_scheduler(), out=tmp_path / "run", methods=["uncond"])
    old = side_extract.audit(tiny_unet(), digits.images, config=SMALL, **kw)
    assert old.pairs("uncond", top=2) == old.pairs("uncond", top=2)  # (equal pairs compare: arrays and all)
    assert len({*old.pairs("uncond", top=2)}) == 2  # and hash
    cosine = {**SMALL, "evaluate.similarity": "cosine:pixels",
              "evaluate.bands": "high=0.99:1,mid=0.98:0.99,low=0.97:0.98"}
    new = side_extract.audit(tiny_unet(), digits.images, config=cosine, **kw)
    with pytest.raises(ValueError, match=r"uncond's evaluation .* was made again .* since this Audit was read: .*"
                                         r"Audit.load\(run\)"):
        old.pairs("uncond")
    sims = [p.similarity for p in new.pairs("uncond")]
    assert sims == sorted(sims, reverse=True)  # a similarity: the most similar first


def test_an_audit_of_relative_paths_survives_a_chdir(tmp_path, one_thread, monkeypatch):
    """audit("tiny", "train.npz") recorded both paths as given: after a chdir (which Audit.load's docstring says the
    object survives) verify said the model 'is not a model on disk' and pairs that the training set 'does not
    exist'."""
    from side_extract.models.target import save_target

    save_target(tiny_unet(), tiny_scheduler(), tmp_path / "tiny")
    digits = side_extract.load_image_set("digits:30")
    np.savez(tmp_path / "train.npz", images=digits.images, labels=digits.labels)
    monkeypatch.chdir(tmp_path)
    a = side_extract.audit("tiny", "train.npz", config=SMALL, out="run", methods=["uncond"])
    assert (a.config.model, a.config.train) == (str(tmp_path / "tiny"), str(tmp_path / "train.npz"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert len(a.pairs("uncond", top=1)) == 1 and a.verify("uncond", top=1)[0].equal


def test_a_side_run_of_relative_paths_survives_a_chdir(tmp_path, one_thread, monkeypatch):
    """`side run` (run_audit) wrote model, train and evaluate.heldout into config.yaml as typed, where audit() made
    them absolute: from another folder `side verify` said 'data spec 'train.npz' does not exist', and so did
    Audit.load(run).pairs."""
    from side_extract.models.target import save_target

    save_target(tiny_unet(), tiny_scheduler(), tmp_path / "tiny")
    digits = side_extract.load_image_set("digits:60")
    np.savez(tmp_path / "train.npz", images=digits.images[:30], labels=digits.labels[:30])
    np.savez(tmp_path / "held.npz", images=digits.images[30:])
    monkeypatch.chdir(tmp_path)
    rc = cfg.RunConfig(model="tiny", train="train.npz", sample=cfg.SampleConfig(n=16, steps=2),
                       extract=cfg.ExtractConfig(methods=("uncond",), n=6, steps=2),
                       evaluate=cfg.EvaluateConfig(carlini_n=5, quality=(), heldout="held.npz",
                                                   calibration_quantiles=(0.1, 0.2, 0.3)))
    run_audit("run", rc)
    written = cfg.load_yaml(tmp_path / "run" / "config.yaml")
    assert (written["model"], written["train"], written["evaluate"]["heldout"]) == tuple(
        str(tmp_path / f) for f in ("tiny", "train.npz", "held.npz"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    a = Audit.load(tmp_path / "run")
    assert len(a.pairs("uncond", top=1)) == 1 and a.verify("uncond", top=1)[0].equal


def test_regenerate_refuses_an_extraction_whose_surrogate_labels_were_made_again(tmp_path, one_thread):
    """The surrogate clustered again (another K) after SIDE's extraction, its classifier kept: regenerate took the
    background class from the new labels beside the old classifier, which the extraction's fingerprint (the
    classifier's) did not catch, and verify reported the model's own generations as not reproduced (a review's find).
    An extraction made from results the run no longer holds is refused, naming them."""
    unet, sched = tiny_unet(), tiny_scheduler()
    digits = side_extract.load_image_set("digits:30")
    res = side_extract.audit(unet, digits.images, scheduler=sched, out=tmp_path / "run", methods=["side"],
                             config={**SMALL, "surrogate.memorized_fraction": 0.5, "extract.scale": 50.0})
    assert all(v.equal for v in res.verify("side", [0, 1, 2], model=unet, scheduler=sched))
    rc = dataclasses.replace(res.config, surrogate=dataclasses.replace(res.config.surrogate, n_clusters=3))
    run_audit(tmp_path / "run", rc, until="surrogate", target=side_extract.as_target(unet, scheduler=sched))
    later = Audit.load(tmp_path / "run")
    for call in (later.regenerate, later.verify):
        with pytest.raises(ValueError, match="made from earlier results of surrogate, made again since"):
            call("side", [0], model=unet, scheduler=sched)


def test_verify_refuses_indices_that_are_not_integers_as_regenerate_does(tmp_path, one_thread):
    """verify() turned its indices to int before regenerate's check: 1.7 was verified as generation 1, "3" as 3."""
    digits = side_extract.load_image_set("digits:30")
    a = side_extract.audit(tiny_unet(), digits.images, scheduler=tiny_scheduler(), config=SMALL,
                           out=tmp_path / "run", methods=["uncond"])
    model = dict(model=tiny_unet(), scheduler=tiny_scheduler())
    for bad in ([1.7], ["3"]):
        for call in (a.verify, a.regenerate):
            with pytest.raises(ValueError, match=r"must be integers \(generation numbers\)"):
                call("uncond", bad, **model)
    assert [v.generation_id for v in a.verify("uncond", 2, **model)] == [2]
    assert a.verify("uncond", np.array([1]), **model)[0].equal


def test_a_run_of_an_in_memory_model_is_verified_from_its_weights_saved_to_a_directory(tmp_path, one_thread):
    """audit() of a UNet2DModel in memory knows it by its weights; the same weights saved with save_pretrained were
    refused by their file hash ('fingerprint ... is not the run's target'), so such a run could never be checked
    with side verify or side theory measure --model DIR."""
    from side_extract.models.target import save_target

    unet, sched = tiny_unet(), tiny_scheduler()
    digits = side_extract.load_image_set("digits:30")
    a = side_extract.audit(unet, digits.images, scheduler=sched, config=SMALL, out=tmp_path / "run", methods=["uncond"])
    save_target(unet, sched, tmp_path / "saved")
    assert all(v.equal for v in a.verify("uncond", top=2, model=str(tmp_path / "saved")))
    save_target(tiny_unet(seed=1), sched, tmp_path / "other")
    with pytest.raises(ValueError, match="is not the run's target"):
        a.verify("uncond", top=1, model=str(tmp_path / "other"))


def test_the_audits_methods_check_their_device_and_their_arguments(tmp_path, one_thread):
    """regenerate/verify/verify_conditions and as_target gave torch's own errors for device='gpu' (verify after
    loading the training set); verify(top=None), which its error offered, was a TypeError; verify_conditions of a
    misspelled method said every condition matched; pairs on a run with no evaluation listed no results at all."""
    digits = side_extract.load_image_set("digits:30")
    a = side_extract.audit(tiny_unet(), digits.images, scheduler=tiny_scheduler(), config=SMALL,
                           out=tmp_path / "run", methods=["uncond"])
    for call in (lambda: a.regenerate("uncond", [0], device="gpu"), lambda: a.verify("uncond", top=1, device="gpu"),
                 lambda: a.verify_conditions("uncond", "gpu"),
                 lambda: as_target(tiny_unet(), scheduler=tiny_scheduler(), device="gpu")):
        with pytest.raises(ValueError, match=r"device='gpu' is not a torch device"):
            call()
    with pytest.raises(ValueError, match=r"top=None must be a positive integer"):
        a.verify("uncond", top=None)
    with pytest.raises(ValueError, match=r"method='uncnd': the run holds no extraction of it"):
        a.verify_conditions("uncnd")
    # a damaged manifest's device ("bogus", 5) ended side verify in torch's RuntimeError: it is a condition that
    # differs, said as recorded
    manifest = tmp_path / "run" / "manifest.json"
    kept = manifest.read_text()
    for bad in ("bogus", 5):
        m = json.loads(kept)
        m["stages"]["extraction/uncond"]["device"] = bad
        manifest.write_text(json.dumps(m))
        assert f"made on {bad}, made again on cpu" in Audit.load(tmp_path / "run").verify_conditions("uncond")
    manifest.write_text(kept)
    run_audit(tmp_path / "bare", dataclasses.replace(a.config, train=None), until="extraction",
              target=as_target(tiny_unet(), scheduler=tiny_scheduler()))
    with pytest.raises(ValueError, match=r"results: none \(no method was evaluated"):
        Audit.load(tmp_path / "bare").pairs("uncond")


def test_a_variance_exploding_scheduler_from_python_is_refused_when_the_target_is_made(tmp_path):
    """A ScoreSdeVeScheduler given from Python (a model folder's was refused already): the run sampled a synthetic
    set by an invented DDIM schedule, clustered it, and was refused only at the classifier, printing the scheduler's
    whole config. Refused now when the target is made, by the scheduler's name."""
    from diffusers import ScoreSdeVeScheduler

    with pytest.raises(ValueError, match="the scheduler is a ScoreSdeVeScheduler, which has no alphas_cumprod"):
        as_target(tiny_unet(), scheduler=ScoreSdeVeScheduler())
    with pytest.raises(ValueError, match="ScoreSdeVeScheduler, which has no alphas_cumprod"):
        side_extract.audit(tiny_unet(), "digits:30", scheduler=ScoreSdeVeScheduler(), out=tmp_path / "run",
                           methods=["side"])
    assert not (tmp_path / "run").exists()


def test_evaluations_of_an_earlier_target_are_not_compared(tmp_path, one_thread):
    """A second audit() of another target into the run, for some of the methods, left the others' evaluations of
    the earlier target in the run's results as comparable: Audit.methods, summary.json's verdict and the findings set
    the two targets' generations against each other (the pipeline warned, the report noted; a review's find). They
    are listed, not compared, and left out of the findings."""
    from side_extract.findings import collect
    from side_extract.summary import audit_summary

    d = side_extract.load_image_set("digits:30")
    kw = dict(scheduler=tiny_scheduler(), config=SMALL)
    side_extract.audit(tiny_unet(seed=0), d.images, out=tmp_path / "run", methods=["uncond", "memguide"], **kw)
    b = side_extract.audit(tiny_unet(seed=1), d.images, out=tmp_path / "run", methods=["uncond"], **kw)
    assert b.methods["uncond"].not_compared is None
    assert "another target" in b.methods["memguide"].not_compared
    summary = audit_summary(tmp_path / "run")
    assert list(summary["not_compared"]) == ["memguide"] and "memguide" in summary["verdict"].split("Not compared")[1]
    assert collect(tmp_path / "run").methods == ("uncond",)
    assert Audit.load(tmp_path / "run").methods["memguide"].not_compared == b.methods["memguide"].not_compared
    # every evaluation of another target than the one the run names now: the verdict said "No method has been
    # evaluated yet." above the evaluated methods' table (a review's find)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    manifest["model"]["fingerprint"] = "0" * 64
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(manifest))
    said = audit_summary(tmp_path / "run")["verdict"]
    assert said.startswith("No evaluation in the run can be compared with its current settings and target. Not "
                           "compared: uncond (made from another target"), said


def test_a_run_of_sets_in_memory_is_read_where_it_was_moved(tmp_path, one_thread):
    """The training set audit() saves into RUN/inputs/ was named in config.yaml by its absolute path: once the run
    was moved (or sent to someone), Audit.load(...).pairs, the report's image pairs and the step commands looked for
    it at the old place ("data spec ... does not exist"; the report fell back to the generations alone). A review's
    find."""
    import shutil

    from side_extract.report import build_report

    d = side_extract.load_image_set("digits:30")
    side_extract.audit(tiny_unet(), d.images, labels=d.labels, scheduler=tiny_scheduler(), out=tmp_path / "a",
                       config={**SMALL, "sweep.scale": [2.0]}, methods=["uncond", "cond"])
    shutil.move(tmp_path / "a", tmp_path / "b")
    moved = Audit.load(tmp_path / "b")
    assert moved.config.train == str((tmp_path / "b" / "inputs").resolve() / Path(moved.config.train).name)
    pairs = moved.pairs("uncond", top=2)
    assert pairs and all((p.nearest == d.images[p.train_index]).all() for p in pairs)
    data = build_report(tmp_path / "b")
    assert not any("could not be loaded" in n for n in data["notes"]), data["notes"]
    # its sweep's sub-run, which keeps no inputs/ of its own, is still the run's (a review of the first fix: every
    # sub-run of a moved run was "made under other settings", left out of the report and Audit.sweeps)
    assert list(moved.sweeps) == ["scale=2"] and list(data["sweeps"]) == ["scale"]
    assert moved.sweeps["scale=2"].pairs("cond", top=1)
    from side_extract.cli.common import stage_config

    assert stage_config(tmp_path / "b", None, {})[1].train == moved.config.train


def test_api_mistakes_a_review_found_late_or_unsaid_are_refused_at_once(tmp_path, one_thread):
    """A review's finds: a one-image training set was refused by the evaluation, after every other stage had run; a
    refused first call into a new nested folder left its parents behind; a progress factory returning no callback
    failed inside a stage with a TypeError naming no argument; heldout= silently replaced the config's
    evaluate.heldout; extract_features given an array said "has no attribute 'subset'"; and pairs() of a run with a
    training set but no finished evaluation said the run had no training set."""
    d = side_extract.load_image_set("digits:30")
    with pytest.raises(ValueError, match=r"the run cannot start:\n  - train=.* holds 1 image: the evaluation needs "
                                         r"at least 2"):
        side_extract.audit(tiny_unet(), d.images[:1], scheduler=tiny_scheduler(), config=SMALL, methods=["uncond"],
                           out=tmp_path / "one")
    assert not (tmp_path / "one").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(ValueError, match="the run cannot start"):
        side_extract.audit(tiny_unet(), d.images[:1], scheduler=tiny_scheduler(), config=SMALL, methods=["uncond"],
                           out=tmp_path / "kept" / "x" / "y" / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"] and not any((tmp_path / "kept").iterdir())
    with pytest.raises(ValueError, match=r"heldout= and the config's evaluate.heldout='digits' both name held-out"):
        side_extract.audit(tiny_unet(), d.images, scheduler=tiny_scheduler(), config={**SMALL,
                           "evaluate.heldout": "digits"}, heldout=255 - d.images[:20], out=tmp_path / "h")
    # a channels-first array, or one of 4 channels, was refused in ImageSet's words, naming neither train= nor the
    # layout (a review's find)
    with pytest.raises(ValueError, match=r"train: an array of images must be \(N, H, W, C\) .* got shape \(30, 1, 8, "
                                         r"8\); it looks channels-first \(N, C, H, W\): pass train.transpose"):
        side_extract.audit(tiny_unet(), d.images.transpose(0, 3, 1, 2), scheduler=tiny_scheduler(), config=SMALL,
                           methods=["uncond"], out=tmp_path / "nchw")
    assert not (tmp_path / "nchw").exists()
    # an empty spec was the current folder: its images audited as the training set, or as the held-out set
    for kwargs, said in (({"train": ""}, "train='' is empty: give an image-set spec"),
                         ({"heldout": " "}, "heldout=' ' is empty"),
                         ({"config": {**SMALL, "evaluate.heldout": ""}}, "heldout='' is empty")):
        args = {"train": d.images, "config": SMALL, **kwargs}
        with pytest.raises(ValueError, match=said):
            side_extract.audit(tiny_unet(), args.pop("train"), scheduler=tiny_scheduler(), methods=["uncond"],
                               out=tmp_path / "empty", **args)
        assert not (tmp_path / "empty").exists()
    with pytest.raises(ValueError, match=r"extract_features\('pixels'\): images must be an ImageSet") as e:
        side_extract.extract_features("pixels", d.images)
    maker = re.search(r"\((side_extract[\w.]+)\(array\)", str(e.value)).group(1)  # the maker it names exists (it
    module, name = maker.rsplit(".", 1)  # named side_extract.as_image_set, which is not exported: a review's find)
    made = getattr(importlib.import_module(module), name)(d.images)
    assert side_extract.extract_features("pixels", made).shape == (len(d.images), d.images[0].size)
    with pytest.raises(ValueError, match=r"progress= returned 5 for stage '[^']+': the factory must return a "
                                         r"callback\(done, total\) or None"):
        side_extract.audit(tiny_unet(), d.images, scheduler=tiny_scheduler(), config=SMALL, methods=["uncond"],
                           out=tmp_path / "p", progress=lambda name: 5)
    audit = side_extract.Audit.load(tmp_path / "p")
    with pytest.raises(ValueError, match=r"results: none \(no method's evaluation has finished\)"):
        audit.pairs("uncond")


def test_the_unet_extractor_takes_the_target_as_as_target_makes_it():
    """extract_features('unet', model=...) and evaluate(feature_model=...) refused the Target that as_target makes,
    and a UNet2DModel, with a message asking for "a diffusers UNet2DModel target" (a review's find): a Target is
    taken; a bare UNet2DModel is refused for what it lacks, its noise schedule."""
    from side_extract.data import load_image_set

    tr, unet = load_image_set("digits:10"), tiny_unet()
    target = as_target(unet, scheduler=tiny_scheduler())
    np.testing.assert_array_equal(side_extract.extract_features("unet", tr, model=target),
                                  side_extract.extract_features("unet", tr, model=target.denoiser))
    with pytest.raises(ValueError, match=r"device='gpu' is not a torch device"):  # (torch's RuntimeError)
        side_extract.extract_features("pixels", tr, device="gpu")
    with pytest.raises(ValueError, match=r"as_target\(unet, scheduler=...\) .*a UNet2DModel alone has no noise "
                                         r"schedule\), got UNet2DModel"):
        side_extract.extract_features("unet", tr, model=unet)
    e = side_extract.evaluate(tr, tr, cfg.EvaluateConfig(similarity="cosine:unet", bands="high=0.9:1"),
                              feature_model=target)
    assert e.ams["high"] == 1.0


def test_a_half_precision_unet_is_audited_as_its_float32_copy(tmp_path):
    """A UNet2DModel in fp16 or bf16 (as pipelines are often held) failed at the first stage's first step ("Input
    type (float) and bias type (c10::Half)"), after the run's files were written: it is audited as a float32 copy,
    as a directory of its weights loads, known by the copy's weights (so that directory is the run's target), and
    the object given stays as it was."""
    import copy

    from side_extract.models.forms import run_target
    from side_extract.models.target import save_target
    from side_extract.sampling import sample

    sched = tiny_scheduler()
    for dtype in (torch.float16, torch.bfloat16):
        half = tiny_unet().to(dtype)
        target = as_target(half, scheduler=sched)
        assert next(half.parameters()).dtype == dtype
        upcast = as_target(copy.deepcopy(half).to(torch.float32), scheduler=sched)
        assert target.fingerprint == upcast.fingerprint
        torch.testing.assert_close(sample(target.denoiser, 2, seed=0, steps=3),
                                   sample(upcast.denoiser, 2, seed=0, steps=3), rtol=0, atol=0)
        save_target(half, sched, tmp_path / str(dtype))
        assert run_target(str(tmp_path / str(dtype)), target.fingerprint).fingerprint == target.fingerprint


def test_a_ddim_pipeline_audited_in_memory_is_the_target_of_its_saved_directory(tmp_path):
    """A DDIMPipeline (or a DDIMScheduler) given from Python is known by its weights and its DDIMScheduler's config;
    its directory saved with save_pretrained, which load_target reads as a DDPMScheduler, was refused as another
    target, so `side verify --model DIR` never ran for it, though a DDPMPipeline's did (a review's find)."""
    from diffusers import DDIMPipeline, DDIMScheduler

    from side_extract.models.forms import run_target

    pipe = DDIMPipeline(unet=tiny_unet(), scheduler=DDIMScheduler(num_train_timesteps=100))
    target = as_target(pipe)
    pipe.save_pretrained(tmp_path / "m")
    assert run_target(str(tmp_path / "m"), target.fingerprint).fingerprint == target.fingerprint
    other = DDIMPipeline(unet=tiny_unet(seed=1), scheduler=DDIMScheduler(num_train_timesteps=100))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="is not the run's target"):
        run_target(str(tmp_path / "other"), target.fingerprint)
    # and its siblings: any diffusers scheduler given with the UNet (a review of the first version, DDIM's alone)
    from diffusers import DDPMPipeline, DPMSolverMultistepScheduler, PNDMScheduler

    for kind in (PNDMScheduler, DPMSolverMultistepScheduler):
        pipe = DDPMPipeline(unet=tiny_unet(), scheduler=kind(num_train_timesteps=100))
        pipe.save_pretrained(tmp_path / kind.__name__)
        fp = as_target(pipe).fingerprint
        assert run_target(str(tmp_path / kind.__name__), fp).fingerprint == fp


def _tiny_ldm():
    from diffusers import DDIMScheduler, LDMPipeline, VQModel

    torch.manual_seed(0)
    vq = VQModel(in_channels=1, out_channels=1, latent_channels=1, block_out_channels=(4, 4), norm_num_groups=4,
                 down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                 up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), num_vq_embeddings=16, vq_embed_dim=1,
                 sample_size=16)
    return LDMPipeline(vqvae=vq, unet=tiny_unet(), scheduler=DDIMScheduler(num_train_timesteps=100))


def test_a_latent_diffusion_pipeline_is_refused_in_memory_and_saved(tmp_path):
    """An LDMPipeline (a UNet2DModel denoising a VQ-VAE's latents) was taken as a pixel-space target, in memory and
    from its saved directory: the audit sampled latents and measured them against training pixels, without a word
    (a review's find). Its UNet and scheduler alone are taken, as the message says."""
    pipe = _tiny_ldm()
    with pytest.raises(ValueError, match=r"the LDMPipeline holds vqvae beside its unet and scheduler: a "
                                         r"latent-diffusion.*pass model=pipe.unet, scheduler=pipe.scheduler"):
        as_target(pipe)
    pipe.save_pretrained(tmp_path / "ldm")
    with pytest.raises(ValueError, match=r"ldm' holds vqvae beside unet and scheduler: a latent-diffusion"):
        as_target(str(tmp_path / "ldm"))
    assert as_target(pipe.unet, scheduler=pipe.scheduler).denoiser.sample_shape == (1, 8, 8)


def test_adapters_and_attention_processors_are_part_of_an_in_memory_models_fingerprint():
    """The fingerprint hashed the config and the state dict: peft adapters switched off (or rescaled), or an
    attention processor replaced, changed every output and left it as it was, so an audit into the same run kept
    the other model's stages (a review's find). A plain model's fingerprint is as before."""
    from diffusers import UNet2DModel
    from diffusers.models.attention_processor import AttnProcessor
    from peft import LoraConfig, inject_adapter_in_model

    from side_extract.models.forms import runtime_state

    sched = tiny_scheduler()
    x, t = torch.randn(1, 1, 8, 8), torch.tensor(50)

    def out(u):
        with torch.no_grad():
            return u(x, t).sample

    lora = LoraConfig(r=2, target_modules=["conv1", "conv2"], init_lora_weights=False)
    u = inject_adapter_in_model(lora, tiny_unet())
    fp, y = module_fingerprint(u, sched), out(u)
    for m in u.modules():
        if m is not u and hasattr(m, "enable_adapters"):
            m.enable_adapters(False)
    assert not torch.equal(out(u), y) and module_fingerprint(u, sched) != fp
    for m in u.modules():
        if m is not u and hasattr(m, "enable_adapters"):
            m.enable_adapters(True)
    assert torch.equal(out(u), y) and module_fingerprint(u, sched) == fp

    torch.manual_seed(0)
    u = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(4, 8), layers_per_block=1,
                    norm_num_groups=4, down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "AttnUpBlock2D"), attention_head_dim=4).eval()
    assert runtime_state(u) == []  # diffusers' own processors: nothing added to the fingerprint
    fp, y = module_fingerprint(u, sched), out(u)

    class Damped(AttnProcessor):
        def __init__(self, factor):
            super().__init__()
            self.factor = factor

        def __call__(self, attn, hidden_states, *a, **k):
            return self.factor * super().__call__(attn, hidden_states, *a, **k)

    prints = set()
    for factor in (0.5, 0.25):
        for m in u.modules():
            if hasattr(m, "set_processor"):
                m.set_processor(Damped(factor))
        assert not torch.equal(out(u), y)
        prints.add(module_fingerprint(u, sched))
    assert len(prints) == 2 and fp not in prints
    for m in u.modules():
        if hasattr(m, "set_processor"):
            m.set_processor(AttnProcessor())
    assert module_fingerprint(u, sched) == fp


def test_a_run_of_a_directory_is_verified_with_its_weights_in_memory(tmp_path, one_thread):
    """A run of a model directory refused the very same weights given in memory (DDPMPipeline.from_pretrained(DIR),
    or its UNet and scheduler: "is not the run's target"; a review's find). A pipeline so loaded is still audited as
    a model in memory, known by its weights: keyed by the directory, the runs made from it before were made again
    and refused it (a review of the first fix)."""
    from diffusers import DDPMScheduler, UNet2DModel

    from side_extract.models.target import save_target

    save_target(tiny_unet(), tiny_scheduler(), tmp_path / "m")
    a = side_extract.audit(str(tmp_path / "m"), "digits:30", config=SMALL, out=tmp_path / "run", methods=["uncond"])
    before = {k: v["fingerprint"] for k, v in read_stages(tmp_path / "run").items()}
    pipe = DDPMPipeline.from_pretrained(tmp_path / "m")
    unet = UNet2DModel.from_pretrained(tmp_path / "m" / "unet")
    sched = DDPMScheduler.from_pretrained(tmp_path / "m" / "scheduler")
    for kw in ({"model": pipe}, {"model": unet, "scheduler": sched}):
        assert all(v.equal for v in a.verify("uncond", top=1, **kw))
    assert {k: v["fingerprint"] for k, v in read_stages(tmp_path / "run").items()} == before
    assert as_target(pipe).description.startswith("in-memory UNet2DModel")
    mem = side_extract.audit(pipe, "digits:30", config=SMALL, out=tmp_path / "mem", methods=["uncond"])
    assert all(v.equal for v in mem.verify("uncond", top=1, model=DDPMPipeline.from_pretrained(tmp_path / "m")))
    with torch.no_grad():  # weights changed in memory since the load: another model, known by its weights
        next(pipe.unet.parameters()).add_(1.0)
    with pytest.raises(ValueError, match="is not the run's target"):
        a.verify("uncond", top=1, model=pipe)
