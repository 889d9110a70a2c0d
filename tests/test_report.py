"""`side report`: one self-contained HTML file plus the JSON behind it, from a small but real run directory."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from side_extract import config as cfg
from side_extract.cli.main import app
from side_extract.data import ImageSet, load_image_set
from side_extract.evaluation import calibrate, digits_complement, evaluate
from side_extract.report import build_report, write_report
from side_extract.runs import RunDir, atomic_save_npz, atomic_write_json
from side_extract.sweeps import sweep_configs

TRAIN = "digits:100"


def generations(train: ImageSet, n_copies: int, n: int, seed: int, n_labels: int = 5) -> ImageSet:
    """``n_copies`` exact copies of training images, then noisy copies and pure noise; labels cycle 0..n_labels-1."""
    rng = np.random.default_rng(seed)
    src = rng.choice(len(train), n, replace=True)
    imgs = train.images[src].astype(np.int16)
    noisy = slice(n_copies, n_copies + (n - n_copies) // 2)
    imgs[noisy] += rng.normal(0, 40, imgs[noisy].shape).astype(np.int16)
    imgs[n_copies + (n - n_copies) // 2:] = rng.integers(0, 256, imgs[n_copies + (n - n_copies) // 2:].shape)
    return ImageSet(np.clip(imgs, 0, 255).astype(np.uint8), np.arange(n) % n_labels, np.arange(n, dtype=np.int64))


def save_extraction(run: Path, method: str, gen: ImageSet) -> None:
    half = len(gen) // 2
    for k, sl in enumerate((slice(0, half), slice(half, None))):
        atomic_save_npz(run / "extraction" / method / f"shard-{k:05d}.npz", images=gen.images[sl][..., 0],
                        index=gen.ids[sl], labels=gen.labels[sl])


def make_run(run: Path, *, sweeps: bool = True) -> Path:
    """A run directory as the pipeline writes it: config, manifest, extraction shards, evaluation, calibration,
    surrogate clusters, classifier histories, and a scale sweep."""
    rc = cfg.RunConfig(train=TRAIN, sweep=cfg.SweepConfig(scale=(1.0, 5.0, 20.0) if sweeps else ()))
    rd = RunDir(run)
    rd.write_config(rc)
    train = load_image_set(TRAIN)
    c = cfg.EvaluateConfig(carlini_n=10)
    rd.begin("calibration", "f" * 64)
    calibrate(train, digits_complement(TRAIN), c).write(run / "evaluation")
    rd.complete("calibration", null_source="heldout")
    c = cfg.EvaluateConfig(carlini_n=10, bands_file=str(run / "evaluation" / "bands.json"))
    for method, copies, n, seed in (("side", 12, 40, 1), ("uncond", 3, 30, 2)):
        gen = generations(train, copies, n, seed, n_labels=5 if method == "side" else 1)
        if method == "uncond":
            gen = ImageSet(gen.images, np.full(len(gen), -1), gen.ids)
        save_extraction(run, method, gen)
        rd.begin(f"evaluation/{method}", method * 8)
        evaluate(gen, train, c, method=method).write(run / "evaluation" / method)
        rd.complete(f"evaluation/{method}")
    atomic_write_json(run / "surrogate" / "clusters.json", {
        "tau": 0.5, "kept": 4, "n_clusters": 5, "labelled": 180,
        "clusters": [{"id": k, "size": 40 + k, "cohesion": 0.4 + 0.1 * k, "kept": k != 4} for k in range(5)]})
    hist = [{"step": s, "loss": 1.0 / s, "accuracy": {f"q{q}": min(1.0, 0.9 - 0.2 * q + s / 1000) for q in range(4)}}
            for s in (100, 200, 300)]
    atomic_write_json(run / "classifier" / "config.json", {"arch": {}, "history": hist})
    atomic_write_json(run / "classifier-clean" / "config.json",
                      {"arch": {}, "history": [{"step": 50, "loss": 0.1, "accuracy": {"clean": 0.97}}]})
    if sweeps:
        subs = dict(sweep_configs(rc))  # each sub-run's config as the sweep makes it (the report reads no other)
        for scale, copies in ((1.0, 2), (5.0, 8), (20.0, 15)):
            sub = run / "sweeps" / f"scale={scale:g}"
            RunDir(sub).write_config(subs[sub.name])
            gen = generations(train, copies, 30, 3)
            save_extraction(sub, "side", gen)
            evaluate(gen, train, c, method="side").write(sub / "evaluation" / "side")
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "run")


@pytest.fixture(scope="module")
def written(run_dir) -> Path:
    return write_report(run_dir, top=6)


def test_html_is_one_self_contained_file(written):
    html = written.read_text()
    assert written == written.parent.parent / "report" / "report.html"
    assert sorted(p.name for p in written.parent.iterdir()) == ["report.html", "report.json"]
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert "<script" not in html.lower() and "@import" not in html and "url(" not in html
    assert html.count("data:image/png;base64,") >= 2 * 6 * 2  # image pairs of two methods, plus figures
    for section in ("comparison", "pairs", "null", "nglaw", "clusters", "classifiers", "sweeps", "provenance"):
        assert f'id="{section}"' in html


def test_table_matches_metrics_json(run_dir, written):
    html = written.read_text().split('id="comparison-table"', 1)[1]  # the comparison table (the summary comes first)
    for method in ("side", "uncond"):
        m = json.loads((run_dir / "evaluation" / method / "metrics.json").read_text())
        row = re.search(rf"<tr><td class=\"l\"><b>{method}</b></td>(.*?)</tr>", html, re.S).group(1)
        cells = dict(re.findall(r'data-key="([^"]+)">([^<]*)</td>', row))
        for k in ("ams", "ums", "ams_cumulative", "ums_cumulative"):
            for band, v in m[k].items():
                assert cells[f"{k}:{band}"] == f"{100 * v:.1f}"
        assert cells["carlini"] == f"{100 * m['carlini']['extracted_fraction']:.1f}"
        assert cells["gu"] == f"{100 * m['gu']['memorized_fraction']:.1f}"
        assert cells["p95"] == f"{m['p95']:.4g}" and cells["n_generated"] == str(m["n_generated"])
    side = json.loads((run_dir / "evaluation" / "side" / "metrics.json").read_text())
    assert side["ams"]["high"] >= 12 / 40  # the planted copies land in the closest band ...
    assert re.search(r'class="best[^"]*" data-key="ams:high">', html)  # ... and side's share is the highlighted best


def test_json_round_trips_and_is_the_source(run_dir, written):
    data = json.loads((written.parent / "report.json").read_text())
    assert data == json.loads(json.dumps(build_report(run_dir, top=6)))
    assert data["comparison"]["best"]["ams:high"] == ["side"]
    side = data["methods"]["side"]
    assert side["ams"] == json.loads((run_dir / "evaluation" / "side" / "metrics.json").read_text())["ams"]
    top = data["top_pairs"]["side"]
    assert len(top) == 6 and top[0]["similarity"] == 0.0 and top[0]["band"] == "high"
    assert [r["similarity"] for r in top] == sorted(r["similarity"] for r in top)  # closest first (distance)
    assert len({r["nearest_train_index"] for r in top}) == 6
    assert set(data["histograms"][0]["null"]) == {"train", "heldout"}
    sweep = data["sweeps"]["scale"]["side"]
    assert sweep["values"] == [1.0, 3.0, 5.0, 20.0]  # 3: this run's own scale (RunConfig's default)
    assert sweep["series"]["AMS high"][1] == side["ams"]["high"] and "uncond AMS high" in sweep["reference"]
    assert {r["label"] for r in data["clusters"]["methods"]["side"]["rows"]} == set(range(5))
    assert data["classifiers"]["classifier"]["final"]["q0"] == pytest.approx(1.0)
    assert [s["stage"] for s in data["stages"]] == ["calibration", "evaluation/side", "evaluation/uncond"]


def test_pairs_show_the_generation_and_its_training_image(run_dir, written):
    """The first pair of side is an exact copy: its two inline PNGs are the same bytes, upscaled to 64 px."""
    import base64
    import io

    from PIL import Image

    html = written.read_text()
    block = html[html.index('id="pairs"'):html.index('id="null"')]
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', block)
    gen, tr = (Image.open(io.BytesIO(base64.b64decode(u))) for u in uris[:2])
    assert gen.size == tr.size == (64, 64) and gen.mode == tr.mode == "L"
    assert np.array_equal(np.asarray(gen), np.asarray(tr))
    # each method's pairs end with the command that makes those generations again, in the order shown
    shown = [int(g) for g in re.findall(r'alt="generation (\d+) of side,', block)]
    assert f"--method side --generations {','.join(map(str, shown))}</code>" in block and shown


def test_missing_optional_sections_do_not_crash(tmp_path):
    run = tmp_path / "bare"
    RunDir(run).write_config(cfg.RunConfig())
    path = write_report(run)
    html = path.read_text()
    assert 'id="provenance"' in html and 'id="comparison"' not in html and "no evaluation" in html
    # (it sent a run without a training set to the evaluation stage, which cannot run without one)
    assert "config names no training set (train), so nothing was measured" in " ".join(html.split())
    data = json.loads((path.parent / "report.json").read_text())
    assert data["comparison"] is None and data["top_pairs"] == {} and data["sweeps"] == {}


def test_partial_run_without_shards_null_or_train(run_dir, tmp_path):
    run = tmp_path / "partial"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("report", "sweeps", "surrogate", "classifier*"))
    shutil.rmtree(run / "extraction" / "uncond")
    (run / "evaluation" / "null.npz").unlink()
    (run / "evaluation" / "side" / "per_generation.npz").unlink()
    path = write_report(run)
    html = path.read_text()
    assert "extraction/uncond holds no shards" in html and "no per_generation.npz" in html
    data = json.loads((path.parent / "report.json").read_text())
    assert data["histograms"][0]["null"] == {} and list(data["top_pairs"]) == ["uncond"]
    assert data["audit_summary"]["findings"]["left_out"] == {"side": "its evaluation has no per_generation.npz"}


def test_not_a_run_directory(tmp_path):
    with pytest.raises(ValueError, match="no config.yaml"):
        build_report(tmp_path)
    # a stage folder holds the config it was made with: its report was written into it, an empty page
    from side_extract import config as cfg

    stage = tmp_path / "run" / "extraction" / "side"
    stage.mkdir(parents=True)
    (stage / "config.yaml").write_text(cfg.dump_yaml(cfg.RunConfig(train="digits:100")))
    (tmp_path / "run" / "manifest.json").write_text(json.dumps({"stages": {"extraction/side": {"status": "complete"}}}))
    with pytest.raises(ValueError, match=r"is the stage folder extraction/side/ of run '.*run', not a run directory"):
        build_report(stage)
    r = CliRunner().invoke(app, ["--no-progress", "report", str(stage)])
    assert r.exit_code == 2 and not (stage / "report").exists()


def test_cli(run_dir, tmp_path):
    run = tmp_path / "cli"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("report", "sweeps"))
    r = CliRunner().invoke(app, ["--no-progress", "report", str(run), "--top", "3"])
    assert r.exit_code == 0, r.output
    data = json.loads((run / "report" / "report.json").read_text())
    assert data["top"] == 3 and all(len(v) == 3 for v in data["top_pairs"].values())
    r = CliRunner().invoke(app, ["--no-progress", "report", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "does not exist (expected a run directory" in r.output


def test_pairs_are_withheld_when_the_sets_changed(run_dir, tmp_path):
    """Indices are only shown against the very sets the evaluation measured (by fingerprint)."""
    run = tmp_path / "changed"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("report", "sweeps"))
    shard = run / "extraction" / "side" / "shard-00000.npz"
    with np.load(shard) as z:
        atomic_save_npz(shard, images=255 - z["images"], index=z["index"], labels=z["labels"])
    cfg_text = (run / "config.yaml").read_text().replace("train: digits:100", "train: digits:200")
    (run / "config.yaml").write_text(cfg_text)
    html = write_report(run).read_text()
    assert "extraction/side changed since it was evaluated" in html
    assert "evaluated against another training set" in html and html.count("no image") >= 2 * 8


def test_pairs_of_a_run_with_resized_training_images(tmp_path):
    """A run that resized its training set (train_resize) was evaluated on the resized images, but the report
    reloaded the set with evaluate.resize: every pair lost its training image, under a false note that the run was
    evaluated against another training set."""
    run = tmp_path / "run"
    rd = RunDir(run)
    rd.write_config(cfg.RunConfig(train=TRAIN, train_resize=16))
    train = load_image_set(TRAIN, 16)
    gen = generations(train, 6, 12, 4, n_labels=1)
    gen = ImageSet(gen.images, np.full(len(gen), -1), gen.ids)
    save_extraction(run, "uncond", gen)
    rd.begin("evaluation/uncond", "u" * 64)
    evaluate(gen, train, cfg.EvaluateConfig(carlini_n=10, bands="high=0:0.1,mid=0.1:0.15,low=0.15:0.2"),
             method="uncond").write(run / "evaluation" / "uncond")
    rd.complete("evaluation/uncond")
    html = write_report(run, top=4).read_text()
    assert "evaluated against another training set" not in html and "no image" not in html
    assert len(re.findall(r'src="data:image/png;base64,', html[html.index('id="pairs"'):])) >= 8


def test_a_sweep_table_puts_each_value_under_its_own_column(run_dir):
    """A method whose sweep lacks a value (an unfinished or stale sub-run) has "–" there: its values were printed
    left to right under the first method's columns (side-teacher's scale=3 under scale=1)."""
    from side_extract.report import build_report, render_html

    data = build_report(run_dir)
    assert data["sweeps"]["scale"]["side"]["values"] == [1.0, 3.0, 5.0, 20.0]
    data["sweeps"]["scale"]["side-teacher"] = {"values": [3.0, 5.0, 20.0], "series": {"AMS high": [0.1, 0.267, 0.5]},
                                               "reference": {}}
    html = render_html(data, run_dir)
    sweeps = html[html.index('id="sweeps"'):]
    assert re.findall(r"<th>scale=([^<]*)</th>", sweeps)[:4] == ["1", "3", "5", "20"]
    row = re.search(r'<td class="l">side-teacher</td><td class="l">AMS high</td>(.*?)</tr>', sweeps).group(1)
    assert re.findall(r"<td>([^<]*)</td>", row) == ["–", "10.0", "26.7", "50.0"]


def test_a_method_name_with_dollar_signs_is_drawn_as_text():
    """Method names are folder names under evaluation/ (``side evaluate --out RUN/evaluation/NAME``): "$...$" was
    parsed as matplotlib maths, and "cost$\\frac$" ended the report with a ParseSyntaxException."""
    import matplotlib

    from side_extract.report_plots import sweep_figure

    uri = sweep_figure("scale", {"cost$\\frac$": {"values": [1.0, 3.0], "series": {"AMS high": [0.1, 0.2]},
                                                  "reference": {"a$_b$ AMS high": 0.1}}})
    assert uri.startswith("data:image/png;base64,") and matplotlib.rcParams["text.parse_math"]  # (left as it was)


def test_side_loras_labels_are_surrogate_clusters_in_the_report(run_dir, tmp_path):
    """side-lora generates toward the surrogate clusters, as side does: its rows were called "target class", and
    their cluster sizes and cohesion were left out."""
    from side_extract.report import build_report

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("report"))
    for kind in ("evaluation", "extraction"):
        if (run / kind / "side").exists():
            (run / kind / "side").rename(run / kind / "side-lora")
    lora = build_report(run)["clusters"]["methods"]["side-lora"]
    assert lora["kind"] == "surrogate cluster" and all(r["size"] is not None for r in lora["rows"])


def test_the_verify_command_in_the_report_pastes_as_one_command(run_dir, tmp_path):
    """The "made again" command is quoted for the shell: a run in "my run" pasted as two arguments."""
    import html as html_module
    import shlex

    from side_extract.report import build_report, render_html

    run = tmp_path / "my run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("report"))
    page = html_module.unescape(render_html(build_report(run), run))
    command = re.search(r"<code>(side verify [^<]*)</code>", page).group(1)
    assert shlex.split(command)[:5] == ["side", "verify", str(run), "--method", "side"]


def test_theory_section_from_measure_json(tmp_path):
    """A run with theory/measure.json gets the theory section with its verdicts."""
    from side_extract import config as cfg
    from side_extract.report import build_report, render_html
    from side_extract.runs import atomic_write_json

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(cfg.dump_yaml(cfg.RunConfig(train="digits:100")))
    est = lambda m: {"mean": m, "stderr": 0.5, "ci95_low": m - 1, "ci95_high": m + 1, "n": 32}
    atomic_write_json(run / "theory" / "measure.json", {
        "m_uncond": est(29.3), "m_guided": est(27.2), "m_opt_uncond": est(4.4), "m_opt_cond": est(0.0),
        "gain_model": est(-2.1), "gain_opt": est(-4.4), "ordering": {"conditioning memorizes no less": "holds"},
        "eps": 0.1, "guidance_scale": 1.0, "index": list(range(32)), "n_steps": 32})
    data = build_report(run)
    assert [r["key"] for r in data["theory"]["rows"]][:2] == ["m_uncond", "m_guided"]
    html = render_html(data, run)
    assert "Memorization divergence (theory)" in html and "conditioning memorizes no less" in html
    assert "29.3" in html


def test_summary_json_verdict_and_first_screen(tiny_model_dir, tmp_path):
    """summary.json: distinct images per band, the 10x projection, cost, ratios and a one-sentence verdict; the
    report opens on it; every pair image's alt text says what it shows and the similarity."""
    import json

    from side_extract.pipeline import run_audit
    from side_extract.report import write_report
    from side_extract.summary import verdict

    from test_pipeline import tiny_rc

    run_audit(tmp_path / "run", tiny_rc(tiny_model_dir, methods=("side", "cond", "uncond")))
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(s["methods"]) == {"side", "cond", "uncond"} and set(s["ratios_to_best_baseline"]) == {"side"}
    u = s["methods"]["uncond"]
    assert u["seconds"] > 0 and u["images_per_second"] > 0 and set(u["distinct_cumulative"]) == {"high", "mid", "low"}
    assert set(u["estimated_2x"]) == {"high", "mid", "low"}
    assert all(v["n_generated"] == 12 for v in u["estimated_2x"].values())  # twice N_G = 6
    assert s["verdict"].startswith("side reached") and "best baseline" in s["verdict"]
    # what every method found together: summary.json, findings.csv (one row per image) and the end of `side run`
    f = s["findings"]
    assert f["methods"] == ["side", "cond", "uncond", "synthetic"]  # the synthetic set last: samples too
    assert f["generations"] == {"side": 6, "cond": 6, "uncond": 6, "synthetic": 40}
    assert f["bands"] == ["high", "mid", "low"]
    rows = (tmp_path / "run" / "findings.csv").read_text().splitlines()
    assert rows[0].endswith("band_by_side,band_by_cond,band_by_uncond,band_by_synthetic")
    assert len(rows) == 1 + f["distinct_nearest_cumulative"]["low"]
    from side_extract.cli.common import console
    from side_extract.cli.run import print_findings

    with console.capture() as said:
        print_findings(tmp_path / "run")
    out = " ".join(said.get().split())
    mid = f["distinct_nearest_cumulative"]["mid"]
    assert s["verdict"] in out
    assert (f"every method and the synthetic set together: {mid} distinct nearest training images at the 'mid' band "
            "or closer in 58 model samples (side 6, cond 6, uncond 6, synthetic 40;") in out
    assert f["synthetic_set"] == "synthetic"
    html = write_report(tmp_path / "run").read_text()
    assert 'id="findings-table"' in html
    assert "up to 8 closest generations" in " ".join(html.split())  # (it said "the 8", over fewer pairs)
    # an evaluation written into the run under the name "synthetic" (side evaluate --out): the run's synthetic set is
    # "synthetic-set" in the findings, and the page called the method the synthetic set, the set itself absent
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "run", other)
    for part in ("evaluation", "extraction"):
        shutil.copytree(other / part / "uncond", other / part / "synthetic")
    m = json.loads((other / "evaluation" / "synthetic" / "metrics.json").read_text())
    m["sources"]["generated"] = str(other / "extraction" / "synthetic")
    (other / "evaluation" / "synthetic" / "metrics.json").write_text(json.dumps(m))
    from side_extract.summary import audit_summary

    assert audit_summary(other)["findings"]["synthetic_set"] == "synthetic-set"
    page = " ".join(write_report(other).read_text().split())
    assert "\"synthetic-set\": the synthetic set the audit drew first" in page and "\"synthetic\": the" not in page
    # a report.json written before findings named it is drawn again as it was
    from side_extract.report import render_html

    data = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    del data["audit_summary"]["findings"]["synthetic_set"]
    again = " ".join(render_html(data, tmp_path / "run").split())
    assert "\"synthetic\": the synthetic set the audit drew first" in again
    assert html.index('id="summary"') < html.index('id="comparison"') and s["verdict"] in html.replace("&#39;", "'")
    assert 'alt="generation ' in html and "to training image" in html and "rms-l2" in html.split('alt="generation ')[1][:120]
    # the verdict by hand
    m = lambda ums_mid: {"bands": {"high": [0, 0.1], "mid": [0.1, 0.2], "low": [0.2, 0.3]}, "orientation": "distance",
                         "n_train": 100, "n_generated": 50}  # noqa: E731
    rows = {"side": {"distinct_cumulative": {"mid": 12}}, "uncond": {"distinct_cumulative": {"mid": 8}}}
    text = verdict({"side": m(0), "uncond": m(0)}, rows)
    assert text == ("side reached 12 distinct training images (of 100) at the 'mid' band or closer with 50 "
                    "generations, more than the best baseline, uncond, with 8 (1.50x).")


