"""A launch of several processes (torchrun, gloo on the CPU): how it starts and ends, who says what, and an error
on one process reaching every other at once; the Python API under torchrun; which GPU each process takes. That the
processes write what one process writes is test_distributed's."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from side_extract.runs import read_json

from test_distributed import TORCHRUN

pytestmark = pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed next to this Python")


def test_an_error_on_one_process_reaches_every_process():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script = str(Path(__file__).parent / "dist_together.py")
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", script], capture_output=True, text=True,
                          env=env, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "rank 1 raised its own: bad shard on process 1" in out
    assert "rank 0 told: another process failed: process 1: ValueError: bad shard on process 1" in out
    assert "finished without an error" not in out


def _failed_launch(script: str, folder: Path, *args: str) -> str:
    """What a two-process launch of ``tests/SCRIPT FOLDER ARGS`` said, where one of its processes fails (checked)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", SIDE_PROCESS_TIMEOUT_S="40")
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", str(Path(__file__).parent / script),
                           str(folder), *args], capture_output=True, text=True, env=env, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "finished without an error" not in out, out[-3000:]
    return out


def test_an_error_in_a_round_of_shards_reaches_every_process_at_once(tmp_path):
    """Shards written in rounds ended each round at a bare barrier: process 1 failed and went to the caller's
    check-in while the main process waited at the barrier, until the process timeout (a day by default), and
    both then said only gloo's error. Each round now ends in a check-in that carries the error."""
    out = _failed_launch("dist_rounds.py", tmp_path / "out")
    assert "rank 1 ValueError: diverged on process 1" in out, out[-3000:]
    assert "rank 0 PeerFailed: another process failed: process 1: ValueError: diverged on process 1" in out
    took = [float(m) for m in re.findall(r"after (\d+) s", out)]
    assert len(took) == 2 and max(took) < 30, out[-3000:]  # at once, not at the process timeout


def _timeout_launch(timeout_s: float, sleep_s: float, late_s: float | None = None) -> subprocess.CompletedProcess:
    """tests/dist_timeout.py on two processes under ``$SIDE_PROCESS_TIMEOUT_S=TIMEOUT_S``: the main one works alone
    for SLEEP_S seconds before an exchange; process 1 starts LATE_S seconds late."""
    env = dict(os.environ, OMP_NUM_THREADS="1", SIDE_PROCESS_TIMEOUT_S=str(timeout_s))
    late = [] if late_s is None else [str(late_s)]
    return subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", str(Path(__file__).parent /
                           "dist_timeout.py"), str(sleep_s), *late], capture_output=True, text=True, env=env,
                          timeout=120)


def test_the_wait_for_the_main_process_is_bounded_by_the_configured_timeout():
    """$SIDE_PROCESS_TIMEOUT_S bounds how long a process waits at an exchange (before: torch's fixed 30 minutes,
    which ended launches whose main process worked alone or waited for a lock longer than that)."""
    short = _timeout_launch(2, 10)
    assert short.returncode != 0 and "rank 1 passed the barrier" not in short.stdout
    assert "Timed out waiting 2000ms" in short.stderr, short.stderr[-2000:]  # the configured 2 s, not another failure
    # said as what it is, naming the setting (a silent PeerFailed, and the launcher named the main process it had
    # stopped itself: "killed by signal 15"; a review's find)
    assert "no answer from the other processes within SIDE_PROCESS_TIMEOUT_S=2 s" in short.stderr, short.stderr[-2000:]
    ok = _timeout_launch(60, 3)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "rank 0 passed the barrier" in ok.stdout and "rank 1 passed the barrier" in ok.stdout


def test_the_timeout_does_not_bound_the_first_connection():
    """The setting bounded the processes' first connection too: processes that started further apart than a short
    bound (seconds apart on a loaded machine) failed there, before any work, in gloo's words. The connection now
    waits at least 30 minutes; the exchanges after it keep the bound."""
    started_late = _timeout_launch(2, 0, late_s=7)
    assert started_late.returncode == 0, started_late.stderr[-2000:]
    assert "rank 1 passed the barrier" in started_late.stdout


