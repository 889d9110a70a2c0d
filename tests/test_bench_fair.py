"""The fair protocol: replicates redraw everything downstream of the target, every guided method gets the
same grid, settings are chosen on validation replicates only, bootstrap intervals by hand."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from side_extract import config as cfg
from side_extract.bench.extraction import ExtractionBenchConfig
from side_extract.bench.intervals import bootstrap_ratios, count_ratios
from side_extract.bench.protocol import (BASELINES, FairBenchConfig, best_setting, budget_curve, budget_grid,
                                         chosen_on_validation, replicate_config, reused_tuning, run_fair_bench,
                                         render_fair_markdown, tuning_budget, tuning_score, write_fair_results)
from side_extract.bench.protocol import _budget_line
from side_extract.data import load_shards
from side_extract.models.target import model_fingerprint

from test_bench import tiny_bench


def test_a_replicate_redraws_every_seed_downstream_of_the_target():
    rc = replicate_config(cfg.RunConfig(), 7)
    assert (rc.sample.seed, rc.surrogate.random_state, rc.classifier.seed, rc.clean_classifier.seed,
            rc.lora.seed, rc.extract.seed) == (7, 7, 7, 7, 7, 7)  # side-lora's fine-tuning too (it kept seed 0)
    with pytest.raises(ValueError, match="replicate=-1 must be an integer >= 0"):
        replicate_config(cfg.RunConfig(), -1)


def test_signals_bench_refuses_a_negative_replicate_before_training_a_target(tmp_path):
    from side_extract.bench.signals import run_signals_bench

    with pytest.raises(ValueError, match="replicate=-1 must be an integer >= 0"):  # it failed after the target trained
        run_signals_bench(tiny_bench(), 20, tmp_path / "cache", replicate=-1)
    assert not (tmp_path / "cache").exists()
    # more clusters than synthetic images (`--n-synthetic 50` under K 100): found after 3,000 steps of target training
    bc = tiny_bench()
    few = dataclasses.replace(bc, run=dataclasses.replace(bc.run, surrogate=dataclasses.replace(
        bc.run.surrogate, n_clusters=bc.run.sample.n + 1)))
    with pytest.raises(ValueError, match=r"surrogate K=\d+ must be <= the number of synthetic images sample.n"):
        run_signals_bench(few, 20, tmp_path / "cache")
    with pytest.raises(ValueError, match=r"surrogate K=\d+ must be <= the number of synthetic images sample.n"):
        run_fair_bench(FairBenchConfig(bench=few), tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_validation_and_heldout_replicates_must_differ():
    with pytest.raises(ValueError, match=r"replicates \[2\] are both"):
        FairBenchConfig(validation_replicates=(1, 2), heldout_replicates=(2, 3))
    with pytest.raises(ValueError, match="select_metric"):
        FairBenchConfig(select_metric="ums")
    # each accepted before, and found hours later (a seed of -1, a KeyError) or never (a repeat: an interval of no
    # spread from one replicate counted twice)
    for kw, says in ((dict(heldout_replicates=(11, 11)), r"heldout_replicates=\[11, 11\] must be distinct"),
                     (dict(validation_replicates=(-1,)), r"validation_replicates=-1 must be an integer >= 0"),
                     (dict(heldout_replicates=(11, 12.5)), r"heldout_replicates=12.5 must be an integer >= 0"),
                     (dict(select_metric="ums/bogus"), "band 'bogus' is not one of the run's bands"),
                     # (one draw's spread is 0: the interval was the replicates' alone, its caption said otherwise)
                     (dict(n_bootstrap=1), "n_bootstrap=1 must be at least 10")):
        with pytest.raises(ValueError, match=says):
            FairBenchConfig(**kw)


def test_bench_command_lines_that_meant_nothing_are_refused_at_once(tmp_path):
    """A form's value that is no YAML (a traceback), a form name given twice (the first dropped without a word), an
    --out that is a file (found when writing, after the work), an empty list of theory checks (all 0 passed)."""
    from typer.testing import CliRunner

    from side_extract.cli.main import app

    (tmp_path / "afile").write_text("")
    for args, says in ((["bench", "fair", "--scales", "30", "--form", "x=side,extract.scale=[1"], "is not YAML"),
                       (["bench", "fair", "--scales", "30", "--form", "x=side", "--form", "x=cond"], "given twice"),
                       (["bench", "compute", "--quick", "--out", str(tmp_path / "afile")], "is not a folder"),
                       (["bench", "extraction", "--quick", "--out", str(tmp_path / "o"), "--cache",
                         str(tmp_path / "afile")], "is not a folder"),  # (after the header: "Not a directory")
                       (["bench", "variants", "--variants", str(tmp_path / "afile"), "--out", str(tmp_path / "o"),
                         "--no-heldout", "--heldout-seed", "1", "--heldout", "all"],  # (dropped without a word)
                        "--no-heldout runs no held-out seed, so --heldout-seed 1, --heldout all would not be read"),
                       (["theory", "check", "--only", ","], "(none named)")):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2 and says in " ".join(r.output.split()) and "Traceback" not in r.output, r.output


def test_a_benchmark_that_could_not_mean_what_it_says_is_refused():
    """A form that pins a seed (its held-out replicates would repeat one run), sets N_G or the bands; entries with
    no baseline to set them against (crashed after every run); one held-out replicate (a single run)."""
    for key in ("sample.seed", "extract.seed", "surrogate.random_state", "extract.n", "evaluate.bands"):
        with pytest.raises(ValueError, match=f"may not set {key}"):
            FairBenchConfig(forms={"f": {"method": "side", key: 0}})
    # the same settings as nested mappings (YAML's reading of --form f=side,sample={seed: 7}) had passed, and the
    # form then drew one synthetic set on every replicate
    for section, key in (("sample", "seed"), ("surrogate", "random_state"), ("classifier", "seed"),
                         ("evaluate", "carlini_n"), ("extract", "n")):
        with pytest.raises(ValueError, match=f"may not set {section}.{key}"):
            FairBenchConfig(forms={"f": {"method": "side", section: {key: 7}}})
    assert FairBenchConfig(forms={"f": {"method": "side", "sample": {"n": 700}}}).forms == {
        "f": {"method": "side", "sample.n": 700}}  # what the equal-samples check (sample.n) reads
    with pytest.raises(ValueError, match="given twice"):
        FairBenchConfig(forms={"f": {"method": "side", "sample.n": 7, "sample": {"n": 8}}})
    # what every entry is measured with alike: the target, the training set and (but for a baseline form) the
    # extraction's sampler; and what the tuning grid sets (the grid's value replaced the form's without a word)
    for key in ("model", "train", "extract.eta", "extract.scheduler", "extract.steps", "extract.stop_unseen"):
        for method in ("side", "memguide"):
            with pytest.raises(ValueError, match=f"may not set {key}"):
                FairBenchConfig(forms={"f": {"method": method, key: 1}})
    for key in ("model", "extract.stop_unseen"):  # a baseline form may change the sampler only (next test)
        with pytest.raises(ValueError, match=f"may not set {key}"):
            FairBenchConfig(forms={"f": {"method": "uncond", key: 1}})
    # under dedup-driven stopping, what it reads besides stop_unseen is every method's too (a form's smaller
    # dedup_threshold never stopped while the baselines stopped at the bench's: a review's find); without it,
    # adaptive allocation's own settings
    stopping = cfg.RunConfig(extract=cfg.ExtractConfig(stop_unseen=0.1, rounds=4))
    for key, value in (("extract.dedup_threshold", 0.001), ("extract.rounds", 2)):
        for method in ("side", "memguide", "uncond"):
            with pytest.raises(ValueError, match=f"may not set {key}"):
                FairBenchConfig(bench=ExtractionBenchConfig(run=stopping), forms={"f": {"method": method, key: value}})
        FairBenchConfig(forms={"f": {"method": "side", "extract.allocation": "adaptive", key: value}})
    for key in ("extract.scale", "extract.temperature", "extract.memguide_scale", "lora.guidance_scale"):
        with pytest.raises(ValueError, match=f"may not set {key}: the tuning grid sets it"):
            FairBenchConfig(forms={"f": {"method": "side", key: 1.0}})
    with pytest.raises(ValueError, match="add cond or uncond"):
        FairBenchConfig(methods=("side", "side-teacher"))
    with pytest.raises(ValueError, match="at least 2"):
        FairBenchConfig(heldout_replicates=(11,))


def test_a_methods_interval_does_not_depend_on_the_other_methods_in_the_table():
    side, uncond = [_stats([0, 1, 2, 2], [1, 1, 1, 0])] * 2, [_stats([5, 5, 6, 7], [1, 1, 0, 1])] * 2
    weak = [_stats([9, 9, 9, 9], [0, 0, 0, 1])] * 2  # a Cond that is not the best baseline
    alone = bootstrap_ratios({"side": side, "uncond": uncond}, ("distinct_nn/mid", "ams_cum/mid"), 200, ("side",),
                             BASELINES)["side"]
    among = bootstrap_ratios({"cond": weak, "side": side, "uncond": uncond}, ("distinct_nn/mid", "ams_cum/mid"), 200,
                             ("side",), BASELINES)["side"]
    for k in alone:
        assert among[k]["best_baseline_method"] == "uncond" and among[k]["ci95"] == alone[k]["ci95"], k


def _stats(nn, reach):
    nn = np.asarray(nn)
    return {"nn": nn, "carlini": np.asarray(reach, bool), "reach/mid": np.asarray(reach, bool)}


def test_settings_are_tuned_at_the_reported_budget_unless_told_otherwise():
    fc = FairBenchConfig()
    assert fc.validation_n == fc.bench.run.extract.n
    assert FairBenchConfig(validation_n=300).validation_n == 300


def test_cli_tunes_at_n_generated_by_default(monkeypatch, tmp_path):
    """`side bench fair` without --validation-n hands the protocol --n-generated (it used to hand it 500)."""
    from typer.testing import CliRunner

    from side_extract.bench import protocol
    from side_extract.cli.main import app

    seen = {}

    def stop(fc, *a, **k):
        seen["validation_n"] = fc.validation_n
        seen["stop_unseen"] = fc.bench.run.extract.stop_unseen
        seen["command"] = k.get("command")
        raise SystemExit(0)

    monkeypatch.setattr(protocol, "run_fair_bench", stop)
    CliRunner().invoke(app, ["bench", "fair", "--out", str(tmp_path), "--cache", str(tmp_path), "--n-generated", "77"])
    assert seen["validation_n"] == 77 and "--memguide-scales" not in seen["command"]
    # memguide as a form only: its grid is part of the recorded command (it was left out)
    CliRunner().invoke(app, ["bench", "fair", "--out", str(tmp_path), "--cache", str(tmp_path), "--methods", "uncond",
                             "--memguide-scales", "1,2,3,4,5,6", "--form", "mga=memguide,extract.memguide_avoid=1"])
    assert "--memguide-scales 1,2,3,4,5,6" in seen["command"]
    # dedup-driven stopping is a setting of the comparison: every method's, recorded in the command
    CliRunner().invoke(app, ["bench", "fair", "--out", str(tmp_path), "--cache", str(tmp_path), "--stop-unseen", "0.3"])
    assert seen["stop_unseen"] == 0.3 and "--stop-unseen 0.3" in seen["command"]


def test_bootstrap_ratio_by_hand():
    """SIDE reaches 4 distinct nearest images in 4 generations, Cond 2 and UnCond 1: ratio 2 against Cond.
    Every generation of SIDE and UnCond reaches the band, half of Cond's: AMS ratio 1 against UnCond."""
    stats = {"side": [_stats([0, 1, 2, 3], [1, 1, 1, 1])] * 2, "cond": [_stats([0, 0, 1, 1], [1, 0, 1, 0])] * 2,
             "uncond": [_stats([5, 5, 5, 5], [1, 1, 1, 1])] * 2}
    r = bootstrap_ratios(stats, ("distinct_nn/mid", "ams_cum/mid"), 300, ("side",), BASELINES)["side"]
    d = r["distinct_nn/mid"]
    assert d["best_baseline_method"] == "cond" and d["ratio"] == pytest.approx((4 / 4) / (2 / 4))
    assert 0 < d["ci95"][0] < 2.0 < d["ci95"][1] < float("inf") and d["replicates"] == 2  # resampled: some spread
    a = r["ams_cum/mid"]
    assert a["best_baseline_method"] == "uncond" and a["ratio"] == 1.0 and a["ci95"] == [1.0, 1.0]
    assert not a["excludes_1"]