def test_fixed_bands_draw_no_stale_null(run_dir, tmp_path):
    """Evaluations redone with fixed bands in a run that once calibrated: the report draws no null (before: the
    earlier calibration's null.npz, still in the run, beside bands it did not make)."""
    run = tmp_path / "fixed"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("report", "sweeps"))
    train = load_image_set(TRAIN)
    c = cfg.EvaluateConfig(carlini_n=10, bands="high=0:0.05,mid=0.05:0.1,low=0.1:0.2")
    for method in ("side", "uncond"):
        from side_extract.data import load_shards
        evaluate(load_shards(run / "extraction" / method), train, c, method=method).write(run / "evaluation" / method)
    assert (run / "evaluation" / "null.npz").is_file()
    data = build_report(run)
    assert data["histograms"][0]["null"] == {} and data["histograms"][0]["null_n"] == {}
    # the calibrated run itself still draws its null, also when the path its evaluations name is relative
    assert build_report(run_dir)["histograms"][0]["null"] != {}


def test_bands_from_another_run_draw_that_runs_null(run_dir, tmp_path):
    """Evaluations with bands from another run's evaluation/bands.json, in a run holding an older calibration of
    its own: any path ending in evaluation/bands.json was taken for the run's own, so the histogram drew the
    run's stale null beside the other run's bands."""
    other = tmp_path / "other"
    shutil.copytree(run_dir / "evaluation", other / "evaluation")
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("report", "sweeps"))
    train = load_image_set(TRAIN)
    calibrate(train, digits_complement(TRAIN), cfg.EvaluateConfig(calibration_quantiles=(0.01, 0.1, 0.3))).write(
        run / "evaluation")  # the run's own, other bands and a null of other values
    c = cfg.EvaluateConfig(carlini_n=10, bands_file=str(other / "evaluation" / "bands.json"))
    from side_extract.data import load_shards

    for method in ("side", "uncond"):
        evaluate(load_shards(run / "extraction" / method), train, c, method=method).write(run / "evaluation" / method)
    h = build_report(run)["histograms"][0]
    assert h["null_file"] == str(other / "evaluation" / "null.npz")


