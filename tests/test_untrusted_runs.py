"""A run directory, config or data set someone else gave: nothing in it may write or delete outside the run, read a
file it links to, or make a few hundred bytes cost gigabytes (faults an independent security review reproduced)."""
from __future__ import annotations

import io
import json
import logging
import re
import shutil
import struct
import time
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from side_extract import config as cfg
from side_extract.data import load_image_set
from side_extract.runs import check_run_path, check_unlocked, npz_arrays, read_json, read_manifest, run_lock


def _run(tmp_path, stages=None):
    run = tmp_path / "given"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"stages": stages or {}}))
    return run


@pytest.mark.parametrize("name", ["../../victim", "/tmp/victim", "extraction/../..", "a//b", ""])
def test_a_manifest_naming_a_stage_outside_the_run_is_refused(tmp_path, name):
    """A stage named ../../victim: a sweep of the run cleared RUN/<stage> in its sub-run and copied the parent's
    RUN/<stage> into it, so the victim folder was deleted (an absolute name: any folder the user can write)."""
    run = _run(tmp_path, {name: {"status": "complete", "fingerprint": "x"}})
    with pytest.raises(ValueError, match="names stages that are no folder of the run"):
        read_manifest(run / "manifest.json")


def test_a_lock_file_linked_elsewhere_is_neither_read_nor_truncated(tmp_path):
    """RUN/.lock linked to ~/.bashrc: the writer logged its contents as the stale holder, then truncated it."""
    run = _run(tmp_path)
    victim = tmp_path / "bashrc"
    victim.write_text("export SECRET_TOKEN=abc123\n")
    (run / ".lock").symlink_to(victim)
    with pytest.raises(ValueError, match=r"\.lock' is a symbolic link, not the run's lock file"):
        with run_lock(run):
            pass
    with pytest.raises(ValueError, match="symbolic link"):
        check_unlocked(run)
    assert victim.read_text() == "export SECRET_TOKEN=abc123\n"


def test_a_run_holding_symbolic_links_is_refused_before_a_writer_follows_them(tmp_path):
    """RUN/evaluation linked to another folder: the next run cleared that folder's method directories and wrote the
    run's bands and metrics there."""
    run = _run(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    (run / "evaluation").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match=r"holds symbolic links \(evaluation\)"):
        check_run_path(run)
    (run / "evaluation").unlink()
    (run / "extraction").mkdir()
    (run / "extraction" / "side").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match=r"holds symbolic links \(extraction/side\)"):
        check_run_path(run)


@pytest.mark.parametrize("inside", ["classifier/work", "classifier-clean/work/checkpoint", "lora/work",
                                    "sweeps/scale=2/classifier/work", "synthetic/shard-00000.npz", "theory"])
def test_a_link_anywhere_inside_a_written_folder_is_refused(tmp_path, inside):
    """RUN/classifier/work linked to the receiver's folder: a rerun resuming the classifier cleared that folder's
    checkpoint/ and wrote its own there, and overwrote its log.json (only the stages' folders and their children
    were looked at; a review's find). A link at any depth of a folder a writer goes into is refused, naming it."""
    run = _run(tmp_path, {"classifier": {"status": "running", "fingerprint": "x"}})
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the receiver's own")
    link = run / inside
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(tmp_path / "mine")
    with pytest.raises(ValueError, match=rf"holds symbolic links \({inside}\)"):
        check_run_path(run)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "the receiver's own"


def test_a_planted_leftover_link_is_not_put_in_a_folders_place(tmp_path):
    """The leftover sweep puts a folder that atomic_directory moved aside back in its place: a link planted under
    such a name (.work.XXXXXXXX.side-old beside a .side-tmp folder) became RUN/classifier/work, after the run's links
    were checked. A link is never put back."""
    from side_extract.runs import sweep_leftovers

    (tmp_path / "mine").mkdir()
    stage = tmp_path / "run" / "classifier"
    (stage / ".work.abcd1234.side-tmp").mkdir(parents=True)
    (stage / ".work.abcd1234.side-old").symlink_to(tmp_path / "mine")
    sweep_leftovers(tmp_path / "run", min_age_s=0)
    assert not (stage / "work").exists() and not (stage / "work").is_symlink()
    # a folder moved aside is put back, as before
    (stage / ".work.abcd1234.side-old").unlink()
    (stage / ".work.abcd1234.side-old").mkdir()
    (stage / ".work.abcd1234.side-tmp").mkdir(exist_ok=True)
    sweep_leftovers(tmp_path / "run", min_age_s=0)
    assert (stage / "work").is_dir() and not (stage / "work").is_symlink()
    # nor a folder holding a link (its checkpoint/ linked elsewhere: a review of the first version's find)
    shutil.rmtree(stage / "work")
    (stage / ".work.abcd1234.side-old" / "checkpoint").mkdir(parents=True)
    (stage / ".work.abcd1234.side-old" / "checkpoint" / "state").symlink_to(tmp_path / "mine")
    (stage / ".work.abcd1234.side-tmp").mkdir()
    sweep_leftovers(tmp_path / "run", min_age_s=0)
    assert not (stage / "work").exists()