@pytest.mark.parametrize("mode", ["uncaught", "cli"])
def test_a_process_failing_alone_ends_the_launch_at_once(mode):
    """Process 1 fails while the main process waits for it at an exchange: the launch hung until the process
    timeout (a day by default; 300 s here), the failed process waiting at the exit barrier the main one never
    reached. Now it leaves at once and torchrun stops the main process: the launch ends by itself, not by the
    process timeout, which lies past this test's guard on the launch (a hang fails it with TimeoutExpired)."""
    script = str(Path(__file__).parent / "dist_error.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", SIDE_PROCESS_TIMEOUT_S="300")
    r = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", script, mode], capture_output=True, text=True,
                       env=env, timeout=150)
    assert r.returncode != 0 and "main passed the barrier" not in r.stdout
    assert "process 1 fails alone" in r.stdout + r.stderr


def test_a_bad_timeout_is_named():
    from side_extract.distributed import process_timeout

    try:
        for bad in ("soon", "inf", "nan", "-1", "1e12"):  # (inf was timedelta's OverflowError on every process)
            os.environ["SIDE_PROCESS_TIMEOUT_S"] = bad
            with pytest.raises(ValueError, match=f"SIDE_PROCESS_TIMEOUT_S='{bad}' must be a positive number"):
                process_timeout()
    finally:
        del os.environ["SIDE_PROCESS_TIMEOUT_S"]
    assert process_timeout().total_seconds() == 86400