def test_no_ums_is_marked_best_between_methods_that_made_other_numbers_of_generations():
    """UnCond stopped early (dedup-driven stopping) at 500 of 2,000 with 100 distinct images (UMS 20 %), SIDE made
    2,000 and reached 200 (10 %): the larger UMS is not the larger count, so no UMS column marks a best (it did);
    AMS, Carlini and Gu are rates per generation and p95 a quantile: marked as before; with equal N_G, UMS too."""
    from side_extract.report import _comparison

    def m(ums, n, p95):
        shares = {"high": ums, "mid": ums}
        return {"bands": {"high": [0, 0.1], "mid": [0.1, 0.2]}, "orientation": "distance", "similarity": "rms-l2",
                "ams": shares, "ums": shares, "ams_cumulative": shares, "ums_cumulative": shares, "p95": p95,
                "carlini": {"extracted_fraction": ums}, "gu": {"memorized_fraction": ums}, "n_generated": n}

    stopped = _comparison({"side": m(0.10, 2000, 0.05), "uncond": m(0.20, 500, 0.08)})["best"]
    assert not [k for k in stopped if k.startswith("ums")] and stopped["p95"] == ["side"]
    assert stopped["ams:mid"] == ["uncond"] and stopped["carlini"] == ["uncond"]
    equal = _comparison({"side": m(0.10, 2000, 0.05), "uncond": m(0.20, 2000, 0.08)})["best"]
    assert equal["ums_cumulative:mid"] == ["uncond"] and equal["carlini"] == ["uncond"]
    # p95 in two feature spaces of one orientation: no scale in common, so no best (one was marked)
    spaces = {"side": m(0.10, 2000, 0.99) | {"similarity": "cosine:pixels", "orientation": "similarity"},
              "uncond": m(0.20, 2000, 0.999) | {"similarity": "cosine:pixels-pca", "orientation": "similarity"}}
    assert "p95" not in _comparison(spaces)["best"] and _comparison(spaces)["best"]["carlini"] == ["uncond"]


def test_labels_remade_after_the_extraction_are_not_joined_to_it(tiny_model_dir, tmp_path):
    """`side cluster` on a finished run with fewer clusters: the report joined SIDE's extraction (targets 0..3)
    with the new clusters.json (0..2) and crashed in the template, after writing a new report.json beside the old
    report.html; with as many clusters it silently showed the new clustering's sizes beside the old extraction."""
    import dataclasses
    import json
    import time

    from side_extract.pipeline import run_audit
    from side_extract.report import write_report

    from test_pipeline import tiny_rc

    rc = tiny_rc(tiny_model_dir, methods=("side", "uncond"))
    run_audit(tmp_path / "run", rc)
    html = write_report(tmp_path / "run")
    fresh = json.loads((tmp_path / "run" / "report" / "report.json").read_text())["clusters"]
    assert fresh["surrogate"]["stale"] is False and all("size" in r and r["size"] is not None
                                                        for r in fresh["methods"]["side"]["rows"])
    time.sleep(1.1)  # the manifest's times: the new labels start after the extraction did
    fewer = dataclasses.replace(rc, surrogate=dataclasses.replace(rc.surrogate, n_clusters=3))
    run_audit(tmp_path / "run", fewer, until="surrogate")
    before = html.read_text()
    write_report(tmp_path / "run")
    data = json.loads((tmp_path / "run" / "report" / "report.json").read_text())["clusters"]
    assert data["surrogate"]["stale"] is True and data["surrogate"]["n_clusters"] == 3
    assert all(r["size"] is None for r in data["methods"]["side"]["rows"])
    page = html.read_text()
    assert page != before and "made again after a SIDE form" in page.replace("\n", " ")


