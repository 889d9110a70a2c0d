"""``side bench variants``: overrides, the objective by hand, the choice, and a tiny end-to-end run."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from side_extract.bench.extraction import ratios_to_best_baseline
from side_extract.bench.tables import render_variants_markdown
from side_extract.bench.variants import (BASE, VariantsBenchConfig, apply_overrides, choose,
                                         load_variants_file, objective_score, run_variants_bench,
                                         write_variants_results)
from side_extract.cli.main import app
from side_extract import config as cfg

from test_bench import metrics, tiny_bench


def test_dotted_overrides_nest_and_apply():
    assert cfg.dotted_to_nested({"extract.t_hi": 0.5, "extract.scale": 2.0, "sample.n": 10}) == {
        "extract": {"t_hi": 0.5, "scale": 2.0}, "sample": {"n": 10}}
    rc = apply_overrides(cfg.RunConfig(), {"extract.t_hi": 0.5, "surrogate.n_clusters": 25}, where="v")
    assert rc.extract.t_hi == 0.5 and rc.surrogate.n_clusters == 25 and rc.extract.scale == cfg.ExtractConfig().scale
    with pytest.raises(ValueError, match="unknown config key.*t_high"):
        apply_overrides(cfg.RunConfig(), {"extract.t_high": 0.5}, where="variants.x")
    with pytest.raises(ValueError, match="t_lo=0.6, t_hi=0.5"):
        apply_overrides(cfg.RunConfig(), {"extract.t_lo": 0.6, "extract.t_hi": 0.5}, where="variants.x")
    with pytest.raises(ValueError, match="dotted section.field"):
        cfg.dotted_to_nested({"extract..t_hi": 1})
    # a null section sets nothing, in either order (after a dotted key it dropped that key without a word)
    for given in ({"extract.n": 5, "extract": None}, {"extract": None, "extract.n": 5}):
        assert cfg.dotted_to_nested(given) == {"extract": {"n": 5}}, given
    # a hex or octal integer needs a digit ('0x_' met int()'s error, naming no key)
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "c.yaml"
    path.write_text("sample: {seed: 0x_}\n")
    with pytest.raises(ValueError, match=r"sample.seed='0x_' must be an integer"):
        cfg.from_dict(cfg.RunConfig, cfg.load_yaml(path))


def test_objective_by_hand():
    side = metrics(0.30, 0.10, 0.05, 0.20, 0.0)
    cond = metrics(0.10, 0.05, 0.10, 0.05, 0.0)
    uncond = metrics(0.15, 0.01, 0.25, 0.10, 0.0)

    def row(s: dict) -> tuple[int, dict]:
        return 100, ratios_to_best_baseline({"side": s, "cond": cond, "uncond": uncond})["side"]

    e = 0.01
    # AMS high: best baseline UnCond 0.15; UMS high: Cond 0.05; Carlini: UnCond 0.10; Gu: 0 vs 0 is a tie
    want = (math.log((0.30 + e) / (0.15 + e)) + math.log((0.10 + e) / (0.05 + e)) + math.log((0.20 + e) / (0.10 + e))
            + 0.0) / 4
    got = objective_score([row(side)], ("ams_cumulative/high", "ums_cumulative/high", "carlini", "gu"))
    assert got == pytest.approx(want)
    # p95 is a distance: closer than the closest baseline (0.05 vs 0.10) scores about log 2 (half an 8-bit level
    # added to each); a distance of 0, exact copies, scored 0 (a tie) and now beats 0.001 (a review's find)
    d = 0.5 / 255
    assert objective_score([row(side)], ("p95",)) == pytest.approx(math.log((0.10 + d) / (0.05 + d)))

    def p95(v: float, b: float) -> float:
        return objective_score([(100, {"p95": {"side": v, "best_baseline": b, "better": "lower"}})], ("p95",))
    assert p95(0.0, 0.05) > p95(0.001, 0.05) > 0 and p95(0.05, 0.0) < 0
    # the mean runs over scales too; the same scale twice changes nothing
    assert objective_score([row(side), row(side)], ("carlini",)) == pytest.approx(math.log(0.21 / 0.11))
    # a variant equal to the best baseline scores 0
    assert objective_score([row(uncond)], ("ams_cumulative/high", "carlini")) == pytest.approx(0.0)


def test_choose_keeps_base_unless_a_variant_beats_it():
    v = {"variants": {BASE: {"objective": {"side": 0.1}}, "a": {"objective": {"side": 0.1}},
                      "b": {"objective": {"side": 0.05}}}}
    assert choose(v, "side") == BASE  # a tie is not a win
    v["variants"]["b"]["objective"]["side"] = 0.2
    assert choose(v, "side") == "b"


def test_bad_variant_settings_are_clear_errors(tmp_path):
    bc = tiny_bench()
    with pytest.raises(ValueError, match="'base' is reserved"):
        VariantsBenchConfig(bench=bc, variants={BASE: {}})
    with pytest.raises(ValueError, match="heldout_seed=1 must differ from validation_seed"):
        VariantsBenchConfig(bench=bc, validation_seed=1, heldout_seed=1)
    with pytest.raises(ValueError, match="methods=\\['cond'\\]"):
        VariantsBenchConfig(bench=bc, methods=("cond",))
    with pytest.raises(ValueError, match="objective metric 'ams/'|objective metric 'amz"):
        VariantsBenchConfig(bench=bc, objective=("amz/high",))
    with pytest.raises(ValueError, match="x: 'extract.n' cannot be varied"):
        VariantsBenchConfig(bench=bc, variants={"x": {"extract.n": 10}})
    with pytest.raises(ValueError, match="x: 'extract.stop_unseen' cannot be varied"):  # SIDE's budget alone
        VariantsBenchConfig(bench=bc, variants={"x": {"extract.stop_unseen": 0.1}})
    # written as YAML's nested mappings they passed every check (a variant scored at 4x the baselines' N_G)
    with pytest.raises(ValueError, match="x: 'extract.n' cannot be varied"):
        VariantsBenchConfig(bench=bc, variants={"x": {"extract": {"n": 24}}})
    with pytest.raises(ValueError, match="x: 'sample.seed' cannot be varied"):
        VariantsBenchConfig(bench=bc, variants={"x": {"sample": {"seed": 7}}})
    with pytest.raises(ValueError, match="base: 'evaluate.carlini_n' cannot be varied"):
        VariantsBenchConfig(bench=bc, base={"evaluate": {"carlini_n": 10}})
    nested = VariantsBenchConfig(bench=bc, variants={"x": {"extract": {"scale": 2.0}}})
    assert nested.variants == {"x": {"extract.scale": 2.0}} and nested.run_config("x").extract.scale == 2.0
    for seed in ("sample.seed", "surrogate.random_state", "classifier.seed", "lora.seed"):  # (the replicate set it
        with pytest.raises(ValueError, match=f"x: '{seed}' cannot be varied: the replicate sets every seed"):  # back)
            VariantsBenchConfig(bench=bc, variants={"x": {seed: 7}})
    # a K no synthetic set of the bench can cluster: found after the target trained and the base run was made
    with pytest.raises(ValueError, match=r"bigk: surrogate K=\d+ must be <= the number of synthetic images"):
        VariantsBenchConfig(bench=bc, variants={"bigk": {"surrogate.n_clusters": bc.run.sample.n + 1}})
    from side_extract.bench.extraction import run_extraction_bench
    from side_extract.bench.variants import run_variants_bench

    stopping = type(bc)(**{**bc.__dict__, "run": dataclasses.replace(
        bc.run, extract=dataclasses.replace(bc.run.extract, stop_unseen=0.1))})
    with pytest.raises(ValueError, match="side bench extraction: extract.stop_unseen=0.1 is not supported here"):
        run_extraction_bench(stopping, "/nonexistent")  # refused before anything is read or made
    with pytest.raises(ValueError, match="side bench variants: extract.stop_unseen=0.1 is not supported here"):
        run_variants_bench(VariantsBenchConfig(bench=stopping), "/nonexistent")
    with pytest.raises(ValueError, match="base: 'evaluate.carlini_n' cannot be varied"):
        VariantsBenchConfig(bench=bc, base={"evaluate.carlini_n": 10})
    with pytest.raises(ValueError, match="unknown config key.*scalez"):  # checked before anything runs
        VariantsBenchConfig(bench=bc, variants={"x": {"extract.scalez": 1}})
    for name in ("validation_seed", "heldout_seed"):  # refused up front: it failed after the targets trained
        with pytest.raises(ValueError, match=f"{name}=-1 must be an integer >= 0"):
            VariantsBenchConfig(bench=bc, variants={"x": {}}, **{name: -1})
    empty = tmp_path / "empty.yaml"
    empty.write_text("base: {extract.scale: 3}\n")  # ran the base alone
    with pytest.raises(ValueError, match="'variants' names none"):
        load_variants_file(empty)
    twice = tmp_path / "twice.yaml"
    twice.write_text("variants:\n  1: {extract.scale: 3}\n  '1': {extract.scale: 5}\n")  # kept one of the two
    with pytest.raises(ValueError, match="variant name\\(s\\) \\['1'\\] given twice"):
        load_variants_file(twice)
    bad = tmp_path / "v.yaml"
    bad.write_text("base: {}\nvariant: {}\n")
    with pytest.raises(ValueError, match="unknown top-level key.*variant"):
        load_variants_file(bad)
    r = CliRunner().invoke(app, ["bench", "variants", "--variants", str(bad)])
    assert r.exit_code != 0 and "unknown top-level key" in r.output


def test_variants_choose_on_validation_and_report_on_heldout(tmp_path, one_thread):
    bc = dataclasses.replace(tiny_bench(), scales=(20,), lambdas=(), n_clusters=(), taus=())
    vf = tmp_path / "variants.yaml"
    vf.write_text("base: {extract.scale: 1.0}\nvariants:\n  lam0: {extract.scale: 0.0}\n"
                  "  k2: {surrogate.n_clusters: 2}\n  ksel: {surrogate.select_k: [2, 3]}\n"
                  "  ddpm: {extract.scheduler: ddpm}\n  lam2-shared: {extract.scale: 2.0, extract.cond_scale: null}\n")
    base, variants = load_variants_file(vf)
    vc = VariantsBenchConfig(bench=bc, base=base, variants=variants, validation_seed=3, heldout_seed=4)
    data = run_variants_bench(vc, tmp_path / "cache", command="side bench variants")
    val = data["validation"]
    assert val["seed"] == 3 and list(val["variants"]) == [BASE, "lam0", "k2", "ksel", "ddpm", "lam2-shared"]
    s = val["scales"][0]
    assert s["n_train"] == 20 and set(s["baselines"]) == {"cond", "uncond"}
    # lambda 0 is unguided: it reproduces UnCond exactly, so it scores 0 against the best baseline only
    # where UnCond is that baseline, and its metrics equal UnCond's
    assert s["variants"]["lam0"]["methods"]["side"]["ams"] == s["baselines"]["uncond"]["ams"]
    # a variant shares the base run's stages and recomputes only what it changes
    lam0 = json.loads((Path(s["variants"]["lam0"]["run"]) / "manifest.json").read_text())["stages"]
    assert lam0["classifier"].get("shared_from") and not lam0["extraction/side"].get("shared_from")
    k2 = json.loads((Path(s["variants"]["k2"]["run"]) / "manifest.json").read_text())["stages"]
    assert k2["synthetic"].get("shared_from") and not k2["surrogate"].get("shared_from")
    assert s["variants"][BASE]["run"].endswith("rep-3")
    # K by silhouette: the chosen K is one of the candidates and every candidate's score is recorded
    clusters = json.loads((Path(s["variants"]["ksel"]["run"]) / "surrogate" / "clusters.json").read_text())
    assert set(clusters["k_scores"]) == {"2", "3"} and clusters["n_clusters"] == int(max(
        clusters["k_scores"], key=lambda k: (clusters["k_scores"][k], -int(k))))
    # a variant with another sampler is measured against the baselines under that sampler as well
    assert set(s["variants"]["ddpm"]["own_baselines"]) == {"cond (ddpm)", "uncond (ddpm)"}
    # K moves SIDE's clusters, not Cond (its clean classifier learns the training set's labels) nor UnCond: both are
    # the base run's, shared and not made again
    assert s["variants"]["k2"]["own_baselines"] == {} and set(s["variants"]["k2"]["methods"]) == {"side"}
    assert k2["extraction/uncond"].get("shared_from") and k2["extraction/cond"].get("shared_from")
    # a variant whose lambda Cond shares (cond_scale null) is set against Cond at that lambda as well (it was scored
    # against the base's Cond alone: only a sampler change reran the baselines); UnCond is the base run's
    shared = json.loads((Path(s["variants"]["lam2-shared"]["run"]) / "manifest.json").read_text())["stages"]
    assert set(s["variants"]["lam2-shared"]["own_baselines"]) == {"cond (lam2-shared)"}
    assert shared["extraction/uncond"].get("shared_from") and not shared["extraction/cond"].get("shared_from")
    assert s["variants"]["lam2-shared"]["own_baselines"]["cond (lam2-shared)"] != s["baselines"]["cond"]
    assert s["variants"]["ddpm"]["own_baselines"]["uncond (ddpm)"]["ams"] != s["baselines"]["uncond"]["ams"] or \
        s["variants"]["ddpm"]["own_baselines"]["uncond (ddpm)"]["p95"] != s["baselines"]["uncond"]["p95"]
    assert s["variants"]["ddpm"]["ratios"]["side"]["carlini"]["best_baseline_method"] in {
        "cond", "uncond", "cond (ddpm)", "uncond (ddpm)"}
    dv = s["variants"]["ddpm"]
    four = {**s["baselines"], **dv["own_baselines"]}
    fresh = ratios_to_best_baseline({"side": dv["methods"]["side"], **four}, baselines=tuple(four))["side"]
    assert val["variants"]["ddpm"]["objective"]["side"] == pytest.approx(objective_score([(6, fresh)], vc.objective))
    scores = {n: v["objective"]["side"] for n, v in val["variants"].items()}
    assert data["chosen"]["side"] == choose(val, "side")
    assert scores[data["chosen"]["side"]] == max(scores.values())
    # the held-out seed runs only base and the chosen variant
    ho = data["heldout"]
    assert ho["seed"] == 4 and list(ho["variants"]) == list(dict.fromkeys([BASE, data["chosen"]["side"]]))
    assert ho["scales"][0]["run"].endswith("rep-4")
    json_path, md_path = write_variants_results(data, tmp_path / "out")
    md = md_path.read_text()
    assert render_variants_markdown(json.loads(json_path.read_text())) == md
    assert "held-out seed 4" in md and "`extract.scale=0.0`" in md
    # SIDE alone was tuned, and the held-out ✓ is one seed's: the file says so (it read as a held-out win)
    assert f"**Not the fair protocol.** SIDE is the best of {len(val['variants'])} settings" in md
    assert "Cond and UnCond are not tuned" in md and "one seed without an interval" in md
    # rerunning is free: every stage is cached
    again = run_variants_bench(vc, tmp_path / "cache")
    assert again["validation"]["variants"] == val["variants"]


def test_what_a_variants_bench_cannot_run_is_refused_before_its_first_run(tmp_path, one_thread):
    """A review's finds: a replicate seed of 2**32 was accepted and refused by the seeds' own check after the target
    was trained and the validation seed run; a variant the target cannot run (extract.steps 5000 of its 1000
    timesteps) was found when its turn came, after the base run and the variants before it; an objective band the
    bands file does not name was a bare KeyError after the validation runs; an --out that cannot be written was found
    after the whole benchmark. Each is refused now before any run, by name."""
    from side_extract.bench.variants import run_variants_bench

    bc = dataclasses.replace(tiny_bench(), scales=(20,), lambdas=(), n_clusters=(), taus=())
    with pytest.raises(ValueError, match=r"heldout_seed=4294967296 must be an integer in \[0, 2\*\*32\)"):
        VariantsBenchConfig(bench=bc, variants={"lam0": {"extract.scale": 0.0}}, validation_seed=3,
                            heldout_seed=2**32)
    late = VariantsBenchConfig(bench=bc, variants={"ok": {"extract.scale": 0.0}, "bad": {"extract.steps": 5000}},
                               validation_seed=3, heldout_seed=4)
    with pytest.raises(ValueError, match=r"^variant bad: the run cannot start:\n.*extract.steps=5000"):
        run_variants_bench(late, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("runs/*/rep-3"))  # (the target and bands are made; no run is)
    band = VariantsBenchConfig(bench=bc, variants={"v": {"extract.scale": 0.0}}, validation_seed=3, heldout_seed=4,
                               objective=("ams_cumulative/middle",))
    with pytest.raises(ValueError, match=r"objective metric 'ams_cumulative/middle': the benchmark's bands are "):
        run_variants_bench(band, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("runs/*/rep-3"))
    vf = tmp_path / "v.yaml"
    vf.write_text("variants: {lam0: {extract.scale: 0.0}}\n")
    (tmp_path / "file").write_text("")
    for args in (["--heldout-seed", str(2**32)], ["--out", str(tmp_path / "file" / "results")]):
        r = CliRunner().invoke(app, ["--threads", "1", "bench", "variants", "--variants", str(vf), "--scales", "300",
                                     "--cache", str(tmp_path / "c2"), "--out", str(tmp_path / "o"), *args])
        assert r.exit_code == 2 and "train target" not in r.output, r.output
    assert not (tmp_path / "c2").exists()


def test_variants_and_signals_faults_of_a_review(tmp_path, monkeypatch):
    """A precision variant (bf16 moves UnCond's samples too) was scored against baselines made at fp32; base's seconds
    were taken after its run (0 s); an empty objective made every score NaN and chose base, a repeated metric
    counted twice; a method or a signal named twice was taken (its tables twice; its classifier trained twice)."""
    import time

    import side_extract.bench.variants as variants
    from side_extract import config as cfg
    from side_extract.bench.extraction import ScaleInputs
    from side_extract.bench.signals import run_signals_bench
    from side_extract.pipeline.context import AuditResult

    from test_bench import metrics, tiny_bench

    rc = cfg.RunConfig()
    bf16 = dataclasses.replace(rc, extract=dataclasses.replace(rc.extract, precision="bf16"))
    from side_extract.pipeline.methods import extraction_settings

    assert extraction_settings(bf16.extract, "uncond", None) != extraction_settings(rc.extract, "uncond", None)
    for bad in ((), ("carlini", "carlini")):
        with pytest.raises(ValueError, match="must name at least one metric, each once"):
            VariantsBenchConfig(bench=tiny_bench(), objective=bad)
    with pytest.raises(ValueError, match="named once"):
        VariantsBenchConfig(bench=tiny_bench(), methods=("side", "side"))
    with pytest.raises(ValueError, match="named once"):
        run_signals_bench(tiny_bench(), 20, tmp_path, signals=("paper", "paper"))

    bc = dataclasses.replace(tiny_bench(), scales=(20,), lambdas=(), n_clusters=(), taus=())
    vc = VariantsBenchConfig(bench=bc, variants={"lam0": {"extract.scale": 0.0}}, objective=("carlini",))
    m = metrics(0.1, 0.1, 0.1, 0.1, 0.0)

    def audit(path, rc, **kw):  # each run takes a second
        time.sleep(1.0)
        return AuditResult(Path(path), {}, {k: m for k in rc.extract.methods})

    monkeypatch.setattr(variants, "scale_inputs", lambda *a, **k: ScaleInputs(20, tmp_path / "t.npz", {
        "path": str(tmp_path / "model")}, tmp_path / "b.json"))
    monkeypatch.setattr(variants, "load_run_target", lambda *a, **k: None)
    monkeypatch.setattr(variants, "_check_variants", lambda *a, **k: None)
    monkeypatch.setattr(variants, "run_audit", audit)
    monkeypatch.setattr(variants, "share_stages", lambda *a, **k: [])
    monkeypatch.setattr(variants, "changed_baselines", lambda *a, **k: [])
    out = variants.run_seed(vc, 1, vc.names, tmp_path / "cache")
    seconds = {n: v["seconds"] for n, v in out["scales"][0]["variants"].items()}
    assert seconds[BASE] >= 1.0 and seconds["lam0"] >= 1.0, seconds
