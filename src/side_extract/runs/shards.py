"""Sharded stage output: a stage's images written shard by shard, each atomically, resumed from what was
written whole, and split between the processes of a launch."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..data import ImageSet, UnreadableShard, load_shards
from ..distributed import SINGLE, ProcessGroup
from .directory import RunDir
from .files import atomic_save_npz, npz_arrays

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""A progress callback: ``progress(done, total)``."""

def shard_path(directory: Path, k: int) -> Path:
    return directory / f"shard-{k:05d}.npz"


def shard_ranges(n: int, shard_size: int, round_size: int | None = None) -> list[list[tuple[int, int]]]:
    """The index ranges of a stage's shards, grouped in rounds: ``n`` indices in rounds of ``round_size`` (one
    round when None), each round cut into shards of at most ``shard_size``. Shard K of the stage is the K-th
    range in this order; the layout depends on these three numbers only, never on the number of processes, so a
    stage begun by one launch resumes in another."""
    if n < 1 or shard_size < 1 or (round_size is not None and round_size < 1):
        raise ValueError(f"n={n}, shard_size={shard_size}, round_size={round_size} must be >= 1")
    step = n if round_size is None else round_size
    rounds = []
    for start in range(0, n, step):
        stop = min(n, start + step)
        rounds.append([(lo, min(stop, lo + shard_size)) for lo in range(start, stop, shard_size)])
    return rounds


def write_shards(
    directory: Path,
    rounds: list[list[tuple[int, int]]],
    make: Callable[[int, int], dict[str, np.ndarray]],
    progress: Progress | None = None,
    *,
    group: ProcessGroup = SINGLE,
    stop: Callable[[int], bool] | None = None,
) -> int:
    """Write ``shard-K.npz`` for the K-th index range of ``rounds`` (:func:`shard_ranges`), skipping shards
    already written. ``stop(end)``, asked on every process once the round ending at index ``end`` is whole
    (before the last round), ends the writing there when true; it must decide from the shards alone, so that
    every process, and a resumed run, decides the same.

    ``make(start, stop)`` returns the arrays of one shard; it must include ``images`` and ``index``.
    Each shard is written atomically, so any shard present is whole. In a launch of several processes each
    writes the shards it owns (k % world == rank); with more than one round (shards that read the earlier
    rounds' ones) every process waits at the end of each round until the round is whole, so the shards within a
    round are written in parallel. Returns the number written now by this process.
    """
    directory.mkdir(parents=True, exist_ok=True)
    n = rounds[-1][-1][1]
    written, first = 0, 0

    def write_round(shards: list[tuple[int, int]], first: int) -> int:
        count = 0
        for k, (lo, hi) in enumerate(shards, start=first):
            p = shard_path(directory, k)
            if not group.owns(k):
                continue
            if p.exists():
                if progress is not None:
                    progress(hi, n)
                continue
            arrays = make(lo, hi)
            assert np.array_equal(arrays["index"], np.arange(lo, hi)), "shard index range mismatch"
            atomic_save_npz(p, **arrays)
            count += 1
            if progress is not None:
                progress(hi, n)
        return count

    for shards in rounds:
        # with several rounds, each ends in a check-in that carries errors (a bare barrier left the others waiting
        # there for the process timeout, a day, while the failed one waited at the caller's check-in, and its
        # error was never said)
        written += (group.together(lambda: write_round(shards, first)) if len(rounds) > 1
                    else write_round(shards, first))
        first += len(shards)
        end = shards[-1][1]
        if stop is not None and end < n and stop(end):
            break
    return written