def test_a_step_command_that_remakes_a_finished_stage_names_the_later_stages_it_left_out_of_date(
        tiny_model_dir, tmp_path, caplog):
    """`side sample` / `side cluster` / `side train-classifier` on a finished run replaced their stage without a
    word, and every later stage stayed 'complete' in the manifest although made from the earlier results."""
    import dataclasses
    import logging
    import time

    from side_extract.pipeline import run_audit

    from test_pipeline import tiny_rc

    rc = tiny_rc(tiny_model_dir, methods=("side", "uncond"))
    run_audit(tmp_path / "run", rc)
    time.sleep(0.05)
    fewer = dataclasses.replace(rc, surrogate=dataclasses.replace(rc.surrogate, n_clusters=3))
    with caplog.at_level(logging.WARNING, logger="side_extract"):
        run_audit(tmp_path / "run", fewer, until="surrogate")
    said = [r.getMessage() for r in caplog.records if "made again here" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("surrogate was made again here")
    assert "classifier, extraction/side, evaluation/side were made from its earlier results" in said[0]
    assert "extraction/uncond" not in said[0]  # made from the model alone
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="side_extract"):
        run_audit(tmp_path / "run", fewer)  # the whole chain again: nothing left out of date
    assert not [r for r in caplog.records if "made again here" in r.getMessage()]


@pytest.mark.parametrize("name,content", [("config.yaml", "train: [digits:100\n"), ("manifest.json", '{"stages": {'),
                                          ("manifest.json", "[1, 2]"), ("manifest.json", '{"stages": {"evaluation/side": 1}}'),
                                          ("manifest.json", '{"stages": {"evaluation/side": {"inputs": [1]}}}'),
                                          ("evaluation/side/metrics.json", '{"ams": '),
                                          ("evaluation/side/metrics.json", "[1]"), ("evaluation/side/metrics.json", "null"),
                                          ("surrogate/clusters.json", "[]"), ("surrogate/clusters.json", "{}"),
                                          ("surrogate/clusters.json", '{"clusters": [3]}'),
                                          ("surrogate/clusters.json", '{"clusters": [{"size": 3}]}'),
                                          ("evaluation/side/per_generation.npz", "PK cut"),
                                          ("evaluation/null.npz", "PK cut")], ids=str)
def test_a_damaged_run_file_is_one_error_that_names_it(run_dir, tmp_path, name, content):
    """A run file cut short or edited by hand: `side report` says which one (a YAML traceback, or a JSON error
    without the file's name, before)."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("report"))
    (run / name).write_text(content)
    r = CliRunner().invoke(app, ["report", str(run)])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error:") and name.split("/")[-1] in r.output and "Traceback" not in r.output
    assert not (run / "report").exists()


def test_a_retrained_classifier_marks_the_extraction_it_guided_in_the_report(tiny_model_dir, tmp_path):
    """Only a re-clustering was noticed: after `side train-classifier` with other settings on a finished run, the
    report showed SIDE's extraction, guided by the earlier classifier, without a word. Each stage now records the
    stages it was made from in the manifest, and the report reads them."""
    import dataclasses

    from side_extract.pipeline import run_audit
    from side_extract.report import build_report

    from test_pipeline import tiny_rc

    rc = tiny_rc(tiny_model_dir, methods=("side", "uncond"))
    run_audit(tmp_path / "run", rc)
    stages = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]
    made_from = {n: set(e.get("inputs") or {}) - {"model"} for n, e in stages.items()}
    assert made_from["features"] == {"synthetic"} and made_from["classifier"] == {"surrogate"}
    assert "features" in made_from["surrogate"] and made_from["extraction/side"] == {"classifier", "surrogate"}
    assert made_from["extraction/uncond"] == set() and made_from["evaluation/side"] == {"extraction/side"}
    assert not [n for n in build_report(tmp_path / "run")["notes"] if "made again since" in n]
    more = dataclasses.replace(rc, classifier=dataclasses.replace(rc.classifier, steps=rc.classifier.steps + 2))
    run_audit(tmp_path / "run", more, until="classifier")
    data = build_report(tmp_path / "run")
    said = [n for n in data["notes"] if "made again since" in n]
    assert len(said) == 1 and said[0].startswith("extraction/side was made from earlier results of classifier")
    assert data["clusters"]["surrogate"]["stale"] is False  # the clustering is the one SIDE's extraction used
    run_audit(tmp_path / "run", more)  # the whole chain again: nothing left out of date
    assert not [n for n in build_report(tmp_path / "run")["notes"] if "made again since" in n]


def test_clusters_remade_and_then_a_classifier_trained_on_them_still_mark_the_old_extraction(tiny_model_dir, tmp_path):
    """`side cluster` then `side train-classifier` on a finished run: the classifier's inputs are current again, but
    SIDE's extraction was made from the earlier clusters; the report showed the new clusters' sizes beside it."""
    import dataclasses

    from side_extract.pipeline import run_audit

    from test_pipeline import tiny_rc

    rc = tiny_rc(tiny_model_dir, methods=("side",))
    run_audit(tmp_path / "run", rc)
    fewer = dataclasses.replace(rc, surrogate=dataclasses.replace(rc.surrogate, n_clusters=3))
    run_audit(tmp_path / "run", fewer, until="surrogate")  # side cluster
    run_audit(tmp_path / "run", fewer, until="classifier")  # side train-classifier
    data = build_report(tmp_path / "run")
    assert data["clusters"]["surrogate"]["stale"] is True
    assert all(r["size"] is None for r in data["clusters"]["methods"]["side"]["rows"])
    said = [n for n in data["notes"] if n.startswith("extraction/side was made from earlier results")]
    assert len(said) == 1 and "surrogate" in said[0] and "classifier" in said[0]


@pytest.mark.parametrize("methods", [("side-lora",), ("side-lora", "uncond")], ids=str)
def test_side_loras_copy_guard_caption_with_and_without_plain_sampling(tiny_model_dir, tmp_path, methods):
    """side-lora's copy-guard caption compares with UnCond's share where the run has UnCond; a run of side-lora
    alone crashed the template ("'dict object' has no attribute 'uncond'") after the whole audit."""
    import dataclasses

    from side_extract import config as cfg
    from side_extract.pipeline import run_audit
    from side_extract.report import write_report

    from test_pipeline import tiny_rc

    rc = dataclasses.replace(tiny_rc(tiny_model_dir, methods=methods),
                             lora=cfg.LoraConfig(rank=4, steps=2, batch_size=8, checkpoint_every=2))
    run_audit(tmp_path / "run", rc)
    html = write_report(tmp_path / "run").read_text()
    assert "copy guard" in html and ("for plain sampling of the same model" in html) == ("uncond" in methods)


def test_summary_counts_distinct_nearest_training_images_as_the_benchmarks_do(tiny_model_dir, tmp_path):
    """summary.json and the report counted only UMS (every training image within a band of some generation), while
    the benchmarks' tables count distinct *nearest* training images; a user could not set one against the other.
    The summary now holds both, the nearest count read by hand here from per_generation.csv."""
    import csv
    import json

    from side_extract.pipeline import run_audit
    from side_extract.report import write_report

    from test_pipeline import tiny_rc

    import dataclasses

    # the embedded `demo` target copies its 100 training images, so the bands hold generations
    rc = dataclasses.replace(tiny_rc(tiny_model_dir, methods=("uncond",), n=40, steps=25), model="demo",
                             train="digits:100")
    run_audit(tmp_path / "run", rc)
    s = json.loads((tmp_path / "run" / "summary.json").read_text())["methods"]["uncond"]
    metrics = json.loads((tmp_path / "run" / "evaluation" / "uncond" / "metrics.json").read_text())
    rows = list(csv.DictReader(open(tmp_path / "run" / "evaluation" / "uncond" / "per_generation.csv")))
    for band, (_, hi) in metrics["bands"].items():  # rms-l2: a distance, "at the band or closer" is below its top
        by_hand = {r["nearest_train_id"] for r in rows if float(r["similarity"]) < hi}
        assert s["distinct_nearest_cumulative"][band] == len(by_hand) <= s["distinct_cumulative"][band]
    assert any(s["distinct_nearest_cumulative"].values())
    assert "distinct nearest at mid or closer" in write_report(tmp_path / "run").read_text()


def test_report_image_size_is_bounded_before_the_report_is_built(tmp_path):
    """--image-size 100000 ran for minutes inlining one huge PNG per pair; 0 and 1.5 reached the resizer."""
    from side_extract.report import write_report

    for bad in (0, 100_000, 1.5):
        with pytest.raises(ValueError, match=f"image_size={bad!r} must be an integer from 1 to 1024"):
            write_report(tmp_path / "no-run", image_size=bad)  # refused before the (missing) run is read
    r = CliRunner().invoke(app, ["report", str(tmp_path), "--image-size", "5000"])
    assert r.exit_code != 0 and "from 1 to 1024" in r.output


def test_a_method_left_unevaluated_or_measured_in_other_bands_is_said(run_dir, tmp_path):
    """A helper's review: a configured method whose evaluation was deleted vanished without a word (the verdict
    moved to another best baseline), and a method measured with other bands sat under the run's band headers,
    its histogram shaded with the run's bands."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("report"))
    configured = cfg.RunConfig().extract.methods
    notes = build_report(run)["notes"]
    said = [n for n in notes if "in the config's methods but not evaluated" in n]
    assert len(said) == 1 and said[0].startswith(", ".join(m for m in configured if m not in ("side", "uncond")))
    m = json.loads((run / "evaluation" / "uncond" / "metrics.json").read_text())
    m["bands"] = {b: [lo * 0.5, hi * 0.5] for b, (lo, hi) in m["bands"].items()}
    (run / "evaluation" / "uncond" / "metrics.json").write_text(json.dumps(m))
    data = build_report(run)
    assert not data["comparison"]["same_bands"] and set(data["comparison"]["best"]) <= {"carlini", "gu"}
    (hist,) = data["histograms"]
    assert hist["method_bands"]["uncond"] == m["bands"] and hist["method_bands"]["side"] != m["bands"]
    html = write_report(run).read_text()
    assert "(not compared: its evaluation used other bands)" in html
    assert "so no band column\nhighlights a best" in html and "the best method per column is highlighted" not in html