def test_the_report_is_not_written_through_a_linked_report_folder(tmp_path):
    from side_extract.report import write_report

    run = _run(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "report.html").write_text("the user's own")
    (run / "report").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="report' is a symbolic link, not the run's report folder"):
        write_report(run)
    assert (tmp_path / "elsewhere" / "report.html").read_text() == "the user's own"


def test_a_yaml_alias_bomb_is_refused_in_milliseconds(tmp_path):
    """Six lines of nested aliases (376 bytes) became an 80-million-character error message (4 s, 259 MB; seven or
    eight lines exhaust memory): the message printed the value in full."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 6)]
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\ntrain: *a5\n")
    data = cfg.load_yaml(tmp_path / "bomb.yaml")
    start = time.perf_counter()
    with pytest.raises(ValueError) as e:
        cfg.from_dict(cfg.RunConfig, {"train": data["train"]})
    assert len(str(e.value)) < 2000 and time.perf_counter() - start < 1.0


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(
        b"IEND", b"")


def test_small_hostile_files_are_named_errors(tmp_path):
    """An 86-byte PNG claiming 100000x100000 pixels (Pillow's DecompressionBombError, a traceback naming no file); an
    npz whose header claims 8 TiB ("out of memory: lower a batch size"); JSON and YAML nested beyond Python's
    stack (a RecursionError traceback)."""
    (tmp_path / "pngs").mkdir()
    (tmp_path / "pngs" / "bomb.png").write_bytes(_png_header(100_000, 100_000))
    with pytest.raises(ValueError, match=r"bomb.png' is unreadable or corrupt"):
        load_image_set(str(tmp_path / "pngs"))
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (2 ** 40,)})
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as z:
        z.writestr("images.npy", header.getvalue())
    for call in (lambda: npz_arrays(tmp_path / "huge.npz"), lambda: load_image_set(str(tmp_path / "huge.npz"))):
        with pytest.raises(ValueError, match=r"huge.npz' claims an array larger than memory"):
            call()
    (tmp_path / "deep.json").write_text("[" * 200_000)
    with pytest.raises(ValueError, match="deep.json' is not valid JSON"):
        read_json(tmp_path / "deep.json")
    (tmp_path / "deep.yaml").write_text("train: " + "[" * 20_000)
    with pytest.raises(ValueError, match="deep.yaml' is nested too deep"):
        cfg.load_yaml(tmp_path / "deep.yaml")


def test_log_lines_escape_control_characters():
    """A folder named with an escape sequence set the terminal's title and cleared its screen through a warning."""
    from side_extract.cli.common import _PlainFormatter

    record = logging.LogRecord("side_extract.runs", logging.WARNING, __file__, 1, "left out: %s", (
        "x\x1b]0;pwned\x07\x1b[2J",), None)
    line = _PlainFormatter("%(levelname)s %(name)s: %(message)s").format(record)
    assert "\x1b" not in line and "\x07" not in line and "x\\x1b]0;pwned\\x07\\x1b[2J" in line


def test_warnings_escape_control_characters_as_log_lines_do(tmp_path):
    """A file named with an escape sequence in a training folder someone gave set the terminal's title and cleared
    its screen through the warning that left it out: warnings went around the log lines' escaping (a review's
    find)."""
    import warnings

    from side_extract.cli.common import one_line_warnings

    for i in range(2):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "x\x1b]0;pwned\x07\x1b[2J.webp").write_bytes(b"")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        load_image_set(str(tmp_path))
    with one_line_warnings():  # how the command's warning shows it
        said = [warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in seen]
    said = [w for w in said if "pwned" in w]
    assert len(said) == 1 and "\x1b" not in said[0] and "\x07" not in said[0], said
    assert "x\\x1b]0;pwned\\x07\\x1b[2J.webp" in said[0], said