def test_a_share_interval_resamples_the_generations_by_hand():
    """SIDE's share 1/2 of n = 4 generations against UnCond's 1 (no spread): ratio 1/2; the bootstrap variance of the
    share is p (1 - p) / n = 1/16, so the log ratio's standard error is 0.25 / 0.5 = 0.5 and the interval
    0.5 exp(+-1.96 * 0.5) = [0.188, 1.332]."""
    stats = {"side": [_stats([0, 1, 2, 3], [1, 1, 0, 0])], "uncond": [_stats([5] * 4, [1] * 4)]}
    r = bootstrap_ratios(stats, ("ams_cum/mid",), 20000, ("side",), ("uncond",))["side"]["ams_cum/mid"]
    assert r["ratio"] == 0.5
    assert r["ci95"] == pytest.approx([0.5 * np.exp(-1.96 * 0.5), 0.5 * np.exp(1.96 * 0.5)], rel=0.03)


def test_a_tie_on_validation_goes_to_the_smaller_lambda_even_through_a_rounding_error():
    """Two validation replicates: lambda 3 scores 0.1 and 0.2, lambda 1 0.15 and 0.15: the same mean, but the
    floats differ in the last bit (lambda 3's is the larger). The documented rule (the smaller lambda, then the
    smaller temperature) must decide, not the rounding."""
    means = {"1,1": float(np.mean([0.15, 0.15])), "3,1": float(np.mean([0.1, 0.2])), "10,1": 0.1}
    assert means["3,1"] > means["1,1"]  # by a rounding error
    assert best_setting([(1.0, 1.0), (3.0, 1.0), (10.0, 1.0)], means) == (1.0, 1.0)
    assert best_setting([(1.0, 2.0), (1.0, 1.0)], {"1,2": 0.2, "1,1": 0.2}) == (1.0, 1.0)
    assert best_setting([(1.0, 1.0), (3.0, 1.0)], {"1,1": 0.1, "3,1": 0.2}) == (3.0, 1.0)


def test_the_headline_form_is_chosen_on_validation_not_on_the_heldout_replicates():
    """Forms a and b tie on validation (12 %), b has the higher held-out ratio: the headline is a (the earlier of the
    tied), b is named as tied and as the held-out highest. The label-free pick is made among memguide entries only,
    and a baseline is never a pick."""
    c = {"select_metric": "ums_cumulative/mid", "methods": ["side", "memguide", "cond", "uncond"],
         "forms": {"a": {"method": "side"}, "b": {"method": "side"}, "mg-avoid": {"method": "memguide"}}}
    chosen = {"side": [1.0, 1.0], "cond": [1.0, 2.0], "uncond": None, "memguide": [60.0, 0.0], "a": [3.0, 1.0],
              "b": [1.0, 2.0], "mg-avoid": [60.0, 0.0]}
    # b's mean is a's summed in another order, a rounding error above it (np.mean([.1, .2, .3]) != np.mean([.3, .2, .1])): still a tie
    means = {"side": {"1,1": 0.10, "3,1": 0.09}, "cond": {"1,2": 0.30}, "memguide": {"60,0": 0.18, "30,0": 0.17},
             "a": {"1,1": 0.11, "3,1": float(np.mean([.3, .2, .1]) / 5 + 0.08)},
             "b": {"1,1": 0.10, "1,2": float(np.mean([.1, .2, .3]) / 5 + 0.08)}, "mg-avoid": {"60,0": 0.20}}
    assert means["b"]["1,2"] > means["a"]["3,1"] == pytest.approx(0.12)  # by a rounding error
    ratio = {"side": 0.9, "a": 1.0, "b": 1.1, "memguide": 1.3, "mg-avoid": 1.47}
    ratios = {m: {"distinct_nn/mid": {"side": 100 * v, "ratio": v, "ci95": [v - 0.1, v + 0.1], "best_baseline_method": "cond",
                                      "excludes_1": v - 0.1 > 1}} for m, v in ratio.items()}
    picks = chosen_on_validation(c, {"tuning": {"chosen": chosen, "mean_by_setting": means},
                                     "heldout": {"ratios": ratios}})
    assert picks["side"]["entry"] == "a" and picks["side"]["validation"] == pytest.approx(0.12)
    assert picks["side"]["tied"] == ["b"]
    assert picks["side"]["heldout_highest"] == "b" and picks["side"]["distinct_nn/mid"]["ratio"] == 1.0
    assert picks["side"]["setting"] == [3.0, 1.0]
    assert picks["label_free"]["entry"] == "mg-avoid" and picks["label_free"]["tied"] == []
    assert picks["label_free"]["heldout_highest"] == "mg-avoid"
    # held-out means that tie (one total spread otherwise over the replicates: a last-bit difference, or equal) are a
    # tie there too: the pick is the highest, not the entry a float or the order named (a review's find)
    for a_mean, b_mean in ((2000 / 9 + 3e-14, 2000 / 9), (200.0, 200.0)):
        tied = {**ratios, "a": {"distinct_nn/mid": {**ratios["a"]["distinct_nn/mid"], "side": a_mean}},
                "b": {"distinct_nn/mid": {**ratios["b"]["distinct_nn/mid"], "side": b_mean}}}
        higher = {**means, "b": {**means["b"], "1,2": 0.13}}  # b the validation pick now
        pick = chosen_on_validation(c, {"tuning": {"chosen": chosen, "mean_by_setting": higher},
                                        "heldout": {"ratios": tied}})["side"]
        assert pick["entry"] == "b" and pick["heldout_highest"] == "b", (a_mean, b_mean, pick)
    # only baselines and label-free entries: no SIDE pick
    assert set(chosen_on_validation({**c, "forms": {}}, {"tuning": {"chosen": chosen, "mean_by_setting": {
        "memguide": means["memguide"]}}, "heldout": {"ratios": {"memguide": ratios["memguide"]}}})) == {"label_free"}


def test_tuning_budget_counts_each_family_and_names_an_unequal_one():
    """Three SIDE forms of 6 settings each against Cond's 6: the best SIDE form is the best of 18, and the report says
    so; a SIDE form of 6 against Cond's 6 is equal; against UnCond alone there is nothing to even out."""
    c = {"methods": ["side", "memguide", "cond", "uncond"], "validation_replicates": [1],
         "forms": {"a": {"method": "side"}, "b": {"method": "side"}, "mg-avoid": {"method": "memguide"}}}
    six = {f"{s:g},{t:g}": 0.1 for s in (1, 3, 10) for t in (1, 2)}
    s = {"tuning": {"mean_by_setting": {"side": six, "a": six, "b": six, "cond": six, "memguide": dict(list(six.items())[:3]),
                                        "mg-avoid": dict(list(six.items())[:3])}}}
    assert tuning_budget(c, s) == {"side": {"side": 6, "a": 6, "b": 6}, "label_free": {"memguide": 3, "mg-avoid": 3},
                                   "cond": {"cond": 6}, "uncond": {"uncond": 0}}
    line = _budget_line(c, s)
    assert line.startswith("Tuning budget (settings tried on validation replicates [1]; a headline entry is the best of "
                           "its family's): SIDE forms 18 (side 6, a 6, b 6); label-free entries 6 (memguide 3, mg-avoid 3); "
                           "cond 6; uncond 0 (nothing to tune).")
    assert "**Unequal:** the best of the SIDE forms is the best of 18 settings, cond the best of 6" in line
    assert "cond forms (`--form NAME=cond,key=value`) or a run of cond alone on a grid of 18 settings" in line
    assert line.count("Unequal") == 1  # label-free: 6 against 6
    one = {"methods": ["side", "cond"], "validation_replicates": [1]}
    assert "Unequal" not in _budget_line(one, {"tuning": {"mean_by_setting": {"side": six, "cond": six}}})
    lora = {"methods": ["uncond"], "validation_replicates": [1], "forms": {"lora": {"method": "side-lora"}}}
    assert _budget_line(lora, {"tuning": {"mean_by_setting": {"lora": six}}}).endswith(
        "The SIDE forms' 6 settings have no counterpart: the only baseline, uncond, has nothing to tune.")
    # the names come from the entries: an UnCond form is a second baseline with nothing to tune
    lora["forms"]["uncond-ddpm"] = {"method": "uncond"}
    assert _budget_line(lora, {"tuning": {"mean_by_setting": {"lora": six}}}).endswith(
        "The SIDE forms' 6 settings have no counterpart: the baselines (uncond, uncond-ddpm) have nothing to tune.")