def grows_from(entry: dict[str, Any] | None, fingerprint: str, n: int, fingerprint_at: Callable[[int], str] | None,
               round_size: int | None) -> int | None:
    """How many images a shard stage (its manifest ``entry``) was made or was being made with where
    :func:`shard_stage` grows it to ``n`` under ``fingerprint`` instead of making it again (None: it does not grow):
    it was made with the same settings at a smaller N (``fingerprint_at``), or begun with them at another N (its
    ``n_planned``) and cut short, not in rounds. (An interrupted one started afresh, its whole shards lost; one cut
    short while growing and run again at an N between lost them too, and its evaluations needed ``--force``.) A
    growth cut short is not taken below the N of the finished stage it grew from (``finished_n``): that stage is
    what it replaces."""
    if entry is None or fingerprint_at is None or round_size is not None:
        return None
    if entry.get("status") == "complete":
        old_n = entry.get("n")
        ok = isinstance(old_n, int) and 0 < old_n < n
    elif entry.get("status") in ("running", "failed"):
        old_n = entry.get("n_planned")
        ok = isinstance(old_n, int) and 0 < old_n != n and n >= (entry.get("finished_n") or 0)
    else:
        return None
    return old_n if ok and entry.get("fingerprint") == fingerprint_at(old_n) != fingerprint else None