def test_an_npz_that_inflates_past_memory_is_refused_before_it_inflates(tmp_path, monkeypatch):
    """A zip bomb inside an .npz (megabytes inflating to terabytes) was inflated in full; it is measured from the
    zip's directory first (here against a machine of 1 KiB)."""
    import side_extract.data as data

    np.savez_compressed(tmp_path / "z.npz", images=np.zeros((100, 8, 8), np.uint8))
    monkeypatch.setattr(data, "_memory_bytes", lambda: 1024)
    for call in (lambda: npz_arrays(tmp_path / "z.npz"), lambda: load_image_set(str(tmp_path / "z.npz"))):
        with pytest.raises(ValueError, match=r"z.npz' inflates to .* more than this machine's .*zip bomb"):
            call()
    monkeypatch.undo()
    assert npz_arrays(tmp_path / "z.npz")["images"].shape == (100, 8, 8)


def test_links_and_manifests_that_are_no_runs_are_let_through(tmp_path):
    """What a review of this session's diff found refused: a link to the model kept beside a run (no writer goes
    through it), and a run under a folder whose manifest.json is another tool's file (read as a run's, and refused
    as damaged)."""
    run = _run(tmp_path)
    (tmp_path / "model").mkdir()
    (run / "target-model").symlink_to(tmp_path / "model")
    check_run_path(run)
    (tmp_path / "proj" / "runs").mkdir(parents=True)
    (tmp_path / "proj" / "manifest.json").write_text('[{"file": "a.png"}]')
    check_run_path(tmp_path / "proj" / "runs" / "r1")
    (tmp_path / "proj" / "manifest.json").write_text('{"files": []}')
    check_run_path(tmp_path / "proj" / "report" / "r1")


@pytest.mark.parametrize("field, value, said", [
    ("stopped", "yes", "stopped='yes' (expected an object)"),
    ("stopped", {"at": "3"}, "stopped.at='3' (expected an integer)"),
    ("finished_n", "6", "finished_n='6' (expected an integer)"),
    ("n", True, "n=True (expected an integer)"),
    ("started_unix", "now", "started_unix='now' (expected a number)"),
    ("grown_from_fingerprints", 3, "grown_from_fingerprints=3 (expected a list)"),
    ("data", [1], "data=[1] (expected an object)")])
def test_a_manifest_entry_whose_fields_the_writers_compute_with_is_damaged_is_named(tmp_path, field, value, said):
    """A stage entry's 'stopped' set to "yes" (a hand edit, a damaged file): a rerun ended in a bare AttributeError
    traceback from inside the shard stage (and finished_n or started_unix of the wrong type in a TypeError), naming
    no file, though read_manifest promises a ValueError naming it (a review's find)."""
    run = _run(tmp_path, {"extraction/uncond": {"status": "complete", "fingerprint": "x", "n": 6, field: value}})
    with pytest.raises(ValueError, match=rf"manifest.json' is damaged: stage 'extraction/uncond' has "
                                         rf"{re.escape(said)}; restore or delete it"):
        read_manifest(run / "manifest.json")
    (tmp_path / "ok").mkdir()
    run = _run(tmp_path / "ok", {"extraction/uncond": {"status": "complete", "fingerprint": None, "n": 6,
                                                      "stopped": {"at": 4, "unseen_mass": 0.1}, "seconds": 1.5}})
    read_manifest(run / "manifest.json")


def test_theory_measure_does_not_write_through_a_linked_theory_folder(tmp_path):
    """RUN/theory linked to the receiver's folder: side theory measure wrote measure.json where it pointed (theory/
    was no folder a run's writers were known to go into, and measure checked no link; a review's find)."""
    from side_extract.theory.measure import measure_run

    run = _run(tmp_path)
    (run / "config.yaml").write_text(cfg.dump_yaml(cfg.RunConfig()))
    (tmp_path / "mine").mkdir()
    (run / "theory").symlink_to(tmp_path / "mine")
    with pytest.raises(ValueError, match=r"holds symbolic links \(theory\)"):
        measure_run(run)
    assert not any((tmp_path / "mine").iterdir())


def test_side_evaluate_does_not_write_into_a_run_through_its_links(tmp_path):
    """side evaluate --out RUN/evaluation/x into a given run whose evaluation/ is linked to the receiver's folder
    checked the lock, not the links, and wrote the evaluation there."""
    from typer.testing import CliRunner

    from side_extract.cli.main import app

    run = _run(tmp_path)
    (run / "config.yaml").write_text(cfg.dump_yaml(cfg.RunConfig()))
    (tmp_path / "mine").mkdir()
    (run / "evaluation").symlink_to(tmp_path / "mine")
    r = CliRunner().invoke(app, ["--no-progress", "evaluate", "--generated", "digits:10", "--train", "digits:20",
                                 "--out", str(run / "evaluation" / "x")])
    assert r.exit_code == 2 and "holds symbolic links (evaluation)" in r.output, r.output
    assert not any((tmp_path / "mine").iterdir())