def test_baseline_forms_join_the_baselines_and_even_the_tuning_budget(tmp_path, one_thread, monkeypatch):
    """A form of Cond (guidance only in the first half of the noise levels) is one more baseline: tuned on the grid
    like Cond, run on every held-out replicate, never set against a baseline itself; each SIDE ratio is against
    the best of the four baselines, and with it Cond's family has as many settings as the SIDE form."""
    import side_extract.bench.protocol as protocol

    # the tiny model reaches no training image, so every count is 0 and the best baseline is the first by any
    # rule: what shows that the held-out ratios and the budget curve weigh the forms too is what they are given
    given = []

    def spy(stats, metrics, n_boot, side_forms, baselines=BASELINES, seed=0):
        given.append(tuple(baselines))
        return bootstrap_ratios(stats, metrics, n_boot, side_forms, baselines, seed=seed)

    monkeypatch.setattr(protocol, "bootstrap_ratios", spy)
    bc = tiny_bench()
    bc = type(bc)(**{**bc.__dict__, "scales": (20,)})
    fc = FairBenchConfig(bench=bc, methods=("side", "cond", "uncond"), scales_grid=(0.0, 1.0), temperatures=(1.0,),
                         validation_replicates=(1,), heldout_replicates=(2, 3), validation_n=4, n_bootstrap=20,
                         equal_samples=False, forms={"cond-late": {"method": "cond", "extract.t_lo": 0.5},
                                                     "uncond-ddpm": {"method": "uncond", "extract.eta": 0.5}})
    assert fc.baselines == ("cond", "uncond", "cond-late", "uncond-ddpm") and fc.compared == ("side",)
    data = run_fair_bench(fc, tmp_path / "cache", command="side bench fair (test)")
    s = data["scales"][0]
    assert set(s["tuning"]["mean_by_setting"]) == {"side", "cond", "cond-late"}  # uncond forms have nothing to tune
    assert s["tuning"]["chosen"]["uncond-ddpm"] is None
    h = s["heldout"]
    assert set(h["ratios"]) == {"side"} and set(h["per_replicate"]) == {"side", "cond", "uncond", "cond-late",
                                                                        "uncond-ddpm"}
    curve = h["budget_curve"][-1]
    means = {m: curve["distinct_mid"][m]["mean"] for m in fc.baselines}
    r = h["ratios"]["side"]["distinct_nn/mid"]
    assert r["best_baseline"] == pytest.approx(max(means.values()) / h["n_generated"])  # the best of all four
    assert r["best_baseline_method"] == max(fc.baselines, key=lambda m: (means[m], -fc.baselines.index(m)))
    n_curve = len(h["budget_curve"])  # the held-out ratios, then one call per budget-curve point
    assert given[-(n_curve + 1):] == [fc.baselines] * (n_curve + 1)
    rep = tmp_path / "cache" / "runs"
    assert len(list(rep.glob("*/rep-2/forms/cond-late/evaluation/cond/metrics.json"))) == 1
    assert len(list(rep.glob("*/rep-3/forms/uncond-ddpm/evaluation/uncond/metrics.json"))) == 1
    md = render_fair_markdown(data)
    assert "Forms (a SIDE method, or memguide, or a baseline: one more baseline to pick the best from" in md
    assert ("SIDE forms 2; cond 4 (cond 2, cond-late 2); uncond 0 (nothing to tune: uncond, uncond-ddpm)." in md
            and "Unequal" not in md)
    with pytest.raises(ValueError, match="'method' one of side, side-teacher, side-lora, memguide, cond, uncond"):
        FairBenchConfig(forms={"x": {"method": "nope"}})


def test_equal_samples_ratio_counts_by_hand():
    """SIDE reaches 4 distinct nearest images in its 4 generations; UnCond 6 in its 8 (N_G + N_S): 4 / 6, although
    per generation SIDE's share (1) is above UnCond's (0.75). A resample of SIDE never finds more than 4."""
    side = _stats([0, 1, 2, 3], [1, 1, 1, 1])
    uncond = _stats([0, 0, 1, 1, 2, 3, 4, 5], [1] * 8)
    r = count_ratios({"side": [side, side]}, [uncond, uncond], 200)["side"]
    assert r["side"] == 4 and r["uncond"] == 6 and r["ratio"] == pytest.approx(4 / 6)
    assert r["ci95"][0] <= 4 / 6 <= r["ci95"][1] * 1.5 and r["ci95"][1] <= 4 / 2
    with pytest.raises(ValueError, match="'uncond-samples' must be a new name"):
        FairBenchConfig(forms={"uncond-samples": {"method": "side"}})


def test_budget_curve_reads_prefixes_by_hand():
    """SIDE finds 2 new images in its first 2 generations and then repeats image 0; UnCond finds one image per
    two generations and keeps going: SIDE leads 2/1 at n = 2, trails 4/6 at n = 8."""
    side = _stats([0, 1, 2, 3, 0, 0, 0, 0], [1] * 8)
    uncond = _stats([0, 0, 1, 1, 2, 3, 4, 5], [1] * 8)
    curve = budget_curve({"side": [side, side], "uncond": [uncond, uncond]}, [2, 4, 8], 50, ("side",))
    assert [p["n_generated"] for p in curve] == [2, 4, 8]
    assert [p["distinct_mid"]["side"]["mean"] for p in curve] == [2, 4, 4]
    assert [p["distinct_mid"]["uncond"]["mean"] for p in curve] == [1, 2, 6]
    assert [p["ratios"]["side"]["distinct_nn/mid"]["ratio"] for p in curve] == pytest.approx([2, 2, 4 / 6])
    # a baseline form that finds more (7 of 8) is the best baseline: SIDE's 4 against it
    wide = _stats([0, 1, 2, 3, 4, 5, 6, 0], [1] * 8)
    curve = budget_curve({"side": [side, side], "uncond": [uncond, uncond], "uncond-x": [wide, wide]}, [2, 8], 50,
                         ("side",), baselines=("uncond", "uncond-x"))
    r = curve[-1]["ratios"]["side"]["distinct_nn/mid"]
    assert r["best_baseline_method"] == "uncond-x" and r["ratio"] == pytest.approx(4 / 7)
    assert curve[0]["ratios"]["side"]["distinct_nn/mid"]["best_baseline_method"] == "uncond-x"  # 2 against 1
    assert budget_grid(1000, 300) == [100, 300, 1000] and budget_grid(2000, 1000) == [200, 600, 1000, 2000]
    assert budget_grid(1000, 5000) == [100, 300, 1000]


