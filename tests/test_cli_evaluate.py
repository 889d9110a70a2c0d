"""`side evaluate` and `side calibrate`: the CLI contract scripts depend on."""
from __future__ import annotations

import json
import logging
import re
import shlex

import numpy as np
import pytest
from typer.testing import CliRunner

from side_extract.cli.main import app
from side_extract.runs import atomic_save_npz

runner = CliRunner()


def flat(values, size: int = 8) -> np.ndarray:
    v = np.asarray(values, dtype=np.uint8)
    return np.broadcast_to(v[:, None, None, None], (len(v), size, size, 1)).copy()


@pytest.fixture
def sets(tmp_path):
    atomic_save_npz(tmp_path / "train.npz", images=flat([0, 60, 120, 180, 240]))
    ext = tmp_path / "run" / "extraction" / "side"
    atomic_save_npz(ext / "shard-00000.npz", images=flat([60, 60]), index=np.arange(2), labels=np.array([4, 4]))
    atomic_save_npz(ext / "shard-00001.npz", images=flat([180, 30]), index=np.arange(2, 4), labels=np.array([2, 9]))
    atomic_save_npz(tmp_path / "small.npz", images=flat([0, 1], size=4))
    return tmp_path


def invoke(*args):
    return runner.invoke(app, ["--no-progress", *map(str, args)])