def test_classifier_table_shows_what_always_answering_the_most_common_label_scores(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("report"))
    saved = json.loads((run / "classifier" / "config.json").read_text())
    (run / "classifier" / "config.json").write_text(json.dumps({**saved, "majority_rate": 0.802}))
    data = build_report(run)
    assert data["classifiers"]["classifier"]["majority"] == 0.802
    assert data["classifiers"]["classifier-clean"]["majority"] is None  # (saved before it was recorded)
    html = write_report(run).read_text()
    assert "most common label (%)" in html and "<td>80.2</td>" in html


def test_kid_best_is_marked_only_beyond_its_standard_error():
    """The demo's KID x1000 (a review's find): cond 41.67 +- 7.58, side 47.73 +- 7.14, uncond 47.80 +- 8.42 (x1e-3):
    cond was marked best although the differences lie within one standard error. By hand: 47.73 - 41.67 = 6.06 <=
    1.96 sqrt(7.58^2 + 7.14^2) = 20.4, so no best; with errors of 0.5 the gap is 6.06 > 1.96 * 0.71 = 1.39."""
    from side_extract.report import _quality

    def metrics(se):
        rows = {"cond": (41.67, 7.58), "side": (47.73, 7.14), "uncond": (47.80, 8.42)}
        return {m: {"quality": {"pixels": {"frechet": 1.0 + i, "kid": k * 1e-3, "kid_se": (se or e) * 1e-3,
                                           "precision": 0.5, "recall": 0.5 + i / 10}}}
                for i, (m, (k, e)) in enumerate(rows.items())}

    assert _quality(metrics(None))["best"]["pixels"]["kid"] is None
    assert _quality(metrics(0.5))["best"]["pixels"]["kid"] == "cond"
    assert _quality(metrics(None))["best"]["pixels"]["frechet"] == "cond"  # (the others as before)
    assert _quality(metrics(None))["best"]["pixels"]["recall"] == "uncond"


def test_a_quality_value_several_methods_share_marks_no_best():
    """Precision 1.0 for two methods (common at small N_G) marked the first in the table best (a review's find), and
    a KID tie left its standard-error rule without a best to compare."""
    from side_extract.report import _quality

    q = {m: {"quality": {"pixels": {"frechet": 5.0, "kid": 0.01, "kid_se": 0.0, "precision": 1.0, "recall": r}}}
         for m, r in (("side", 0.2), ("uncond", 0.3))}
    assert _quality(q)["best"]["pixels"] == {"frechet": None, "kid": None, "precision": None, "recall": "uncond"}


def test_a_quality_row_not_compared_is_marked_and_no_candidate_for_a_best():
    """The comparison, summary and findings set aside the evaluations a run does not compare (an earlier call's
    generations of another target, another training set); the sample-quality table let them compete, and marked an
    earlier call's memguide, made from another target, the run's best Frechet (a review's find). By hand: memguide's
    74.9 is lowest, but it is apart, so uncond's 80.7 against side's 90.0 is the best."""
    from side_extract.report import _quality

    q = {m: {"quality": {"pixels": {"frechet": f, "kid": 0.01, "kid_se": 0.01, "precision": 0.5, "recall": 0.5,
                                    "n_generated": 12, "n_reference": 200, "k": 3}}}
         for m, f in (("uncond", 80.7), ("side", 90.0), ("memguide", 74.9))}
    why = "made from another target (the run's config names another model now)"
    got = _quality(q, {"memguide": why})
    assert got["best"]["pixels"]["frechet"] == "uncond"
    assert [r["not_compared"] for r in got["spaces"]["pixels"]] == [None, None, why]
    assert _quality(q)["best"]["pixels"]["frechet"] == "memguide"  # (compared: as before)
    alone = _quality({m: q[m] for m in ("uncond", "memguide")}, {"memguide": why})
    assert "pixels" not in alone["best"]  # (one candidate left: no best to mark)


def test_an_evaluation_under_another_name_shows_the_generations_it_names(run_dir, tmp_path):
    """`side evaluate --out RUN/evaluation/NAME` of a run's generations: the report looked for extraction/NAME and
    showed no image pairs ("holds no shards"), although its metrics.json names the generations it measured."""
    from side_extract.data import load_shards

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("report"))
    gen = load_shards(run / "extraction" / "uncond")
    c = cfg.EvaluateConfig(carlini_n=10, bands_file=str(run / "evaluation" / "bands.json"))
    ev = evaluate(gen, load_image_set(TRAIN), c, method="uncond-again")
    ev.write(run / "evaluation" / "uncond-again")
    assert json.loads((run / "evaluation" / "uncond-again" / "metrics.json").read_text())["sources"]["generated"] == \
        str(run / "extraction" / "uncond")
    data = build_report(run)
    from side_extract.report import _pairs

    notes: list[str] = []
    pairs = _pairs(data, run, notes, 16)
    assert not [n for n in notes if "uncond-again" in n], notes
    assert pairs["uncond-again"] and all(p["gen_uri"] for p in pairs["uncond-again"])


def test_classifier_table_shows_the_mean_recall_per_label_beside_its_chance(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("report"))
    saved = json.loads((run / "classifier" / "config.json").read_text())
    saved["heldout_labels"] = 8  # as training saves it (the labels the recall averages over)
    last = saved["history"][-1]
    last["balanced_accuracy"] = {"q0": 0.5, "q1": 0.4, "q2": 0.3, "q3": 0.25}  # as training records it
    (run / "classifier" / "config.json").write_text(json.dumps(saved))
    data = build_report(run)
    c = data["classifiers"]["classifier"]
    assert c["balanced"] == last["balanced_accuracy"]
    assert c["balanced_chance"] == pytest.approx(1 / 8)
    html = write_report(run).read_text()
    row = html.split("classifier: mean recall per label", 1)[1].split("</tr>", 1)[0]
    assert re.findall(r"<td>([^<]*)</td>", row) == ["300", "50.0", "40.0", "30.0", "25.0", "–", "chance 12.5"]
    for h in saved["history"]:  # a classifier saved before it was recorded: no such row
        h.pop("balanced_accuracy", None)
    (run / "classifier" / "config.json").write_text(json.dumps(saved))
    assert build_report(run)["classifiers"]["classifier"]["balanced_chance"] is None
    assert "classifier: mean recall per label" not in write_report(run).read_text()


def test_a_killed_reports_temporary_files_are_swept_by_the_next_report(tmp_path):
    """A report killed mid-write left report/.report.json.XXXXXXXX.side-tmp for good: only a lock-holding writer
    swept, and a report takes no lock (an independent review of interruptions)."""
    import os

    run = make_run(tmp_path / "run", sweeps=False)
    write_report(run)
    left = run / "report" / ".report.json.abcd1234.side-tmp"
    left.write_text("{")
    os.utime(left, (1, 1))  # untouched for long: a killed writer's
    write_report(run)
    assert not left.exists()


def test_distinct_images_are_not_compared_between_methods_of_other_budgets(tmp_path):
    """The ratio table set one method's share of distinct images per generation against a baseline's made with
    another N_G: a method that had reached 0.37x the baseline's images in 40 generations against 200 was shown,
    highlighted, as 1.86x under "distinct". AMS and Carlini are shares of generations, and stay."""
    from side_extract.report import build_report, render_html
    from side_extract.summary import audit_summary

    run = make_run(tmp_path / "run", sweeps=False)  # side: 40 generations, uncond: 30
    rows = audit_summary(run)["ratios_to_best_baseline"]["side"]
    for name, r in rows.items():
        if name.startswith("ums"):
            assert r["ratio"] is None and r["side_better"] is None, name
            assert r["unequal_budgets"] == {"side": 40, "uncond": 30}
        else:
            assert "unequal_budgets" not in r and r["side_better"] is not None, name
    html = " ".join(render_html(build_report(run), run).split())
    assert "N_G differs: side 40, uncond 30" in html
    # nor in the verdict above that table, which gave "with 5 in 30 (3.20x)" (a review's find)
    said = audit_summary(run)["verdict"]
    assert "reached 5 in 30 (no ratio: side was asked for 40 generations, uncond 30)." in said, said
    assert "x)" not in said, said
    assert " than the best baseline" not in said and "as many as" not in said, said
    # a baseline given the method's budget is compared with, whatever another of a smaller budget reached (it was
    # chosen as the best by its inflated share, and the comparison withheld)
    from side_extract.summary import ratios_to_best_baseline

    def m(ums):
        return {"ams": {"mid": 0.1}, "ums": {"mid": ums}, "ams_cumulative": {"mid": 0.1},
                "ums_cumulative": {"mid": ums}, "p95": 0.2, "orientation": "distance",
                "carlini": {"extracted_fraction": 0.1}, "gu": {"memorized_fraction": 0.1}}

    r = ratios_to_best_baseline({"side": m(0.3), "cond": m(0.35), "uncond": m(0.2)},
                                budgets={"side": 200, "cond": 40, "uncond": 200})["side"]["ums/mid"]
    assert (r["best_baseline_method"], r["ratio"], r["side_better"]) == ("uncond", 0.3 / 0.2, True)
    assert "unequal_budgets" not in r