def test_fair_bench_on_a_tiny_run(tmp_path, one_thread, monkeypatch):
    bc = tiny_bench()
    bc = type(bc)(**{**bc.__dict__, "scales": (20,)})
    fc = FairBenchConfig(bench=bc, methods=("side", "cond", "uncond"), scales_grid=(0.0, 1.0), temperatures=(1.0,), validation_replicates=(1,),
                         heldout_replicates=(2, 3), validation_n=4, n_bootstrap=20)
    data = run_fair_bench(fc, tmp_path / "cache", command="side bench fair (test)")
    json_path, md_path = write_fair_results(data, tmp_path / "out")
    d = json.loads(json_path.read_text())
    s = d["scales"][0]
    chosen = s["tuning"]["chosen"]
    assert chosen["uncond"] is None and all(len(chosen[m]) == 2 for m in ("side", "cond"))
    assert set(s["tuning"]["mean_by_setting"]["cond"]) == set(s["tuning"]["mean_by_setting"]["side"]) == {"0,1", "1,1"}
    assert s["heldout"]["replicates"] == [2, 3] and len(s["heldout"]["per_replicate"]["side"]) == 2
    assert set(s["heldout"]["ratios"]) == {"side"}
    picks = chosen_on_validation(d["config"], s)  # from the written file alone
    pick = picks["side"]  # the only SIDE form, at its chosen setting's validation score
    assert pick["entry"] == "side" and pick["validation"] == s["tuning"]["mean_by_setting"]["side"][
        "{:g},{:g}".format(*chosen["side"])] and "label_free" not in picks
    assert "- best SIDE form: **side** (lambda {:g}, T {:g}; validation".format(*chosen["side"]) in md_path.read_text()
    assert "SIDE forms 2; cond 2; uncond 0 (nothing to tune)." in md_path.read_text()
    curve = s["heldout"]["budget_curve"]
    assert curve[-1]["n_generated"] == s["heldout"]["n_generated"] and "side" in curve[-1]["ratios"]
    for m in ("side", "cond", "uncond"):  # each replicate's count, in the held-out order, for pairing across files
        d_m = curve[-1]["distinct_mid"][m]
        assert len(d_m["per_replicate"]) == 2 and np.mean(d_m["per_replicate"]) == d_m["mean"]
    assert [c / 4 for c in curve[-1]["distinct_mid"]["side"]["per_replicate"]] == pytest.approx(
        s["heldout"]["ratios"]["side"]["distinct_nn/mid"]["per_replicate"])
    assert curve[-1]["ratios"]["side"]["distinct_nn/mid"]["ratio"] == s["heldout"]["ratios"]["side"]["distinct_nn/mid"]["ratio"]
    # each replicate has its own run with its own synthetic set (redrawn, not shared)
    runs = sorted((tmp_path / "cache" / "runs").glob("*/rep-*"))
    assert [p.name for p in runs] == ["rep-1", "rep-2", "rep-3"]
    syn = [load_shards(p / "synthetic").images for p in runs]
    assert not np.array_equal(syn[1], syn[2])
    manifest = json.loads((runs[1] / "manifest.json").read_text())["stages"]
    assert not any(v.get("shared_from") for v in manifest.values())
    assert "Fair extraction benchmark" in md_path.read_text() and "by budget" in md_path.read_text()
    # the trained target itself is recorded (the same config can train to other weights on another machine)
    assert s["target"]["model_sha256"] == model_fingerprint(s["target"]["path"])
    assert s["target"]["trained_with"]["torch_threads"] == 1 and s["target"]["trained_with"]["resumed_from"] == 0
    assert f"model fingerprint `{s['target']['model_sha256'][:16]}`" in md_path.read_text()
    assert ("results rest on the same target only where it agrees; trained on 1 torch thread(s), cpu)."
            in md_path.read_text())
    # equal model samples: UnCond at N_G + N_S in its own sub-run, whose first N_G generations are the N_G run's
    eq = s["heldout"]["equal_samples"]
    n, n_syn = s["heldout"]["n_generated"], bc.run.sample.n
    assert eq["n_generated"] == n + n_syn and eq["n_synthetic"] == n_syn
    for rep in runs[1:]:
        longer = load_shards(rep / "forms" / "uncond-samples" / "extraction" / "uncond")
        assert len(longer) == n + n_syn
        np.testing.assert_array_equal(longer.images[:n], load_shards(rep / "extraction" / "uncond").images)
    assert eq["ratios"]["side"]["side"] == pytest.approx(curve[-1]["distinct_mid"]["side"]["mean"])
    assert eq["uncond"]["mean"] >= curve[-1]["distinct_mid"]["uncond"]["mean"]  # a longer run finds at least as many
    assert "Equal model samples" in md_path.read_text()
    # a re-report takes the earlier run's tuning (no validation grid) and reports the same held-out runs again
    from side_extract.bench import protocol

    with pytest.raises(ValueError, match="differs in scales_grid"):
        reused_tuning(dataclasses.replace(fc, scales_grid=(0.0, 2.0)), (d, "fair.json"))
    older = json.loads(json.dumps(d))  # a file from before an option existed: accepted while it is at its default
    del older["config"]["bench"]["run"]["surrogate"]["memorized_fraction"]
    assert reused_tuning(fc, (older, "older.json"))[20]["chosen"] == chosen
    mem = dataclasses.replace(bc.run.surrogate, memorized_fraction=0.5)
    with pytest.raises(ValueError, match=r"differs in bench\.run\.surrogate\.memorized_fraction"):
        reused_tuning(dataclasses.replace(fc, bench=dataclasses.replace(
            bc, run=dataclasses.replace(bc.run, surrogate=mem))), (older, "older.json"))
    more = dataclasses.replace(fc, heldout_replicates=(2, 3, 4))
    assert reused_tuning(more, (d, "fair.json"))[20]["chosen"] == chosen
    alone = dataclasses.replace(bc.run.classifier, data_parallel=False)  # who trains: the same configuration
    assert reused_tuning(dataclasses.replace(fc, bench=dataclasses.replace(
        bc, run=dataclasses.replace(bc.run, classifier=alone))), (d, "fair.json"))[20]["chosen"] == chosen
    tuning = reused_tuning(dataclasses.replace(fc, n_bootstrap=30), (d, "fair.json"))
    monkeypatch.setattr(protocol, "tune", lambda *a, **k: pytest.fail("the validation grid ran again"))
    again = run_fair_bench(dataclasses.replace(fc, n_bootstrap=30), tmp_path / "cache", tuning=tuning)["scales"][0]
    assert again["tuning"]["chosen"] == chosen and again["tuning"]["reused_from"] == "fair.json"
    assert again["heldout"]["per_replicate"] == s["heldout"]["per_replicate"]
    assert reused_tuning(fc, (json.loads(json.dumps({**d, "scales": [again]})), "rereport.json"))[20]["reused_from"] \
        == "fair.json"  # the file whose run tuned, not the re-report in between
    assert "not checked" not in protocol.render_fair_markdown({**d, "scales": [again]})
    # a file that recorded no target (older): reused, and the report says its target was not checked
    unknown = json.loads(json.dumps(d))
    del unknown["scales"][0]["target"]["model_sha256"]
    blind = run_fair_bench(dataclasses.replace(fc, n_bootstrap=30), tmp_path / "cache",
                           tuning=reused_tuning(fc, (unknown, "unknown.json")))
    assert "`unknown.json` records no target, so the target its settings were chosen on is not checked" in \
        protocol.render_fair_markdown(blind)
    # settings chosen on another target's weights, or by code whose stages worked otherwise, are not reused
    other = json.loads(json.dumps(d))
    other["scales"][0]["target"]["model_sha256"] = "0" * 64
    with pytest.raises(ValueError, match="chosen on another target"):
        run_fair_bench(fc, tmp_path / "cache", tuning=reused_tuning(fc, (other, "other.json")))
    assert d["code"]["stage_versions"]["extraction"] >= 1
    other = json.loads(json.dumps(d))
    other["code"]["stage_versions"]["extraction"] += 1
    with pytest.raises(ValueError, match="stages worked otherwise"):
        reused_tuning(fc, (other, "other.json"))


def test_signals_bench_on_a_tiny_run(tmp_path, one_thread):
    from side_extract.bench.signals import run_signals_bench, write_signals_results

    bc = tiny_bench()
    data = run_signals_bench(bc, 20, tmp_path / "cache", replicate=1, heldout_fraction=0.5, command="test")
    assert set(data["signals"]) == {"paper", "every-block", "x0-hat", "unet-features"}
    for r in data["signals"].values():
        assert set(r["accuracy"]) == {"q0", "q1", "q2", "q3"} and all(0 <= v <= 1 for v in r["accuracy"].values())
        assert set(r["balanced_accuracy"]) == set(r["accuracy"])
        assert all(0 <= v <= 1 for v in r["balanced_accuracy"].values())
    assert data["signals"]["every-block"]["parameters"] > data["signals"]["paper"]["parameters"]
    _, md = write_signals_results(data, tmp_path / "out")
    assert "every-block" in md.read_text() and "Mean recall per label" in md.read_text()
    assert f"chance {1 / data['heldout_labels']:.3f}" in md.read_text() and data["heldout_labels"] >= 2


def test_forms_are_tuned_like_methods_in_their_own_sub_runs(tmp_path, one_thread):
    """A form (a SIDE method with overrides) gets the same-size grid, runs in rep-r/forms/<name> sharing the
    replicate's synthetic set, and is compared with the best baseline like the methods."""
    bc = tiny_bench()
    bc = type(bc)(**{**bc.__dict__, "scales": (20,)})
    fc = FairBenchConfig(bench=bc, methods=("side", "uncond"), scales_grid=(0.0, 1.0), temperatures=(1.0,),
                         validation_replicates=(1,), heldout_replicates=(2, 3), validation_n=4, n_bootstrap=10,
                         forms={"side-x0": {"method": "side", "classifier.guidance_input": "x0_hat"},
                                "side-every": {"method": "side", "classifier.time_blocks": "every",
                                               "sample.n": bc.run.sample.n + 8}})
    data = run_fair_bench(fc, tmp_path / "cache")
    s = data["scales"][0]
    # a form with a synthetic set of another size is left out of the equal-samples line, which says so
    assert set(s["heldout"]["equal_samples"]["ratios"]) == {"side", "side-x0"}
    assert s["heldout"]["equal_samples"]["left_out"] == ["side-every"]
    assert "(left out: side-every, which drew a synthetic set of another size)" in \
        write_fair_results(data, tmp_path / "out")[1].read_text()
    assert set(s["tuning"]["mean_by_setting"]) == {"side", "side-x0", "side-every"}
    assert all(len(v) == 2 for v in s["tuning"]["mean_by_setting"].values())  # the same budget
    # with that form alone no line can be made, and fair.md said nothing, as if the comparison were turned off
    lone = run_fair_bench(dataclasses.replace(fc, methods=("uncond",), forms={"side-every": fc.forms["side-every"]}),
                          tmp_path / "cache")
    assert lone["scales"][0]["heldout"]["equal_samples"] == {"n_synthetic": bc.run.sample.n, "left_out": ["side-every"]}
    assert "Equal model samples: not measured. Every form that draws a synthetic set (side-every)" in \
        write_fair_results(lone, tmp_path / "out-lone")[1].read_text()
    assert set(s["heldout"]["ratios"]) == {"side", "side-x0", "side-every"}
    rep2 = next((tmp_path / "cache" / "runs").glob("*/rep-2"))
    sub = rep2 / "forms" / "side-x0"
    assert json.loads((sub / "manifest.json").read_text())["stages"]["synthetic"].get("shared_from")
    from side_extract.models.classifier import load_classifier

    assert load_classifier(sub / "classifier").arch.time_mode == "none"
    assert load_classifier(rep2 / "forms" / "side-every" / "classifier").arch.time_blocks == "every"
    with pytest.raises(ValueError, match="same tuning budget"):
        FairBenchConfig(bench=bc, methods=("side-lora", "uncond"), scales_grid=(1.0,), temperatures=(1.0,))


def test_memguide_is_tuned_on_the_same_budget_and_compared_without_a_synthetic_set(tmp_path, one_thread):
    """memguide (label-free) gets as many lambdas as the grid has settings, draws no synthetic set (so no
    equal-samples line), and is set against the best baseline like a SIDE form; lambda 0 is UnCond exactly."""
    bc = tiny_bench()
    bc = type(bc)(**{**bc.__dict__, "scales": (20,)})
    fc = FairBenchConfig(bench=bc, methods=("memguide", "uncond"), scales_grid=(0.0, 1.0), temperatures=(1.0,),
                         memguide_scales=(0.0, 30.0), validation_replicates=(1,), heldout_replicates=(2, 3),
                         validation_n=4, n_bootstrap=10,
                         forms={"mg-avoid": {"method": "memguide", "extract.memguide_avoid": 1.0,
                                             "extract.rounds": 2}})
    data = run_fair_bench(fc, tmp_path / "cache")
    s = data["scales"][0]
    for m in ("memguide", "mg-avoid"):  # the same budget: two settings each, the form's too
        assert set(s["tuning"]["mean_by_setting"][m]) == {"0,0", "30,0"}
        assert s["tuning"]["chosen"][m][0] in (0.0, 30.0)
    assert s["tuning"]["chosen"]["uncond"] is None
    assert set(s["heldout"]["ratios"]) == {"memguide", "mg-avoid"} and "equal_samples" not in s["heldout"]
    rep1 = next((tmp_path / "cache" / "runs").glob("*/rep-1"))
    assert not (rep1 / "synthetic").exists() and not (rep1 / "forms" / "mg-avoid" / "synthetic").exists()
    md = write_fair_results(data, tmp_path / "out")[1].read_text()
    assert "memguide over lambda in [0.0, 30.0]" in md and "| memguide |" in md
    chosen = s["tuning"]["chosen"]["mg-avoid"][0]
    assert f"| mg-avoid | {chosen:g} |" in md  # a memguide form's setting is its lambda alone
    # the form made in rounds: its budget-curve cells below N_G are its first rounds, and say so
    assert s["heldout"]["in_rounds"] == ["mg-avoid"]
    section = md[md.find("by budget"):md.find("Validation means")]
    row = next(line for line in section.splitlines() if line.startswith("| mg-avoid |"))
    assert "‡: made in rounds (mg-avoid)" in section and row.count("‡") == len(s["heldout"]["budget_curve"]) - 1
    with pytest.raises(ValueError, match="memguide_scales has 1 values; memguide gets the same tuning budget"):
        FairBenchConfig(bench=bc, methods=("memguide", "uncond"), scales_grid=(1.0, 3.0), temperatures=(1.0,),
                        memguide_scales=(30.0,))


