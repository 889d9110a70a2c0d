"""The command line: every command documents its defaults; config files and flags combine; errors are clean."""
import dataclasses
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from side_extract import config as cfg
from side_extract.cli.main import app
from side_extract.data import load_image_set

COMMANDS = [["train-target"], ["sample"], ["cluster"], ["train-classifier"], ["extract"], ["run"], ["demo"],
            ["evaluate"], ["calibrate"], ["report"], ["verify"], ["theory", "check"], ["theory", "measure"]]


def test_top_level_help_lists_commands():
    r = CliRunner().invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in ("train-target", "sample", "run", "demo", "evaluate", "report", "theory"):
        assert cmd in r.output


@pytest.mark.parametrize("cmd", COMMANDS, ids=" ".join)
def test_each_help_shows_defaults(cmd):
    r = CliRunner().invoke(app, [*cmd, "--help"], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "[default:" in r.output or cmd == ["report"] and "default" in r.output


def test_sample_config_file_then_flags(tiny_model_dir, tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text(f"model: {tiny_model_dir}\nsample: {{n: 5, steps: 2, seed: 3}}\n")
    r = CliRunner().invoke(app, ["--no-progress", "sample", "--config", str(conf), "--n", "3", "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    text = (tmp_path / "r" / "config.yaml").read_text()
    assert "n: 3" in text and "seed: 3" in text and "steps: 2" in text  # flag beats file; file beats default


def test_bad_input_is_one_clean_line(tmp_path):
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(app, ["--no-progress", "train-target", "--data", str(tmp_path / "empty"), "--out",
                                 str(tmp_path / "m")])
    assert r.exit_code == 2
    assert "holds no images" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "m").exists()  # nothing half-written
    (tmp_path / "afile").write_text("")  # an --out that is a file: refused before the data loads (it said "training
    r = CliRunner().invoke(app, ["--no-progress", "train-target", "--data", "digits:10", "--out",  # on ..." first)
                                 str(tmp_path / "afile")])
    assert r.exit_code == 2 and "is a file; expected a directory" in r.output and "training on" not in r.output, r.output
    # an --out holding others' files, and a --resize the UNet cannot halve: refused before the data loads too (they
    # came after loading and hashing it, "training on ..." printed; here the data's own error came first)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    for flags, said in ((["--out", str(tmp_path / "foreign")], "holds files train-target did not write (notes.txt)"),
                        (["--out", str(tmp_path / "m"), "--resize", "12", "--block-out-channels", "8,8,8,8",
                          "--norm-num-groups", "4"],
                         "image size 12 is not divisible by 2**3 = 8")):
        r = CliRunner().invoke(app, ["--no-progress", "train-target", "--data", str(tmp_path / "nowhere"), *flags])
        assert r.exit_code == 2 and said in r.output and "training on" not in r.output, r.output
    conf = tmp_path / "bad.yaml"
    conf.write_text("steps: 10\nbatchsize: 4\n")
    r = CliRunner().invoke(app, ["train-target", "--config", str(conf), "--out", str(tmp_path / "m")])
    assert r.exit_code == 2 and "unknown config key(s): batchsize" in r.output
    # keys YAML reads as other types, a number past float's range, a group count of 0: tracebacks before
    for text, says in (("extract:\n  on: 3\n", "unknown config key(s) in section 'extract': True; YAML reads"),
                       ("extract:\n  scale: 1" + "0" * 400 + "\n", "extract.scale (an integer of"),
                       ("extract:\n  2: 3\n  n: 4\n", "unknown config key(s) in section 'extract': 2;")):
        conf.write_text(text)
        r = CliRunner().invoke(app, ["run", str(conf), "--out", str(tmp_path / "r")])
        assert r.exit_code == 2 and says in " ".join(r.output.split()) and "Traceback" not in r.output, r.output
    for flag, says in (("--norm-num-groups=0", "error: --norm-num-groups=0 must be a positive"),
                       ("--block-out-channels=-32,-64", "must all be >= 1")):
        r = CliRunner().invoke(app, ["train-target", flag, "--out", str(tmp_path / "m")])
        assert r.exit_code == 2 and says in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "m").exists() and not (tmp_path / "r").exists()
    for args, says in ((["run", str(tmp_path)], "is a directory; a YAML file was expected"),
                       # (a run's was offered, configs/digits.yaml, which train-target refuses)
                       (["train-target", "--config", str(tmp_path), "--out", str(tmp_path / "m")],
                        "is a directory; a YAML file was expected"),
                       (["verify", str(tmp_path / "nope")], "does not exist (expected a run directory")):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2 and says in " ".join(r.output.split()), r.output
    # a folder that is no run: its report was an empty page written into it (a config.yaml of any text sufficed)
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "config.yaml").write_text("hello: world\n")
    for args in (["report", str(fake)], ["theory", "measure", str(fake)], ["verify", str(fake)]):
        r = CliRunner().invoke(app, ["--no-progress", *args])
        said = " ".join(r.output.split())
        assert r.exit_code == 2 and "is not a run directory: its config.yaml is not a run's" in said, (args, r.output)
    assert sorted(p.name for p in fake.iterdir()) == ["config.yaml"]
    r = CliRunner().invoke(app, ["verify", str(fake), "--generations", "0,-1"])  # said as indices=[0, -1]
    assert r.exit_code == 2 and "--generations='0,-1' must be generation numbers >= 0" in r.output, r.output
    for args, says in ((["--generations", "0,0"], "names a generation twice"),  # ("all 2 generations" of one)
                       (["--generations", "0", "--top", "3"], "--top 3 picks the closest generations, and "
                                                               "--generations names them")):  # (--top dropped)
        r = CliRunner().invoke(app, ["verify", str(fake), *args])
        assert r.exit_code == 2 and says in " ".join(r.output.split()), r.output
    r = CliRunner().invoke(app, ["report", str(fake / "config.yaml")])
    assert r.exit_code == 2 and "is a file, not a run directory" in " ".join(r.output.split()), r.output


def test_missing_model_directory(tmp_path):
    r = CliRunner().invoke(app, ["--no-progress", "sample", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "r")])
    assert r.exit_code == 2 and "is not a directory" in r.output