def test_a_lambda_sweep_joins_each_methods_own_lambda(tmp_path):
    """A lambda sweep sets Cond's own lambda (cond_scale) to each swept value; the run's own Cond result, made at
    cond_scale 1, joined Cond's curve at extract.scale (3), a point nothing measured, and hid the flat stretch."""
    run = tmp_path / "run"
    rc = cfg.RunConfig(train=TRAIN, extract=cfg.ExtractConfig(methods=("side", "cond"), scale=3.0, cond_scale=1.0),
                       sweep=cfg.SweepConfig(scale=(2.0, 5.0)))
    RunDir(run).write_config(rc)
    train = load_image_set(TRAIN)
    c = cfg.EvaluateConfig(carlini_n=10, bands="high=0:0.05,mid=0.05:0.1,low=0.1:0.2")

    def put(where, method, copies, seed):
        gen = generations(train, copies, 30, seed)
        save_extraction(where, method, gen)
        evaluate(gen, train, c, method=method).write(where / "evaluation" / method)

    put(run, "side", 6, 1)
    put(run, "cond", 2, 2)
    for name, sub_rc in sweep_configs(rc):
        RunDir(run / "sweeps" / name).write_config(sub_rc)
        for m in ("side", "cond"):
            put(run / "sweeps" / name, m, 4, 3)
    sweeps = build_report(run)["sweeps"]["scale"]
    assert sweeps["side"]["values"] == [2.0, 3.0, 5.0]
    assert sweeps["cond"]["values"] == [1.0, 2.0, 5.0]


def test_the_cost_of_a_grown_extraction_is_not_said_from_its_last_session(tiny_model_dir, tmp_path):
    """A resumed or grown extraction's manifest seconds count only its last session: the summary divided all N_G
    by them (4.7x the true rate in a review) as the method's images per second."""
    import dataclasses

    from side_extract.pipeline import run_audit
    from side_extract.report import write_report
    from side_extract.summary import audit_summary

    from test_pipeline import tiny_rc

    rc = tiny_rc(tiny_model_dir, methods=("uncond",), shard_size=2)
    run = tmp_path / "run"
    run_audit(run, rc)
    first = audit_summary(run)["methods"]["uncond"]
    assert first["seconds"] > 0 and first["images_per_second"] > 0 and "timing" not in first
    run_audit(run, dataclasses.replace(rc, extract=dataclasses.replace(rc.extract, n=10)))  # grown from 6
    grown = audit_summary(run)["methods"]["uncond"]
    assert grown["n_generated"] == 10 and grown["seconds"] is None and grown["images_per_second"] is None
    assert grown["timing"].startswith("not kept: the extraction was resumed or grown")
    assert "not kept: the extraction was resumed or grown" in " ".join(write_report(run).read_text().split())


def test_a_synthetic_evaluation_the_run_no_longer_stands_for_is_named(tiny_model_dir, tmp_path):
    """The synthetic set made again (more samples) left its old evaluation on disk, marked complete; the findings
    dropped it with a line on stderr only, and the caption said the run had none or did not measure it."""
    import dataclasses

    from side_extract.pipeline import run_audit

    from test_pipeline import tiny_rc

    rc = tiny_rc(tiny_model_dir, methods=("side", "uncond"))
    run = tmp_path / "run"
    run_audit(run, rc)
    assert not any("synthetic-evaluation" in n for n in build_report(run)["notes"])
    run_audit(run, dataclasses.replace(rc, sample=dataclasses.replace(rc.sample, n=48)), until="surrogate")
    data = build_report(run)
    assert "synthetic" not in data["audit_summary"]["findings"]["generations"]
    assert any(n.startswith("synthetic-evaluation/ left out of the findings: unfinished, or made from a synthetic "
                            "set the run no longer holds") for n in data["notes"])


def test_the_browser_check_names_bad_paths_and_a_hung_browser(tmp_path):
    """scripts/check_report_chromium.py: a screenshot folder that does not exist was blamed on the report (exit 1);
    a folder as --out was an IsADirectoryError traceback; a browser that hangs was subprocess's TimeoutExpired, not
    the documented ValueError (exit 2). None of these needs a real Chromium."""
    from side_extract.report_browser import check_report

    html = tmp_path / "report.html"
    html.write_text("<!DOCTYPE html><html><head><title>x</title></head><body><table></table></body></html>")
    with pytest.raises(ValueError, match="its folder .*nodir' does not exist"):
        check_report(html, screenshot=tmp_path / "nodir" / "shot.png", chromium="sh")
    with pytest.raises(ValueError, match="is a directory; give a file path"):
        check_report(html, screenshot=tmp_path, chromium="sh")
    with pytest.raises(ValueError, match="is a directory, not a report.html"):
        check_report(tmp_path, chromium="sh")
    hang = tmp_path / "hang"
    hang.write_text("#!/bin/sh\nsleep 30\n")
    hang.chmod(0o755)
    with pytest.raises(ValueError, match=r"did not finish within 1 s"):
        check_report(html, chromium=str(hang), timeout=1)


def test_the_summary_takes_no_extraction_an_evaluation_did_not_measure(tiny_model_dir, tmp_path):
    """`side evaluate --out RUN/evaluation/side` of other images: the summary took the run's own extraction of side
    as that method's (its N_G as the budget the shares were scaled to, its seconds and images per second)."""
    from typer.testing import CliRunner

    from side_extract.cli.main import app
    from side_extract.data import load_image_set
    from side_extract.pipeline import run_audit
    from side_extract.summary import audit_summary

    from test_pipeline import tiny_rc

    run = tmp_path / "run"
    run_audit(run, tiny_rc(tiny_model_dir, methods=("side", "uncond"), n=6), until="extraction")
    np.savez(tmp_path / "gens.npz", images=load_image_set("digits:30").images[:4])
    for m, gen in (("side", tmp_path / "gens.npz"), ("uncond", run / "extraction" / "uncond")):
        r = CliRunner().invoke(app, ["--no-progress", "evaluate", "--generated", str(gen), "--method", m, "--train",
                                     "digits:30", "--out", str(run / "evaluation" / m), "--carlini-n", "5", "--bands",
                                     "high=0:0.1,mid=0.1:0.15,low=0.15:0.2"])
        assert r.exit_code == 0, r.output
    methods = audit_summary(run)["methods"]
    side = methods["side"]
    assert side["n_generated"] == 4 and side["seconds"] is None and side["images_per_second"] is None
    assert "timing" not in side and "stopped" not in side
    assert methods["uncond"]["seconds"] is not None  # (side evaluate of the run's own extraction: it is that one)


def dataclasses_replace_sweep(rc: cfg.RunConfig, scales: tuple[float, ...]) -> cfg.RunConfig:
    import dataclasses

    return dataclasses.replace(rc, sweep=dataclasses.replace(rc.sweep, scale=scales))