def test_dedup_driven_stopping_is_every_methods_and_tuning_scores_per_budget(tmp_path, one_thread, monkeypatch):
    """--stop-unseen for every method: with every generation one image (dedup_threshold 0.99) each method stops
    after its first round (U = 1/3 after 2 of 4 validation generations, 1/4 after 3 of 6 held-out ones), UnCond at
    N_G + N_S too; tuning scores a setting per N_G asked for (by hand below), the tables say how many were made and
    that the ratios count the generations not made as misses."""
    bc = tiny_bench()
    ex = dataclasses.replace(bc.run.extract, rounds=2, dedup_threshold=0.99, stop_unseen=0.4)
    bc = type(bc)(**{**bc.__dict__, "scales": (20,), "run": dataclasses.replace(bc.run, extract=ex)})
    fc = FairBenchConfig(bench=bc, methods=("side", "memguide", "uncond"), scales_grid=(0.0, 1.0), temperatures=(1.0,),
                         memguide_scales=(0.0, 30.0), validation_replicates=(1,), heldout_replicates=(2, 3),
                         validation_n=4, n_bootstrap=10)
    from side_extract.bench import protocol

    scored, real = [], protocol.tuning_score  # the tuning table is made of tuning_score, per N_G asked (4)
    monkeypatch.setattr(protocol, "tuning_score", lambda met, key, n: scored.append((met["n_generated"], n))
                        or real(met, key, n))
    data = run_fair_bench(fc, tmp_path / "cache")
    assert scored and set(scored) == {(2, 4)}
    s = data["scales"][0]
    h = s["heldout"]
    assert all(row["n_generated"] == 3 for m in ("side", "memguide", "uncond") for row in h["per_replicate"][m])
    assert h["in_rounds"] == ["side", "memguide", "uncond"]
    assert h["equal_samples"]["made"] == [15, 15]  # UnCond at N_G + N_S = 30 stops too: U = 1/16 after 15
    rep1 = next((tmp_path / "cache" / "runs").glob("*/rep-1"))  # holds the grid's last setting, lambda 30
    assert json.loads((rep1 / "evaluation" / "memguide" / "metrics.json").read_text())["n_generated"] == 2
    # by hand: 30 distinct images in 100 generations made of 400 asked for score 30 / 400, not 30 / 100
    def made(n: int) -> dict:
        return {"n_generated": n, **{k: {"mid": 0.3} for k in ("ams", "ums", "ams_cumulative", "ums_cumulative")},
                "carlini": {"extracted_fraction": 0.5}, "gu": {"memorized_fraction": 0.1}}

    assert tuning_score(made(100), "ums_cumulative/mid", 400) == pytest.approx(0.075)
    assert tuning_score(made(400), "ums_cumulative/mid", 400) == 0.3
    md = write_fair_results(data, tmp_path / "out")[1].read_text()
    assert "Dedup-driven stopping for every method (`extract.stop_unseen` = 0.4" in md
    assert "side 3.0 [3-3]; memguide 3.0 [3-3]; uncond 3.0 [3-3]" in md
    assert "so they are per N_G asked for (distinct_nn: a ratio of counts)" in md
    assert "UnCond with 30 generations at most (it made 15.0 [15-15] before dedup-driven stopping ended it)" in md


def test_generations_not_made_count_as_misses_so_ratios_are_of_counts():
    """Method A stopped after 2 of 4 generations with 2 distinct images, B made all 4 and reached 3: per generation
    made A would lead (1.0 against 0.75) though it found fewer; padded to N_G asked, A's rate is 2/4 and the ratio
    the ratio of counts, 2/3."""
    from side_extract.bench.intervals import value
    from side_extract.bench.protocol import padded_to

    a = {"nn": np.array([3, 5]), "reach/mid": np.array([True, True]), "carlini": np.array([True, False])}
    b = {"nn": np.array([1, 2, 7, 7]), "reach/mid": np.array([True, True, True, True]),
         "carlini": np.array([False] * 4)}
    pa = padded_to(a, 4)
    assert pa["nn"].tolist() == [3, 5, -1, -1] and pa["reach/mid"].tolist() == [True, True, False, False]
    assert value(a, "distinct_nn/mid") == 1.0 and value(b, "distinct_nn/mid") == 0.75
    assert value(pa, "distinct_nn/mid") / value(b, "distinct_nn/mid") == pytest.approx(2 / 3)
    assert value(pa, "carlini") == 0.25 and padded_to(b, 4) is b
    ratio = bootstrap_ratios({"a": [pa], "b": [b]}, ("distinct_nn/mid",), 20, ("a",), ("b",))
    assert ratio["a"]["distinct_nn/mid"]["ratio"] == pytest.approx(2 / 3)


def test_side_lora_forms_copy_guard_is_in_the_fair_tables(tmp_path, one_thread):
    """The fair benchmark records each replicate's copy guard (the share of generations nearer the synthetic set
    than the training set: side-lora's failure mode) from the runs' own metrics, and its Markdown says it (the
    README quoted it from the bench cache: no committed file held it)."""
    bc = tiny_bench()
    bc = type(bc)(**{**bc.__dict__, "scales": (20,)})
    fc = FairBenchConfig(bench=bc, methods=("uncond",), scales_grid=(1.0,), temperatures=(1.0,), lora_scales=(1.0,),
                         validation_replicates=(1,), heldout_replicates=(2, 3), validation_n=4, n_bootstrap=10,
                         forms={"lora-t": {"method": "side-lora", "lora.steps": 2, "lora.rank": 4,
                                           "lora.batch_size": 8, "lora.checkpoint_every": 2}})
    data = run_fair_bench(fc, tmp_path / "cache")
    h = data["scales"][0]["heldout"]
    guards = [r["copy_guard"] for r in h["per_replicate"]["lora-t"]]
    stored = sorted(tmp_path.glob("cache/**/rep-[23]/forms/lora-t/evaluation/side-lora/metrics.json"))
    assert len(stored) == 2
    assert guards == [json.loads(p.read_text())["copy_guard"]["nearer_synthetic_fraction"] for p in stored]
    g = h["summary"]["lora-t"]["copy_guard"]
    assert g["mean"] == pytest.approx(np.mean(guards)) and g["min"] == min(guards)
    # UnCond's reference share against the form's synthetic set, by brute force from the stored images and the
    # evaluation's distance to the nearest training image
    ref = []
    for r in (2, 3):
        rep = next(tmp_path.glob(f"cache/**/rep-{r}"))
        gen = load_shards(rep / "extraction" / "uncond")
        syn = load_shards(rep / "forms" / "lora-t" / "synthetic")
        with np.load(rep / "evaluation" / "uncond" / "per_generation.npz") as z:
            d_train = dict(zip(z["generation_id"].tolist(), z["pixel_distance"].tolist()))
        a = gen.images.reshape(len(gen), -1).astype(np.float64) / 255
        b = syn.images.reshape(len(syn), -1).astype(np.float64) / 255
        d_syn = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).mean(-1)).min(1)
        ref.append(float(np.mean(d_syn < np.array([d_train[int(i)] for i in gen.ids]) - 1e-9)))
    got = [row["copy_guard"] for row in h["per_replicate"]["uncond"]]
    assert got == pytest.approx(ref, abs=1e-12) and h["copy_guard_synthetic"] == "lora-t"
    md = write_fair_results(data, tmp_path / "out")[1].read_text()
    assert f"lora-t {100 * g['mean']:.2f} [{100 * g['min']:.2f}-{100 * g['max']:.2f}]" in md
    u = h["summary"]["uncond"]["copy_guard"]
    assert f"uncond {100 * u['mean']:.2f} [" in md and "the baselines' against `lora-t`'s synthetic set" in md


def test_a_baselines_row_does_not_depend_on_what_its_replicate_folder_held_before(tmp_path, one_thread):
    """A baseline's metrics hold a copy guard where its run folder already holds a synthetic set: in a replicate a
    first bench run made (UnCond there runs after SIDE drew its set), not in a fresh one (UnCond runs first). The
    held-out summary took its keys from the first replicate's row: a KeyError 'copy_guard' after every held-out run
    (a review's find). Only the entries that draw a synthetic set carry their own guard."""
    bc = tiny_bench()
    bc = type(bc)(**{**bc.__dict__, "scales": (20,)})

    def fair(methods, heldout):
        return FairBenchConfig(bench=bc, methods=methods, scales_grid=(1.0,), temperatures=(1.0,),
                               validation_replicates=(1,), heldout_replicates=heldout, validation_n=4, n_bootstrap=10)

    run_fair_bench(fair(("side", "uncond"), (2, 3)), tmp_path / "cache")  # UnCond evaluated beside SIDE's set
    h = run_fair_bench(fair(("uncond", "side"), (2, 3, 4)), tmp_path / "cache")["scales"][0]["heldout"]  # rep-4: first
    rows = h["per_replicate"]["uncond"]
    assert len(rows) == 3 and all(sorted(row) == sorted(rows[0]) for row in rows)
    assert "copy_guard" not in h["summary"]["uncond"] and "copy_guard" in h["summary"]["side"]