def test_the_python_api_under_torchrun(tiny_model_dir, tmp_path):
    """``audit()`` on two processes: every rank took the run lock, so one failed with RunLocked (and its clean-up
    could remove the directory the other was writing); now the main process locks and writes the inputs."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script = str(Path(__file__).parent / "dist_api.py")
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", script, str(tiny_model_dir),
                           str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=300)
    out = proc.stdout + proc.stderr
    # (its head too: the process that failed first said why there, above torchrun's report of the others)
    assert proc.returncode == 0, out[:4000] + "\n[...]\n" + out[-2000:]
    assert "rank 0 done: 6 generations" in out and "rank 1 done: 6 generations" in out
    stages = read_json(tmp_path / "run" / "manifest.json")["stages"]
    assert stages["evaluation/uncond"]["status"] == "complete"
    # processes given other settings mixed their shards into one run without a word (exit 0): refused on both
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", script, str(tiny_model_dir),
                           str(tmp_path / "mixed"), "disagree"], capture_output=True, text=True, env=env, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and out.count("the processes of this launch were given different settings") >= 1
    assert not (tmp_path / "mixed" / "extraction").exists()


def test_cuda_in_a_launch_is_each_processs_own_gpu_and_needs_one(monkeypatch):
    """--device cuda under a launch of N processes per machine took cuda:<local rank> without checking that it
    exists (read from the code by a review; no GPU here: the count is simulated)."""
    from side_extract.distributed import ProcessGroup

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert ProcessGroup(rank=0, world=2, local_rank=0).device("cuda") == "cuda:0"
    assert ProcessGroup(rank=0, world=1).device("cpu") == "cpu" and ProcessGroup().device("cuda") == "cuda"
    with pytest.raises(ValueError, match="process 1 would take cuda:1, but this machine has 1 GPU"):
        ProcessGroup(rank=1, world=2, local_rank=1).device("cuda")


def test_a_gpu_named_by_number_in_a_launch_is_shared_and_the_main_process_says_so(caplog):
    """--device cuda:1 under a launch put every process on that one GPU without a word (a review's find): still
    taken as asked (small models may want it), with a warning from the main process that names --device cuda."""
    from side_extract.distributed import ProcessGroup

    with caplog.at_level("WARNING", logger="side_extract.distributed"):
        assert ProcessGroup(rank=0, world=2, local_rank=0).device("cuda:1") == "cuda:1"
    assert "all 2 processes of this launch share that one GPU; --device cuda gives each" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="side_extract.distributed"):
        ProcessGroup(rank=1, world=2, local_rank=1).device("cuda:1")  # the other process: silent
        ProcessGroup(rank=0, world=1).device("cuda:1")  # one process: nothing shared
        ProcessGroup(rank=0, world=2, local_rank=0).device("cpu")
    assert caplog.text == ""


def test_a_launch_says_a_usage_error_once_before_it_starts_and_its_errors_without_torchruns_report(tmp_path):
    """`side --processes 2 run --model X` (run takes a config file, not --model): each process of the launch used to
    parse the arguments, so the usage error was printed twice, then torchrun's failure report with a traceback, and
    the status was 1. Now the arguments parse before the launch: said once, status 2, no process started. An error
    every process meets (a model that is not there) ends the launch with status 2 and the processes' own message,
    without torchrun's report; nothing is left in the output folder."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    side = [sys.executable, "-m", "side_extract.cli.main", "--threads", "1", "--no-progress", "--processes", "2"]
    usage = subprocess.run([*side, "run", "--model", str(tmp_path / "nope")], capture_output=True, text=True,
                           env=env, timeout=120)
    said = usage.stdout + usage.stderr
    assert usage.returncode == 2 and said.count("No such option: --model") == 1, said
    assert "Traceback" not in said and "ChildFailedError" not in said and "torch.distributed" not in said
    missing = subprocess.run([*side, "sample", "--model", str(tmp_path / "nope"), "--n", "4", "--out",
                              str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)
    said = missing.stdout + missing.stderr
    assert missing.returncode == 2 and f"model '{tmp_path / 'nope'}'" in said and "is not a directory" in said, said
    assert "Traceback" not in said and "ChildFailedError" not in said and not (tmp_path / "out").exists()


def test_an_error_the_main_process_meets_alone_is_said_once_with_status_2(tmp_path, tiny_model_dir):
    """A refusal only the main process meets (a finished extraction made with other settings) reached the other
    process as a bare RuntimeError: a 45-line traceback beside the one error line. It now leaves without words of its
    own, and the launch says the error once, status 2."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    side = [sys.executable, "-m", "side_extract.cli.main", "--threads", "1", "--no-progress"]
    for steps, nproc in ((2, 1), (3, 2)):
        (tmp_path / "c.yaml").write_text(yaml.safe_dump({"model": str(tiny_model_dir), "extract": {
            "methods": ["uncond"], "n": 4, "steps": steps}}))
        r = subprocess.run([*side, "--processes", str(nproc), "extract", "--config", str(tmp_path / "c.yaml"), "--run",
                            str(tmp_path / "run"), "--no-evaluate"], capture_output=True, text=True, env=env,
                           timeout=300)
    said = r.stdout + r.stderr
    errors = [line for line in said.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "changed: extract.steps 2 -> 3" in errors[0], said
    assert "Traceback" not in said and "RuntimeError" not in said, said
    assert "leaving on an error" not in said, said  # (a warning after the error it had said: noise)


@pytest.mark.parametrize("kind", ["plain", "sweep"])
def test_a_refusal_every_process_meets_before_the_run_is_said_by_the_main_one(tmp_path, kind):
    """A config the run's checks refuse (overlapping bands) was refused by every process of a launch, each printing
    the whole refusal (twice under --processes 2, where torchrun had not stopped the others first; a sweep's checks
    nearly always). The main process checks first and says it; the others leave for its failure, without words of
    their own (PeerFailed, which the command line says nothing of)."""
    _failed_launch("dist_refusal.py", tmp_path, kind)
    said = {r: json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)}
    assert said[0]["error"] == "ValueError" and "bands 'high' (0.0:0.1) and 'mid' (0.05:0.2) overlap" in said[0]["text"]
    assert said[1]["error"] == "PeerFailed" and said[1]["text"].startswith("the main process failed: ValueError"), said


def test_only_the_main_process_checks_the_run_folder_it_is_writing(tmp_path):
    """The other processes of a launch met the run folder while the main one wrote its first files, before its
    manifest, and refused it as no run directory: test_the_python_api_under_torchrun failed so in a clean-clone CI
    (rank 1: "is not empty and holds no manifest.json ... (it holds manifest.json)"). The main one checks it (it
    holds the run's lock); the others take it as the main one made it."""
    from side_extract.distributed import ProcessGroup
    from side_extract.runs import RunDir

    run = tmp_path / "run"
    run.mkdir()
    (run / "evaluation").mkdir()  # a folder the main process writes, met before the manifest by another process
    RunDir(run, group=ProcessGroup(rank=1, world=2))
    with pytest.raises(ValueError, match="holds no manifest.json, so it is no run directory"):
        RunDir(run, group=ProcessGroup(rank=0, world=2))


def test_a_target_with_dropout_draws_other_masks_on_each_process_and_is_warned_of(tmp_path):
    """Every process seeded a target's dropout with one seed per step, so both drew the same masks for other rows
    (which no single process does); the adapters of such a target depend on the number of processes, which no
    fingerprint records, and nothing said so."""
    script = str(Path(__file__).parent / "dist_dropout.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", script, str(tmp_path)], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    a, b = np.load(tmp_path / "masks-0.npy"), np.load(tmp_path / "masks-1.npy")
    assert a.shape == b.shape and 0.3 < a.mean() < 0.7 and not np.array_equal(a, b)
    said = " ".join((r.stdout + r.stderr).split())
    assert said.count("side-lora: the target has dropout (p=0.5): each of the 2 processes draws the masks") == 1


def test_the_launcher_names_the_process_that_failed_of_its_own(monkeypatch, capsys):
    """The launcher named whichever process failed first: one stopped by it (SIGTERM, in the same second) where
    another met the error, or one that left because another had failed. A process killed by another signal (the
    kernel's OOM kill) is still the one named where the others then fail."""
    import torch.distributed.run as run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from side_extract.distributed import PEER_FAILED_STATUS, launch

    def failing(codes):
        def fake(_args):
            failures = {}
            for rank, (code, ts) in codes.items():
                failures[rank] = ProcessFailure(rank, 100 + rank, code, "<N/A>")
                failures[rank].timestamp = ts
            raise ChildFailedError("side", failures)
        return fake

    one = "process 1 of the launch of 2 ended with exit status 1"
    cases = [({0: (-15, 1000), 1: (1, 1000)}, one, 1), ({0: (PEER_FAILED_STATUS, 1000), 1: (1, 1001)}, one, 1),
             ({0: (-9, 1000), 1: (1, 1001)}, "process 0 of the launch of 2 was killed by signal 9", 1),
             ({0: (-15, 1000), 1: (2, 1000)}, "", 2),
             # in one second (torch stamps the failures it notices together): the one killed, not its survivor, which
             # left with status 1 (process 0 was named by its rank; a review's find); the one that said its error
             ({0: (1, 1000), 1: (-9, 1000)}, "process 1 of the launch of 2 was killed by signal 9", 1),
             ({0: (1, 1000), 1: (2, 1000)}, "", 2)]
    for codes, said, status in cases:
        monkeypatch.setattr(run, "run", failing(codes))
        assert launch(2, ["run"]) == status
        err = capsys.readouterr().err
        assert (said in err) if said else "error:" not in err, (codes, err)


def test_a_broken_exchange_is_another_processs_failure(monkeypatch):
    """An exchange that fails (gloo's "Connection reset by peer" from a process that was killed, or its timeout from
    one that hangs) printed gloo's traceback on the survivor, which left with status 1 and was then named by the
    launcher (a review's find): it is PeerFailed, which leaves with no words of its own and PEER_FAILED_STATUS."""
    import torch.distributed as dist

    from side_extract.distributed import PeerFailed, ProcessGroup

    def reset(*a, **k):
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:1234: Connection reset by peer")

    monkeypatch.setattr(dist, "all_gather_object", reset)
    monkeypatch.setattr(dist, "broadcast_object_list", reset)
    group = ProcessGroup(rank=0, world=2)
    for exchange in (lambda: group.gather(1), group.barrier, lambda: group.share(1), lambda: group.together(lambda: 1)):
        with pytest.raises(PeerFailed, match="the exchange with the other processes failed: .*Connection reset"):
            exchange()


def test_an_exchange_timed_out_names_the_setting(monkeypatch):
    """gloo's timeout was a PeerFailed too: the waiting process left without a word, and the launcher named the main
    process it had stopped itself, "killed by signal 15" (a review's find)."""
    import torch.distributed as dist

    from side_extract.distributed import ExchangeTimedOut, ProcessGroup

    def late(*a, **k):
        raise RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 8000ms for recv operation "
                           "to complete")

    monkeypatch.setattr(dist, "broadcast_object_list", late)
    monkeypatch.setenv("SIDE_PROCESS_TIMEOUT_S", "8")
    with pytest.raises(ExchangeTimedOut, match=r"no answer from the other processes within SIDE_PROCESS_TIMEOUT_S=8 s "
                                               r".*raise SIDE_PROCESS_TIMEOUT_S \(.*Timed out waiting 8000ms"):
        ProcessGroup(rank=1, world=2).barrier()


def test_a_training_launch_into_a_folder_another_training_holds_says_one_line(tmp_path):
    """side --processes 2 train-target into a folder another training holds: the main process was refused the lock,
    and process 1, which had gone on reading the folder, failed in DDP's constructor with a 49-line gloo traceback
    (a review's find). The others wait for the main process to hold the lock."""
    holder = subprocess.Popen([sys.executable, "-c", f"import time; from side_extract.runs import run_lock\n"
                               f"with run_lock({str(tmp_path / 'm')!r}):\n    print('held', flush=True); "
                               "time.sleep(120)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = subprocess.run([sys.executable, "-m", "side_extract.cli.main", "--threads", "1", "--no-progress",
                            "--processes", "2", "train-target", "--steps", "2", "--out", str(tmp_path / "m")],
                           capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    finally:
        holder.kill()
        holder.wait()
    said = r.stdout + r.stderr
    assert r.returncode == 2 and "is being written by another process" in said, said
    assert "Traceback" not in said, said


def _launched_by(pid: int) -> list[int]:
    """The processes whose environment names ``pid`` as their launcher (distributed.LAUNCHER_ENV)."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and f"SIDE_LAUNCHER_PID={pid}".encode() in (d / "environ").read_bytes().split(b"\0"):
                found.append(int(d.name))
        except OSError:
            continue
    return found


def test_the_processes_of_a_launch_stop_once_their_launcher_is_killed(tiny_model_dir, tmp_path):
    """side --processes 2 killed outright (SIGKILL: the OOM killer, a CI job cancelled) left its processes running,
    each in a session of its own: they went on writing the run and holding its lock, and a rerun was refused as
    written by a process the user never started (a review's find)."""
    import signal
    import time

    launcher = subprocess.Popen([sys.executable, "-m", "side_extract.cli.main", "--threads", "1", "--no-progress",
                                 "--processes", "2", "sample", "--model", str(tiny_model_dir), "--n", "100000",
                                 "--steps", "20", "--shard-size", "10", "--out", str(tmp_path / "run")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    try:
        deadline = time.time() + 240
        while not list((tmp_path / "run" / "synthetic").glob("shard-*.npz")) and time.time() < deadline:
            time.sleep(0.5)
        workers = _launched_by(launcher.pid)
        assert len(workers) == 2, workers
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.time() + 30
        while _launched_by(launcher.pid) and time.time() < deadline:
            time.sleep(0.5)
        assert _launched_by(launcher.pid) == []
    finally:
        for pid in _launched_by(launcher.pid):
            os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:  # (an assertion before its kill: the processes stop once it is gone)
            launcher.kill()
            launcher.wait()


def test_a_stage_another_process_failed_is_not_reported_done(tmp_path):
    """The main process wrote the stage's last shard while process 1 failed its own: the main one's progress said
    "6 of 6 done" before the check-in told it of the failure. The whole is reported only once every process
    has checked in."""
    out = _failed_launch("dist_progress.py", tmp_path / "run")
    main = tmp_path / "rank-0.json"  # (not parsed from stdout: the processes' lines there can run into one another)
    assert main.exists(), out[-3000:]
    told = json.loads(main.read_text())
    assert told["error"].startswith("PeerFailed: ") and "diverged on process 1" in told["error"], told
    reports = told["reported"]  # the main process's (done, total) reports
    assert reports and all(done < total for done, total in reports), reports


def _sampling(model: Path, out: Path, *args: str, **env: str) -> subprocess.Popen:
    """``side --processes 2 sample --model MODEL ARGS --out OUT`` started (``env`` added to its environment), once
    it has written ``shard-00001.npz`` (both processes sampling, or process 1's share done)."""
    import time

    proc = subprocess.Popen([sys.executable, "-m", "side_extract", "--processes", "2", "--threads", "1",
                             "--no-progress", "sample", "--model", str(model), *args, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", **env))
    deadline = time.monotonic() + 120
    while not (out / "synthetic" / "shard-00001.npz").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    return proc


def _ranks(launcher: int) -> dict[int, int]:
    """rank -> pid of the processes launcher ``launcher`` started."""
    return {int(e[5:]): pid for pid in _launched_by(launcher)
            for e in (Path("/proc") / str(pid) / "environ").read_bytes().decode().split("\0") if e.startswith("RANK=")}


def test_a_launch_stopped_by_ctrl_c_says_one_line(tiny_model_dir, tmp_path):
    """Ctrl-C to `side --processes 2 ...` ended with torch's 23-line traceback ("SignalException: Process ... got
    signal: 2"); it says one line and leaves with 128 + the signal's number, its processes stopped."""
    import signal

    out = tmp_path / "run"
    proc = _sampling(tiny_model_dir, out, "--n", "100000", "--steps", "20", "--shard-size", "8")
    try:
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    said = stdout + stderr
    assert proc.returncode == 128 + signal.SIGINT, said[-3000:]
    assert "error: the launch of 2 processes was stopped by SIGINT" in said and "Traceback" not in said, said[-3000:]


def test_a_process_of_a_launch_stopped_by_sigterm_is_named(tiny_model_dir, tmp_path):
    """SIGTERM from outside to process 1 of a launch (a job system stopping one process): the launcher named process
    0, which torchrun had stopped after it, since both ended by SIGTERM (an interruption review's find); and once a
    stopped process unwound, it waited at the stage's check-in until the others had done their share (the whole
    sample here) before it left. It leaves at once, recording when it was stopped, and the launcher names it."""
    import signal

    out = tmp_path / "run"
    proc = _sampling(tiny_model_dir, out, "--n", "100000", "--steps", "20", "--shard-size", "8")
    try:
        ranks = _ranks(proc.pid)
        os.kill(ranks[1], signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    said = stdout + stderr
    assert "error: process 1 of the launch of 2 was killed by signal 15" in said, said[-3000:]
    assert "process 0 of the launch" not in said and "Traceback" not in said, said[-3000:]
    entry = read_json(out / "manifest.json")["stages"]["synthetic"]
    assert entry["status"] == "failed" and "stopped by SIGTERM" in entry["error"], entry


def test_a_process_stopped_while_it_waits_for_the_others_leaves_within_the_grace(tiny_model_dir, tmp_path):
    """SIGTERM to a process of a launch that had done its share and waited at the stage's check-in for the others:
    Python runs the handler only once the exchange returns, so it stopped only once the others had done their share,
    without bound (a review's find; before the handler it died at once). Its watch leaves after SIDE_STOP_GRACE_S
    (here 1 s), the stop recorded, and the launcher names it; process 0's last shard takes several seconds more."""
    import signal
    import time

    out = tmp_path / "run"  # (shard 1, process 1's share, done: it waits for process 0's shard 2)
    proc = _sampling(tiny_model_dir, out, "--n", "1536", "--steps", "500", "--shard-size", "512", "--batch-size",
                     "512", SIDE_STOP_GRACE_S="1")
    try:
        time.sleep(1.0)  # (it waits in the check-in's exchange: process 0 samples shard 2)
        ranks = _ranks(proc.pid)
        sent = time.monotonic()
        os.kill(ranks[1], signal.SIGTERM)
        while Path(f"/proc/{ranks[1]}").exists() and "Z" not in (
                Path(f"/proc/{ranks[1]}/stat").read_text().rsplit(")", 1)[1].split()[:1]):
            assert time.monotonic() - sent < 60
            time.sleep(0.05)
        took = time.monotonic() - sent
        last = (out / "synthetic" / "shard-00002.npz").exists()
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    said = stdout + stderr
    assert took < 6 and not last, (took, last, said[-2000:])
    assert "error: process 1 of the launch of 2 was stopped by signal 15 (exit status 143)" in said, said[-3000:]


@pytest.mark.parametrize("command", ["sample", "train-target"])
def test_processes_given_other_settings_are_refused_by_the_step_commands_too(tiny_model_dir, tmp_path, command):
    """side run refused a launch whose processes were given other settings; side sample mixed their shards into
    one run (process 0's seed in config.yaml), and side train-target trained one model on the mixture."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "out"
    args = (["sample", "--model", str(tiny_model_dir), "--n", "4", "--steps", "2", "--shard-size", "1", "--seed",
             "{rank}"] if command == "sample" else
            ["train-target", "--data", "digits:20", "--resize", "8", "--steps", "2", "--batch-size", "4",
             "--block-out-channels", "8,8", "--norm-num-groups", "4", "--seed", "{rank}"])
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "--", str(Path(__file__).parent /
                           "dist_disagree.py"), "--threads", "1", "--no-progress", *args, "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    said = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "the processes of this launch were given different" in said, said[-3000:]
    assert not list(out.glob("synthetic/shard-*.npz")) and not (out / "unet").exists()


def test_the_app_called_with_arguments_of_its_own_launches_them(tiny_model_dir, tmp_path, monkeypatch):
    """``app([... "--processes", "2", ...])`` (a wrapper script, a test's runner) launched the outer program's
    command line, read from sys.argv: both processes failed with its options."""
    from typer.testing import CliRunner

    from side_extract.cli.main import app

    monkeypatch.setattr(sys, "argv", ["my_wrapper.py", "--some-flag-of-the-wrapper"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["--threads", "1", "--no-progress", "--processes", "2", "sample", "--model",
                                 str(tiny_model_dir), "--n", "4", "--steps", "2", "--shard-size", "2", "--out",
                                 str(out)])
    assert r.exit_code == 0, r.output[-2000:]
    assert len(list((out / "synthetic").glob("shard-*.npz"))) == 2


def test_a_launch_says_once_what_one_process_says(tiny_model_dir, tmp_path):
    """side cluster's and side train-classifier's closing lines, and side run's "settings changed" and "sweep" lines,
    were said by every process of a launch."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    side = [sys.executable, "-m", "side_extract.cli.main", "--threads", "1", "--no-progress", "--processes", "2"]
    config = {"model": str(tiny_model_dir), "sample": {"n": 24, "steps": 2, "shard_size": 8},
              "surrogate": {"n_clusters": 3, "tau": -1.0, "n_init": 1},
              "classifier": {"depth": 10, "width": 8, "steps": 2, "batch_size": 8},
              "extract": {"methods": ["side"], "n": 2, "steps": 2}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    run = str(tmp_path / "run")
    said = {}
    for command in ("cluster", "train-classifier"):
        r = subprocess.run([*side, command, "--config", str(tmp_path / "c.yaml"), "--run", run], capture_output=True,
                           text=True, env=env, timeout=300)
        said[command] = r.stdout + r.stderr
        assert r.returncode == 0, said[command][-3000:]
    assert said["cluster"].count("surrogate labels:") == 1, said["cluster"]
    assert said["train-classifier"].count("classifiers in") == 1, said["train-classifier"]
    config["extract"]["scale"] = 2.0
    config["sweep"] = {"scale": [3.0]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    r = subprocess.run([*side, "run", str(tmp_path / "c.yaml"), "--out", run, "--no-report"], capture_output=True,
                       text=True, env=env, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert out.count("settings changed since the last run") == 1 and out.count("sweep scale=3:") == 1, out


def test_a_launch_refuses_a_batch_it_cannot_split_before_sampling_and_grows_a_run_trained_without_one(
        tmp_path, tiny_model_dir):
    """side --processes 3 with classifier.batch_size 2 only warned, then sampled, embedded and clustered and failed at
    the training with "a batch of 2 rows cannot be split", naming no setting (a review's find). It is refused before
    sampling; a run whose classifier is trained (by one process) still grows its extractions under the launch."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    side = [sys.executable, "-m", "side_extract.cli.main", "--threads", "1", "--no-progress"]
    run = tmp_path / "run"

    def extract(nproc: int, n: int, steps: int = 2, *more: str) -> subprocess.CompletedProcess:
        (tmp_path / "c.yaml").write_text(yaml.safe_dump({
            "model": str(tiny_model_dir), "sample": {"n": 40, "steps": 2, "shard_size": 16},
            "surrogate": {"n_clusters": 4, "tau": -1.0, "n_init": 1},
            "classifier": {"depth": 10, "width": 8, "steps": steps, "batch_size": 2, "eval_every": 2},
            "extract": {"methods": ["side", "uncond"], "n": n, "steps": 2}}))
        return subprocess.run([*side, "--processes", str(nproc), "extract", "--config", str(tmp_path / "c.yaml"),
                               "--run", str(run), "--no-evaluate", *more], capture_output=True, text=True, env=env,
                              timeout=300)

    r = extract(3, 4)
    said = r.stdout + r.stderr
    assert r.returncode == 2 and "classifier.batch_size=2: a launch of 3 processes" in said, said
    assert "cannot be split" not in said and "would fail once it starts" not in said, said
    assert "synthetic" not in (read_json(run / "manifest.json")["stages"] if (run / "manifest.json").exists() else {})
    assert extract(1, 4).returncode == 0
    r = extract(3, 6)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (r.stdout + r.stderr).count("would fail once it starts") == 1, r.stdout + r.stderr  # (by the main process)
    assert read_json(run / "manifest.json")["stages"]["extraction/side"]["n"] == 6
    r = extract(3, 6, 4, "--force")  # to be trained again (its settings changed): refused before any stage (only
    # warned of, it failed at the training, the classifier marked failed; a review of this session's diff)
    assert r.returncode == 2 and "classifier.batch_size=2: a launch of 3" in r.stdout + r.stderr, r.stdout + r.stderr
    assert read_json(run / "manifest.json")["stages"]["classifier"]["status"] == "complete"