def test_report_faults_of_a_review(run_dir, tmp_path, monkeypatch):
    """An independent review's finds: a best was marked among evaluations the summary does not compare (the same
    images under another Carlini alpha "extracted the most"); the same bands in another key order were "other
    bands"; a Frechet distance or precision was marked best between other N_G; side verify's command was printed
    for images side evaluate measured elsewhere (and failed); the null's path was written as typed; stale sweeps
    were said as "no sweeps"; report.json lacked the notes met while reading the pixels."""
    from side_extract.data import load_shards
    from side_extract.report import _quality

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("report"))
    gen = load_shards(run / "extraction" / "uncond")
    bands = json.loads((run / "evaluation" / "bands.json").read_text())["bands"]
    other_alpha = cfg.EvaluateConfig(carlini_n=10, carlini_alpha=0.9, bands_file=str(run / "evaluation" / "bands.json"))
    evaluate(gen, load_image_set(TRAIN), other_alpha, method="uncond-alpha09").write(
        run / "evaluation" / "uncond-alpha09")
    reordered = ",".join(f"{b}={lo!r}:{hi!r}" for b, (lo, hi) in reversed(list(bands.items())))
    evaluate(gen, load_image_set(TRAIN), cfg.EvaluateConfig(carlini_n=10, bands=reordered),
             method="uncond2").write(run / "evaluation" / "uncond2")
    # a stale sweep: the run's sweep is now of other values
    rc = cfg.from_dict(cfg.RunConfig, cfg.load_yaml(run / "config.yaml"))
    RunDir(run).write_config(dataclasses_replace_sweep(rc, (2.0,)))
    monkeypatch.chdir(tmp_path)  # the run named relatively
    data = build_report("run")
    cmp = data["comparison"]
    assert cmp["same_bands"]  # uncond2's bands are the run's, in another order
    assert all("uncond-alpha09" not in ms for ms in cmp["best"].values()), cmp["best"]
    assert next(r for r in cmp["rows"] if r["method"] == "uncond-alpha09")["not_compared"].startswith(
        "its evaluation used other metric settings")
    assert all(h["null_file"] == str(run / "evaluation" / "null.npz") for h in data["histograms"] if h["null_file"])
    assert any(n.startswith("sweeps/scale=1, sweeps/scale=20, sweeps/scale=5 left out") for n in data["notes"]), \
        data["notes"]
    assert not any(n.startswith("no sweeps/") for n in data["notes"])
    q = {m: {"quality": {"pixels": {"frechet": f, "kid": 0.01, "kid_se": 0.0, "precision": p, "recall": 0.5,
                                    "n_generated": n, "n_reference": 100, "k": 3}}}
         for m, f, p, n in (("uncond", 1.8, 0.69, 300), ("cond", 7.1, 0.63, 30))}
    assert _quality(q)["best"]["pixels"] == {"frechet": None, "kid": None, "precision": None, "recall": None}
    # report.json keeps the notes met while reading the pixels; no verify command for images measured elsewhere
    shutil.rmtree(run / "extraction" / "uncond")
    evaluate(gen, load_image_set(TRAIN), cfg.EvaluateConfig(carlini_n=10, bands=reordered),
             method="elsewhere").write(run / "evaluation" / "elsewhere")
    page = write_report("run", top=3).read_text()
    saved = json.loads((run / "report" / "report.json").read_text())
    assert any("extraction/uncond holds no shards" in n for n in saved["notes"]), saved["notes"]
    assert "--method side " in page and "--method uncond2" not in page and "--method elsewhere" not in page


def test_the_theory_of_a_classifier_made_from_earlier_results_is_left_out(tmp_path):
    """A review's find: after `side sample` with another model remade the synthetic set, the theory section (measured
    on the old target's classifier, whose fingerprint had not changed) was shown as current, and the classifier's
    accuracy too."""
    run = tmp_path / "run"
    rd = RunDir(run)
    rd.write_config(cfg.RunConfig(train="digits:100"))
    rd.begin("synthetic", "a" * 64)
    rd.complete("synthetic")
    rd.begin("classifier", "c" * 64, inputs={"synthetic": "b" * 64})  # made from a synthetic set made again since
    rd.complete("classifier")
    atomic_write_json(run / "classifier" / "config.json", {"arch": {}, "history": [{"step": 1, "loss": 1.0}]})
    est = {"mean": 1.0, "stderr": 0.5, "ci95_low": 0.0, "ci95_high": 2.0, "n": 32}
    atomic_write_json(run / "theory" / "measure.json", {"m_uncond": est, "train": "digits:100", "eps": 0.1,
                                                        "classifier_fingerprint": "c" * 64, "index": [0, 1]})
    data = build_report(run)
    assert data["theory"] is None
    assert any(n.startswith("theory/measure.json was measured on a classifier and target") for n in data["notes"])
    assert any(n.startswith("classifier was made from earlier results of synthetic") for n in data["notes"])


def test_the_evaluation_set_apart_is_the_odd_one_whichever_comes_first():
    """A review's find: compared against the first evaluation alone, one with another Carlini alpha listed first set
    every other method apart ("not compared") and no best was marked."""
    from side_extract.evaluation import incomparable

    def m(alpha):
        return {"similarity": "rms-l2", "orientation": "distance", "bands": {"high": [0, 0.1]}, "n_train": 10,
                "config": {"carlini_alpha": alpha}}

    for order in (("cond", "side", "uncond"), ("side", "uncond", "cond")):
        metrics = {k: m(0.3 if k == "cond" else 0.5) for k in order}
        assert list(incomparable(metrics)) == ["cond"], order
    assert list(incomparable({"a": m(0.3), "b": m(0.5)})) == ["b"]  # none agree: against the first


def test_a_sweep_of_the_runs_own_value_is_said_so_not_missing(tiny_model_dir, tmp_path, one_thread):
    """A one-value sweep equal to the run's own value (scale 1 of a run at scale 1): its sub-run shares every
    evaluation with the run, so no point was its own, and the page said "no sweeps/<param>=<value>/: that section is
    left out" of a run that holds a current one. It says what the sub-run holds now."""
    from side_extract.sweeps import run_with_sweeps
    from test_pipeline import tiny_rc

    rc = dataclasses.replace(tiny_rc(tiny_model_dir, methods=("side", "uncond"), scale=1.0),
                             sweep=cfg.SweepConfig(scale=(1.0,)))
    run_with_sweeps(tmp_path / "run", rc)
    notes = json.loads((write_report(tmp_path / "run").parent / "report.json").read_text())["notes"]
    assert "sweeps/scale=1 holds the run's own results (the swept value is the run's own), drawn as the run's " \
        "point of the curve" in notes and not any(n.startswith("no sweeps/") for n in notes), notes
    # a sub-run of another value cut short before its evaluations is not said to hold the run's results
    from conftest import interrupt_at
    from side_extract.pipeline import run_audit

    other = dataclasses.replace(rc, sweep=cfg.SweepConfig(scale=(2.0,)))
    run_audit(tmp_path / "cut", other)  # the run itself, then its sub-run cut short in its extraction
    with pytest.raises(KeyboardInterrupt):
        run_with_sweeps(tmp_path / "cut", other, progress=interrupt_at("extract side", 1))
    assert (tmp_path / "cut" / "sweeps" / "scale=2" / "manifest.json").is_file()
    notes = json.loads((write_report(tmp_path / "cut").parent / "report.json").read_text())["notes"]
    assert not any("holds the run's own results" in n for n in notes), notes


def test_report_faults_of_a_second_review(run_dir, tmp_path):
    """A side evaluation without the run's clusters.json (side evaluate into a run that clustered nothing) failed
    the page ("'dict object' has no attribute 'size'"); one training image in a band of 2,500 generations read
    "0.0" %, a best marked between two "0.0" cells; bands an evaluation calibrated itself were said "given"; the
    closest band was marked by the last method's band names only; 12,345 s read 1.235e+04."""
    from side_extract.data import load_shards
    from side_extract.report import _fmt

    assert _fmt(0.0004, "%") == "0.04" and _fmt(0.0, "%") == "0.0" and _fmt(0.1234, "%") == "12.3"
    assert _fmt(0.00049, "%") == "0.05" and _fmt(12345.6) == "12346" and _fmt(0.5) == "0.5"
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("report", "sweeps"))
    (run / "surrogate" / "clusters.json").unlink()
    train = load_image_set(TRAIN)
    for method, ev in (("side", cfg.EvaluateConfig(carlini_n=10)),  # bands calibrated by the evaluation itself
                       ("uncond", cfg.EvaluateConfig(carlini_n=10, bands="near=0:0.05,far=0.05:0.1"))):
        shutil.rmtree(run / "evaluation" / method)
        evaluate(load_shards(run / "extraction" / method), train, ev, method=method).write(run / "evaluation" / method)
    (run / "evaluation" / "bands.json").unlink()
    data = build_report(run)
    rows = data["clusters"]["methods"]["side"]["rows"]
    assert data["clusters"]["methods"]["side"]["kind"] == "surrogate cluster" and rows
    assert all(r["size"] is None and r["cohesion"] is None and r["kept"] is None for r in rows)
    html = " ".join(write_report(run, top=8).read_text().split())
    side_bands = json.loads((run / "evaluation" / "side" / "metrics.json").read_text())["bands_source"]
    assert side_bands == "train-null"  # (an image set with no held-out digits beside it)
    assert f"its bands were calibrated by the evaluation itself ({side_bands}), which keeps no null" in html
    marked = set(re.findall(r'<span class="band band-top">([^<]+)</span>', html))
    assert marked == {"high", "near"}, marked  # each method's own closest band (uncond's "high" was plain)


def test_a_report_drawn_again_from_its_json_says_each_note_once(run_dir, tmp_path):
    """write_report kept the notes met while reading the pixels in report.json, and render_html, given that file,
    added them again: a damaged shard's note twice on the page."""
    from side_extract.report import render_html

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    shutil.rmtree(run / "report", ignore_errors=True)
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace(TRAIN, "digits:nonsense"))
    written = write_report(run, top=2)
    data = json.loads((written.parent / "report.json").read_text())
    assert sum("could not be loaded" in n for n in data["notes"]) == 1
    again = render_html(data, run)
    assert again.count("could not be loaded") == written.read_text().count("could not be loaded") == 1