def test_a_fair_bench_split_over_two_processes_joins_into_the_one_run_report(tmp_path, one_thread, monkeypatch):
    """The entries of one fair bench run as two (SIDE + UnCond, Cond + UnCond, as two processes would, on one
    cache); a report with both files' tuning (``--tuning-from A --tuning-from B``) runs no validation grid and
    equals the single run's held-out results. The join refuses an entry no file tuned, two files that tuned one
    entry differently, an entry defined otherwise there, and files tuned on other targets."""
    import side_extract.bench.protocol as protocol

    bc = tiny_bench()
    bc = type(bc)(**{**bc.__dict__, "scales": (20,)})
    fc = FairBenchConfig(bench=bc, methods=("side", "cond", "uncond"), scales_grid=(0.0, 1.0), temperatures=(1.0,),
                         validation_replicates=(1,), heldout_replicates=(2, 3), validation_n=4, n_bootstrap=20,
                         equal_samples=False)
    whole = json.loads(json.dumps(run_fair_bench(fc, tmp_path / "one")))
    split = tmp_path / "two"
    a = json.loads(json.dumps(run_fair_bench(dataclasses.replace(fc, methods=("side", "uncond")), split)))
    b = json.loads(json.dumps(run_fair_bench(dataclasses.replace(fc, methods=("cond", "uncond")), split)))
    with pytest.raises(ValueError, match="no file tuned 'cond'"):
        reused_tuning(fc, (a, "a.json"))
    joined = reused_tuning(fc, (a, "a.json"), (b, "b.json"))[20]
    assert joined["reused_from_by_entry"] == {"side": "a.json", "cond": "b.json"}
    assert joined["chosen"] == whole["scales"][0]["tuning"]["chosen"]
    assert joined["mean_by_setting"] == whole["scales"][0]["tuning"]["mean_by_setting"]
    monkeypatch.setattr(protocol, "tune", lambda *a, **k: pytest.fail("the validation grid ran again"))
    again = run_fair_bench(fc, split, tuning={20: joined})
    assert again["scales"][0]["heldout"]["per_replicate"] == whole["scales"][0]["heldout"]["per_replicate"]
    # the processes may share replicates: a replicate's run directory another process holds is waited for (it used to
    # end the bench with RunLocked)
    from test_reliability import _holder

    released = tmp_path / "released"
    holder = _holder(next(split.glob("runs/*/rep-2")), 2, done=released)
    held = run_fair_bench(fc, split, tuning={20: joined})
    assert released.exists()  # it read the replicate only once the holder let go
    holder.wait()
    assert held["scales"][0]["heldout"]["per_replicate"] == again["scales"][0]["heldout"]["per_replicate"]
    assert "from `a.json` (side); `b.json` (cond) (`--tuning-from`" in render_fair_markdown(again)
    # a re-report of the joined report names the files whose runs tuned, entry by entry; one of fewer entries (a
    # file may hold entries this report lacks) names the one file its entries came from, and nothing of the other
    rejoined = reused_tuning(fc, (again, "joined.json"))[20]
    assert rejoined["reused_from_by_entry"] == {"side": "a.json", "cond": "b.json"}
    assert rejoined["chosen"] == joined["chosen"]
    fewer = reused_tuning(dataclasses.replace(fc, methods=("side", "uncond")), (again, "joined.json"))[20]
    assert fewer["reused_from"] == "a.json" and "reused_from_by_entry" not in fewer
    assert fewer["chosen"] == {"uncond": None, "side": joined["chosen"]["side"]}
    assert fewer["target_sha256"] == whole["scales"][0]["target"]["model_sha256"]
    # each entry takes the setting of the file that tuned it (the tiny model ties every setting: set them apart)
    b2 = json.loads(json.dumps(b))
    b2["scales"][0]["tuning"]["chosen"]["cond"] = [1.0, 1.0]
    assert reused_tuning(fc, (a, "a.json"), (b2, "b.json"))[20]["chosen"] == {"uncond": None, "side": [0.0, 1.0],
                                                                              "cond": [1.0, 1.0]}
    with pytest.raises(ValueError, match="b.json and b2.json both tuned 'cond', with other results"):
        reused_tuning(fc, (a, "a.json"), (b, "b.json"), (b2, "b2.json"))
    assert reused_tuning(fc, (a, "a.json"), (b, "b.json"), (b, "b-again.json"))[20]["chosen"] == joined["chosen"]
    # a form by another definition in the file than here; a file tuned on another target
    with_form = dataclasses.replace(fc, forms={"side-x": {"method": "side", "extract.t_lo": 0.5}})
    a_form = json.loads(json.dumps(a))
    a_form["config"]["forms"] = {"side-x": {"method": "side", "extract.t_lo": 0.25}}
    a_form["scales"][0]["tuning"]["chosen"]["side-x"] = [0.0, 1.0]
    with pytest.raises(ValueError, match="'side-x' is .*0.25.* there, .*0.5.* here"):
        reused_tuning(with_form, (a_form, "a.json"), (b, "b.json"))
    other = json.loads(json.dumps(b))
    other["scales"][0]["target"]["model_sha256"] = "0" * 64
    with pytest.raises(ValueError, match="on other targets"):
        reused_tuning(fc, (a, "a.json"), (other, "b.json"))
    unknown = json.loads(json.dumps(b))  # a file that recorded no target: joined, its target is not checked
    del unknown["scales"][0]["target"]["model_sha256"]
    mixed = reused_tuning(fc, (a, "a.json"), (unknown, "b.json"))[20]
    assert mixed["target_sha256"] == whole["scales"][0]["target"]["model_sha256"]
    assert mixed["target_unrecorded"] == ["b.json"]
    # ... but the other file's target still is: one tuned on another target was let through beside such a file
    other_a = json.loads(json.dumps(a))
    other_a["scales"][0]["target"]["model_sha256"] = "0" * 64
    with pytest.raises(ValueError, match="chosen on another target"):
        run_fair_bench(fc, split, tuning=reused_tuning(fc, (other_a, "a.json"), (unknown, "b.json")))
    # the old rule stays for what is not an entry list: another grid is another configuration
    with pytest.raises(ValueError, match="differs in scales_grid"):
        reused_tuning(dataclasses.replace(fc, scales_grid=(0.0, 2.0)), (a, "a.json"), (b, "b.json"))