def test_training_set_that_does_not_fit_the_model(tiny_model_dir, tmp_path):
    from PIL import Image

    folder = tmp_path / "big"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(folder / f"{i}.png")
    # (from the folder's headers, before any image is decoded: a folder of photos of another size was decoded whole
    # before the message; a review's find)
    for train, says in ((f"train: {folder}", "are 16x16 (their headers), but the model makes 8x8 images; resize them "
                                             "to 8 (train_resize in a run config"),
                        ("train: digits:30\ntrain_resize: 16", "train_resize=16: the model makes 8x8 images")):
        conf = tmp_path / "run.yaml"
        conf.write_text(f"model: {tiny_model_dir}\n{train}\nextract: {{methods: [uncond], n: 2, steps: 2}}\n")
        r = CliRunner().invoke(app, ["--no-progress", "run", str(conf), "--out", str(tmp_path / "r")],
                               terminal_width=300)
        assert r.exit_code == 2 and says in r.output, r.output
        # (it named --resize of side train-target, to commands that have no such option; a review's find)
        assert "train-target" not in r.output


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "side_extract.cli.main", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "train-target" in r.stdout


def test_each_embedded_target_has_its_own_demo_config():
    from side_extract.cli.demo import demo_config
    from side_extract.models.target import load_target

    default, memorized, custom = demo_config(), demo_config("demo"), demo_config("/some/dir", "digits:100")
    assert (default.model, default.train) == ("demo-1000", "digits:1000")
    assert (memorized.model, memorized.train) == ("demo", "digits:100")
    assert (custom.model, custom.train) == ("/some/dir", "digits:100")
    assert custom.extract.methods == default.extract.methods and "cond" in custom.extract.methods
    for rc in (default, memorized):  # the config's training set fits its target
        assert load_target(rc.model).sample_shape == (1, 8, 8)