@pytest.mark.parametrize("damaged", ["theory/measure.json", "evaluation/bands.json"])
def test_a_report_input_that_is_json_of_another_shape_is_named(run_dir, tmp_path, damaged):
    """A theory/measure.json or a bands.json holding a JSON list ended `side report` in a traceback
    ("'list' object has no attribute 'get'")."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / damaged).parent.mkdir(parents=True, exist_ok=True)
    (run / damaged).write_text("[1]")
    with pytest.raises(ValueError, match=re.escape(damaged.split("/")[-1])):
        write_report(run, top=2)


def test_a_page_that_cannot_be_written_leaves_no_report_json_alone(run_dir, tmp_path):
    """A run folder whose name is not UTF-8 (bytes a file system allows) wrote report.json, then failed encoding the
    page: report.json without report.html, where the two are written together or not at all. The page is written,
    the undecodable byte shown as a replacement character."""
    run = tmp_path / "bad\udcffname"  # (the byte 0xff in a name, as Python decodes it)
    try:
        shutil.copytree(run_dir, run)
    except (UnicodeEncodeError, OSError):
        pytest.skip("this file system refuses the name")
    shutil.rmtree(run / "report", ignore_errors=True)
    written = write_report(run, top=2)
    assert sorted(p.name for p in written.parent.iterdir()) == ["report.html", "report.json"]
    assert "bad\ufffdname" in written.read_bytes().decode("utf-8")


def test_a_method_folder_whose_name_is_not_utf8_is_drawn(run_dir, tmp_path):
    """A method folder whose name is not UTF-8 failed the report inside matplotlib's font code (its histogram's title
    and legend); the figures now draw the odd byte as ``\\xff``."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    odd = "uncond\udcffx"  # (the byte 0xff in a name, as Python decodes it)
    try:
        for stage in ("extraction", "evaluation"):
            if (run / stage / "uncond").is_dir():
                (run / stage / "uncond").rename(run / stage / odd)
    except (UnicodeEncodeError, OSError):
        pytest.skip("this file system refuses the name")
    shutil.rmtree(run / "report", ignore_errors=True)
    written = write_report(run, top=2)
    assert sorted(p.name for p in written.parent.iterdir()) == ["report.html", "report.json"]


def test_report_faults_of_a_third_review(run_dir, tmp_path):
    """Generations side evaluate measured with --resize outside the run showed no image ("changed since": the report
    dropped metrics.json's config, and its resize, before loading them); a moved run whose training set is in its
    inputs/ lost its theory section ("measured on a training set the run no longer holds": measure.json names the
    old place); 9,999.6 s read 1e+04; top=2.5 was taken."""
    from side_extract.report import _fmt, _pairs
    from side_extract.runs import RunDir, read_run_config

    assert _fmt(9999.6) == "10000" and _fmt(-9999.96) == "-10000" and _fmt(9999.4) == "9999"
    with pytest.raises(ValueError, match=r"top=2\.5 must be an integer"):  # (a pair per distinct training image)
        build_report(run_dir, top=2.5)
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("report", "sweeps"))
    small = load_image_set(TRAIN).images[:6]
    big = tmp_path / "gens16.npz"
    np.savez(big, images=small.repeat(2, axis=1).repeat(2, axis=2)[..., 0])  # the same digits at 16x16
    r = CliRunner().invoke(app, ["--no-progress", "evaluate", "--generated", str(big), "--method", "ext", "--train",
                                 TRAIN, "--resize", "8", "--carlini-n", "5", "--bands", "high=0:0.1,mid=0.1:0.2",
                                 "--out", str(run / "evaluation" / "ext")])
    assert r.exit_code == 0, r.output
    notes: list[str] = []
    pairs = _pairs(build_report(run), run, notes, 16)
    assert not [n for n in notes if "ext" in n], notes
    assert pairs["ext"] and all(p["gen_uri"] for p in pairs["ext"])

    old = tmp_path / "old" / "run"
    (old / "inputs").mkdir(parents=True)
    train = load_image_set("digits:50")
    np.savez(old / "inputs" / "train-0123456789ab.npz", images=train.images, labels=train.labels)
    rd = RunDir(old)
    rd.write_config(cfg.RunConfig(train=str(old / "inputs" / "train-0123456789ab.npz")))
    rd.begin("classifier", "c" * 64)
    rd.complete("classifier")
    atomic_write_json(old / "classifier" / "config.json", {"arch": {}, "history": [{"step": 1, "loss": 1.0}]})
    est = {"mean": 1.0, "stderr": 0.5, "ci95_low": 0.0, "ci95_high": 2.0, "n": 32}
    atomic_write_json(old / "theory" / "measure.json", {"m_uncond": est, "train": read_run_config(old)["train"],
                                                        "eps": 0.1, "classifier_fingerprint": "c" * 64, "index": [0]})
    assert build_report(old)["theory"] is not None
    moved = tmp_path / "new" / "run"
    moved.parent.mkdir()
    shutil.move(str(old), str(moved))
    data = build_report(moved)
    assert data["theory"] is not None, data["notes"]
    assert not [n for n in data["notes"] if n.startswith("theory")]


def test_an_evaluation_set_apart_in_other_bands_leaves_the_best_between_the_others_marked():
    """A side evaluation of another training set in its own bands is set apart (no candidate for a best); its bands
    and N_G also turned off every band column's and UMS's best between the methods that are compared, and the
    caption listed only the first method's bands."""
    from side_extract.report import _comparison

    def m(share, n=100, bands=None, train=100):
        shares = {b: share for b in (bands or {"high": 0, "mid": 0})}
        return {"bands": bands or {"high": [0, 0.1], "mid": [0.1, 0.2]}, "orientation": "distance",
                "similarity": "rms-l2", "ams": shares, "ums": shares, "ams_cumulative": shares, "ums_cumulative": shares,
                "p95": share, "carlini": {"extracted_fraction": share}, "gu": {"memorized_fraction": share},
                "n_generated": n, "n_train": train, "config": {}}

    apart = m(0.9, n=37, bands={"near": [0, 0.05]}, train=50)
    cmp = _comparison({"side": m(0.3), "uncond": m(0.2), "other": apart}, {"other": "another training set"})
    assert cmp["best"]["ums:mid"] == ["side"] and cmp["best"]["ams:high"] == ["side"], cmp["best"]
    assert not cmp["same_bands"] and cmp["compared_same_bands"]
    assert not [k for k in cmp["best"] if "near" in k]  # (only the set-apart one has it)
    assert _comparison({"side": m(0.3), "uncond": m(0.2, bands={"near": [0, 0.05]})})["best"].keys() == {"carlini",
                                                                                                         "gu", "p95"}


def test_a_report_json_from_before_compared_same_bands_still_renders(run_dir, tmp_path):
    """render_html takes a report.json; one written before the comparison recorded compared_same_bands, of methods in
    other bands, failed the page (StrictUndefined)."""
    from side_extract.report import render_html

    data = build_report(run_dir, top=2)
    data["comparison"]["same_bands"] = False
    del data["comparison"]["compared_same_bands"]
    assert "The methods were measured with other similarities or bands" in " ".join(render_html(data, run_dir).split())


def test_the_report_says_which_stages_are_unfinished_and_whether_they_are_being_made(tiny_model_dir, tmp_path):
    """A stage left running by a killed process (SIGKILL, the OOM killer: the manifest says running, no process holds
    the lock) was shown as "running", for good, in the stage table at the page's end alone; a failed one likewise,
    and nothing said a method was missing or why. A note says what each unfinished stage is now: interrupted, failed
    with its error, or being made by another process."""
    import yaml

    from side_extract.pipeline import run_audit
    from side_extract.runs import run_lock

    from test_pipeline import tiny_rc
    from test_reliability import _holder

    run = tmp_path / "run"
    run_audit(run, tiny_rc(tiny_model_dir, methods=("uncond", "cond")))
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["stages"]["extraction/uncond"]["status"] = "running"  # (what SIGKILL leaves)
    manifest["stages"]["extraction/cond"].update(status="failed", error="StoppedBySignal: stopped by SIGTERM")
    (run / "manifest.json").write_text(json.dumps(manifest))
    notes = build_report(run)["notes"]
    interrupted = ("stage extraction/uncond: running, interrupted (no other process holds the run's lock: the one "
                   "making it was killed); a rerun resumes it")
    assert interrupted in notes, notes
    assert ("stage extraction/cond: failed (StoppedBySignal: stopped by SIGTERM), not finished; a rerun resumes it"
            in notes), notes
    with run_lock(run):  # (side run writes its report holding the lock: none of this is being made by another)
        assert interrupted in build_report(run)["notes"]
    holder = _holder(run, 60)
    try:
        notes = build_report(run)["notes"]
    finally:
        holder.kill()
        holder.wait()
    assert ("stage extraction/uncond: running, being made now (another process holds the run's lock); this report "
            "shows the run as it was") in notes, notes
    assert ("stage extraction/cond: failed (StoppedBySignal: stopped by SIGTERM), not finished (another process holds "
            "the run's lock now); a rerun resumes it") in notes, notes
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["extract"]["methods"] = ["uncond"]  # (cond's stages are an earlier configuration's: no rerun touches them)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    manifest["stages"]["classifier-clean"]["status"] = "running"  # (Cond's and side-teacher's classifier, killed)
    (run / "manifest.json").write_text(json.dumps(manifest))
    notes = build_report(run)["notes"]
    assert ("stage extraction/cond: failed (StoppedBySignal: stopped by SIGTERM), not finished; left by an earlier "
            "configuration: a rerun leaves it as it is, unless extract.methods names cond again" in notes), notes
    assert ("stage classifier-clean: running, interrupted (no other process holds the run's lock: the one making it "
            "was killed); left by an earlier configuration: a rerun leaves it as it is, unless extract.methods names "
            "cond or side-teacher again" in notes), notes
