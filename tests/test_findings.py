"""What every method found together (``side_extract.findings``: ``findings.csv``, ``summary.json``'s ``findings``):
a toy counted by hand in both orientations, the invariants against each method's own count, and the files a run
writes."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from side_extract import config as cfg
from side_extract.evaluation import GenerationTable
from side_extract.findings import collect
from side_extract.runs import atomic_write_json
from side_extract.summary import audit_summary, write_summary

DISTANCE_BANDS = {"high": [0.0, 0.1], "mid": [0.1, 0.2], "low": [0.2, 0.3]}
SIMILARITY_BANDS = {"low": [0.7, 0.8], "mid": [0.8, 0.9], "high": [0.9, 1.0]}

# (nearest training image, distance) per generation; training image 2 is reached by no band, 4 by none at all
TOY = {"a": [(0, 0.05), (1, 0.15), (1, 0.12), (2, 0.5)],
       "b": [(1, 0.08), (3, 0.25), (0, 0.09)]}


def write_evaluation(run: Path, method: str, rows: list[tuple[int, float]], orientation: str,
                     bands: dict | None = None, similarity: str | None = None, ids: dict[int, int] | None = None,
                     train: str | None = None) -> None:
    """An evaluation folder as ``side evaluate`` writes it: per_generation.{csv,npz} (the real writer) and the keys
    of metrics.json the findings read."""
    n = len(rows)
    train_rows = np.array([t for t, _ in rows])
    score = np.array([s for _, s in rows], dtype=float)
    if orientation == "similarity":
        score = 1.0 - score
    out = run / "evaluation" / method
    tid = np.array([(ids or {}).get(int(t), int(t) + 100) for t in train_rows])
    GenerationTable(np.arange(n), np.full(n, -1), train_rows, tid, score, np.full(n, ""), train_rows, score, score,
                    score, method).write(out)
    bands = bands or (DISTANCE_BANDS if orientation == "distance" else SIMILARITY_BANDS)
    atomic_write_json(out / "metrics.json", {
        "method": method, "n_generated": n, "n_train": 5, "orientation": orientation,
        "similarity": similarity or ("rms-l2" if orientation == "distance" else "cosine:pixels"), "bands": bands,
        **{k: dict.fromkeys(bands, 0.0) for k in ("ams", "ums", "ams_cumulative", "ums_cumulative")},
        "p95": 0.0, "carlini": {"extracted_fraction": 0.0}, "gu": {"memorized_fraction": 0.0},
        "fingerprints": {"train": train or "t" * 64}})


@pytest.mark.parametrize("orientation", ["distance", "similarity"])
def test_the_union_of_the_methods_by_hand(tmp_path, orientation):
    for m, rows in TOY.items():
        write_evaluation(tmp_path, m, rows, orientation)
    f = collect(tmp_path)
    assert [b.name for b in f.bands] == ["high", "mid", "low"] and f.methods == ("a", "b")
    assert f.generations == {"a": 4, "b": 3}
    # by hand: image 0 high (a 0.05, b 0.09), image 1 high by b (0.08) and mid by a (0.12), image 3 low by b only
    got = [(x.train_index, x.train_id, x.band, x.method, x.generation_id, x.by_method, x.generations) for x in f.found]
    assert got == [(0, 100, "high", "a", 0, {"a": "high", "b": "high"}, 2),
                   (1, 101, "high", "b", 0, {"a": "mid", "b": "high"}, 3),
                   (3, 103, "low", "b", 1, {"b": "low"}, 1)]
    best = [0.05, 0.08, 0.25] if orientation == "distance" else [0.95, 0.92, 0.75]
    assert [x.similarity for x in f.found] == pytest.approx(best)
    assert [f.count(b) for b in ("high", "mid", "low")] == [2, 2, 3]
    assert [f.count(b, "a") for b in ("high", "mid", "low")] == [1, 2, 2]
    assert [f.only("b", b) for b in ("high", "mid", "low")] == [1, 0, 1]  # image 1 at high; image 3
    assert [f.only("a", b) for b in ("high", "mid", "low")] == [0, 0, 0]
    rows = list(csv.DictReader(io.StringIO(f.to_csv())))
    assert [r["train_index"] for r in rows] == ["0", "1", "3"]
    assert rows[1]["band_by_a"] == "mid" and rows[1]["band_by_b"] == "high" and rows[2]["band_by_a"] == ""
    j = f.to_json()
    assert j["distinct_nearest_cumulative"] == {"high": 2, "mid": 2, "low": 3} and j["generations"] == {"a": 4, "b": 3}
    assert j["only"] == {"a": {"high": 0, "mid": 0, "low": 0}, "b": {"high": 1, "mid": 0, "low": 1}}
    with pytest.raises(ValueError, match="band='top' must be one of high, mid, low"):
        f.count("top")
    with pytest.raises(ValueError, match="method='c' was not read"):
        f.only("c", "mid")
    # a mistyped method or band gave 0 ("found nothing") where the method had no finding at that band
    with pytest.raises(ValueError, match="method='aa' was not read"):
        f.count("mid", "aa")
    with pytest.raises(ValueError, match="band='top' must be one of"):
        f.only("a", "top")


def test_an_evaluation_in_other_bands_is_left_out_and_named(tmp_path):
    write_evaluation(tmp_path, "a", TOY["a"], "distance")
    write_evaluation(tmp_path, "b", TOY["b"], "distance", bands={"close": [0.0, 0.3]})
    f = collect(tmp_path)
    assert f.methods == ("a",) and f.left_out == {"b": "its evaluation used other bands"}
    assert [f.count(b) for b in ("high", "mid", "low")] == [1, 2, 2]
    assert audit_summary(tmp_path)["findings"]["left_out"] == {"b": "its evaluation used other bands"}


def test_each_methods_count_and_the_union_agree_with_the_summary(tmp_path):
    """On a real evaluation (test_report's run): one method alone gives its own distinct nearest count, and the
    union and the images found by one method alone equal set arithmetic on each method's per_generation.csv, read
    here by hand (rms-l2: a generation reaches a band where its distance lies below the band's upper edge)."""
    from test_report import make_run

    run = make_run(tmp_path / "run", sweeps=False)
    s = audit_summary(run)
    f = collect(run)
    assert f.methods == ("side", "uncond")
    rows = {m: list(csv.DictReader(open(run / "evaluation" / m / "per_generation.csv"))) for m in f.methods}
    bands = json.loads((run / "evaluation" / "side" / "metrics.json").read_text())["bands"]
    for band, (_, hi) in bands.items():
        reached = {m: {r["nearest_train_id"] for r in rows[m] if float(r["similarity"]) < hi} for m in f.methods}
        assert {m: f.count(band, m) for m in f.methods} == {m: len(v) for m, v in reached.items()}
        assert {m: f.count(band, m) for m in f.methods} == {m: s["methods"][m]["distinct_nearest_cumulative"][band]
                                                            for m in f.methods}
        assert f.count(band) == len(reached["side"] | reached["uncond"])
        assert f.only("side", band) == len(reached["side"] - reached["uncond"])
        assert f.only("uncond", band) == len(reached["uncond"] - reached["side"])
    assert s["findings"] == {**f.to_json(), "synthetic_set": None} and f.count("low") > 0  # (no synthetic set here)
    from side_extract import Audit

    assert Audit.load(run).findings() == f  # the Python API reads the same
    write_summary(run)
    assert (run / "findings.csv").read_text() == f.to_csv()
    assert json.loads((run / "summary.json").read_text())["findings"]["file"] == "findings.csv"


def test_a_run_with_no_evaluation_left_keeps_no_list(tmp_path):
    write_evaluation(tmp_path, "a", TOY["a"], "distance")
    write_summary(tmp_path)
    assert (tmp_path / "findings.csv").is_file()
    (tmp_path / "evaluation" / "a" / "metrics.json").unlink()
    write_summary(tmp_path)
    assert not (tmp_path / "findings.csv").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["findings"] is None


def test_an_evaluation_in_other_bands_no_longer_breaks_the_summary_and_report(tmp_path):
    """An evaluation written into a run with other bands (``side evaluate --out RUN/evaluation/X --bands ...``) made
    summary.json's verdict raise KeyError, and with it the report; it is now left out of the comparison, named."""
    from side_extract import config as cfg
    from side_extract.data import load_image_set
    from side_extract.evaluation import evaluate
    from side_extract.report import write_report

    from test_report import TRAIN, generations, make_run

    run = make_run(tmp_path / "run", sweeps=False)
    train = load_image_set(TRAIN)
    evaluate(generations(train, 5, 20, 7), train, cfg.EvaluateConfig(carlini_n=10, bands="near=0:0.3"),
             method="extra").write(run / "evaluation" / "extra")
    s = audit_summary(run)
    assert s["not_compared"] == {"extra": "its evaluation used other bands"}
    assert s["verdict"].endswith("Not compared: extra (its evaluation used other bands).")
    assert "extra" in s["methods"] and s["findings"]["left_out"] == s["not_compared"]
    html = write_report(run).read_text()
    assert 'id="findings-table"' in html and "Left out: extra (its evaluation used other bands)" in html


def test_ties_go_to_the_first_method_in_the_runs_order_and_a_band_edge_is_the_farther_band(tmp_path):
    """The config lists uncond before memguide (the reverse of their names' order): on a tie uncond's generation is
    the best; a distance exactly on the high band's upper edge (0.1) is mid, not high ([lo, hi))."""
    from side_extract import config as cfg
    from side_extract.runs import RunDir

    RunDir(tmp_path).write_config(cfg.RunConfig(extract=cfg.ExtractConfig(methods=("uncond", "memguide"))))
    write_evaluation(tmp_path, "memguide", [(0, 0.05), (1, 0.1)], "distance")
    write_evaluation(tmp_path, "uncond", [(2, 0.3), (0, 0.05)], "distance")
    f = collect(tmp_path)
    assert f.methods == ("uncond", "memguide")
    assert [(x.train_index, x.band, x.method, x.generation_id) for x in f.found] == [(0, "high", "uncond", 1),
                                                                                    (1, "mid", "memguide", 1)]
    assert [f.count(b) for b in ("high", "mid", "low")] == [1, 2, 2]  # 0.3 lies on low's upper edge: in no band


def test_an_evaluation_against_another_training_set_of_the_same_size_is_left_out(tmp_path):
    write_evaluation(tmp_path, "a", TOY["a"], "distance")
    write_evaluation(tmp_path, "b", TOY["b"], "distance", train="u" * 64)
    f = collect(tmp_path)
    assert f.methods == ("a",) and f.left_out == {"b": "its evaluation used other training set"}


def test_training_images_that_share_an_id_count_once_as_in_each_methods_own_count(tmp_path):
    """Rows 0 and 1 of the training set carry the same id (an .npz whose index repeats one): each method's
    distinct count goes by id, and so do the findings."""
    from side_extract.evaluation import distinct_count, generation_stats
    from side_extract.metrics import Band

    write_evaluation(tmp_path, "a", [(0, 0.05), (1, 0.06)], "distance", ids={0: 7, 1: 7})
    f = collect(tmp_path)
    own = distinct_count(generation_stats(tmp_path / "evaluation" / "a", [Band("high", 0.0, 0.1)], "distance"),
                         "high")
    assert f.count("high") == f.count("high", "a") == own == 1 and f.found[0].train_id == 7
    assert f.found[0].generations == 2 and f.found[0].train_index == 0  # the row of the best generation


def test_side_evaluate_into_a_run_writes_its_summary_and_findings_again(tmp_path):
    """An evaluation written into the run (side evaluate --out RUN/evaluation/X) left summary.json and
    findings.csv without it; they now include it, and the report names what it shows."""
    from typer.testing import CliRunner

    from side_extract.cli.main import app

    from side_extract.data import load_image_set
    from side_extract.runs import atomic_save_npz
    from test_report import TRAIN, generations, make_run

    run = make_run(tmp_path / "run", sweeps=False)
    write_summary(run)
    before = (run / "findings.csv").read_text()
    other = generations(load_image_set(TRAIN), 5, 20, seed=9)  # (the run's own generations count once: below)
    atomic_save_npz(tmp_path / "other.npz", images=other.images, index=other.ids)
    r = CliRunner().invoke(app, ["evaluate", "--generated", str(tmp_path / "other.npz"), "--train", TRAIN,
                                 "--out", str(run / "evaluation" / "again"), "--carlini-n", "10",
                                 "--bands-file", str(run / "evaluation" / "bands.json")])
    assert r.exit_code == 0, r.output
    s = json.loads((run / "summary.json").read_text())
    assert "again" in s["methods"] and s["findings"]["methods"] == ["side", "uncond", "again"]
    after = (run / "findings.csv").read_text()
    assert after != before and after.splitlines()[0].endswith("band_by_again")
    # the report reads: it names the file where it is current, and says so where it is not (it writes nothing)
    from side_extract.report import write_report

    assert "in the run directory lists every one" in write_report(run).read_text()
    (run / "findings.csv").unlink()
    assert "is missing or older than these evaluations" in write_report(run).read_text()
    assert not (run / "findings.csv").exists()
    # without a bands flag it takes the run's own bands (it calibrated its own, so it was left out of the findings)
    r = CliRunner().invoke(app, ["evaluate", "--generated", str(run / "extraction" / "side"), "--train", TRAIN,
                                 "--out", str(run / "evaluation" / "plain"), "--carlini-n", "10"])
    assert r.exit_code == 0 and "bands: the run's" in r.output, r.output
    s = json.loads((run / "summary.json").read_text())
    assert "plain" not in s["not_compared"] and "plain" not in s["findings"]["methods"]  # compared; counted once
    assert s["findings"]["left_out"]["plain"] == (f"it measures the same generation files as side "
                                                  f"({(run / 'extraction' / 'side').resolve()}), counted once")
    assert s["findings"]["generations"] == {"side": 40, "uncond": 30, "again": 20}  # (not 80 of side's)
    # the same images in other files are another source (two methods whose generations coincide stay two)
    twin = tmp_path / "twin"
    shutil.copytree(run / "extraction" / "side", twin)
    r = CliRunner().invoke(app, ["evaluate", "--generated", str(twin), "--train", TRAIN,
                                 "--out", str(run / "evaluation" / "twin"), "--carlini-n", "10"])
    assert r.exit_code == 0, r.output
    s = json.loads((run / "summary.json").read_text())
    assert "twin" in s["findings"]["methods"] and s["findings"]["generations"]["twin"] == 40
    # bands the run's config names win over its calibrated file
    conf = run / "config.yaml"
    conf.write_text(conf.read_text().replace("bands: null", "bands: high=0:0.05,mid=0.05:0.1,low=0.1:0.2", 1))
    r = CliRunner().invoke(app, ["evaluate", "--generated", str(run / "extraction" / "side"), "--train", TRAIN,
                                 "--out", str(run / "evaluation" / "named"), "--carlini-n", "10"])
    assert r.exit_code == 0 and "its config's (high=0:0.05" in " ".join(r.output.split()), r.output
    assert json.loads((run / "evaluation" / "named" / "metrics.json").read_text())["bands"]["mid"] == [0.05, 0.1]


def test_side_evaluate_refuses_to_write_into_a_folder_of_the_runs_own_stages(tmp_path):
    """``side evaluate --out RUN/evaluation/side`` replaced the run's own evaluation of side while its manifest entry
    still vouched for it (a rerun kept it; with other bands it made every other method "not compared"). Refused now,
    before the sets load, naming the stage; the run's files stay as they were."""
    from typer.testing import CliRunner

    from side_extract.cli.main import app

    from test_report import TRAIN, make_run

    run = make_run(tmp_path / "run", sweeps=False)
    write_summary(run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for out, stage in ((run / "evaluation" / "side", "evaluation/side"), (run / "evaluation", "calibration"),
                       (run / "evaluation" / "uncond" / "x", "evaluation/uncond")):
        r = CliRunner().invoke(app, ["evaluate", "--generated", str(run / "extraction" / "side"), "--train", TRAIN,
                                     "--out", str(out), "--carlini-n", "10", "--bands", "high=0.9:1"])
        assert r.exit_code != 0 and f"own stage '{stage}'" in " ".join(r.output.split()), r.output
        assert "Traceback" not in r.output
    # side calibrate into RUN/evaluation replaced the run's bands.json and null.npz (its calibration stage's files)
    r = CliRunner().invoke(app, ["calibrate", "--train", TRAIN, "--out", str(run / "evaluation"),
                                 "--calibration-quantiles", "0.1,0.2,0.3"])
    assert r.exit_code != 0 and "own stage 'calibration'" in " ".join(r.output.split()), r.output
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    r = CliRunner().invoke(app, ["calibrate", "--train", TRAIN, "--out", str(run / "evaluation" / "mine")])
    assert r.exit_code == 0 and (run / "evaluation" / "mine" / "bands.json").is_file(), r.output  # a new folder: yes


def test_the_synthetic_set_is_measured_once_and_counts_while_it_is_the_runs(tiny_model_dir, tmp_path):
    """A run measures its synthetic set like a method's generations (RUN/synthetic-evaluation, in the run's bands)
    and the findings count it last, as ``synthetic``; a rerun reuses it; a synthetic set drawn again without it
    (side cluster) leaves it out until the run measures the new one."""
    import dataclasses

    from side_extract.data import load_image_set, load_shards
    from side_extract.evaluation import evaluate
    from side_extract.pipeline import run_audit
    from side_extract.runs import read_stages

    from test_pipeline import tiny_rc

    run = tmp_path / "run"
    rc = tiny_rc(tiny_model_dir, methods=("side", "uncond"))
    run_audit(run, rc)
    d = run / "synthetic-evaluation"
    m = json.loads((d / "metrics.json").read_text())
    assert m["n_generated"] == 40 and m["bands"] == json.loads((run / "evaluation" / "side" / "metrics.json")
                                                               .read_text())["bands"]
    by_hand = evaluate(load_shards(run / "synthetic"), load_image_set("digits:30"),
                       dataclasses.replace(rc.evaluate, bands_file=str(run / "evaluation" / "bands.json")))
    with np.load(d / "per_generation.npz") as z:
        assert (z["nearest_train_id"] == by_hand.table.nearest_train_id).all()
        assert np.allclose(z["similarity"], by_hand.table.similarity)
    f = collect(run)
    assert f.methods == ("side", "uncond", "synthetic") and f.generations["synthetic"] == 40
    assert f.count("low", "synthetic") == len({int(i) for i, s in zip(by_hand.table.nearest_train_id,
                                                                      by_hand.table.similarity)
                                               if s < m["bands"]["low"][1]})
    from side_extract import Audit

    pairs = Audit.load(run).pairs("synthetic", top=3)  # a finding of the synthetic set can be looked at
    syn = load_shards(run / "synthetic")
    order = np.argsort(by_hand.table.similarity, kind="stable")[:3]  # rms-l2: the closest first
    assert [p.generation_id for p in pairs] == [int(by_hand.table.generation_id[i]) for i in order]
    assert all((p.generation == syn.images[list(syn.ids).index(p.generation_id)]).all() and p.method == "synthetic"
               for p in pairs)
    stamp = (d / "metrics.json").stat().st_mtime_ns
    run_audit(run, rc)
    assert (d / "metrics.json").stat().st_mtime_ns == stamp  # reused
    again = dataclasses.replace(rc, sample=dataclasses.replace(rc.sample, seed=rc.sample.seed + 1))
    run_audit(run, again, until="surrogate")  # the synthetic set drawn again, nothing measured
    assert collect(run).methods == ("side", "uncond")
    run_audit(run, again)
    assert collect(run).methods == ("side", "uncond", "synthetic")
    stages = read_stages(run)
    assert stages["synthetic-evaluation"]["inputs"] == {"synthetic": stages["synthetic"]["fingerprint"]}


def test_the_synthetic_sets_measurement_is_keyed_by_what_it_reads_and_never_blocks_a_rerun(tiny_model_dir, tmp_path):
    """Sample quality (not measured on the synthetic set) changes nothing; a Carlini setting redoes it, also in a
    rerun that may not replace finished results (side extract --run without --force), where a grown extraction is
    evaluated again: that rerun raised StageWouldBeReplaced on this stage after redoing the others. A run whose
    methods' evaluations are out of date has no findings, not the synthetic set's alone."""
    import dataclasses

    from side_extract.pipeline import run_audit
    from side_extract.runs import read_stages

    from test_pipeline import tiny_rc

    run = tmp_path / "run"
    rc = tiny_rc(tiny_model_dir, methods=("side",))
    run_audit(run, rc)
    fp = lambda: read_stages(run)["synthetic-evaluation"]["fingerprint"]  # noqa: E731
    first = fp()
    rc = dataclasses.replace(rc, evaluate=dataclasses.replace(rc.evaluate, quality=()))
    run_audit(run, rc)  # (the methods' evaluations are made again: they measure it)
    assert fp() == first
    grown = dataclasses.replace(rc, extract=dataclasses.replace(rc.extract, n=10),
                                evaluate=dataclasses.replace(rc.evaluate, carlini_n=4))
    run_audit(run, grown, replace=False)
    assert fp() != first and json.loads((run / "summary.json").read_text())["methods"]["side"]["n_generated"] == 10
    assert json.loads((run / "synthetic-evaluation" / "metrics.json").read_text())["carlini"]["n"] == 4
    run_audit(run, dataclasses.replace(grown, extract=dataclasses.replace(grown.extract, n=12)), until="extraction")
    assert collect(run) is None  # side's evaluation is of 10 generations the run no longer holds


def test_pairs_open_every_source_the_findings_name(tiny_model_dir, tmp_path, monkeypatch):
    """An evaluation written into the run by `side evaluate --out RUN/evaluation/synthetic` made the findings call the
    run's own synthetic set 'synthetic-set', which Audit.pairs refused (listing 'synthetic' twice), and pairs of the
    user's evaluation read extraction/synthetic: 'holds no shard-*.npz files'. Both open now; the user's from the
    images it was measured on."""
    from typer.testing import CliRunner

    from side_extract.api import Audit
    from side_extract.cli.main import app
    from side_extract.data import load_shards
    from side_extract.pipeline import run_audit
    from side_extract.runs import atomic_save_npz

    from test_pipeline import tiny_rc

    run = tmp_path / "run"
    rc = tiny_rc(tiny_model_dir, methods=("side",), n=4)
    bands = "high=0:0.1,mid=0.1:0.15,low=0.15:0.2"
    rc = dataclasses.replace(rc, evaluate=dataclasses.replace(rc.evaluate, bands=bands))
    run_audit(run, rc)
    mine = load_shards(run / "extraction" / "side")
    atomic_save_npz(tmp_path / "mine.npz", images=mine.images[::-1].copy())
    r = CliRunner().invoke(app, ["--no-progress", "evaluate", "--generated", str(tmp_path / "mine.npz"), "--train",
                                 "digits:30", "--out", str(run / "evaluation" / "synthetic"), "--bands",
                                 "high=0:0.1,mid=0.1:0.15,low=0.15:0.2", "--carlini-n", "5"])
    assert r.exit_code == 0, r.output
    a = Audit.load(run)
    assert {"synthetic", "synthetic-set"} <= set(collect(run).methods)
    own = a.pairs("synthetic-set")
    assert len(own) == len(load_shards(run / "synthetic")) and {p.method for p in own} == {"synthetic-set"}
    theirs = a.pairs("synthetic")
    assert len(theirs) == 4 and all(any(np.array_equal(p.generation, g) for g in mine.images) for p in theirs)
    # an evaluation side evaluate wrote under a method's own name, of other images than its extraction: the run's
    # generations were shown beside the other images' nearest training images
    # (a run extracted without evaluating: side extract --no-evaluate)
    run_audit(tmp_path / "bare", rc, until="extraction")
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["--no-progress", "evaluate", "--generated", "mine.npz", "--train", "digits:30",
                                 "--out", str(tmp_path / "bare" / "evaluation" / "side"), "--bands", bands,
                                 "--carlini-n", "5"])
    assert r.exit_code == 0, r.output
    monkeypatch.chdir("/")  # (the source is recorded absolute: it reads from any folder)
    shown = Audit.load(tmp_path / "bare").pairs("side")
    assert len(shown) == 4 and all(np.array_equal(p.generation, mine.images[::-1][p.generation_id]) for p in shown)
    from side_extract.report import write_report

    html = write_report(tmp_path / "bare").read_text()  # (the report took extraction/side: "changed since")
    assert "changed since it was evaluated" not in html and "holds no shards" not in html


def test_measured_generations_says_why_it_cannot_show_them(tmp_path):
    """Its errors said a source that was there 'is not here', and an extraction never evaluated 'changed since it was
    evaluated'."""
    from side_extract.data import ImageSet
    from side_extract.evaluation import measured_generations
    from side_extract.runs import atomic_save_npz

    src, made, empty = tmp_path / "src.npz", tmp_path / "extraction" / "side", tmp_path / "extraction" / "uncond"
    atomic_save_npz(src, images=np.zeros((2, 4, 4, 1), np.uint8))
    atomic_save_npz(made / "shard-00000.npz", images=np.ones((2, 4, 4, 1), np.uint8), index=np.arange(2))
    measured = ImageSet(np.full((2, 4, 4, 1), 7, np.uint8)).fingerprint()  # neither set
    m = {"sources": {"generated": str(src)}, "fingerprints": {"generated": measured}}
    with pytest.raises(ValueError, match=r"uncond's generations cannot be shown: extraction/uncond holds no shards, "
                                         r"and side evaluate measured .*src.npz', whose images changed since"):
        measured_generations("uncond", m, empty)
    with pytest.raises(ValueError, match=r"extraction/side holds other images, and side evaluate measured .*src.npz', "
                                         r"whose images changed since"):
        measured_generations("side", m, made)
    src.unlink()
    with pytest.raises(ValueError, match=r"holds other images, and side evaluate measured .*src.npz', which is not"):
        measured_generations("side", m, made)
    with pytest.raises(ValueError, match=r"extraction/side changed since it was evaluated: rerun the evaluation"):
        measured_generations("side", {"sources": {"generated": str(made)}, "fingerprints": m["fingerprints"]}, made)


def test_summary_faults_of_a_review():
    """Shares put per generation asked for (dedup-driven stopping) were count / made * made / asked in floats: one
    image in 10 made of 100 asked beat one image in 100 (ratio 1.0000000000000002, 'SIDE better'), and a tie between
    baselines was broken. The verdict named as tied a baseline of another budget, and left out one asked for as many
    that stopped earlier with as many images."""
    from side_extract.summary import per_budget, ratios_to_best_baseline, verdict

    def m(count, made):
        share = {b: count / made for b in DISTANCE_BANDS}
        return {"bands": DISTANCE_BANDS, "orientation": "distance", "n_train": 100, "n_generated": made, "ams": share,
                "ums": share, "ams_cumulative": share, "ums_cumulative": share, "p95": 0.2,
                "carlini": {"extracted_fraction": 0.0}, "gu": {"memorized_fraction": 0.0}}

    def table(metrics, asked):
        return ratios_to_best_baseline({k: per_budget(v, asked[k]) for k, v in metrics.items()},
                                       budgets=asked)["side"]["ums_cumulative/mid"]

    def counts(metrics):
        return {k: {"distinct_cumulative": {b: round(v["ums_cumulative"][b] * v["n_generated"])
                                            for b in DISTANCE_BANDS}} for k, v in metrics.items()}

    row = table({"side": m(1, 10), "uncond": m(1, 100)}, {"side": 100, "uncond": 100})
    assert row["ratio"] == 1.0 and row["side_better"] is False
    metrics = {"side": m(2, 100), "cond": m(1, 100), "uncond": m(1, 5)}
    asked = {k: 100 for k in metrics}
    row = table(metrics, asked)
    assert row["best_baseline_method"] == "cond" and row["tied_baselines"] == ["uncond"]
    assert "the best baseline, cond and uncond, with 1 (2.00x)" in verdict(metrics, counts(metrics), asked)
    metrics = {"side": m(6, 100), "cond": m(5, 50), "uncond": m(5, 50)}  # cond asked for 50, uncond for 100
    said = verdict(metrics, counts(metrics), {"side": 100, "cond": 50, "uncond": 100})
    assert "the best baseline, uncond, with 5 in 50 (1.20x)" in said, said


def test_a_run_made_under_a_relative_path_counts_its_generations_once_from_any_folder(tiny_model_dir, tmp_path,
                                                                                      monkeypatch, one_thread):
    """A run made as `side run C --out run` recorded its evaluations' source as run/extraction/x, relative: read
    from another folder it named other files, so a side evaluate of the run's own extraction into the run counted
    the same generations twice there (and the findings changed with the folder they were read from)."""
    from typer.testing import CliRunner

    from side_extract.cli.main import app
    from side_extract.pipeline import run_audit

    from test_pipeline import tiny_rc

    (tmp_path / "here").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    bands = "high=0:0.1,mid=0.1:0.2,low=0.2:0.4"
    rc = dataclasses.replace(tiny_rc(tiny_model_dir, methods=("uncond",)),
                             evaluate=cfg.EvaluateConfig(carlini_n=5, quality=(), bands=bands))
    run_audit("run", rc)
    run = tmp_path / "here" / "run"
    for cwd in ("here", "elsewhere"):
        monkeypatch.chdir(tmp_path / cwd)
        r = CliRunner().invoke(app, ["--no-progress", "evaluate", "--generated", str(run / "extraction" / "uncond"),
                                     "--train", "digits:30", "--out", str(run / "evaluation" / "plain"),
                                     "--carlini-n", "5"])
        assert r.exit_code == 0, r.output
        found = json.loads((run / "summary.json").read_text())["findings"]
        assert found["generations"] == {"uncond": 6} and list(found["left_out"]) == ["plain"], (cwd, found)
        shutil.rmtree(run / "evaluation" / "plain")


def test_a_copied_runs_evaluation_of_its_own_extraction_counts_once(tmp_path):
    """A pipeline run records each evaluation's source as the absolute folder it measured; a run copied (or moved)
    elsewhere and given ``side evaluate`` of its own extraction there had the two told apart by those paths (the old
    place, the new one), so the findings counted the same generations twice and every image side found lost "found by
    no other" (a review's find). They are now read where they lie: counted once, in place and in the copy alike."""
    from typer.testing import CliRunner

    from side_extract.cli.main import app
    from test_report import TRAIN, make_run

    here = make_run(tmp_path / "a" / "run", sweeps=False)
    for m in ("side", "uncond"):  # (as a pipeline run records them)
        p = here / "evaluation" / m / "metrics.json"
        d = json.loads(p.read_text())
        d["sources"]["generated"] = str(here / "extraction" / m)
        p.write_text(json.dumps(d))
    there = tmp_path / "b" / "run"
    shutil.copytree(here, there)
    found = {}
    for run in (here, there):
        r = CliRunner().invoke(app, ["--no-progress", "evaluate", "--generated", str(run / "extraction" / "side"),
                                     "--train", TRAIN, "--carlini-n", "10", "--out", str(run / "evaluation" / "again")])
        assert r.exit_code == 0, r.output
        found[run] = json.loads((run / "summary.json").read_text())["findings"]
        assert found[run]["generations"] == {"side": 40, "uncond": 30}, found[run]["generations"]
        assert found[run]["left_out"]["again"] == (f"it measures the same generation files as side "
                                                   f"({(run / 'extraction' / 'side').resolve()}), counted once")
    assert found[there]["only"] == found[here]["only"] and sum(found[here]["only"]["side"].values()) > 0


def test_a_moved_runs_evaluation_of_an_extraction_made_again_since_is_left_out(tmp_path):
    """side evaluate of the run's own extraction, then the run moved, then the extraction made again: the stale
    evaluation was told from the run's own by its recorded path (the old place), so in the moved run it counted as
    current, its old generations beside the new ones (a review's find). side evaluate records that the stage is the
    run's it writes into, which holds wherever the run goes."""
    from typer.testing import CliRunner

    from side_extract.cli.main import app
    from side_extract.runs import evaluated_methods
    from test_report import TRAIN, make_run

    here = make_run(tmp_path / "a" / "run", sweeps=False)
    manifest = json.loads((here / "manifest.json").read_text())  # (the fixture's extraction, recorded as a run does)
    manifest["stages"]["extraction/side"] = {"status": "complete", "fingerprint": "e" * 64, "inputs": {}, "n": 40}
    (here / "manifest.json").write_text(json.dumps(manifest))
    r = CliRunner().invoke(app, ["--no-progress", "evaluate", "--generated", str(here / "extraction" / "side"),
                                 "--train", TRAIN, "--carlini-n", "10", "--out", str(here / "evaluation" / "own")])
    assert r.exit_code == 0, r.output
    assert json.loads((here / "evaluation" / "own" / "metrics.json").read_text())["sources"]["generated_stage_here"]
    there = tmp_path / "b" / "run"
    shutil.move(here, there)
    assert "own" in evaluated_methods(there)
    manifest = json.loads((there / "manifest.json").read_text())
    manifest["stages"]["extraction/side"]["fingerprint"] = "made-again"
    (there / "manifest.json").write_text(json.dumps(manifest))
    assert "own" not in evaluated_methods(there)
    # recorded as measured outside the run (--out elsewhere, the folder moved in since), yet its source the run's
    # stage: the path tells (a first version took the record as a veto, and kept it as current)
    metrics = there / "evaluation" / "own" / "metrics.json"
    d = json.loads(metrics.read_text())
    d["sources"] |= {"generated_stage_here": False, "generated": str(there / "extraction" / "side")}
    metrics.write_text(json.dumps(d))
    assert "own" not in evaluated_methods(there)