def test_evaluate_into_a_run_directory_takes_its_lock(sets):
    """`side evaluate --out RUN/evaluation/x` writes into a run directory: while another process holds the run (here
    a thread holding its lock through another file description), it is refused by name and writes nothing; once the
    run is free it writes (it used to write beside the holder)."""
    import fcntl
    import threading

    run = sets / "run"
    (run / "manifest.json").write_text(json.dumps({"stages": {}}))
    (run / ".lock").write_text("pid 1, command 'side run'\n")
    args = ["evaluate", "--generated", run / "extraction/side", "--train", sets / "train.npz", "--out",
            run / "evaluation" / "mine", "--bands", "low=0.1:0.2,mid=0.01:0.1,high=0:0.01", "--carlini-n", 3]
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        with open(run / ".lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            taken.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    taken.wait()
    try:
        r = invoke(*args)
    finally:
        release.set()
        t.join()
    assert r.exit_code != 0 and "being written by another process" in r.output and "side run" in r.output
    assert not (run / "evaluation" / "mine").exists()
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    assert (run / "evaluation" / "mine" / "metrics.json").is_file()


def test_evaluate_writes_the_contract(sets):
    out = sets / "eval"
    r = invoke("evaluate", "--generated", sets / "run/extraction/side", "--train", sets / "train.npz", "--out", out,
               "--bands", "low=0.1:0.2,mid=0.01:0.1,high=0:0.01", "--carlini-n", 3)
    assert r.exit_code == 0, r.output
    d = json.loads((out / "metrics.json").read_text())
    assert d["method"] == "side" and d["n_generated"] == 4 and d["n_train"] == 5 and d["similarity"] == "rms-l2"
    assert d["bands"] == {"low": [0.1, 0.2], "mid": [0.01, 0.1], "high": [0.0, 0.01]} and d["bands_source"] == "option"
    assert d["ams"] == {"low": 0.25, "mid": 0.0, "high": 0.75} and d["ums"] == {"low": 0.5, "mid": 0.0, "high": 0.5}
    assert d["ams_cumulative"]["low"] == 1.0 and d["ums_cumulative"]["low"] == 0.75 and d["p95"] == 0.0
    assert d["carlini"]["alpha"] == 0.5 and d["carlini"]["n"] == 3 and d["carlini"]["centering"] == "generation"
    assert d["carlini"]["extracted_fraction"] == 0.75 and d["gu"]["memorized_fraction"] == 0.75
    assert set(d["fingerprints"]) == {"generated", "train"}
    rows = (out / "per_generation.csv").read_text().splitlines()
    assert rows[1].startswith("0,side,4,1,1,0,high") and len(rows) == 5


def test_evaluate_config_file_and_flags(sets, tmp_path):
    yml = tmp_path / "run.yaml"
    yml.write_text("model: demo\nevaluate:\n  bands: 'high=0:0.01'\n  carlini_n: 2\n  carlini_centering: reference\n")
    r = invoke("evaluate", "--generated", sets / "run/extraction/side", "--train", sets / "train.npz",
               "--out", tmp_path / "e", "--config", yml, "--method", "uncond", "--carlini-n", 3)
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert d["method"] == "uncond" and d["bands"] == {"high": [0.0, 0.01]}
    assert d["carlini"]["n"] == 3 and d["carlini"]["centering"] == "reference"  # flag over file
    # a run YAML that leaves evaluate: at its defaults was refused ("unknown config key(s): extract, model, train")
    yml.write_text("model: demo\ntrain: digits:30\nextract: {n: 5}\n")
    r = invoke("evaluate", "--generated", sets / "run/extraction/side", "--train", sets / "train.npz",
               "--out", tmp_path / "e2", "--config", yml, "--carlini-n", 3, "--bands", "high=0:0.01")
    assert r.exit_code == 0, r.output
    # a run YAML's held-out set (configs/own-model.yaml has one) beside typed bands or a cosine similarity, where
    # it is not read: refused as "--heldout ... would not be read", a flag nobody typed (a review's find)
    yml.write_text(f"model: demo\ntrain: digits:30\nevaluate:\n  heldout: {sets / 'train.npz'}\n")
    for more in (["--bands", "high=0:0.01"], ["--similarity", "cosine:pixels"]):
        r = invoke("evaluate", "--generated", sets / "run/extraction/side", "--train", sets / "train.npz",
                   "--out", tmp_path / "e3", "--config", yml, "--carlini-n", 3, *more)
        assert r.exit_code == 0, r.output
    r = invoke("evaluate", "--generated", sets / "run/extraction/side", "--train", sets / "train.npz",
               "--out", tmp_path / "e4", "--heldout", sets / "train.npz", "--carlini-n", 3, "--bands", "high=0:0.01")
    assert r.exit_code == 2 and "calibrates the bands" in r.output, r.output  # (typed: still said)


def test_typed_bands_replace_the_config_files_other_way_of_giving_them(sets, tmp_path):
    """--bands beside a --config file's bands_file was refused ("give one of them, not both"): the typed flag did not
    win, as any other flag does, and the user had to edit the file."""
    (tmp_path / "cal").mkdir()
    (tmp_path / "cal" / "bands.json").write_text(json.dumps({"similarity": "rms-l2", "bands": {"high": [0, 0.05]}}))
    yml = tmp_path / "ev.yaml"
    yml.write_text(f"evaluate:\n  bands_file: {tmp_path / 'cal' / 'bands.json'}\n")
    r = invoke("evaluate", "--generated", sets / "run/extraction/side", "--train", sets / "train.npz", "--out",
               tmp_path / "e", "--config", yml, "--bands", "high=0:0.01,mid=0.01:0.1", "--carlini-n", 3)
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert d["bands"] == {"high": [0.0, 0.01], "mid": [0.01, 0.1]} and d["bands_source"] == "option"
    r = invoke("evaluate", "--generated", sets / "run/extraction/side", "--train", sets / "train.npz", "--out",
               tmp_path / "e2", "--config", yml, "--bands", "high=0:0.01", "--bands-file", tmp_path / "cal/bands.json")
    assert r.exit_code == 2 and "give one of them, not both" in " ".join(r.output.split()), r.output


def test_calibrate_then_evaluate_with_bands_file(sets):
    r = invoke("calibrate", "--train", sets / "train.npz", "--heldout", sets / "run/extraction/side",
               "--out", sets / "cal", "--calibration-quantiles", "0.1,0.3,0.45")
    assert r.exit_code == 0, r.output
    b = json.loads((sets / "cal" / "bands.json").read_text())
    assert b["null_source"] == "heldout" and list(b["bands"]) == ["low", "mid", "high"]
    assert set(b["null"]) == {"heldout", "train"} and "histogram" in b["null"]["train"]
    r = invoke("evaluate", "--generated", sets / "run/extraction/side", "--train", sets / "train.npz",
               "--out", sets / "e", "--bands-file", sets / "cal" / "bands.json", "--carlini-n", 2)
    assert r.exit_code == 0, r.output
    d = json.loads((sets / "e" / "metrics.json").read_text())
    assert d["bands"] == b["bands"] and d["bands_source"].startswith("file:")


def test_calibrate_reads_heldout_from_its_config_file(sets):
    """`side calibrate --config FILE` with `heldout:` in FILE calibrated on the train-vs-rest null: only the flag was
    read."""
    (sets / "cal.yaml").write_text(f"heldout: {sets / 'run/extraction/side'}\ncalibration_quantiles: [0.1, 0.3, 0.45]\n")
    r = invoke("calibrate", "--train", sets / "train.npz", "--config", sets / "cal.yaml", "--out", sets / "cal")
    assert r.exit_code == 0, r.output
    assert "no --heldout" not in r.output and "digits not in" not in r.output, r.output
    (sets / "self.yaml").write_text("calibration_quantiles: [0.1, 0.3, 0.45]\n")  # no held-out set at all
    r = invoke("calibrate", "--train", sets / "train.npz", "--config", sets / "self.yaml", "--out", sets / "cal-self")
    assert r.exit_code == 0 and "no --heldout: bands from each training image vs the rest" in r.output, r.output
    assert json.loads((sets / "cal" / "bands.json").read_text())["null_source"] == "heldout"


def test_calibrate_digits_uses_the_complement(tmp_path):
    r = invoke("calibrate", "--train", "digits:50", "--out", tmp_path)
    assert r.exit_code == 0, r.output
    # (session 40's review commit printed "no --heldout: bands from each training image vs the rest" here too)
    assert "the 1747 digits not in digits:50" in r.output and "no --heldout" not in r.output, r.output
    b = json.loads((tmp_path / "bands.json").read_text())
    assert b["null"]["heldout"]["n"] == 1747 and b["null"]["train"]["n"] == 50


def test_evaluate_digits_calibrates_on_the_complement_as_calibrate_does(tmp_path):
    """``side evaluate --train digits:N`` calibrated its bands on the training digits against each other (warning
    that the null was too coarse) while ``side calibrate`` and a run take the digits outside the subset; now it takes
    them too, and its bands are calibrate's; ``digits`` (all of them) keeps the training null."""
    from side_extract.data import load_image_set

    atomic_save_npz(tmp_path / "gen.npz", images=load_image_set("digits").images[::40])
    r = invoke("calibrate", "--train", "digits:100", "--out", tmp_path / "cal")
    assert r.exit_code == 0, r.output
    r = invoke("evaluate", "--generated", tmp_path / "gen.npz", "--train", "digits:100", "--out", tmp_path / "e")
    assert r.exit_code == 0 and "held-out set: the 1697 digits not in digits:100" in r.output, r.output
    d = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert d["bands_source"] == "heldout:digits minus digits:100" and d["null"]["n"] == 1697
    assert d["bands"] == json.loads((tmp_path / "cal" / "bands.json").read_text())["bands"]
    r = invoke("evaluate", "--generated", tmp_path / "gen.npz", "--train", "digits", "--out", tmp_path / "all",
               "--calibration-quantiles", "0.05,0.1,0.2")
    assert r.exit_code == 0 and "held-out set" not in r.output, r.output
    assert json.loads((tmp_path / "all" / "metrics.json").read_text())["bands_source"] == "train-null"


def test_default_bands_from_the_training_null(sets):
    # 5 training images cannot estimate the default 0.1 % quantile: refused, saying what it needs
    r = invoke("evaluate", "--generated", sets / "run/extraction/side", "--train", sets / "train.npz",
               "--out", sets / "e", "--carlini-n", 2)
    assert r.exit_code == 2 and "evaluate.bands" in r.output
    assert "at least 100 held-out images, and 1000 for an edge" in r.output
    r = invoke("evaluate", "--generated", sets / "run/extraction/side", "--train", sets / "train.npz",
               "--out", sets / "e", "--carlini-n", 2, "--calibration-quantiles", "0.05,0.1,0.2")
    assert r.exit_code == 0, r.output
    d = json.loads((sets / "e" / "metrics.json").read_text())
    assert d["bands_source"] == "train-null" and d["null"]["n"] == 5


def test_mismatched_shapes_name_both(sets):
    r = invoke("evaluate", "--generated", sets / "small.npz", "--train", sets / "train.npz", "--out", sets / "e")
    assert r.exit_code == 2
    assert "4x4x1" in r.output and "8x8x1" in r.output and "--resize" in r.output


def test_bad_options_are_clear(sets):
    r = invoke("evaluate", "--generated", sets / "small.npz", "--train", sets / "train.npz", "--out", sets / "e",
               "--carlini-centering", "middle")
    assert r.exit_code == 2 and "--carlini-centering='middle'" in r.output
    r = invoke("evaluate", "--generated", sets / "small.npz", "--train", sets / "train.npz", "--out", sets / "e",
               "--bands", "high")
    assert r.exit_code == 2 and "name=lo:hi" in r.output


def test_model_option_enables_cosine_unet(sets, tiny_model_dir):
    r = invoke("evaluate", "--generated", sets / "run/extraction/side", "--train", sets / "train.npz",
               "--out", sets / "u", "--similarity", "cosine:unet", "--model", tiny_model_dir, "--carlini-n", 3)
    assert r.exit_code == 0, r.output
    d = json.loads((sets / "u" / "metrics.json").read_text())
    assert d["similarity"] == "cosine:unet" and d["n_generated"] == 4
    r = invoke("calibrate", "--train", sets / "train.npz", "--out", sets / "c", "--similarity", "cosine:unet",
               "--model", tiny_model_dir, "--calibration-quantiles", "0.05,0.1,0.2")
    assert r.exit_code == 0, r.output
    assert json.loads((sets / "c" / "bands.json").read_text())["similarity"] == "cosine:unet"
    r = invoke("evaluate", "--generated", sets / "run/extraction/side", "--train", sets / "train.npz",
               "--out", sets / "v", "--similarity", "cosine:unet")
    assert r.exit_code == 2 and "give it with --model" in " ".join(r.output.split()), r.output
    # a --resize the model does not take: the advice names this command's own option (it named train-target's)
    r = invoke("calibrate", "--train", sets / "train.npz", "--out", sets / "c16", "--similarity", "cosine:unet",
               "--model", tiny_model_dir, "--resize", 16, "--calibration-quantiles", "0.05,0.1,0.2")
    said = " ".join(r.output.split())
    assert r.exit_code == 2 and "resize them to 8 (--resize)" in said, r.output


def test_a_similarity_that_cannot_be_read_is_refused_before_any_set_loads(sets, monkeypatch):
    """An unknown extractor, a torchscript file that is not there, and cosine:unet without --model were found after
    both image sets had loaded (and the last one's message did not name --model)."""
    import side_extract.data as data

    monkeypatch.setattr(data, "load_image_set", lambda *a, **k: pytest.fail("a set loaded before the check"))
    for sim, said in (("cosine:foo", "unknown feature extractor 'foo'"),
                      (f"cosine:torchscript:{sets / 'nope.pt'}", "no such file"),
                      ("cosine:unet", "give it with --model")):
        for cmd in (["evaluate", "--generated", sets / "run/extraction/side", "--train", sets / "train.npz"],
                    ["calibrate", "--train", sets / "train.npz"]):
            r = invoke(*cmd, "--out", sets / "v", "--similarity", sim)
            assert r.exit_code == 2 and said in " ".join(r.output.split()), r.output
    assert not (sets / "v").exists()


def test_an_out_that_is_a_file_and_held_out_images_of_another_size_are_said_before_the_work(sets, monkeypatch):
    """`--out` naming a file was found after the calibration and the evaluation ("File exists"); held-out images of
    another size than the training set's were found after the training set's null, and called "generated"."""
    import side_extract.evaluation as evaluation

    (sets / "afile").write_text("mine\n")
    for args in (("calibrate", "--train", sets / "train.npz", "--out", sets / "afile"),
                 ("evaluate", "--generated", sets / "run" / "extraction" / "side", "--train", sets / "train.npz",
                  "--out", sets / "afile")):
        r = invoke(*args)
        assert r.exit_code == 2 and f"--out '{sets / 'afile'}' exists and is not a directory" in r.output, r.output
    assert (sets / "afile").read_text() == "mine\n"
    monkeypatch.setattr(evaluation, "calibrate", lambda *a, **k: pytest.fail("calibrated before the check"))
    r = invoke("calibrate", "--train", sets / "train.npz", "--heldout", sets / "small.npz", "--out", sets / "c")
    said = " ".join(r.output.split())
    assert r.exit_code == 2 and "held-out images (" in said and "are 4x4x1 (HxWxC) but training images are 8x8x1" in said
    assert not (sets / "c").exists()


def test_held_out_images_that_would_not_be_read_are_refused(sets):
    """`--heldout` only calibrates bands: beside --bands (or --bands-file), with a cosine similarity (which takes
    the paper's bands), or written into a run whose bands the evaluation takes, it was never read, even when the
    path did not exist, and the command succeeded."""
    base = ["evaluate", "--generated", sets / "run/extraction/side", "--train", sets / "train.npz", "--carlini-n", 3]
    r = invoke(*base, "--out", sets / "e", "--bands", "low=0.1:0.2,mid=0.01:0.1,high=0:0.01",
               "--heldout", sets / "missing.npz")
    assert r.exit_code == 2 and "calibrates the bands, and --bands or --bands-file gives them" in r.output, r.output
    r = invoke(*base, "--out", sets / "e", "--similarity", "cosine:pixels", "--heldout", sets / "missing.npz")
    assert r.exit_code == 2 and "cosine:pixels without bands takes the paper's cosine bands: they would not be read" \
        in " ".join(r.output.split()), r.output  # (the paper's bands were taken and the command succeeded)
    run = sets / "run"
    (run / "manifest.json").write_text(json.dumps({"stages": {}}))
    (run / "config.yaml").write_text("evaluate:\n  bands: low=0.1:0.2,mid=0.01:0.1,high=0:0.01\n")
    r = invoke(*base, "--out", run / "evaluation" / "mine", "--heldout", sets / "train.npz")
    assert r.exit_code == 2 and "--out lies in run" in " ".join(r.output.split()), r.output
    assert not (sets / "e").exists() and not (run / "evaluation" / "mine").exists()
    r = invoke(*base, "--out", run / "evaluation" / "mine")  # without it: the run's bands
    assert r.exit_code == 0, r.output
    # a --config file's held-out set (a run YAML's) beside the run's bands: left out, not refused as a --heldout
    # nobody typed (a review of this session's fix)
    (sets / "r.yaml").write_text(f"evaluate:\n  heldout: {sets / 'train.npz'}\n")
    r = invoke(*base, "--out", run / "evaluation" / "mine2", "--config", sets / "r.yaml")
    assert r.exit_code == 0, r.output


def test_inputs_found_wrong_only_after_the_work_are_refused_before_it(sets, tmp_path, monkeypatch):
    """An independent review of the step commands' input checks: a --model the similarity never reads (loaded, or
    failing to load, then ignored); a model of other channels than the images (a torch traceback mid-work); an
    --out under a file (found at the write, after the work); held-out images that are all training images (blamed on
    duplicates, after the null); a channel mismatch advised to be fixed by --resize."""
    import side_extract.evaluation as evaluation
    from side_extract.models.target import save_target

    from conftest import tiny_scheduler, tiny_unet

    monkeypatch.setattr(evaluation, "calibrate", lambda *a, **k: pytest.fail("calibrated before the check"))
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: pytest.fail("evaluated before the check"))
    gen = ["--generated", sets / "run/extraction/side", "--train", sets / "train.npz"]
    r = invoke("evaluate", *gen, "--out", sets / "e", "--model", sets / "nowhere")
    assert r.exit_code == 2 and "--model" in r.output and "would not be read" in " ".join(r.output.split()), r.output
    r = invoke("calibrate", "--train", sets / "train.npz", "--out", sets / "c", "--model", sets / "nowhere")
    assert r.exit_code == 2 and "would not be read" in " ".join(r.output.split()), r.output
    save_target(tiny_unet(channels=3), tiny_scheduler(), tmp_path / "rgb")
    for cmd in (["evaluate", *gen], ["calibrate", "--train", sets / "train.npz"]):
        r = invoke(*cmd, "--out", sets / "u", "--similarity", "cosine:unet", "--model", tmp_path / "rgb")
        said = " ".join(r.output.split())
        assert r.exit_code == 2 and "with 1 channel(s), but the model expects 8x8 with 3 channel(s)" in said, r.output
        assert "Traceback" not in r.output
    (sets / "afile").write_text("mine\n")
    for cmd in (["evaluate", *gen], ["calibrate", "--train", sets / "train.npz"]):
        r = invoke(*cmd, "--out", sets / "afile" / "x")
        assert r.exit_code == 2 and "is a file, not a folder to write into" in " ".join(r.output.split()), r.output
    monkeypatch.undo()  # (the shapes, and the held-out copies, are checked where the sets load, before any null)
    for cmd in (["calibrate", "--train", "digits:30"], ["evaluate", "--generated", "digits:5", "--train", "digits:30"]):
        r = invoke(*cmd, "--heldout", "digits:30", "--out", sets / "c")
        said = " ".join(r.output.split())
        assert r.exit_code == 2 and "held-out images (digits:30): every one of its 30 images is a training image" \
            in said, said
    atomic_save_npz(sets / "rgb.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    r = invoke("evaluate", "--generated", sets / "rgb.npz", "--train", sets / "train.npz", "--out", sets / "e")
    said = " ".join(r.output.split())
    assert r.exit_code == 2 and "differ in channels" in said and "--resize" not in said, said
    assert not any((sets / d).exists() for d in ("e", "c", "u"))


def test_a_result_cut_short_leaves_no_earlier_mark_beside_it(sets, monkeypatch):
    """`side evaluate` into a folder that held an evaluation, cut short at metrics.json: the new table stood beside
    the old metrics.json, read as one evaluation (3 generations in metrics.json, 4 rows in the table); the same for
    `side calibrate`'s null.npz and bands.json."""
    import side_extract.evaluation as evaluation

    base = ["--train", sets / "train.npz", "--carlini-n", 3, "--bands", "low=0.1:0.2,mid=0.01:0.1,high=0:0.01"]
    r = invoke("evaluate", "--generated", sets / "run/extraction/side", *base, "--out", sets / "e")
    assert r.exit_code == 0, r.output
    cal = ["calibrate", "--train", "digits:200", "--calibration-quantiles", "0.05,0.1,0.2", "--out", sets / "c"]
    assert invoke(*cal).exit_code == 0

    def cut(path, *a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(evaluation, "atomic_write_json", cut)
    atomic_save_npz(sets / "more.npz", images=flat([0, 60, 120]))
    assert invoke("evaluate", "--generated", sets / "more.npz", *base, "--out", sets / "e").exit_code != 0
    assert not (sets / "e" / "metrics.json").exists() and (sets / "e" / "per_generation.csv").exists()
    assert invoke(*cal).exit_code != 0
    assert not (sets / "c" / "bands.json").exists()


def test_evaluate_names_the_closest_band_whichever_order_the_bands_are_given_in(sets):
    """The closing line took the last band listed: with bands written closest first (as the README's example) it
    gave the farthest band's AMS and UMS as the headline."""
    for spec in ("high=0:0.01,mid=0.01:0.1,low=0.1:0.2", "low=0.1:0.2,mid=0.01:0.1,high=0:0.01"):
        r = invoke("evaluate", "--generated", sets / "run/extraction/side", "--train", sets / "train.npz", "--out",
                   sets / spec[:3], "--bands", spec, "--carlini-n", 3)
        assert r.exit_code == 0, r.output
        assert "AMS high 75.00%, UMS high 50.00%" in " ".join(r.output.split()), r.output


def test_evaluate_and_calibrate_faults_of_a_review(sets, monkeypatch):
    """An independent review's finds: --calibration-quantiles that no band is made of were dropped and recorded as
    used; a run made before this release names its bands file as typed, read from the current folder (another
    file's bands, without a word); side calibrate refused a too-small held-out set only after every neighbour
    search; a cosine null dropped near copies (one level in one pixel) as exact copies, moving the band edges."""
    from side_extract import config as cfg
    from side_extract.data import ImageSet
    from side_extract.evaluation import calibrate
    from side_extract.neighbors import NearestNeighborIndex

    base = ["evaluate", "--generated", sets / "run/extraction/side", "--train", sets / "train.npz", "--carlini-n", 3]
    r = invoke(*base, "--out", sets / "e", "--bands", "low=0.1:0.2,mid=0.01:0.1,high=0:0.01",
               "--calibration-quantiles", "0.1,0.2,0.3")
    assert r.exit_code == 2 and "no bands are calibrated here (--bands or --bands-file)" in " ".join(r.output.split())
    r = invoke(*base, "--out", sets / "e", "--similarity", "cosine:pixels", "--calibration-quantiles", "0.1,0.2,0.3")
    assert r.exit_code == 2 and "cosine:pixels without bands" in r.output, r.output
    run = sets / "run"
    (run / "manifest.json").write_text(json.dumps({"stages": {}}))
    (run / "config.yaml").write_text("evaluate:\n  bands_file: calA/bands.json\n")
    r = invoke(*base, "--out", run / "evaluation" / "again")
    assert r.exit_code == 2 and "names its bands file as typed where it was made ('calA/bands.json')" in \
        " ".join(r.output.split()), r.output
    assert not (sets / "e").exists() and not (run / "evaluation" / "again").exists()
    # quantiles a --config file gives (a run's own config.yaml) are taken as they are (a review of the fix)
    (run / "config.yaml").write_text("evaluate:\n  bands: low=0.1:0.2,mid=0.01:0.1,high=0:0.01\n"
                                     "  calibration_quantiles: [0.01, 0.05, 0.1]\n")
    r = invoke(*base, "--out", run / "evaluation" / "more", "--config", run / "config.yaml")
    assert r.exit_code == 0, r.output
    # calibrate: a null too small is refused before any search
    monkeypatch.setattr(NearestNeighborIndex, "kneighbors", lambda *a, **k: pytest.fail("searched"))
    rng = np.random.default_rng(0)
    train = ImageSet(rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8))
    held = ImageSet(rng.integers(0, 256, (50, 8, 8, 1), dtype=np.uint8))
    with pytest.raises(ValueError, match="a null of 50 values cannot estimate its 0.001 quantile"):
        calibrate(train, held, cfg.EvaluateConfig())
    monkeypatch.undo()
    # a cosine null: near copies are no exact copies (only byte copies are left out)
    near = held.images.copy()
    near[:6] = train.images[:6]
    near[:6, 0, 0, 0] ^= 1  # one level in one pixel
    near[6] = train.images[7]  # an exact copy
    c = calibrate(train, ImageSet(near), cfg.EvaluateConfig(similarity="cosine:pixels",
                                                            calibration_quantiles=(0.05, 0.1, 0.2)))
    assert c.to_json()["null"]["heldout"]["copies_left_out"] == 1
    assert c.bands[-1].lo > 0.999  # the high band's edge: the near copies are its non-members


def test_a_bands_file_of_another_training_set_is_said(tmp_path, caplog):
    """bands.json records the training set it was calibrated on; an evaluation applied it to another set (the same
    digits at 8 px with edges calibrated at 16 px) without a word (a review's find)."""
    from side_extract import config as cfg
    from side_extract.data import load_image_set
    from side_extract.evaluation import calibrate, digits_complement, evaluate

    ev = cfg.EvaluateConfig(carlini_n=5)
    for size in (16, None):
        train = load_image_set("digits:50", size)
        calibrate(train, digits_complement("digits:50", size), ev).write(tmp_path / f"cal{size}")
    train = load_image_set("digits:50")
    gen = load_image_set("digits:20")
    for size, warned in ((16, True), (None, False)):
        caplog.clear()
        with caplog.at_level("WARNING"):
            evaluate(gen, train, cfg.EvaluateConfig(carlini_n=5,
                                                    bands_file=str(tmp_path / f"cal{size}" / "bands.json")))
        said = [r.getMessage() for r in caplog.records if "was calibrated on another training set" in r.getMessage()]
        assert bool(said) == warned, caplog.text
    # a damaged fingerprints entry: the bands read as before the check, with no word (it was an AttributeError)
    damaged = json.loads((tmp_path / "calNone" / "bands.json").read_text())
    for fps in (["x"], {"train": 5}):
        (tmp_path / "damaged.json").write_text(json.dumps({**damaged, "fingerprints": fps}))
        evaluate(gen, train, cfg.EvaluateConfig(carlini_n=5, bands_file=str(tmp_path / "damaged.json")))


def test_detection_settings_without_its_threshold_are_refused(sets):
    """--detect-min-size / --detect-mode / --detect-grid / --extraction-threshold without --detect-threshold were
    dropped without a word and recorded in metrics.json as if used (a review's find)."""
    base = ["evaluate", "--generated", sets / "run/extraction/side", "--train", sets / "train.npz", "--carlini-n", 3,
            "--bands", "low=0.1:0.2,mid=0.01:0.1,high=0:0.01"]
    r = invoke(*base, "--out", sets / "e", "--detect-min-size", 3, "--extraction-threshold", 0.3)
    assert r.exit_code == 2 and "--detect-min-size, --extraction-threshold set the label-free detection, which runs " \
        "only with --detect-threshold" in " ".join(r.output.split()), r.output
    assert not (sets / "e").exists()
    r = invoke(*base, "--out", sets / "e", "--detect-min-size", 2, "--detect-threshold", 0.1)
    assert r.exit_code == 0 and json.loads((sets / "e" / "metrics.json").read_text())["detection"], r.output


def test_an_evaluation_written_into_a_run_takes_its_metric_settings(sets):
    """An evaluation written into RUN/evaluation/NAME took the run's bands but not its settings of Carlini's and Gu's
    ratios: at the defaults, beside a run of carlini_n 3, it was left out of the run's comparison and findings without
    a word (a review's find). It now takes them where not typed, and says where one typed differs."""
    from side_extract import config as cfg

    run = sets / "run"
    (run / "manifest.json").write_text(json.dumps({"stages": {}}))
    (run / "config.yaml").write_text("evaluate:\n  bands: low=0.1:0.2,mid=0.01:0.1,high=0:0.01\n  carlini_n: 3\n"
                                     "  gu_threshold: 0.25\n")
    base = ["evaluate", "--generated", run / "extraction/side", "--train", sets / "train.npz"]
    r = invoke(*base, "--out", run / "evaluation" / "mine")
    assert r.exit_code == 0 and "metric settings" not in r.output, r.output
    recorded = json.loads((run / "evaluation" / "mine" / "metrics.json").read_text())["config"]
    assert (recorded["carlini_n"], recorded["gu_threshold"]) == (3, 0.25)
    r = invoke(*base, "--out", run / "evaluation" / "other", "--carlini-n", 4)
    assert r.exit_code == 0, r.output
    assert "metric settings: not the run's (carlini_n 4 (the run's 3)): this evaluation is left out of the run's " \
           "comparison and findings" in " ".join(r.output.split()), r.output
    (sets / "mine.yaml").write_text(f"carlini_n: {cfg.EvaluateConfig().carlini_n}\n")  # a file's value at the
    r = invoke(*base, "--out", run / "evaluation" / "file", "--config", sets / "mine.yaml")  # default is given too: it
    assert r.exit_code == 0, r.output  # was replaced by the run's 3 without a word
    recorded = json.loads((run / "evaluation" / "file" / "metrics.json").read_text())["config"]
    assert (recorded["carlini_n"], recorded["gu_threshold"]) == (cfg.EvaluateConfig().carlini_n, 0.25)
    assert f"carlini_n {cfg.EvaluateConfig().carlini_n} (the run's 3)" in " ".join(r.output.split()), r.output


def test_a_folder_where_a_result_file_is_written_is_refused_before_the_work(sets):
    """`side evaluate --out O` with a folder O/metrics.json (`side calibrate`'s O/bands.json) did the whole work,
    wrote its per-generation table, then failed with "Is a directory" (a review's find): it is refused first, by
    name, and nothing is written."""
    for name in ("metrics.json", "per_generation.npz"):
        out = sets / f"e-{name}"
        (out / name).mkdir(parents=True)
        r = invoke("evaluate", "--generated", sets / "run/extraction/side", "--train", sets / "train.npz",
                   "--bands", "low=0.1:0.2,mid=0.01:0.1,high=0:0.01", "--out", out)
        assert r.exit_code == 2 and f"{str(out / name)!r} is a folder, where the results' {name} is written" in \
            " ".join(r.output.split()), r.output
        assert [p.name for p in out.iterdir()] == [name]
    out = sets / "c"
    (out / "bands.json").mkdir(parents=True)
    r = invoke("calibrate", "--train", sets / "train.npz", "--heldout", sets / "run/extraction/side", "--out", out)
    said = f"{str(out / 'bands.json')!r} is a folder, where the results' bands.json is written"
    assert r.exit_code == 2 and said in " ".join(r.output.split()), r.output
    assert [p.name for p in out.iterdir()] == ["bands.json"]


def test_a_stage_configs_bands_replace_the_runs_other_ways_of_giving_them(tmp_path):
    """`side extract --run R --config C` merged C over R's config.yaml key by key: C's evaluate.bands_file (valid
    alone) beside R's evaluate.bands was refused as "give one of them, not both"; side evaluate already took them as
    alternatives. A typed flag replaces them the same way; a C that gives none keeps the run's."""
    from side_extract import config as cfg
    from side_extract.cli.common import stage_config
    from side_extract.runs import RunDir

    RunDir(tmp_path / "run").write_config(cfg.RunConfig(train="digits:30",
                                                        evaluate=cfg.EvaluateConfig(bands="high=0:0.1,mid=0.1:0.2")))
    (tmp_path / "c.yaml").write_text(f"evaluate:\n  bands_file: {tmp_path / 'bands.json'}\n")
    ev = stage_config(tmp_path / "run", tmp_path / "c.yaml", {})[1].evaluate
    assert ev.bands_file == str(tmp_path / "bands.json") and ev.bands is None
    ev = stage_config(tmp_path / "run", tmp_path / "c.yaml", {"evaluate": {"bands": "near=0:0.05"}})[1].evaluate
    assert ev.bands == "near=0:0.05" and ev.bands_file is None
    (tmp_path / "c.yaml").write_text("evaluate:\n  carlini_n: 7\n")
    ev = stage_config(tmp_path / "run", tmp_path / "c.yaml", {})[1].evaluate
    assert ev.bands == "high=0:0.1,mid=0.1:0.2" and ev.carlini_n == 7


def test_bands_given_later_keep_the_runs_held_out_set(tmp_path):
    """The held-out set is also the sample quality's reference: bands given by a stage's --config dropped the run's
    evaluate.heldout with the run's other bands, and the quality was measured against something else."""
    from side_extract import config as cfg
    from side_extract.cli.common import stage_config
    from side_extract.runs import RunDir

    RunDir(tmp_path / "run").write_config(cfg.RunConfig(train="digits:30", evaluate=cfg.EvaluateConfig(
        heldout="digits:20", bands_file=str(tmp_path / "old.json"))))
    (tmp_path / "c.yaml").write_text("evaluate:\n  bands: high=0:0.1\n")
    ev = stage_config(tmp_path / "run", tmp_path / "c.yaml", {})[1].evaluate
    assert ev.bands == "high=0:0.1" and ev.bands_file is None and ev.heldout == "digits:20"


def test_a_side_evaluate_of_an_extraction_the_run_made_again_is_left_out(tiny_model_dir, tmp_path, caplog):
    """side evaluate of the run's own extraction/uncond into RUN/evaluation/uncond-cli counts once; after the run made
    extraction/uncond again (another seed), the old evaluation still counted in the summary, findings and report as
    6 more generations that no longer exist. It records the stage it measured and is left out once that changes."""
    import dataclasses

    from side_extract.pipeline import run_audit
    from side_extract.summary import audit_summary

    from test_pipeline import tiny_rc

    run = tmp_path / "run"
    rc = tiny_rc(tiny_model_dir, methods=("uncond",))
    run_audit(run, rc)
    r = CliRunner().invoke(app, ["--threads", "1", "--no-progress", "evaluate", "--generated",
                                 str(run / "extraction" / "uncond"), "--train", "digits:30", "--carlini-n", "5",
                                 "--out", str(run / "evaluation" / "uncond-cli")])
    assert r.exit_code == 0, r.output
    sources = json.loads((run / "evaluation" / "uncond-cli" / "metrics.json").read_text())["sources"]
    assert sources["generated_stage"] == "extraction/uncond" and len(sources["generated_stage_fingerprint"]) == 64
    assert set(audit_summary(run)["methods"]) == {"uncond", "uncond-cli"}  # (counted once: the same files)
    run_audit(run, dataclasses.replace(rc, extract=dataclasses.replace(rc.extract, seed=123)))
    with caplog.at_level(logging.WARNING):
        s = audit_summary(run)
    assert list(s["methods"]) == ["uncond"] and s["findings"]["generations"] == {"uncond": 6}
    # the advice is a command that runs: it lacked --train, which side evaluate requires (a review's find)
    advised = re.search(r"evaluate it again \((side evaluate [^,]*),", caplog.text).group(1)
    assert f"--train {sources['train']}" in advised, advised
    r = CliRunner().invoke(app, ["--threads", "1", "--no-progress", *shlex.split(advised)[1:], "--carlini-n", "5"])
    assert r.exit_code == 0, r.output
    assert list(audit_summary(run)["methods"]) == ["uncond", "uncond-cli"]


def test_a_side_evaluate_of_an_unfinished_extraction_is_refused(tiny_model_dir, tmp_path):
    """side evaluate --generated RUN/extraction/<m> of a stage left running (SIGTERM) or failed measured the shards on
    disk as the whole set without a word and recorded no stage, so the run counted that part as the method's for
    good, even once the stage was made again (an interruption review's find). It is refused, naming the status and
    the way on; the same images copied out of the run are measured."""
    import shutil

    from side_extract.pipeline import run_audit

    from test_pipeline import tiny_rc

    run = tmp_path / "run"
    run_audit(run, tiny_rc(tiny_model_dir, methods=("uncond",)))
    manifest = json.loads((run / "manifest.json").read_text())
    entry = manifest["stages"]["extraction/uncond"]
    n = entry["n"]
    for status, said in (("running", "interrupted (no other process holds"), ("failed", "not finished")):
        entry.update(status=status, n_planned=n + 4)
        (run / "manifest.json").write_text(json.dumps(manifest))
        r = CliRunner().invoke(app, ["--threads", "1", "--no-progress", "evaluate", "--generated",
                                     str(run / "extraction" / "uncond"), "--train", "digits:30", "--carlini-n", "5",
                                     "--out", str(run / "evaluation" / "uncond-cli")])
        assert r.exit_code == 2, r.output
        text = " ".join(r.output.split())
        assert f"stage extraction/uncond of run {str(run)!r}, which is {status}: {said}" in text
        assert f"of the {n + 4} generations" in text
        assert f"side extract --run {run} --method uncond" in text, text
        assert not (run / "evaluation" / "uncond-cli").exists()
    from test_reliability import _holder

    entry.update(status="running")
    (run / "manifest.json").write_text(json.dumps(manifest))
    holder = _holder(run, 60)  # a side run still growing it: refused where the evaluation is written elsewhere too
    try:
        r = CliRunner().invoke(app, ["--threads", "1", "--no-progress", "evaluate", "--generated",
                                     str(run / "extraction" / "uncond"), "--train", "digits:30", "--out",
                                     str(tmp_path / "elsewhere")])
    finally:
        holder.kill()
        holder.wait()
    assert r.exit_code == 2 and "being made now (another process holds the run's lock)" in " ".join(r.output.split())
    assert not (tmp_path / "elsewhere").exists()
    copy = tmp_path / "part"
    shutil.copytree(run / "extraction" / "uncond", copy)
    r = CliRunner().invoke(app, ["--threads", "1", "--no-progress", "evaluate", "--generated", str(copy),
                                 "--train", "digits:30", "--carlini-n", "5", "--out", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["n_generated"] == n


def test_a_runs_bands_of_a_revised_extractors_earlier_features_are_not_taken(tmp_path, capsys):
    """side evaluate into a run measured under cosine:efficientnet-lite0 took the run's calibrated bands.json
    without a word, though they were calibrated on the extractor's features of before its normalisation fix
    (revision 2), which moved the scores (a review's find). bands.json now records a revised extractor's revision,
    and bands of another revision are not taken, said so; those of this revision are, as before."""
    import numpy as np

    from side_extract import config as cfg
    from side_extract.cli.evaluate import run_bands
    from side_extract.evaluation import Calibration
    from side_extract.metrics import Band

    sim = "cosine:efficientnet-lite0"
    run = tmp_path / "run"
    (run / "evaluation").mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.dump_yaml(cfg.from_dict(cfg.RunConfig, {"evaluate": {"similarity": sim}})))
    cal = Calibration(sim, "similarity", (0.5, 0.9, 0.99), "train",
                      (Band("low", 0.5, 0.8), Band("mid", 0.8, 0.9), Band("high", 0.9, 1.0)),
                      {"train": np.linspace(0.4, 0.95, 50)})
    made = cal.to_json()
    assert made["extractor_revision"] == 2
    c = cfg.EvaluateConfig(similarity=sim)
    del made["extractor_revision"]  # (as the release before wrote it)
    (run / "evaluation" / "bands.json").write_text(json.dumps(made))
    assert run_bands(run, c) == c
    assert "calibrated on efficientnet-lite0's features of before revision 2" in capsys.readouterr().err
    (run / "evaluation" / "bands.json").write_text(json.dumps(cal.to_json()))
    assert run_bands(run, c).bands_file == str(run / "evaluation" / "bands.json")
    pixels = Calibration("rms-l2", "distance", (0.5,), "train", (Band("near", 0.0, 0.1),), {"train": np.ones(3)})
    assert "extractor_revision" not in pixels.to_json()  # (the others record nothing new)


def test_evaluate_names_the_files_behind_a_folders_ids(tmp_path):
    """A folder's ids are positions in name order (10.png before 2.png), and no output named a file: generations
    copying 2.png and 11.png of 0.png..11.png read as copies of "4" and "3", which a data owner took for 4.png and
    3.png (a review's find). id_files.csv names them; one of an earlier evaluation goes where no set is a folder,
    and a file of that name the command did not write is left as it is (refused)."""
    import csv

    from PIL import Image

    rng = np.random.default_rng(0)
    train, gen = tmp_path / "train", tmp_path / "gen"
    train.mkdir()
    gen.mkdir()
    pictures = {i: rng.integers(0, 256, (8, 8), dtype=np.uint8) for i in range(12)}
    for i, a in pictures.items():
        Image.fromarray(a).save(train / f"{i}.png")
    Image.fromarray(pictures[2]).save(gen / "b.png")
    Image.fromarray(pictures[11]).save(gen / "a.png")
    out = tmp_path / "eval"
    r = invoke("evaluate", "--generated", gen, "--train", train, "--out", out, "--bands", "high=0:0.01,mid=0.01:0.1")
    assert r.exit_code == 0, r.output
    files = {(row["set"], int(row["id"])): row["file"] for row in csv.DictReader((out / "id_files.csv").open())}
    nearest = [(files[("generated", int(row["generation_id"]))], files[("train", int(row["nearest_train_id"]))])
               for row in csv.DictReader((out / "per_generation.csv").open())]
    assert sorted(nearest) == [("a.png", "11.png"), ("b.png", "2.png")]
    atomic_save_npz(tmp_path / "t.npz", images=np.stack(list(pictures.values()))[..., None])
    r = invoke("evaluate", "--generated", tmp_path / "t.npz", "--train", tmp_path / "t.npz", "--out", out,
               "--bands", "high=0:0.01,mid=0.01:0.1")
    assert r.exit_code == 0 and not (out / "id_files.csv").exists(), r.output
    (out / "id_files.csv").write_text("my own list\n")
    r = invoke("evaluate", "--generated", gen, "--train", train, "--out", out, "--bands", "high=0:0.01,mid=0.01:0.1")
    assert r.exit_code == 2 and "holds id_files.csv, not one side evaluate wrote" in " ".join(r.output.split())
    assert (out / "id_files.csv").read_text() == "my own list\n"


def test_evaluate_refuses_writing_among_the_shards_it_reads_and_bands_it_cannot_use(sets, tmp_path, caplog):
    """--out the generations' shard folder wrote per_generation.npz among the shards, and the folder was refused as
    generations from then on; a bands file calibrated on an extractor's features of before its revision was taken
    without a word (a run's own was refused); bands on another scale (the paper's L2 edges for rms-l2 distances)
    gave a confident 100 % without a word (review finds)."""
    shards = sets / "run/extraction/side"
    r = invoke("evaluate", "--generated", shards, "--train", sets / "train.npz", "--out", shards,
               "--bands", "high=0:0.01")
    assert r.exit_code == 2 and "is the folder of shards given as --generated" in " ".join(r.output.split()), r.output
    assert sorted(p.name for p in shards.iterdir()) == ["shard-00000.npz", "shard-00001.npz"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"similarity": "cosine:efficientnet-lite0", "bands": {"high": [0.9, 1.0]}}))
    from side_extract.metrics import read_bands_file

    with pytest.raises(ValueError, match=r"calibrated on efficientnet-lite0's features of before revision 2"):
        read_bands_file(old, "cosine:efficientnet-lite0")
    with caplog.at_level(logging.WARNING):
        r = invoke("evaluate", "--generated", shards, "--train", sets / "train.npz", "--out", tmp_path / "e",
                   "--bands", "high=0:1.4,mid=1.4:1.6,low=1.6:1.85", "--carlini-n", 3)
    assert r.exit_code == 0, r.output
    assert "bands mid=1.4:1.6, low=1.6:1.85 lie outside the scores rms-l2 can take ([0, 1])" in caplog.text


def test_evaluate_out_of_memory_names_its_chunk_options_not_a_batch_size(sets, monkeypatch):
    """side evaluate out of memory was told to "lower a batch size (the config's batch_size keys, or the command's
    batch-size option)": it has none; its blocks are --query-chunk and --ref-chunk (a review's find)."""
    from side_extract.neighbors import NearestNeighborIndex

    def allocator(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 805306368 bytes")

    monkeypatch.setattr(NearestNeighborIndex, "kneighbors", allocator)
    r = invoke("evaluate", "--generated", sets / "run" / "extraction" / "side", "--train", sets / "train.npz",
               "--out", sets / "ev", "--bands", "high=0:0.05,mid=0.05:0.1")
    said = " ".join(r.output.split())
    assert r.exit_code == 2 and "error: out of memory (" in said and "lower --feature-batch-size" in said and "--ref-chunk" in said, said
    assert "batch size" not in said and "Traceback" not in said
