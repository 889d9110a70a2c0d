"""Sweeps of lambda, K and tau: each value is a sub-run ``RUN/sweeps/<name>=<value>/``.

A sub-run is an ordinary run directory. Before it runs, every stage its parent completed is shared into it
(files hard-linked, manifest entry copied), so the sub-run recomputes only what the swept value changes:
a lambda sweep reuses the synthetic set, labels and classifier and redoes extraction and evaluation; a K or
tau sweep redoes labels, classifier, extraction and evaluation. Only the classifier-guided methods are swept
(UnCond and memorization guidance do not depend on any swept value; their parent results are the reference); a
sub-run's stage that its value does not move (Cond's in a K sweep, side-lora's in a lambda sweep) is its parent's,
shared, and the report leaves it out of the sweep's curves.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
from pathlib import Path

from . import config as cfg
from .distributed import ProcessGroup
from .models.target import Target
from .pipeline import (AuditResult, ProgressFactory, absolute_paths, load_run_target, no_progress, preflight,
                       run_audit)
from .runs import RunDir, atomic_write_json, check_run_path, check_unlocked, read_run_config, read_stages, run_lock
from .summary import LABEL_FREE

log = logging.getLogger(__name__)

SWEEPABLE = {"scale": "extract", "n_clusters": "surrogate", "tau": "surrogate"}
# the methods whose generations a swept value moves (side-lora samples with lora.guidance_scale, not lambda; Cond and
# side-teacher are guided by the training set's labels, not by the surrogate clusters)
SWEPT_METHODS = {"scale": ("side", "side-teacher", "cond"), "n_clusters": ("side", "side-lora"),
                 "tau": ("side", "side-lora")}


def share_stages(parent: RunDir, child: RunDir) -> list[str]:
    """Hard-link (or copy) each complete stage of ``parent`` into ``child`` unless the child has it, or shared
    it from an earlier version of the parent's stage (then the parent's new one replaces it)."""
    shared = []
    parent_m, child_m = parent.manifest(), child.manifest()
    if not (child.path / RunDir.MANIFEST).exists():  # first: a copy cut short then leaves a run directory to resume,
        child.path.mkdir(parents=True, exist_ok=True)  # not a folder of stages with no manifest (refused as no run)
        atomic_write_json(child.path / RunDir.MANIFEST, child_m)
    for stage, entry in parent_m["stages"].items():
        mine = child_m["stages"].get(stage)
        if entry.get("status") != "complete" or (
                mine is not None and not (mine.get("shared_from") and mine.get("fingerprint") != entry.get("fingerprint"))):
            continue
        src, dst = parent.path / stage, child.path / stage
        if mine is not None:  # its entry goes first: cut short below, the child vouched for the parent's new files
            del child_m["stages"][stage]  # under its old fingerprint, and a rerun skipped them as its own
            atomic_write_json(child.path / RunDir.MANIFEST, child_m)
        if dst.exists():  # an older share of the stage, or one cut short (listed in no manifest)
            shutil.rmtree(dst)
        if src.is_dir():
            shutil.copytree(src, dst, copy_function=_link_or_copy, dirs_exist_ok=True)
        if stage == "calibration":  # its files lie outside its folder: linked before its entry is recorded (a later
            # stage's manifest write records it: cut short after, the sub-run kept the old bands under the new entry)
            _share_calibration_files(parent, child, replace=True)
        child_m["stages"][stage] = dict(entry, shared_from=str(parent.path))
        shared.append(stage)
    _share_calibration_files(parent, child, replace=False)  # (a child without them: a run of an earlier release)
    atomic_write_json(child.path / RunDir.MANIFEST, child_m)
    return shared


def _share_calibration_files(parent: RunDir, child: RunDir, *, replace: bool) -> None:
    """Link the calibration stage's files (``evaluation/bands.json``, ``null.npz``) of ``parent`` into ``child``:
    each one the child lacks, or (``replace``) every one."""
    for extra in ("evaluation/bands.json", "evaluation/null.npz"):
        if (parent.path / extra).exists() and (replace or not (child.path / extra).exists()):
            (child.path / extra).parent.mkdir(parents=True, exist_ok=True)
            (child.path / extra).unlink(missing_ok=True)
            _link_or_copy(parent.path / extra, child.path / extra)


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def sweep_configs(rc: cfg.RunConfig) -> list[tuple[str, cfg.RunConfig]]:
    """(sub-run name, its config) for every swept value in ``rc.sweep``. A sweep that would change nothing is
    refused: one of a value no method in ``extract.methods`` reads (:data:`SWEPT_METHODS`), or of K while
    ``surrogate.select_k`` picks K itself."""
    out = []
    guided = tuple(m for m in rc.extract.methods if m not in ("uncond", *LABEL_FREE))
    for name, readers in SWEPT_METHODS.items():
        if getattr(rc.sweep, name) and not set(readers) & set(rc.extract.methods):
            raise ValueError(f"sweep.{name}: no method in extract.methods ({', '.join(rc.extract.methods)}) reads "
                             f"{SWEEPABLE[name]}.{name}, so every sub-run would repeat the main run; it moves "
                             f"{', '.join(readers)}")
    if rc.sweep.n_clusters and rc.surrogate.select_k:
        raise ValueError(f"sweep.n_clusters with surrogate.select_k={list(rc.surrogate.select_k)}: K is the candidate "
                         "with the best silhouette score whatever surrogate.n_clusters says, so every sub-run would "
                         "cluster with the same K; leave select_k empty to sweep K")
    if not guided:
        return out
    for name, section in SWEEPABLE.items():
        for value in getattr(rc.sweep, name):
            try:
                sec = dataclasses.replace(getattr(rc, section), **{name: value})
            except ValueError as e:
                raise ValueError(f"sweep {name}={value}: {e}") from None
            if name == "scale":  # a lambda sweep moves every guided method's lambda, Cond's too
                sec = dataclasses.replace(sec, cond_scale=value, teacher_scale=value)
            if section == "extract":
                sec = dataclasses.replace(sec, methods=guided)
                sub = dataclasses.replace(rc, extract=sec, sweep=cfg.SweepConfig())
            else:
                sub = dataclasses.replace(rc, **{section: sec}, extract=dataclasses.replace(rc.extract, methods=guided),
                                          sweep=cfg.SweepConfig())
            out.append((sweep_name(name, value), sub))
    names = [n for n, _ in out]  # (two values alike to 6 digits shared one folder, the first lost without a word)
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"sweep: two values are both named {twice[0]} (their first 6 significant digits agree), and "
                         "would share one sub-run folder: give values that differ there")
    return out


def sweep_name(param: str, value: float | int) -> str:
    """The name of the sub-run of ``param`` = ``value`` (its folder, ``RUN/sweeps/<name>``): a float to 6
    significant digits (so read the value from the sweep, not back from the name: 2.00000025 is ``scale=2``)."""
    return f"{param}={value:g}" if isinstance(value, float) else f"{param}={value}"


def own_value(rc: cfg.RunConfig, param: str, method: str) -> float | int:
    """The value of swept ``param`` that ``method``'s results in run ``rc`` were made with (a lambda sweep sets
    Cond's and side-teacher's own lambdas, ``cond_scale`` and ``teacher_scale``, to the swept value, as
    :func:`sweep_configs` does): where the run's own result joins the sweep's curve."""
    if param == "scale":
        return rc.extract.guidance(method)[0]
    return getattr(getattr(rc, SWEEPABLE[param]), param)


def current_sweeps(run: str | Path, rc: cfg.RunConfig) -> dict[str, Path]:
    """The sweep sub-runs of ``run`` (config ``rc``) that its ``sweep:`` asks for now, each as it would be made now
    (its config.yaml is :func:`sweep_configs`'s): name -> directory. A sub-run of a value since taken out of
    ``sweep:``, made under other settings of its parent (not run again since), or holding a parent stage the parent
    has made again since, is not among them: the report and :class:`~side_extract.api.Audit` had drawn such sub-runs
    into the sweep's curves as if they were this run's."""
    out: dict[str, Path] = {}
    try:
        wanted = sweep_configs(rc)
    except ValueError:  # a sweep this config cannot make: none of its sub-runs is current
        return out
    parent = read_stages(run)
    for name, sub_rc in wanted:
        d = Path(run) / "sweeps" / name
        # and holds the parent's stages as the parent holds them now: a parent stage made again under the same
        # config (other training images or model at the same path, a new stage version) left the sub-run's copy
        # of the old one, drawn into the curves beside the parent's new results
        shared = {k: e.get("fingerprint") for k, e in read_stages(d).items() if e.get("shared_from")}
        if (d / "config.yaml").is_file() and _read_config(d) == sub_rc and all(
                (parent.get(k) or {}).get("fingerprint") == fp for k, fp in shared.items()):
            out[name] = d
    return out


def stale_sweeps(run: str | Path, rc: cfg.RunConfig, current: dict[str, Path] | None = None) -> list[str]:
    """The names of ``run``'s sweep sub-runs on disk that :func:`current_sweeps` leaves out (``current``: its answer,
    where the caller has it)."""
    root = Path(run) / "sweeps"
    on_disk = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    current = current_sweeps(run, rc) if current is None else current
    return [n for n in on_disk if n not in current]


def _read_config(d: Path) -> cfg.RunConfig | None:
    try:  # (as the parent's is read: a moved run's sub-runs were all "made under other settings")
        return cfg.from_dict(cfg.RunConfig, read_run_config(d))
    except ValueError:  # a config this code cannot read: not one it made now
        return None


def run_with_sweeps(path: str | Path, rc: cfg.RunConfig, *, device: str = "cpu",
                    progress: ProgressFactory = no_progress, wait: bool = False,
                    replace: bool = True, target: Target | None = None) -> tuple[AuditResult, dict[str, AuditResult]]:
    """The main run, then one sub-run per swept value (sharing the main run's unchanged stages).

    ``wait`` and ``replace`` apply to the main run (:func:`~side_extract.pipeline.run_audit`); sub-runs are
    redone freely when their settings change. Every sub-run's config is checked (:func:`preflight`) before the
    main run starts. The run's lock is held from the main run's start until the last sub-run is done, and each
    sub-run's own lock before its parent's stages are shared into it (``wait``: block on another writer)."""
    sweeps = sweep_configs(rc)
    if not sweeps:
        return run_audit(path, rc, device=device, progress=progress, wait=wait, replace=replace, target=target), {}
    group = ProcessGroup.from_env()

    def hold(p: Path) -> contextlib.AbstractContextManager:  # a launch is one writer: its main process locks
        return run_lock(p, wait=wait) if group.main else contextlib.nullcontext()

    check_run_path(path)
    if group.main and not wait:
        check_unlocked(path)  # another writer: said at once, before the model loads
    target = target or load_run_target(rc, device)
    def check() -> None:  # (the main process first, as run_audit's: every process of a launch said a refusal)
        preflight(rc, target.denoiser, warn_inert=False)  # (a fault of the run's own config was said as a sweep's)
        for name, sub_rc in sweeps:  # a bad sweep value fails before anything is written
            try:
                preflight(sub_rc, target.denoiser, warn_inert=False)  # (the runs warn: each sub-run what the main
                # does not)
            except ValueError as e:
                raise ValueError(f"sweep {name}: {e}") from None

    group.main_first(check)
    with hold(Path(path)):
        main = run_audit(path, rc, device=device, progress=progress, wait=wait, replace=replace, target=target)
        subs = {}
        for name, sub_rc in sweeps:
            log.info("sweep %s", name)
            child = Path(path) / "sweeps" / name
            with hold(child):
                if group.main:  # in a launch of several processes the main one copies, the others wait
                    share_stages(RunDir(path), RunDir(child))
                group.barrier()
                subs[name] = run_audit(child, sub_rc, device=device, progress=progress, wait=wait, target=target,
                                       warn_inert=cfg.inert_settings(rc))  # (what the main run has not said:
                # each sub-run whose list differed at all said its whole list again)
    if group.main and (stale := stale_sweeps(path, absolute_paths(rc))):  # (its paths as the sub-runs record them:
        # typed relative, every fresh sub-run was called an earlier config's)
        log.warning("sweeps/ also holds %s, not a value of this config's sweep (an earlier config's): left as it is, "
                    "and out of the report and Audit.sweeps", ", ".join(stale))
    return main, subs