def shard_stage(
    run: RunDir,
    stage: str,
    fingerprint: str,
    n: int,
    shard_size: int,
    make: Callable[[int, int, Progress | None], dict[str, np.ndarray]],
    *,
    inputs: dict[str, str] | None = None,
    progress: Progress | None = None,
    round_size: int | None = None,
    fingerprint_at: Callable[[int], str] | None = None,
    stop: Callable[[int], dict[str, Any] | None] | None = None,
    **info: Any,
) -> ImageSet:
    """A stage whose output is ``n`` images in ``run/<stage>/shard-*.npz``: skipped when complete with the same
    fingerprint, resumed at its last whole shard when interrupted, grown when complete with fewer images, else
    written afresh.

    ``make(lo, hi, progress)`` returns one shard's arrays; its progress callback counts within the whole stage.
    ``round_size``: the shards come in rounds, each made after the earlier rounds are whole (:func:`shard_ranges`,
    :func:`write_shards`). ``fingerprint_at(m)``: the stage's fingerprint had it ``m`` images, for a stage whose
    image i does not depend on ``n`` (not in rounds): a complete stage of m < ``n`` images with that fingerprint
    is grown, keeping every shard whose index range is the same in both layouts. ``stop(end)``: with rounds, asked
    after each round but the last (:func:`write_shards`); a dict ends the stage there with fewer than ``n``
    images, and is recorded in the manifest entry as ``stopped``: ``{"at": end, **that dict}``. In a launch of
    several processes the main one decides and records; every process writes its own shards.
    """
    group = run.group
    directory = run.path / stage
    decision = None
    rounds = shard_ranges(n, shard_size, round_size)
    if group.main:
        entry = run.stage_entry(stage)
        old_n = grows_from(entry, fingerprint, n, fingerprint_at, round_size)
        if old_n is not None:
            log.info("stage %s: %s, keeping its whole shards", stage, f"growing its {old_n} images to {n}"
                     if old_n < n else f"made at {n} images (begun with {old_n} and cut short)")
            # recorded first: cut short before the unlinking below, the manifest still called the stage complete
            # at old_n with a shard gone (and the check below removes a shard of the old layout a cut left behind)
            decision = run.grow(stage, fingerprint, inputs, old_n, n_planned=n)
            new = {r: k for k, r in enumerate(shard_ranges(n, shard_size)[0])}
            for k, r in enumerate(shard_ranges(old_n, shard_size)[0]):
                if new.get(r) != k:  # (the old last shard, when it was short)
                    shard_path(directory, k).unlink(missing_ok=True)
        else:
            decision = run.begin(stage, fingerprint, inputs=inputs, n_planned=n)
        stopped_at = (entry.get("stopped") or {}).get("at") if decision == "skip" else None  # it stopped early
        n_shards = sum(1 for rnd in rounds for _, hi in rnd if stopped_at is None or hi <= stopped_at)
        ranges = [r for rnd in rounds for r in rnd]

        def whole(k: int) -> bool:  # it reads, and holds the images of its place in this layout
            try:
                return np.array_equal(npz_arrays(shard_path(directory, k), "index")["index"], np.arange(*ranges[k]))
            except ValueError:
                return False

        if decision != "fresh" and (cut := [k for k in range(n_shards) if shard_path(directory, k).exists()
                                            and not whole(k)]):
            # (a shard cut short since failed every later run, --force included, with "remake it"; one kept by a
            # resumed or grown stage failed its first rerun; the short last shard of another N's layout, left by a
            # growth cut short, was taken as a whole shard of this one)
            log.warning("stage %s: shard(s) %s do not read or hold other images than their place's (cut short, "
                        "damaged, or left by another N); writing them again", stage, ", ".join(map(str, cut)))
            for k in cut:
                shard_path(directory, k).unlink()
        if decision != "fresh" and (extra := sorted(set(directory.glob("shard-*.npz"))
                                                    - {shard_path(directory, k) for k in range(n_shards)})):
            # (a stage begun at a larger N, cut short, then made smaller and cut short again between its record and
            # the unlinking above: the old layout's last shards stayed, and load_shards read them with the stage's,
            # "complete at 6" holding 8 generations)
            log.warning("stage %s: shard file(s) %s lie outside its %d shards (left by a larger N); removing them",
                        stage, ", ".join(p.name for p in extra), n_shards)
            for p in extra:
                p.unlink()
        if decision == "skip" and not all(shard_path(directory, k).exists() for k in range(n_shards)):
            log.warning("stage %s: marked complete but shard files are missing or damaged; writing them again", stage)
            decision = run.reopen(stage)
    decision = group.share(decision)
    if decision != "skip":
        t0 = time.time()
        report = progress
        if progress is not None and group.world > 1:  # the whole is said once every process has checked in (the
            # main one's last shard can be the stage's last while another's failed: it said "6 of 6 done")
            def report(done: int, total: int) -> None:
                if done < total:
                    progress(done, total)

        def make_shard(lo: int, hi: int) -> dict[str, np.ndarray]:
            return make(lo, hi, None if report is None else (lambda done, _total: report(lo + done, n)))

        stopped: dict[str, Any] = {}

        def stop_at(end: int) -> bool:
            said = stop(end)
            if said is not None:
                stopped.update(at=end, **said)
            return said is not None

        # (checked in: a process that failed writing raises on every process, instead of the others waiting for it)
        written = group.total(group.together(lambda: write_shards(directory, rounds, make_shard, report, group=group,
                                                                  stop=None if stop is None else stop_at)))
        if stopped and progress is not None:  # ended early: the work is done at the stop (a bar fills, a line says so)
            progress(stopped["at"], stopped["at"])
        elif progress is not None and group.world > 1:  # every process has written its shards (the main one counted
            progress(n, n)  # only its own: a bar stopped short where another process wrote the last shard)
        if group.main and stopped:  # shards past the stop, left by an earlier attempt that stopped later
            # (a lost shard remade on another device can move the stop)
            for k, (lo, _) in enumerate(r for rnd in rounds for r in rnd):
                if lo >= stopped["at"]:
                    shard_path(directory, k).unlink(missing_ok=True)
        if group.main:
            run.complete(stage, n=n, shards_written_now=written, resumed=decision == "resume",
                         sampling_seconds=round(time.time() - t0, 3), processes=group.world,
                         **({"stopped": stopped} if stopped else {}), **info)
        group.barrier()
    try:
        return load_shards(directory)
    except UnreadableShard as e:  # (damaged inside since it was written: the resume reads each shard's index alone,
        # and every rerun, --force included, failed here without a word on what to do)
        raise ValueError(f"{e}: it is a shard of stage {stage}; delete it and run again, and the stage writes it "
                         "again") from None