def test_a_form_that_repeats_another_entrys_runs_is_refused_at_its_first_run(tmp_path, one_thread, monkeypatch,
                                                                              caplog):
    """Cond is guided by the training set's own labels, so a Cond form that changes the clustering makes Cond's
    generations again: it would count as six more settings of tuning and one more baseline without being either.
    Tuning goes setting by setting over the entries, so it is refused at its first run (the third), not after the
    grids of the entries before it; an UnCond form that changes nothing UnCond reads is refused on the held-out
    replicates, where it first runs."""
    import side_extract.bench.protocol as protocol

    calls = []
    real = protocol.run_audit
    monkeypatch.setattr(protocol, "run_audit", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    bc = tiny_bench()
    bc = type(bc)(**{**bc.__dict__, "scales": (20,)})
    fc = FairBenchConfig(bench=bc, methods=("side", "cond", "uncond"), scales_grid=(0.0, 1.0), temperatures=(1.0,),
                         validation_replicates=(1,), heldout_replicates=(2, 3), validation_n=4, n_bootstrap=20,
                         equal_samples=False, forms={"cond-k4": {"method": "cond", "surrogate.n_clusters": 4}})
    with pytest.raises(ValueError,
                       match=r"'cond-k4' makes exactly the generations 'cond' makes .*surrogate\.n_clusters"):
        run_fair_bench(fc, tmp_path / "cache")
    assert len(calls) == 3 and calls[-1].name == "cond-k4"
    # a form whose every override is a setting its runs do not read is refused before any run
    with pytest.raises(ValueError, match=r"'cond-first' changes nothing its runs read: clean_classifier\.time_blocks"):
        dataclasses.replace(fc, forms={"cond-first": {"method": "cond", "clean_classifier.time_blocks": "first"}})
    ddpm = dataclasses.replace(bc, run=dataclasses.replace(bc.run, sample=dataclasses.replace(bc.run.sample,
                                                                                             scheduler="ddpm")))
    with pytest.raises(ValueError, match=r"'side-eta' changes nothing its runs read: sample\.eta=0\.5 \(DDIM's"):
        dataclasses.replace(fc, bench=ddpm, forms={"side-eta": {"method": "side", "sample.eta": 0.5}})
    # one with some such overrides is warned of; under dedup-driven stopping too (its config is checked at the
    # validation budget, where stopping has rounds to stop after)
    stopping = dataclasses.replace(bc, run=dataclasses.replace(bc.run, extract=dataclasses.replace(
        bc.run.extract, stop_unseen=0.1, rounds=2)))
    with caplog.at_level("WARNING", logger="side_extract.bench.protocol"):
        dataclasses.replace(fc, bench=stopping, forms={"cond-late-t": {"method": "cond", "extract.t_lo": 0.5,
                                                                        "clean_classifier.time_blocks": "first"}})
    assert "'cond-late-t' sets what its runs do not read: clean_classifier.time_blocks='first'" in caplog.text
    # a form that does change what Cond reads (its guidance window) runs
    late = dataclasses.replace(fc, forms={"cond-late": {"method": "cond", "extract.t_lo": 0.5}})
    tuned = run_fair_bench(late, tmp_path / "cache")["scales"][0]["tuning"]  # no error: its runs are its own
    assert set(tuned["mean_by_setting"]) == {"side", "cond", "cond-late"}
    same = dataclasses.replace(fc, methods=("side", "uncond"),
                               forms={"uncond-k4": {"method": "uncond", "surrogate.n_clusters": 4}})
    with pytest.raises(ValueError, match="'uncond-k4' makes exactly the generations 'uncond' makes"):
        run_fair_bench(same, tmp_path / "cache")


def test_a_validation_run_made_before_is_kept_and_not_made_again(tmp_path, one_thread, monkeypatch, caplog):
    """A replicate's run directory keeps only its last extraction, so a fair bench run again on its cache (the same
    entries, or one more form) used to remake every setting of its validation grid. Each validation run's metrics are
    kept under the key of everything they depend on and read instead: the same tuning, no run made again; a new form
    runs only its own grid; a kept file that is not one is made again; another setting, a rewritten file or another
    stage version is another key."""
    import side_extract.bench.protocol as protocol
    from side_extract.bench.extraction import scale_inputs

    made = []
    real = protocol.run_audit
    monkeypatch.setattr(protocol, "run_audit", lambda *a, **k: made.append(a[0]) or real(*a, **k))
    bc = tiny_bench()
    bc = type(bc)(**{**bc.__dict__, "scales": (20,)})
    fc = FairBenchConfig(bench=bc, methods=("side", "uncond"), scales_grid=(0.0, 1.0), temperatures=(1.0,),
                         validation_replicates=(1,), heldout_replicates=(2, 3), validation_n=4, n_bootstrap=10,
                         equal_samples=False)
    cache = tmp_path / "cache"
    first = run_fair_bench(fc, cache)
    rep1 = next((cache / "runs").glob("*/rep-1"))
    assert made.count(rep1) == 2 and first["scales"][0]["tuning"]["runs_kept"] == 0
    made.clear()
    again = run_fair_bench(fc, cache)
    t0, t1 = first["scales"][0]["tuning"], again["scales"][0]["tuning"]
    assert rep1 not in made and (t1["runs"], t1["runs_kept"]) == (2, 2)  # the validation grid: every run kept
    assert (t1["chosen"], t1["mean_by_setting"]) == (t0["chosen"], t0["mean_by_setting"])
    assert again["scales"][0]["heldout"]["per_replicate"] == first["scales"][0]["heldout"]["per_replicate"]
    # one more form: its own grid runs, the others' is kept
    made.clear()
    joined = run_fair_bench(dataclasses.replace(fc, forms={"side-x0": {"method": "side",
                                                                       "classifier.guidance_input": "x0_hat"}}), cache)
    tj = joined["scales"][0]["tuning"]
    assert [p for p in made if rep1 in (p, p.parent.parent)] == [rep1 / "forms" / "side-x0"] * 2
    assert (tj["runs"], tj["runs_kept"]) == (4, 2) and tj["mean_by_setting"]["side"] == t0["mean_by_setting"]["side"]
    md = render_fair_markdown(json.loads(json.dumps(joined)))
    assert "; 2 of its 4 runs kept from an earlier fair bench (the cache's `validation-runs/`" in md
    assert "runs kept" not in render_fair_markdown(json.loads(json.dumps(first)))
    assert len(sorted((cache / "validation-runs").rglob("*.json"))) == 4
    # the key: another setting, a bands file rewritten under the same path, another stage version
    inputs = scale_inputs(bc, 20, cache)
    rc = protocol.method_config(replicate_config(inputs.run_config(bc.run), 1), "side", (1.0, 1.0), 4)
    key = protocol.validation_key(rc, inputs)
    kept = next((cache / "validation-runs").rglob(f"rep-1/{key}.json"))
    assert json.loads(kept.read_text())["metrics"]["n_generated"] == 4
    assert key != protocol.validation_key(protocol.method_config(replicate_config(inputs.run_config(bc.run), 1),
                                                                 "side", (0.0, 1.0), 4), inputs)
    bands = inputs.bands.read_text()
    inputs.bands.write_text(bands.replace("0", "0 ", 1))
    assert key != protocol.validation_key(rc, inputs)
    inputs.bands.write_text(bands)
    assert key == protocol.validation_key(rc, inputs)
    with monkeypatch.context() as m:
        m.setitem(protocol.STAGE_VERSIONS, "extraction", protocol.STAGE_VERSIONS["extraction"] + 1)
        assert key != protocol.validation_key(rc, inputs)
    # a kept file that is not one (cut short by hand, say) is made again, with a warning
    kept.write_text("{")
    made.clear()
    with caplog.at_level("WARNING", logger="side_extract.bench.protocol"):
        assert run_fair_bench(fc, cache)["scales"][0]["tuning"]["runs_kept"] == 1
    assert f"{kept}: not a kept validation run" in caplog.text and made.count(rep1) == 1
    assert json.loads(kept.read_text())["key"] == key  # and kept again


def test_fair_md_says_what_its_first_table_holds():
    """Its first table's caption said "% of N_G" under dedup-driven stopping (the shares are of the generations
    made) and called p95 the 5th percentile of an RMS-L2 distance whatever the similarity."""
    from pathlib import Path

    results = Path(__file__).parents[1] / "benchmarks" / "results" / "fair16"
    stopped = json.loads((results / "stop-n100r" / "fair.json").read_text())
    assert "[min-max], % of generations made (p95: the 5th percentile" in render_fair_markdown(stopped)
    plain = json.loads((results / "mem9-n300" / "fair.json").read_text())
    assert "[min-max], % of N_G (p95: the 5th percentile of the nearest RMS-L2 distance" in render_fair_markdown(plain)
    plain["config"]["bench"]["run"]["evaluate"]["similarity"] = "cosine:pixels"
    md = render_fair_markdown(plain)
    assert "(p95: the 95th percentile of the best cosine:pixels similarity, higher = closer)" in md
    assert "| p95 sim. |" in md and "p95 dist." not in md


def test_every_committed_bench_table_is_its_json_rendered():
    """The committed tables are what the renderers make of the committed results: 83 of 96 fair.md files were older
    renders (captions since corrected, no "Chosen on validation" or tuning-budget line) and four extraction.md files
    still headed the 5th percentile "p95", read as if current. A renderer change now re-renders them
    (``render_*_markdown(json.load(open(J)))`` into ``J``'s .md)."""
    from side_extract.bench.signals import render_signals_markdown
    from side_extract.bench.tables import (render_compute_markdown, render_extraction_markdown,
                                           render_scale_markdown, render_variants_markdown)

    renderers = {"fair": render_fair_markdown, "extraction": render_extraction_markdown,
                 "compute": render_compute_markdown, "variants": render_variants_markdown,
                 "scale": render_scale_markdown, "signals": render_signals_markdown}
    root = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    checked, stale = 0, []
    for j in sorted(root.rglob("*.json")):
        render = next((r for k, r in renderers.items() if j.stem.startswith(k)), None)
        if render is None or not j.with_suffix(".md").exists():  # (gpu-check.json: its script writes the .md)
            continue
        checked += 1
        if render(json.loads(j.read_text())) != j.with_suffix(".md").read_text():
            stale.append(str(j.relative_to(root)))
    assert checked >= 100 and not stale, f"re-render these tables from their .json: {stale}"


def test_a_stopped_file_written_before_padding_says_its_ratios_are_per_generation_made():
    """``fair16/stop-n100`` was written when the ratios were per generation made (uncond's 91 images over its 500
    generations); re-rendered later, its caption said they were per N_G asked for, which its own numbers contradict.
    The caption now follows the file's numbers: the best baseline's value times N_G is its count, or not."""
    root = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "fair16"
    old, new = (json.loads((root / f / "fair.json").read_text()) for f in ("stop-n100", "stop-n100r"))
    assert "so are the ratios: this file was written before" in render_fair_markdown(old)
    assert "count the generations not made as misses, so they are per N_G asked" in render_fair_markdown(new)


def test_a_tuning_grid_that_repeats_a_value_is_refused():
    """A repeated lambda, temperature, LoRA or memguide scale passed: it counted as a setting tried while trying one
    fewer, so the entries' tuning budgets were no longer equal as the tables say."""
    bc = tiny_bench()
    base = dict(bench=bc, methods=("side", "uncond", "memguide"), scales_grid=(1.0, 3.0), temperatures=(1.0,),
                validation_replicates=(1,), heldout_replicates=(2, 3), memguide_scales=(10.0, 30.0))
    FairBenchConfig(**base)
    for key, value in (("scales_grid", (3.0, 3.0)), ("temperatures", (1.0, 1.0)), ("memguide_scales", (30.0, 30.0))):
        with pytest.raises(ValueError, match=f"{key}=.* repeats a value"):
            FairBenchConfig(**{**base, key: value})
    # the same to 6 significant digits: the tuning's scores, keyed by "lambda,T", merged the two settings
    with pytest.raises(ValueError, match=r"scales_grid=\[1.0, 1.0000001\]: two values are the same to 6 significant"):
        FairBenchConfig(**{**base, "scales_grid": (1.0, 1.0000001)})


def test_a_tuning_setting_its_runs_would_refuse_is_refused_before_any_run():
    """A negative --lora-scales value, or a form with lora.label_dropout 0 under the default CFG scales (w != 1 needs
    the null label), passed the config and failed in the tuning, after the target trained, the bands were calibrated
    and earlier entries' validation runs were made; the error named neither the option nor the form."""
    bc = tiny_bench()
    base = dict(bench=bc, methods=("cond", "uncond", "side-lora"), scales_grid=(1.0,), temperatures=(1.0,),
                validation_replicates=(1,), heldout_replicates=(11, 12))
    with pytest.raises(ValueError, match=r"side-lora: the setting \(-2.0, 0.0\) of its tuning grid \(lora_scales\) "
                                         r"is refused: .*guidance_scale=-2.0"):
        FairBenchConfig(**base, lora_scales=(-2.0,))
    with pytest.raises(ValueError, match=r"l: the setting \(1.5, 0.0\) .* needs label_dropout > 0"):
        FairBenchConfig(**{**base, "methods": ("cond", "uncond")}, lora_scales=(1.5,),
                        forms={"l": {"method": "side-lora", "lora.label_dropout": 0.0}})
    FairBenchConfig(**base, lora_scales=(1.5,))


def test_a_form_whose_clustering_cannot_work_is_refused_before_any_run():
    """A form with more clusters than synthetic images, or too few synthetic images for the K it keeps, was accepted
    and failed at its own first run, after the target trained and the entries before it ran (the base config was
    checked, not the forms; a review's find). It is refused when the bench is configured, naming the form."""
    bc = tiny_bench()  # (sample.n 24, K 3)
    base = dict(bench=bc, methods=("side", "cond", "uncond"), scales_grid=(0.0, 1.0), temperatures=(1.0,),
                validation_replicates=(1,), heldout_replicates=(2, 3), validation_n=4)
    with pytest.raises(ValueError, match=r"forms: 'side-bad': surrogate K=30 must be <= the number of synthetic "
                                         r"images sample.n=24"):
        FairBenchConfig(**base, forms={"side-bad": {"method": "side", "surrogate.n_clusters": 30}})
    with pytest.raises(ValueError, match=r"forms: 'few': surrogate K=3 must be <= .* sample.n=2"):
        FairBenchConfig(**base, forms={"few": {"method": "side", "sample.n": 2}})
    FairBenchConfig(**base, forms={"ok": {"method": "side", "surrogate.n_clusters": 4}})
    FairBenchConfig(**base, forms={"u": {"method": "uncond", "sample.n": 2}})  # (it clusters nothing)


def test_bands_without_high_and_mid_are_refused_before_any_run():
    """Two calibration quantiles name the bands tail0.01 and tail0.05: accepted, then a KeyError 'reach/high' at the
    report, after every tuning and held-out run (a review's find)."""
    bc = tiny_bench()
    ev = dataclasses.replace(bc.run.evaluate, calibration_quantiles=(0.01, 0.05))
    two = dataclasses.replace(bc, run=dataclasses.replace(bc.run, evaluate=ev))
    with pytest.raises(ValueError, match=r"bands \(tail0.01, tail0.05\) must include 'high' and 'mid'"):
        FairBenchConfig(bench=two, validation_replicates=(1,), heldout_replicates=(2, 3),
                        select_metric="ums_cumulative/tail0.05")


@pytest.mark.parametrize("given", [dict(bands="near=0:0.05,high=0.05:0.1,mid=0.1:0.2"), dict(bands_file="b.json")])
def test_bands_of_the_benchmarks_run_template_are_refused_not_replaced(given):
    """run.evaluate.bands passed the check of select_metric's band, then every run was scored in the calibrated bands
    instead: a KeyError at the first tuning run for a band of the user's own ('near'), or the calibrated edges under the
    user's names in fair.json's record (a review's find). The benchmark calibrates its own bands, so it refuses them."""
    bc = tiny_bench()
    with pytest.raises(ValueError, match=r"run\.evaluate\.bands(_file)?=.*: the benchmark calibrates its bands on each "
                                         r"training set's held-out digits"):
        dataclasses.replace(bc, run=dataclasses.replace(bc.run, evaluate=dataclasses.replace(bc.run.evaluate, **given)))


def test_a_marked_interval_never_prints_a_bound_as_1_00():
    """[0.99796, 0.99971] printed as "[1.00, 1.00] ↓": the mark said the interval lies off 1, the bounds did not."""
    from side_extract.bench.protocol import _ci

    assert _ci(0.99796, 0.99971, True) == "[0.998, 0.9997]"
    assert _ci(1.0003, 1.02, True) == "[1.0003, 1.02]"
    assert _ci(0.9996, 1.02, False) == "[1.00, 1.02]"  # unmarked: 2 decimals as ever


def test_signals_bench_without_held_out_images_is_refused_before_any_classifier_trains(tmp_path, one_thread):
    """Clusters too small to give up a held-out image left none: every classifier trained and was scored on nothing
    (accuracy 0), and the table then failed on a None chance, losing the JSON too."""
    from side_extract.bench.signals import run_signals_bench

    bc = tiny_bench()
    many = dataclasses.replace(bc, run=dataclasses.replace(bc.run, surrogate=dataclasses.replace(
        bc.run.surrogate, n_clusters=12)))
    with pytest.raises(ValueError, match=r"no held-out images: the \d+ kept clusters hold .* fewer clusters"):
        run_signals_bench(many, 20, tmp_path / "cache", signals=("paper",))


def test_cli_signals_records_its_device(monkeypatch, tmp_path):
    """`side bench signals --device X` ran on X but recorded a command without --device (every other bench command
    records it): the results' exact command reran on the CPU."""
    from typer.testing import CliRunner

    from side_extract.bench import signals
    from side_extract.cli.main import app

    seen = {}

    def stop(*a, **k):
        seen["device"], seen["command"] = k.get("device"), k.get("command")
        raise SystemExit(0)

    monkeypatch.setattr(signals, "run_signals_bench", stop)
    CliRunner().invoke(app, ["bench", "signals", "--out", str(tmp_path), "--cache", str(tmp_path), "--device", "cpu:0"])
    assert seen["device"] == "cpu:0" and "--device cpu:0" in seen["command"]


def test_a_form_that_finds_images_where_the_baselines_find_none_is_shown_as_such():
    """A ratio against baselines that found nothing was shown as "- [-, -]", as no data: the form's clearest win read
    as nothing measured (fair16/k25-n1000's budget table, n = 100)."""
    from side_extract.bench.protocol import _ratio_text

    assert _ratio_text({"ratio": None, "side": 0.625, "best_baseline": 0.0}) == "∞ (baseline 0)"
    assert _ratio_text({"ratio": None, "side": 0.0, "best_baseline": 0.0}) == "0/0"
    assert _ratio_text({"ratio": 1.5, "side": 3.0, "best_baseline": 2.0}) == "1.50"
    md = (Path(__file__).resolve().parents[1] / "benchmarks/results/fair16/k25-n1000/fair.md").read_text()
    assert "∞ (baseline 0)" in md


def test_the_command_a_variants_bench_records_runs_again(tmp_path, monkeypatch):
    """Under --no-heldout the recorded command named --heldout too, which the refusal of held-out options beside
    --no-heldout then refused (the shipped size16/variants.md records `--heldout chosen --no-heldout`): the recorded
    command leaves it out, and the default --heldout chosen beside --no-heldout is taken (a review's find)."""
    import shlex

    from typer.testing import CliRunner

    import side_extract.bench.variants as variants
    from side_extract.cli.main import app

    said = []

    def stop(vc, cache, **kw):
        said.append(kw["command"])
        raise ValueError("stopped before the work")

    monkeypatch.setattr(variants, "run_variants_bench", stop)
    variants_file = Path(__file__).resolve().parents[1] / "benchmarks" / "variants.yaml"
    base = ["bench", "variants", "--variants", str(variants_file), "--out", str(tmp_path / "o"), "--cache",
            str(tmp_path / "c"), "--scales", "30"]
    r = CliRunner().invoke(app, [*base, "--no-heldout"])
    assert r.exit_code == 2 and "stopped before the work" in r.output, r.output
    recorded = shlex.split(said[-1])
    assert "--no-heldout" in recorded and "--heldout" not in recorded and "--heldout-seed" not in recorded
    r = CliRunner().invoke(app, recorded[1:])  # the recorded command, as it is
    assert r.exit_code == 2 and "stopped before the work" in r.output and said[-1] == said[-2], r.output
    r = CliRunner().invoke(app, [*base, "--heldout", "chosen", "--no-heldout"])  # as size16/variants.md records it
    assert r.exit_code == 2 and "stopped before the work" in r.output, r.output


def test_bench_faults_of_a_review(monkeypatch, tmp_path):
    """The recorded command (meant to run the benchmark again) wrote --eta, --stop-unseen and --gpu-tflops with 6
    digits (another value when run again); a form named '..' or '../../rep-3' ran in its replicate's own folder or
    another replicate's; a form shared its replicate's stages only once, so after the replicate made a stage again
    the form made it again itself from the stale copy."""
    import shlex

    from typer.testing import CliRunner

    from side_extract.bench import protocol, scale
    from side_extract.bench.protocol import entry_run
    from side_extract.cli.main import app
    from side_extract.runs import RunDir, read_json

    seen = {}

    def stop(c, *a, **k):
        seen["command"] = shlex.split(k["command"])
        raise SystemExit(0)

    monkeypatch.setattr(protocol, "run_fair_bench", stop)
    monkeypatch.setattr(scale, "run_scale_bench", stop)
    CliRunner().invoke(app, ["bench", "fair", "--out", str(tmp_path), "--cache", str(tmp_path), "--eta", "0.12345678",
                             "--stop-unseen", "0.0123456789"])
    a = seen["command"]
    assert a[a.index("--eta") + 1] == "0.12345678" and a[a.index("--stop-unseen") + 1] == "0.0123456789"
    CliRunner().invoke(app, ["bench", "scale", "--out", str(tmp_path), "--gpu-tflops", "123.456789"])
    assert seen["command"][seen["command"].index("--gpu-tflops") + 1] == "123.456789"

    for name in ("..", "../../rep-3", "x/y", ".hidden", ""):
        with pytest.raises(ValueError, match="form name .* must be non-empty, without '/', not starting with '.'"):
            FairBenchConfig(forms={name: {"method": "side"}})

    fc = FairBenchConfig(forms={"late": {"method": "side", "extract.t_hi": 0.5}})
    rep = tmp_path / "rep-2"
    rd = RunDir(rep)
    for fingerprint in ("a" * 64, "b" * 64):  # the replicate's synthetic set, then made again (another n)
        rd.begin("synthetic", fingerprint)
        (rep / "synthetic").mkdir(exist_ok=True)
        (rep / "synthetic" / "shard-00000.npz").write_bytes(fingerprint.encode())
        rd.complete("synthetic")
        path, _ = entry_run(fc, "late", cfg.RunConfig(), (1.0, 1.0), 6, rep)
        assert path == rep / "forms" / "late"
        assert read_json(path / "manifest.json")["stages"]["synthetic"]["fingerprint"] == fingerprint
        assert (path / "synthetic" / "shard-00000.npz").read_bytes() == fingerprint.encode()


def test_tuning_from_joins_and_shrinks_benches_whose_method_grids_differ_only_where_one_does_not_run_them():
    """A fair bench split over processes, memguide with its own --memguide-scales in one and SIDE in the other, did
    not join: the SIDE file recorded the default memguide grid and was refused ("memguide_scales has 6 values");
    nor did a file that tuned SIDE and memguide re-report SIDE alone ("differs in memguide_scales"; a review's find).
    A method's grid is now compared only where both benches run the method."""
    from side_extract.bench.protocol import SCHEMA, STAGE_VERSIONS

    common = dict(bench=tiny_bench(), scales_grid=(0.0, 1.0), temperatures=(1.0,), validation_replicates=(1,),
                  heldout_replicates=(2, 3), validation_n=4)

    def made(fc, chosen):  # what run_fair_bench records (its tuning step)
        return json.loads(json.dumps({
            "schema": SCHEMA, "config": cfg.to_dict(fc), "code": {"stage_versions": dict(STAGE_VERSIONS)},
            "scales": [{"n_train": n, "target": {"model_sha256": "abc"},
                        "tuning": {"chosen": {m: chosen.get(m) for m in fc.entries},
                                   "mean_by_setting": {m: {"x": 1.0} for m in chosen if chosen[m]}}}
                       for n in fc.bench.scales]}))

    a = made(FairBenchConfig(methods=("side", "uncond"), **common), {"side": [1.0, 1.0]})
    b = made(FairBenchConfig(methods=("memguide", "uncond"), memguide_scales=(10.0, 30.0), **common),
             {"memguide": [30.0, 1.0]})
    joined = FairBenchConfig(methods=("side", "memguide", "uncond"), memguide_scales=(10.0, 30.0), **common)
    got = reused_tuning(joined, (a, "a.json"), (b, "b.json"))
    assert got[20]["chosen"] == {"side": [1.0, 1.0], "memguide": [30.0, 1.0], "uncond": None}
    both = made(joined, {"side": [1.0, 1.0], "memguide": [30.0, 1.0]})
    fewer = FairBenchConfig(methods=("side", "uncond"), **common)  # (the default memguide grid: it runs none)
    assert reused_tuning(fewer, (both, "both.json"))[20]["chosen"] == {"side": [1.0, 1.0], "uncond": None}
    # where both run memguide, its grid must agree: its settings were chosen on that grid
    other = FairBenchConfig(methods=("side", "memguide", "uncond"), memguide_scales=(10.0, 20.0), **common)
    with pytest.raises(ValueError, match="differs in memguide_scales"):
        reused_tuning(other, (both, "both.json"))