def test_demo_of_a_model_directory_audits_against_its_own_training_images(tmp_path):
    """`side demo --model DIR` audited a user's model against digits:1000, demo-1000's training set; now it needs
    the model's own (--train), refuses --train with an embedded target, and leaves Cond out for images without
    labels instead of failing on them."""
    from side_extract.cli.demo import demo_config

    np.savez(tmp_path / "plain.npz", images=np.zeros((4, 8, 8), np.uint8))
    unlabelled = demo_config("/some/dir", str(tmp_path / "plain.npz"))
    assert unlabelled.train == str(tmp_path / "plain.npz")
    assert unlabelled.extract.methods == ("side", "memguide", "uncond")
    np.savez(tmp_path / "one.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.full(4, 3))
    assert "cond" not in demo_config("/some/dir", str(tmp_path / "one.npz")).extract.methods  # one class
    with pytest.raises(ValueError, match="needs its training images: --train"):
        demo_config("/some/dir")
    with pytest.raises(ValueError, match="--train 'digits:100': the embedded target 'demo' has its own"):
        demo_config("demo", "digits:100")
    with pytest.raises(ValueError, match="--heldout 'x.npz': the embedded target 'demo-1000' has its own"):
        demo_config("demo-1000", heldout="x.npz")
    assert demo_config("/some/dir", "digits:100", str(tmp_path / "plain.npz")).evaluate.heldout == str(
        tmp_path / "plain.npz")
    r = CliRunner().invoke(app, ["--no-progress", "demo", "--out", str(tmp_path / "d"), "--model", str(tmp_path)],
                           terminal_width=300)
    assert r.exit_code == 2 and "needs its training images: --train" in r.output, r.output
    assert not (tmp_path / "d").exists()  # refused before any work


def test_demo_command_runs_its_whole_chain_on_a_tiny_config(tiny_model_dir, tmp_path, monkeypatch):
    """The default suite's run of `side demo` itself (the full demo is the slow test below): the command's chain
    after its config (audit, metrics table, findings, theory, report) on a tiny target and config."""
    from test_pipeline import tiny_rc

    import side_extract.cli.demo as demo

    rc = tiny_rc(tiny_model_dir, methods=("side", "memguide", "cond", "uncond"))
    monkeypatch.setattr(demo, "demo_config", lambda model, train, heldout: rc)
    r = CliRunner().invoke(app, ["--no-progress", "demo", "--out", str(tmp_path / "demo")], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "theory:" in r.output and "report:" in r.output
    assert (tmp_path / "demo" / "report" / "report.html").exists()
    for m in rc.extract.methods:
        assert (tmp_path / "demo" / "evaluation" / m / "metrics.json").exists(), m
    # into a run of other settings: it was replaced without a word (side run names what changed)
    import side_extract.pipeline as pipeline

    other = dataclasses.replace(rc, extract=dataclasses.replace(rc.extract, seed=7))
    monkeypatch.setattr(demo, "demo_config", lambda model, train, heldout: other)
    monkeypatch.setattr(pipeline, "run_audit", lambda *a, **k: (_ for _ in ()).throw(ValueError("stopped here")))
    r = CliRunner().invoke(app, ["--no-progress", "demo", "--out", str(tmp_path / "demo")], terminal_width=400)
    assert "settings changed since the last run into" in r.output and "extract.seed 1 -> 7" in r.output, r.output


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    r = CliRunner().invoke(app, ["--no-progress", "demo", "--out", str(tmp_path / "demo")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "demo" / "report" / "report.html").exists()


def _extract(tiny_model_dir, tmp_path, *flags: str) -> dict:
    """`side extract` of 2 generations with ``flags`` into tmp_path/r; the run config's extract section."""
    conf = tmp_path / "c.yaml"
    conf.write_text(f"model: {tiny_model_dir}\nextract: {{n: 2, steps: 2}}\n")
    r = CliRunner().invoke(app, ["--no-progress", "extract", "--run", str(tmp_path / "r"), "--config", str(conf),
                                 *flags, "--no-evaluate"])
    assert r.exit_code == 0, r.output
    return yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["extract"]


def test_verify_makes_generations_again_and_catches_an_altered_file(tiny_model_dir, tmp_path):
    _extract(tiny_model_dir, tmp_path, "--method", "memguide")
    run = tmp_path / "r"
    ok = CliRunner().invoke(app, ["verify", str(run), "--method", "memguide", "--generations", "1,0"], terminal_width=200)
    assert ok.exit_code == 0 and "all 2 generations equal the stored ones bit for bit" in ok.output, ok.output
    assert "made on" not in ok.output and "made with torch" not in ok.output  # made here, on this device and versions
    past = CliRunner().invoke(app, ["verify", str(run), "--method", "memguide", "--generations", "2"],
                              terminal_width=200)
    assert past.exit_code == 2 and "error: --generations=[2] must be a non-empty list of generations in 0 .. 1" in \
        past.output, past.output  # (said as indices=[2], the API's name)
    manifest = json.loads((run / "manifest.json").read_text())
    entry = manifest["stages"]["extraction/memguide"]
    assert entry["device"] == "cpu"
    entry.update(torch_threads=entry["torch_threads"] + 7, device="cuda:0")
    (run / "manifest.json").write_text(json.dumps(manifest))
    noted = CliRunner().invoke(app, ["verify", str(run), "--method", "memguide", "--generations", "0"], terminal_width=200)
    assert noted.exit_code == 0 and "note: made on cuda:0, made again on cpu" in noted.output, noted.output
    assert f"made with {entry['torch_threads']} torch threads" in noted.output, noted.output
    shard = run / "extraction" / "memguide" / "shard-00000.npz"
    with np.load(shard) as z:
        arrays = dict(z)
    arrays["images"][1, 0, 0] ^= 1  # one pixel of generation 1, one uint8 level
    np.savez(shard, **arrays)
    bad = CliRunner().invoke(app, ["verify", str(run), "--method", "memguide", "--generations", "0,1"], terminal_width=200)
    assert bad.exit_code == 1 and "1 of 2 generations differ" in bad.output, bad.output
    for flags, says in ((["--generations", "0,x"], "comma-separated integers"),
                        (["--generations", "2"], "0 .. 1"), ([], "give --generations"),
                        # (an empty list fell back to --top 8; a number past int64 was "got object")
                        (["--generations", ""], "--generations='' names no generation"),
                        (["--generations", "99999999999999999999"], "lie past every generation number")):
        r = CliRunner().invoke(app, ["verify", str(run), "--method", "memguide", *flags], terminal_width=200)
        assert r.exit_code == 2 and says in r.output, r.output


def test_extract_temperature_flag_reaches_the_run_config(tiny_model_dir, tmp_path):
    extract = _extract(tiny_model_dir, tmp_path, "--method", "uncond", "--temperature", "3")
    assert extract["temperature"] == 3.0 and extract["cond_temperature"] == 2.0 and extract["n"] == 2  # Cond keeps its own


def test_extract_memguide_scale_flag_reaches_the_run_config(tiny_model_dir, tmp_path):
    from side_extract.data import load_shards

    extract = _extract(tiny_model_dir, tmp_path, "--method", "memguide", "--memguide-scale", "5")
    assert extract["methods"] == ["memguide"] and extract["memguide_scale"] == 5.0
    assert len(load_shards(tmp_path / "r" / "extraction" / "memguide")) == 2


def test_python_dash_m_side_extract_is_the_side_command():
    """`python -m side_extract` (what `accelerate launch -m side_extract` and `torchrun -m -- side_extract` run)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "side_extract", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Usage: side" in proc.stdout and "train-target" in proc.stdout


@pytest.mark.parametrize("device, says", [("foo", "is not a torch device: expected cpu, cuda, cuda:N or mps"),
                                          ("cuda:99", "")])
def test_a_device_torch_cannot_use_is_one_error_line_before_any_work(tmp_path, device, says):
    """--device cuda on a CPU build of torch (or a typo) ended every command in torch's assertion or parse error."""
    import side_extract

    r = CliRunner().invoke(app, ["--no-progress", "sample", "--n", "2", "--steps", "2", "--device", device,
                                 "--out", str(tmp_path / "r")])
    assert r.exit_code == 2, r.output
    assert f"error: --device='{device}'" in r.output and says in r.output and "Traceback" not in r.output
    assert not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match=f"device='{device}'"):
        side_extract.audit("demo", "digits:30", out=tmp_path / "a", device=device)
    assert not (tmp_path / "a").exists()


def test_verify_names_a_method_the_run_never_extracted(tmp_path):
    """`side verify RUN --method bogus` said 'give --generations', and following that hint gave the real answer."""
    (tmp_path / "run" / "extraction" / "uncond").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("model: demo\n")
    r = CliRunner().invoke(app, ["verify", str(tmp_path / "run"), "--method", "bogus"], terminal_width=200)
    assert r.exit_code == 2 and "--method='bogus': the run holds no extraction of it (it holds: uncond)" in r.output


def test_extract_says_when_it_cannot_evaluate(tiny_model_dir, tmp_path):
    """`side extract` (evaluation on by default) on a run without a training set skipped evaluation without a word."""
    conf = tmp_path / "c.yaml"
    conf.write_text(f"model: {tiny_model_dir}\nextract: {{n: 2, steps: 2}}\n")
    r = CliRunner().invoke(app, ["--no-progress", "extract", "--run", str(tmp_path / "r"), "--config", str(conf),
                                 "--method", "uncond"], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "not evaluated: the run has no training set" in r.output


def test_run_says_when_it_cannot_evaluate_and_still_writes_its_report(tiny_model_dir, tmp_path):
    """`side run` on a config without a training set skipped evaluation and the report (on by default) without a
    word, exit 0."""
    conf = tmp_path / "c.yaml"
    conf.write_text(f"model: {tiny_model_dir}\nextract: {{methods: [uncond], n: 2, steps: 2}}\n")
    r = CliRunner().invoke(app, ["--no-progress", "run", str(conf), "--out", str(tmp_path / "r")], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "not evaluated: the run has no training set" in r.output
    assert (tmp_path / "r" / "report" / "report.html").is_file() and "report: " in r.output


HEAVY = ("torch", "diffusers", "matplotlib", "sklearn", "peft")


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["bench", "fair", "--help"], ["run"],
                                  ["--threads", "-1", "sample"], ["--version"]], ids=" ".join)
def test_help_and_usage_errors_import_no_heavy_library(argv):
    """`side --help`, a subcommand's --help and a usage error answer at once (they took ~10 s: the CLI imported
    torch, diffusers and matplotlib before parsing anything)."""
    code = ("import sys\nfrom side_extract.cli.main import app\n"
            f"try:\n    app({argv!r}, prog_name='side')\nexcept SystemExit as e:\n    code = e.code\n"
            f"print('LOADED', [m for m in {HEAVY!r} if m in sys.modules], code)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    line = [x for x in r.stdout.splitlines() if x.startswith("LOADED")][-1]
    assert line.startswith("LOADED []"), line
    assert line.endswith(" 0" if "--help" in argv or "--version" in argv else " 2"), (line, r.stderr[-500:])


def test_threads_are_set_when_a_command_starts_its_work(tmp_path):
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        r = CliRunner().invoke(app, ["--threads", "1", "report", str(tmp_path / "none")])
        assert r.exit_code == 2  # no such run: the command ran, after setting the threads
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_new_run_directory_says_which_model_it_used(tmp_path):
    """`side sample --out NEW` with nothing naming a model ran the embedded `demo` target without a word; it says
    so when it is done (and a command that fails says only its error)."""
    argv = ["--no-progress", "sample", "--n", "2", "--steps", "2"]
    r = CliRunner().invoke(app, [*argv, "--out", str(tmp_path / "new")])
    assert r.exit_code == 0 and "no config names a model, so the run used the default" in r.output, r.output
    assert "'demo'" in r.output
    again = CliRunner().invoke(app, [*argv, "--out", str(tmp_path / "new")])  # its config.yaml names it now
    assert again.exit_code == 0 and "no config names a model" not in again.output, again.output
    named = CliRunner().invoke(app, [*argv, "--out", str(tmp_path / "new2"), "--model", "demo"])
    assert named.exit_code == 0 and "no config names a model" not in named.output, named.output


def test_side_run_says_when_its_config_names_no_model(tmp_path):
    """`side run CONFIG` with no model: in CONFIG audited the embedded demo target without a word (a user's own
    training set then met a model it was never trained on); it says so before the run starts."""
    body = ("train: digits:20\nextract: {methods: [uncond], n: 2, steps: 2}\n"
            "evaluate: {bands: 'high=0:0.1,mid=0.1:0.15,low=0.15:0.2', quality: [], carlini_n: 2}\n")
    (tmp_path / "c.yaml").write_text(body)
    argv = ["--no-progress", "run", str(tmp_path / "c.yaml"), "--no-report"]
    r = CliRunner().invoke(app, [*argv, "--out", str(tmp_path / "r")], terminal_width=300)
    assert r.exit_code == 0 and "c.yaml names no model, so the run used the default" in r.output, r.output
    (tmp_path / "c.yaml").write_text("model: demo\n" + body)
    named = CliRunner().invoke(app, [*argv, "--out", str(tmp_path / "r2")], terminal_width=300)
    assert named.exit_code == 0 and "names no model" not in named.output, named.output


def test_no_progress_prints_a_line_when_a_stage_starts_and_ends(tiny_model_dir, tmp_path):
    """--no-progress (logs, CI) printed nothing until the results; now each stage that works says how far it got
    and when it is done, and a stage that is skipped says nothing."""
    conf = tmp_path / "c.yaml"
    conf.write_text(f"model: {tiny_model_dir}\ntrain: digits:30\nextract: {{n: 3, steps: 2}}\n"
                    "evaluate: {carlini_n: 2, quality: []}\n")
    argv = ["--no-progress", "extract", "--run", str(tmp_path / "r"), "--config", str(conf), "--method", "uncond"]
    r = CliRunner().invoke(app, argv, terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "extract uncond: 3 of 3 done in" in r.output and "evaluate uncond: 3 of 3 done in" in r.output
    again = CliRunner().invoke(app, argv, terminal_width=200)
    assert again.exit_code == 0 and "extract uncond:" not in again.output, again.output


def test_progress_lines_say_progress_every_so_often_and_the_end_once(monkeypatch):
    from side_extract.cli import common

    clock = iter([0.0, 10.0, 20.0, 41.0, 50.0, 75.0])  # made at 0; reports at 10, 20, 41, 50, 75
    monkeypatch.setattr(common.time, "monotonic", lambda: next(clock))
    said = []
    monkeypatch.setattr(common.console, "print", lambda text, **_: said.append(text))
    cb = common.progress_lines("stage", every=30.0)
    for done in (1, 2, 3, 4, 5, 5):  # the last: after done, nothing more (and no clock read)
        cb(done, 5)
    assert said == ["stage: 1 of 5, 10 s", "stage: 3 of 5, 41 s", "stage: 5 of 5 done in 75 s"]


def test_version_is_the_installed_distributions():
    from importlib import metadata

    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"side-extract {metadata.version('side-extract')}"


def test_the_own_model_template_is_the_memorization_aware_form_with_three_paths_to_fill(tiny_model_dir, tmp_path):
    """configs/own-model.yaml (README "Your own model") parses, is the benchmark's mem-k25 form, and with its three
    paths pointed at real files passes the pre-run checks: nothing in it needs labels."""
    from pathlib import Path

    from side_extract.config import from_dict, load_yaml
    from side_extract.models.target import load_target
    from side_extract.pipeline import preflight

    data = load_yaml(Path(__file__).resolve().parents[1] / "configs" / "own-model.yaml")
    rc = from_dict(cfg.RunConfig, data)
    assert (rc.model, rc.train, rc.evaluate.heldout) == ("/path/to/model", "/path/to/train", "/path/to/heldout")
    assert (rc.surrogate.n_clusters, rc.surrogate.memorized_fraction, rc.classifier.time_blocks) == (25, 0.25, "every")
    assert not {"cond", "side-teacher"} & set(rc.extract.methods)
    digits = load_image_set("digits")
    np.savez(tmp_path / "train.npz", images=digits.images[:30])
    np.savez(tmp_path / "heldout.npz", images=digits.images[30:1030])  # the 0.001 quantile's 1,000
    paths = {"model": str(tiny_model_dir), "train": str(tmp_path / "train.npz"),
             "evaluate": {"heldout": str(tmp_path / "heldout.npz")}}
    filled = from_dict(cfg.RunConfig, cfg.merge(data, paths))
    preflight(filled, load_target(tiny_model_dir))


def test_out_of_memory_and_a_message_with_brackets_are_one_clean_line(tmp_path, monkeypatch):
    """A batch size of 10^12 ended in a traceback from torch's allocator (status 1); an error naming a path with
    brackets lost them (rich read `[a]` as markup): '/tmp/r[a]/x' was said as '/tmp/r/x'. (Such a batch is refused
    by the config now, with batch sizes past torch's own, which were still a traceback: the allocator's error is
    raised here as it says it.)"""
    import side_extract.models.target as target_module

    r = CliRunner().invoke(app, ["--threads", "1", "--no-progress", "train-target", "--steps", "2", "--batch-size",
                                 str(2**62), "--out", str(tmp_path / "m")])
    assert r.exit_code == 2 and f"--batch-size={2**62} must be at most" in " ".join(r.output.split()), r.output

    def allocator(*args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 8000000000000 bytes")

    monkeypatch.setattr(target_module, "add_noise", allocator)
    r = CliRunner().invoke(app, ["--threads", "1", "--no-progress", "train-target", "--steps", "2", "--out",
                                 str(tmp_path / "m")])
    said = " ".join(r.output.split())
    assert r.exit_code == 2 and "error: out of memory (" in said and "lower a batch size" in said, r.output
    assert "Traceback" not in r.output and not (tmp_path / "m").exists()
    monkeypatch.undo()
    odd = tmp_path / "r[a]" / "x"
    r = CliRunner().invoke(app, ["report", str(odd)])
    assert r.exit_code == 2 and f"'{odd}' does not exist" in " ".join(r.output.split()), r.output


def test_a_model_directory_with_a_config_diffusers_cannot_build_is_one_clean_line(tiny_model_dir, tmp_path):
    """A scheduler config with num_train_timesteps -5 or an unknown beta_schedule was a traceback from diffusers
    (status 1); an unreadable unet/config.json was said without naming the file."""
    import json
    import shutil

    for where, edit, says in (("scheduler/scheduler_config.json", {"num_train_timesteps": -5},
                               "scheduler/scheduler_config.json cannot be loaded by diffusers"),
                              ("scheduler/scheduler_config.json", {"beta_schedule": "weird"},
                               "scheduler/scheduler_config.json cannot be loaded by diffusers (NotImplementedError"),
                              ("unet/config.json", None, "unet/config.json is not a readable config")):
        model = tmp_path / "m"
        shutil.rmtree(model, ignore_errors=True)
        shutil.copytree(tiny_model_dir, model)
        f = model / where
        f.write_text(json.dumps({**json.loads(f.read_text()), **edit}) if edit else "{bad")
        r = CliRunner().invoke(app, ["--no-progress", "sample", "--model", str(model), "--n", "2", "--out",
                                     str(tmp_path / "r")])
        said = " ".join(r.output.split())
        assert r.exit_code == 2 and f"model directory '{model}': {says}" in said and "Traceback" not in said, r.output
        assert not (tmp_path / "r").exists()


def test_processes_under_a_world_size_already_set_is_refused(tmp_path, monkeypatch):
    """WORLD_SIZE left in the environment (a cluster job's, an earlier export) turned --processes 2 off without a
    word: one process ran (a review's find)."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    r = CliRunner().invoke(app, ["--no-progress", "--processes", "2", "sample", "--out", str(tmp_path / "r")])
    said = " ".join(r.output.split())
    assert r.exit_code == 2 and "--processes=2: WORLD_SIZE=1 is set here" in said, r.output
    assert not (tmp_path / "r").exists()


def test_a_launch_of_a_command_it_does_not_split_is_refused(tmp_path):
    """`side --processes 2 report RUN` ran the report twice, side by side, each writing the same files."""
    for name, args in (("report", [str(tmp_path)]),
                       ("evaluate", ["--generated", "x", "--train", "digits:10", "--out", str(tmp_path / "e")]),
                       ("bench fair", ["--out", str(tmp_path / "b")])):
        r = CliRunner().invoke(app, ["--no-progress", "--processes", "2", *name.split(), *args])
        said = " ".join(r.output.split())
        assert r.exit_code == 2 and f"--processes=2: side {name} runs in one process" in said, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_bench_options_are_named_as_typed(tmp_path):
    """`side bench fair --lambdas 1,nan` said `scales_grid=[1.0, nan]`, `--n-generated -1` said `n=-1`, `side bench
    signals --n-train 0` said `scales: 0`: the config's names, not the options the user typed."""
    for args, says in ((["fair", "--lambdas", "1,nan"], "--lambdas='1,nan' must be finite numbers"),
                       (["fair", "--n-generated", "-1"], "'--n-generated'"),
                       (["fair", "--n-bootstrap", "0"], "'--n-bootstrap'"),
                       (["fair", "--n-bootstrap", "2"], "'--n-bootstrap'"),
                       (["signals", "--n-train", "0"], "'--n-train'"),
                       (["signals", "--n-synthetic", "0"], "'--n-synthetic'"),
                       # (an empty grid or replicate list was said as "scales_grid=[]", "validation_replicates")
                       (["fair", "--lambdas", ""], "--lambdas='' names no value"),
                       (["fair", "--validation", ","], "--validation=',' names no value")):
        r = CliRunner().invoke(app, ["--no-progress", "bench", *args, "--out", str(tmp_path / "b")])
        assert r.exit_code == 2 and says in " ".join(r.output.split()), (args, r.output)
    assert not (tmp_path / "b").exists()


def test_extract_into_a_run_that_does_not_exist_is_refused_without_a_config(tmp_path):
    """`side extract --run TYPO` started a whole new audit of the default target (the demo), every default method."""
    r = CliRunner().invoke(app, ["--no-progress", "extract", "--run", str(tmp_path / "typo"), "--method", "uncond"])
    said = " ".join(r.output.split())
    assert r.exit_code == 2 and f"--run '{tmp_path / 'typo'}' does not exist: side extract continues a run" in said
    assert not (tmp_path / "typo").exists()
    # side train-classifier: it said the training set was missing, and with a --config naming only methods it began
    # a new audit of the default target there
    r = CliRunner().invoke(app, ["--no-progress", "train-classifier", "--run", str(tmp_path / "typo")])
    said = " ".join(r.output.split())
    assert r.exit_code == 2 and f"--run '{tmp_path / 'typo'}' does not exist: side train-classifier continues" in said
    assert not (tmp_path / "typo").exists()
    # with --wait, which makes and locks a run not made yet, the typo was a run of the default target (a review of
    # that change)
    for command in ("extract", "train-classifier"):
        r = CliRunner().invoke(app, ["--no-progress", command, "--run", str(tmp_path / "typo"), "--wait"])
        said = " ".join(r.output.split())
        assert r.exit_code == 2 and f"--run '{tmp_path / 'typo'}' does not exist: side {command}" in said, r.output
        assert not (tmp_path / "typo").exists()


def test_the_summary_table_gives_each_methods_n_g_where_they_differ():
    """The table's title gave the first method's N_G as everyone's: under dedup-driven stopping memguide stopped at 2
    generations and uncond made 6, and the title said N_G = 2."""
    from side_extract.cli.common import console
    from side_extract.cli.run import print_summary

    def metrics(n):
        return {"similarity": "rms-l2", "orientation": "distance", "n_generated": n, "n_train": 30,
                "bands": {"high": [0, 0.1]}, "ams": {"high": 0.5}, "ums": {"high": 0.1}, "p95": 0.2,
                "carlini": {"extracted_fraction": 0.0}, "gu": {"memorized_fraction": 0.0}}

    with console.capture() as out:
        print_summary({"memguide": metrics(2), "uncond": metrics(6)})
    said = out.get()
    assert "N_G = " not in said and re.search(r"N_G \(generations\)\s*│\s*2\s*│\s*6", said), said
    with console.capture() as out:
        print_summary({"memguide": metrics(6), "uncond": metrics(6)})
    assert "N_G = 6" in out.get() and "N_G (generations)" not in out.get()


def test_train_classifier_on_methods_that_need_none_is_refused(tiny_model_dir, tmp_path):
    """`side train-classifier` on a run of uncond alone trained nothing, said 'classifiers in RUN', exit 0, and
    recorded classifier.steps in the run's config.yaml."""
    conf = tmp_path / "c.yaml"
    conf.write_text(f"model: {tiny_model_dir}\nextract: {{methods: [uncond], n: 2, steps: 2}}\n")
    r = CliRunner().invoke(app, ["--no-progress", "train-classifier", "--run", str(tmp_path / "r"), "--config",
                                 str(conf), "--steps", "3"], terminal_width=200)
    assert r.exit_code == 2 and "needs none of them" in r.output, r.output
    assert not (tmp_path / "r").exists()


def test_an_interrupted_sample_marks_its_stage_failed(tiny_model_dir, tmp_path, monkeypatch):
    """`side sample` cut short (Ctrl-C) left its stage 'running' in the manifest, which the report showed as running
    although no process held the run (run_audit marks such stages failed)."""
    import side_extract.sampling as sampling

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sampling, "sample", interrupted)
    CliRunner().invoke(app, ["--no-progress", "sample", "--model", str(tiny_model_dir), "--n", "4", "--steps", "2",
                             "--out", str(tmp_path / "r")])
    entry = json.loads((tmp_path / "r" / "manifest.json").read_text())["stages"]["synthetic"]
    assert entry["status"] == "failed" and entry["error"].startswith("KeyboardInterrupt"), entry


def test_a_run_that_recorded_relative_paths_is_not_told_its_settings_changed(tiny_model_dir, tmp_path, monkeypatch):
    """A run records its model and training set absolute since this release; rerun from the same folder, a run made
    before (config.yaml: model: tiny) was told 'settings changed since the last run: model 'tiny' -> '/.../tiny''."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model_dir, tmp_path / "tiny")
    conf = tmp_path / "rel.yaml"
    conf.write_text("model: tiny\nextract: {methods: [uncond], n: 2, steps: 2}\n")
    r = CliRunner().invoke(app, ["--no-progress", "run", str(conf), "--out", "run", "--no-report"])
    assert r.exit_code == 0, r.output
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert recorded["model"] == str(tmp_path / "tiny")
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump({**recorded, "model": "tiny"}))  # an earlier release's
    r = CliRunner().invoke(app, ["--no-progress", "run", str(conf), "--out", "run", "--no-report"], terminal_width=300)
    assert r.exit_code == 0 and "settings changed" not in r.output, r.output


def _cli(*args):
    return CliRunner().invoke(app, ["--threads", "1", "--no-progress", *map(str, args)])


def test_step_commands_say_what_they_leave_stale_and_what_their_flags_set(tiny_model_dir, tmp_path, one_thread,
                                                                          caplog):
    """A review's finds: side train-classifier --steps/--depth/--width/--lr trained cond's clean classifier with the
    config's settings and recorded the typed ones as used; side run --no-report (and a step command) left RUN/report/
    showing the earlier results without a word; side run of a config without a training set printed the earlier
    training set's findings as this run's; side sample warned of no inert setting (side run does); side cluster's
    refusal sent a run of uncond and memguide to side train-classifier, which refuses them too."""
    from test_pipeline import tiny_rc

    rc = tiny_rc(tiny_model_dir, methods=("side", "uncond"))
    conf = tmp_path / "run.yaml"
    conf.write_text(cfg.dump_yaml(rc))
    run = tmp_path / "run"
    r = _cli("run", conf, "--out", run)
    assert r.exit_code == 0 and "report: " in r.output, r.output
    r = _cli("run", conf, "--out", run, "--no-report")  # nothing made: the report is current
    assert r.exit_code == 0 and "shows the run as it was" not in r.output, r.output
    conf.write_text(cfg.dump_yaml(dataclasses.replace(rc, extract=dataclasses.replace(rc.extract, scale=4.0))))
    r = _cli("run", conf, "--out", run, "--no-report")
    said = " ".join(r.output.split())
    assert r.exit_code == 0 and f"{run / 'report'} shows the run as it was before this call: `side report " \
        f"{run}` writes it again" in said, r.output
    said_command = said.split("`")[1].split()  # the command it says works as said (it said `side report --run RUN`,
    assert said_command[:2] == ["side", "report"] and _cli(*said_command[1:]).exit_code == 0  # no such option)
    # without a training set: this run evaluated nothing, and says so, not the earlier set's findings
    conf.write_text(cfg.dump_yaml(dataclasses.replace(rc, train=None, extract=dataclasses.replace(
        rc.extract, scale=4.0, methods=("uncond",)))))
    r = _cli("run", conf, "--out", run, "--no-report")
    assert r.exit_code == 0 and "not evaluated: the run has no training set" in r.output, r.output
    assert "together" not in r.output and "distinct training images" not in r.output, r.output
    # the noise-aware classifier's flags in a run that trains none
    cond = tmp_path / "cond.yaml"
    cond.write_text(cfg.dump_yaml(dataclasses.replace(rc, extract=dataclasses.replace(rc.extract,
                                                                                        methods=("cond", "uncond")))))
    r = _cli("train-classifier", "--run", tmp_path / "k", "--config", cond, "--steps", "7", "--depth", "18")
    assert r.exit_code == 2 and "--steps, --depth set the noise-aware classifier, which only side and " \
        "side-teacher use" in " ".join(r.output.split()), r.output
    assert not (tmp_path / "k" / "classifier-clean").exists()
    # side cluster of methods that need no clustering nor classifier: sent to side extract
    unc = tmp_path / "unc.yaml"
    unc.write_text(cfg.dump_yaml(dataclasses.replace(
        rc, extract=dataclasses.replace(rc.extract, methods=("uncond", "memguide")))))
    r = _cli("cluster", "--run", tmp_path / "c", "--config", unc)
    assert r.exit_code == 2 and "go on with side extract" in " ".join(r.output.split()), r.output
    # side sample warns of its inert settings, as side run does
    with caplog.at_level("WARNING"):
        r = _cli("sample", "--out", tmp_path / "s", "--model", tiny_model_dir, "--n", "4", "--steps", "2",
                 "--scheduler", "ddpm", "--eta", "0.5")
    assert r.exit_code == 0 and "sample.eta=0.5 (DDIM's; sample.scheduler is ddpm)" in caplog.text, caplog.text
    assert "Flags left out keep the run's config.yaml values" in " ".join(_cli("sample", "--help").output.split())


def test_a_config_given_as_a_pipe_is_read(tmp_path):
    """`side run <(cat run.yaml)` was refused: "config file '/dev/fd/63' does not exist" (a pipe is no regular file)."""
    import os

    r, w = os.pipe()
    os.write(w, b"model: demo\nsample: {n: 3}\n")
    os.close(w)
    try:
        assert cfg.load_yaml(f"/dev/fd/{r}") == {"model": "demo", "sample": {"n": 3}}
    finally:
        os.close(r)
    with pytest.raises(ValueError, match="config file .*nowhere.yaml' does not exist"):
        cfg.load_yaml(tmp_path / "nowhere.yaml")


def test_a_warning_a_command_says_is_one_line(tmp_path, monkeypatch):
    """A warning said while a command ran came out in Python's own form, with the source file's path and the line
    that warned (`labeler.fit(...)`; a review's find): it is one line now, and Python's form is back after."""
    import warnings

    import numpy as np
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for k in range(30):  # one see-through image among them: data.load_folder warns
        a = np.full((8, 8, 4), 255, np.uint8)
        a[..., :3] = (k * 8) % 256
        a[0, 0, 3] = 0 if k == 0 else 255
        Image.fromarray(a, "RGBA").save(folder / f"{k:02d}.png")
    import sys

    def show(message, category, filename, lineno, file=None, line=None):  # Python's own (pytest records them)
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    monkeypatch.setattr(warnings, "showwarning", show)
    before = warnings.formatwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        r = _cli("calibrate", "--train", folder, "--out", tmp_path / "cal", "--calibration-quantiles", "0.1,0.2,0.4")
    said = [line for line in r.output.splitlines() if "transparent pixels" in line]
    assert r.exit_code == 0 and len(said) == 1 and said[0].startswith("warning: 1 of the 30 images"), r.output
    assert "warnings.warn(" not in r.output and "data.py" not in r.output, r.output
    assert warnings.formatwarning is before


@pytest.mark.parametrize("args", [
    ["bench", "extraction", "--n-generated", "0"], ["bench", "extraction", "--sweep-n-generated", "0"],
    ["bench", "variants", "--n-generated", "0"], ["bench", "variants", "--train-steps", "0"],
    ["bench", "compute", "--bench-threads", "0"], ["bench", "scale", "--bench-threads", "0"],
    ["theory", "measure", "RUN", "--probes", "0"], ["theory", "measure", "RUN", "--steps", "0"],
    ["theory", "measure", "RUN", "--batch-size", "0"], ["theory", "measure", "RUN", "--n-points", "1"],
])
def test_a_count_below_its_least_is_said_by_the_flag_typed(args, tmp_path):
    """`--probes 0` was refused as `n_probes=0`, `--n-generated 0` as `n=0`, `--bench-threads 0` as `threads=0`
    (names of the library's arguments), or, where the run folder was checked first, not at all: each such count is
    now refused by its flag, before anything is read."""
    args = [str(tmp_path / "run") if a == "RUN" else a for a in args]
    flag = next(a for a in args if a.startswith("--"))
    r = CliRunner().invoke(app, ["--no-progress", *args, "--out" if args[0] == "bench" else "--seed",
                                 str(tmp_path / "out") if args[0] == "bench" else "0"], terminal_width=200)
    assert r.exit_code == 2 and f"Invalid value for '{flag}'" in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_train_target_says_how_many_steps_its_loss_is_the_mean_of(tmp_path):
    """A 3-step training said "mean loss of the last 100 steps"."""
    r = CliRunner().invoke(app, ["--no-progress", "--threads", "1", "train-target", "--data", "digits:10", "--out",
                                 str(tmp_path / "m"), "--steps", "3", "--batch-size", "2", "--block-out-channels",
                                 "4,8", "--norm-num-groups", "4"])
    assert r.exit_code == 0 and "(steps 3, mean loss of the last 3 steps " in r.output, r.output


@pytest.mark.parametrize("args", [
    ["sample", "--out", "", "--model", "demo", "--n", "2"],
    ["train-target", "--out", "", "--data", "digits:10", "--steps", "1"],
    ["report", ""], ["verify", ""], ["theory", "measure", ""],
    ["evaluate", "--generated", "digits:4", "--train", "digits:8", "--out", ""],
    ["calibrate", "--train", "digits:8", "--out", ""],
    ["demo", "--out", ""], ["run", "", "--out", "r"], ["sample", "--out", "s", "--config", " "],
    ["bench", "fair", "--out", ""], ["bench", "fair", "--tuning-from", "", "--out", "b"],
])
def test_an_empty_path_is_refused_not_read_as_the_current_folder(args, tmp_path, monkeypatch):
    """click read an empty path (an unset shell variable: --out "$OUT") as Path(""), the current folder: `side
    sample --out ""` wrote its lock, manifest and synthetic/ there, `side train-target` a whole model, `side report ""`
    a report into the folder one stood in (a review's find). Each is refused, naming the option, and nothing is
    written."""
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["--no-progress", *args], terminal_width=200)
    said = " ".join(r.output.replace("│", " ").split())
    assert r.exit_code == 2 and "is empty: give a path" in said, r.output
    assert list(tmp_path.iterdir()) == []


def test_an_error_names_the_flag_typed_not_the_setting_behind_it(tmp_path):
    """Errors said the library's names of what the user typed as flags (a review's find): `side sample --n 0` said
    "sample.n=0", `side theory measure --n-points 1000` "n_points=1000", `side verify --generations 99`
    "indices=[99]". The flag typed is named; a value from a --config file keeps its key's name."""
    r = CliRunner().invoke(app, ["--no-progress", "sample", "--out", str(tmp_path / "s"), "--n", "0"])
    assert r.exit_code == 2 and "error: --n=0 must be a positive integer" in r.output, r.output
    (tmp_path / "c.yaml").write_text("sample:\n  n: 0\n")
    r = CliRunner().invoke(app, ["--no-progress", "sample", "--out", str(tmp_path / "s"), "--config",
                                 str(tmp_path / "c.yaml")])
    assert r.exit_code == 2 and "error: sample.n=0 must be a positive integer" in r.output, r.output
    r = CliRunner().invoke(app, ["--no-progress", "train-target", "--out", str(tmp_path / "m"), "--block-out-channels",
                                 "32,x"])
    assert r.exit_code == 2 and "error: --block-out-channels='32,x' must be comma-separated" in r.output, r.output
    for args, said in ((["cluster", "--n-clusters", "1"], "error: --n-clusters=1 must be >= 2"),  # (surrogate.
                       # n_clusters)
                       (["train-classifier", "--lr", "-1"], "error: --lr=-1.0 must be > 0")):  # (classifier.lr)
        r = CliRunner().invoke(app, ["--no-progress", *args, "--run", str(tmp_path / "r")])
        assert r.exit_code == 2 and said in r.output, r.output
    assert not any(tmp_path.glob("[smr]"))


def test_paths_with_brackets_are_printed_as_they_are(tiny_model_dir, tmp_path):
    """Messages were rich markup: a run directory "s[b]" was printed as "s" (a folder that does not exist), and
    "s[/]" ended side run in a MarkupError after its evaluation, before its report (a review's find)."""
    for name in ("s[b]", "s[/]"):
        out = tmp_path / name
        r = CliRunner().invoke(app, ["--no-progress", "sample", "--n", "2", "--steps", "2", "--out", str(out)])
        assert r.exit_code == 0, r.output
        assert f"2 images in {out / 'synthetic'}" in r.output, r.output
    conf = tmp_path / "c.yaml"
    conf.write_text(f"model: {tiny_model_dir}\ntrain: digits:30\nextract: {{methods: [uncond, memguide], n: 2, "
                    "steps: 2}\nevaluate: {carlini_n: 5}\n")
    out = tmp_path / "r[/]"
    r = CliRunner().invoke(app, ["--no-progress", "run", str(conf), "--out", str(out)], terminal_width=400)
    assert r.exit_code == 0, r.output
    assert f"each one, closest first: {out / 'findings.csv'}" in r.output and f"report: {out / 'report'}" in r.output


def test_a_run_directory_below_a_file_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """--out FILE/sub was met at the lock's mkdir ("Not a directory"), after the model and the training set had
    loaded (a review's find); train-target, calibrate and bench refused it at once."""
    from side_extract.models import target

    (tmp_path / "f.yaml").write_text("x: 1\n")
    monkeypatch.setattr(target, "load_target", lambda *a, **k: pytest.fail("the model loaded before the refusal"))
    (tmp_path / "run.yaml").write_text("model: demo\ntrain: digits:30\n")
    for argv in (["sample", "--n", "2"], ["run", str(tmp_path / "run.yaml")]):
        r = CliRunner().invoke(app, ["--no-progress", *argv, "--out", str(tmp_path / "f.yaml" / "sub")])
        assert r.exit_code == 2, r.output
        assert f"run directory '{tmp_path / 'f.yaml' / 'sub'}': '{tmp_path / 'f.yaml'}' is a file, not a folder" in (
            r.output), r.output


@pytest.mark.parametrize("argv, says", [(["--threads", "50000"], "--threads=50000 must be between 0 and 1024"),
                                        (["--processes", "100000"], "--processes=100000 must be between 1 and 256"),
                                        (["--processes", "0"], "--processes=0 must be between 1 and 256")])
def test_threads_and_processes_are_bounded(argv, says):
    """--threads had no upper bound: 50,000 ended in OpenBLAS's pthread_create failure and a segmentation fault
    (a review's find); --processes would have launched as many processes as typed."""
    r = CliRunner().invoke(app, [*argv, "report", "nowhere"])
    assert r.exit_code == 2 and says in r.output, r.output


def test_train_target_refuses_another_config_before_the_data_loads(tmp_path, monkeypatch):
    """A folder holding checkpoints of another config was refused only after the training set had loaded and been
    hashed ("training on ..." said first; a review's find): the settings are compared before the data loads, the data
    once it has."""
    import side_extract.data

    argv = ["--threads", "1", "--no-progress", "train-target", "--data", "digits:20", "--steps", "2",
            "--block-out-channels", "4,8", "--norm-num-groups", "4", "--batch-size", "8", "--checkpoint-every", "1",
            "--out", str(tmp_path / "t")]
    assert CliRunner().invoke(app, argv).exit_code == 0
    monkeypatch.setattr(side_extract.data, "load_image_set",
                        lambda *a, **k: pytest.fail("the training set loaded before the refusal"))
    r = CliRunner().invoke(app, [*argv[:-2], "--lr", "0.0005", "--out", str(tmp_path / "t")])
    assert r.exit_code == 2 and "holds a target trained with a different config or data set" in r.output, r.output


def test_a_config_given_as_a_pipe_is_read_once(tiny_model_dir, tmp_path):
    """``side sample --config <(...)``: the command read the file twice (the default-model note, then the config), so
    the second reading found the pipe empty, and the stage ran the default target with default settings, writing
    them as the run's config without a word (a review's find). The pipe's settings are the run's now."""
    import os

    read, write = os.pipe()
    os.write(write, f"model: {tiny_model_dir}\nsample: {{n: 3, steps: 2}}\n".encode())
    os.close(write)
    try:
        r = CliRunner().invoke(app, ["--threads", "1", "--no-progress", "sample", "--out", str(tmp_path / "run"),
                                     "--config", f"/dev/fd/{read}"])
    finally:
        os.close(read)
    assert r.exit_code == 0, r.output
    made = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert made["model"] == str(tiny_model_dir) and made["sample"]["n"] == 3 and made["sample"]["steps"] == 2
    assert "no config names a model" not in r.output


def test_a_bad_stop_grace_is_named(monkeypatch):
    """SIDE_STOP_GRACE_S, how long a command stopped by SIGTERM may unwind, is checked before any work."""
    for bad in ("abc", "0", "-1", "inf", "7200"):
        monkeypatch.setenv("SIDE_STOP_GRACE_S", bad)
        r = CliRunner().invoke(app, ["report", "nowhere"])
        assert r.exit_code == 2 and f"SIDE_STOP_GRACE_S={bad!r} must be a positive number of seconds" in r.output, (
            r.output)
