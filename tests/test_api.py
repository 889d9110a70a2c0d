"""The public API: docs/api.md runs as written; an in-memory UNet2DModel, a pipeline object and a callable
go through the whole chain without a model directory; the typed results match the run's files."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDPMPipeline

import side_extract
from side_extract.api import Audit, as_target

from conftest import tiny_scheduler, tiny_unet

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
SMALL = {"sample.n": 40, "sample.steps": 2, "sample.shard_size": 16, "surrogate.n_clusters": 4, "surrogate.tau": -1.0,
         "surrogate.n_init": 1, "classifier.depth": 10, "classifier.width": 8, "classifier.steps": 4,
         "classifier.batch_size": 16, "clean_classifier.depth": 10, "clean_classifier.width": 8,
         "clean_classifier.steps": 4, "clean_classifier.batch_size": 16, "extract.n": 6, "extract.steps": 2,
         "extract.scale": 1.0, "evaluate.carlini_n": 5, "evaluate.quality": ["pixels"], "evaluate.bands": "high=0:0.1,mid=0.1:0.15,low=0.15:0.2"}


def test_docs_example_runs(tmp_path, one_thread):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 3
    scope = {"workdir": tmp_path}
    for code in blocks:
        exec(compile(code, str(DOC), "exec"), scope)
    assert (tmp_path / "audit" / "report" / "report.html").is_file()
    assert scope["result"].to_csv().splitlines()[0].startswith("method,band,lo,hi,ams,ums")


def test_in_memory_unet_end_to_end_without_a_model_directory(tmp_path, one_thread):
    unet = tiny_unet()
    digits = side_extract.load_image_set("digits:30")
    res = side_extract.audit(unet, digits.images, labels=digits.labels, scheduler=tiny_scheduler(), config=SMALL,
                             out=tmp_path / "run", methods=["side", "cond", "uncond"])
    assert isinstance(res, Audit) and set(res.methods) == {"side", "cond", "uncond"}
    assert not list(tmp_path.rglob("unet"))  # no model directory was written anywhere
    assert res.config.model.startswith("in-memory UNet2DModel")
    assert (tmp_path / "run" / "inputs" / "train.npz").is_file()
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
