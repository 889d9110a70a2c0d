"""What a run directory holds, read without writing: its manifest's stages, the methods evaluated in it, its
config, the target model it was made of, and which stages are stale."""
from __future__ import annotations

import logging
import shlex
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


from .. import config as cfg
from .files import read_json

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"  # a run directory's record of its stages (:class:`~.directory.RunDir` writes it)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """A run's ``manifest.json``: a JSON object whose ``stages`` maps each stage to an object (its ``inputs``, where
    it has them, an object too), or a ValueError naming the file."""
    m = read_json(path, dict)
    stages = m.get("stages", {})
    if not isinstance(stages, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("inputs") or {}, dict) for e in stages.values()):
        raise ValueError(f"{str(path)!r} is not a run manifest (expected a JSON object whose 'stages' maps each stage "
                         "to an object); it is damaged: restore or delete it")
    if bad := [k for k in stages if not _stage_name(k)]:  # (../../x: a sweep cleared and copied RUN/<stage>)
        raise ValueError(f"{str(path)!r} names stages that are no folder of the run ({', '.join(map(repr, bad[:3]))})"
                         ": it is damaged or not a run's; restore or delete it")
    for stage, e in stages.items():  # what the writers compute with (a damaged one was a bare AttributeError or
        # TypeError from inside a rerun, naming no file)
        fields = {**e, **({"stopped.at": e["stopped"].get("at")} if isinstance(e.get("stopped"), dict) else {})}
        if bad := [f"{k}={fields[k]!r} (expected {what})" for k, (types, what) in ENTRY_FIELDS.items()
                   if fields.get(k) is not None and (not isinstance(fields[k], types) or isinstance(fields[k], bool))]:
            raise ValueError(f"{str(path)!r} is damaged: stage {stage!r} has {'; '.join(bad)}; restore or delete it")
    return m


# the fields of a manifest's stage entry that the writers compute with: their types, and those said in words
ENTRY_FIELDS = {"status": (str, "text"), "fingerprint": (str, "text"), "n": (int, "an integer"),
                "n_planned": (int, "an integer"), "finished_n": (int, "an integer"), "grown_from": (int, "an integer"),
                "started_unix": ((int, float), "a number"), "stopped": (dict, "an object"),
                "stopped.at": (int, "an integer"), "grown_from_fingerprints": (list, "a list"),
                "data": (dict, "an object")}


def _stage_name(name: str) -> bool:
    """Whether ``name`` can be a stage: relative folder names below the run (``extraction/side``), none of them
    empty, ``.`` or ``..``."""
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and all(p not in ("", ".", "..") and "\\" not in p for p in parts)


def settings_changed(run: str | Path, rc: cfg.RunConfig,
                     recorded: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> list[str]:
    """``key old -> new`` for each setting of ``rc`` that differs from the config run directory ``run`` was last
    run with (none for a new run): what a rerun into it says before it replaces anything. ``recorded``: the
    config.yaml's dict as ``rc`` spells it (paths made absolute, as an earlier release did not record them)."""
    config = Path(run) / "config.yaml"
    if not config.is_file():
        return []
    try:
        old = cfg.load_yaml(config)
        return cfg.differences(*cfg.as_comparable(rc, recorded(old) if recorded is not None else old))
    except ValueError as e:  # (it blocked the rerun that writes it anew; the stages' fingerprints are in the manifest)
        return [f"none known: the run's config.yaml does not read ({e}), and this run writes it anew"]


def evaluated_methods(run: str | Path) -> dict[str, Path]:
    """Each method run directory ``run`` holds an evaluation of (``evaluation/<method>/metrics.json``) -> that
    folder: the config's methods first, in its order, then the others by name (a directory that ran one method at
    a time, as the benchmarks' replicates do, has a config naming only the last)."""
    run = Path(run)
    stages = read_stages(run)

    def current(m: str) -> bool:
        """Finished, and made from the extraction the run holds now (an evaluation that ``side evaluate --out``
        wrote into the folder has no manifest entry: checked below, :func:`measures_a_remade_extraction`)."""
        e = stages.get(f"evaluation/{m}")
        if e is None:
            return True
        return e.get("status") == "complete" and not remade_inputs(stages, f"evaluation/{m}")

    found = {p.parent.name: p.parent for p in (run / "evaluation").glob("*/metrics.json")}
    remeasure = {m: stage for m in found if f"evaluation/{m}" not in stages
                 and (stage := measures_a_remade_extraction(run, found[m] / "metrics.json", stages)) is not None}
    for m, stage in sorted(remeasure.items()):
        try:  # (the advice lacked --train, which side evaluate requires: it did not run as printed)
            train = (read_json(found[m] / "metrics.json", dict).get("sources") or {}).get("train")
        except ValueError:
            train = None
        again = shlex.join(["side", "evaluate", "--generated", str(run / stage), "--train",
                            train if isinstance(train, str) and train else "TRAIN", "--out", str(found[m])])
        log.warning("%s: evaluation %s (written by side evaluate) left out: it measured %s as it was before the run "
                    "made it again; evaluate it again (%s, with the other settings it was made with)", run, m, stage,
                    again)
    stale = sorted(m for m in found if not current(m) and m not in remeasure)
    found = {m: d for m, d in found.items() if m not in remeasure}
    if stale:  # (it said to rerun without --force, which refuses to replace a finished evaluation made from another
        # extraction; --force makes no finished extraction again)
        remade = [m for m in stale if (stages.get(f"evaluation/{m}") or {}).get("status") == "complete"]
        log.warning("%s: evaluation of %s left out: unfinished, or made from an extraction the run no longer holds "
                    "(rerun `side extract --run %s%s` to evaluate it again%s)", run, ", ".join(stale), run,
                    " --force" if remade else "", "; --force replaces the finished evaluation of "
                    + ", ".join(remade) + ", and makes no finished extraction again" if remade else "")
    found = {m: d for m, d in found.items() if m not in stale}
    order = _config_methods(run)
    return {m: found[m] for m in sorted(found, key=lambda k: (order.index(k) if k in order else len(order), k))}


def measures_a_remade_extraction(run: Path, metrics: Path, stages: dict[str, dict[str, Any]]) -> str | None:
    """The extraction stage of ``run`` (``extraction/<m>``) that an evaluation ``side evaluate`` wrote into it
    (``metrics``: its metrics.json) measured (:func:`own_stage`), where the run has made it again since (its
    fingerprint is another, or it is unfinished); None where it is current, or records none (an evaluation of images
    elsewhere, or one written before the stage was recorded: taken as it is). Counted as current, the old generations
    stayed in the summary, findings and report beside the new ones."""
    try:
        sources = read_json(metrics, dict).get("sources") or {}
    except ValueError:
        return None
    if (stage := own_stage(run, sources, stages)) is None:
        return None
    e = stages.get(stage) or {}
    return None if e.get("status") == "complete" and e.get("fingerprint") == sources.get(
        "generated_stage_fingerprint") else stage


def own_stage(run: str | Path, sources: dict[str, Any], stages: dict[str, dict[str, Any]]) -> str | None:
    """The stage of run directory ``run`` that an evaluation ``side evaluate`` wrote into it measured (``sources``:
    its metrics.json's), else None (images elsewhere): the stage it recorded where it recorded that the stage was
    this run's (``generated_stage_here``), or where the source it recorded is the stage's folder; evaluations written
    before it recorded that: also where the recorded source ends with the stage and the stage still has the
    fingerprint it recorded (the same generations, in a run copied or moved since, whose recorded paths are the old
    place's)."""
    source, stage, fp = (sources.get(k) for k in ("generated", "generated_stage", "generated_stage_fingerprint"))
    if not (isinstance(stage, str) and stage and isinstance(source, str) and source):
        return None
    if Path(source).resolve() == (Path(run) / stage).resolve() or sources.get("generated_stage_here") is True:
        return stage
    if sources.get("generated_stage_here") is not None:  # (recorded as another run's: no guessing from the path)
        return None
    same = fp is not None and (stages.get(stage) or {}).get("fingerprint") == fp
    return stage if same and Path(source).parts[-len(Path(stage).parts):] == Path(stage).parts else None


def generated_source(run: str | Path, method: str, folder: str | Path, metrics: dict[str, Any],
                     stages: dict[str, dict[str, Any]]) -> Path | None:
    """Where the generations an evaluation in run directory ``run`` measured lie now (``method``: its name; ``folder``:
    where it lies; ``metrics``: its ``metrics.json``; ``stages``: the run's): the run's synthetic set or extraction of
    ``method`` for an evaluation the run made, the run's stage for one ``side evaluate`` made of it
    (:func:`own_stage`), else the source it recorded (None: none). The recorded path is where they lay when it was
    made: read as it was, a run copied or moved since counted ``side evaluate``'s evaluation of its own extraction as
    other generations."""
    run, folder = Path(run), Path(folder).resolve()
    if folder == (run / SYNTHETIC_EVALUATION).resolve() and SYNTHETIC_EVALUATION in stages:
        return run / "synthetic"
    if folder == (run / "evaluation" / method).resolve() and f"evaluation/{method}" in stages:
        return run / "extraction" / method
    sources = metrics.get("sources") or {}
    if (stage := own_stage(run, sources, stages)) is not None:
        return run / stage
    source = sources.get("generated")
    return Path(source) if isinstance(source, str) and source else None


def _config_methods(run: Path) -> list[str]:
    conf = run / "config.yaml"
    return list(((cfg.load_yaml(conf).get("extract") or {}).get("methods") or []) if conf.is_file() else [])


def reference_method(run: str | Path, methods: Iterable[str]) -> str | None:
    """The evaluation among ``methods`` that a run's others are set against (evaluation.incomparable): its config's
    first method that has one, made by the call that wrote the config, with its training set and bands (None: the
    config names none of them). Against the largest group that agreed, a second ``audit()`` on another training set
    for one method called that method's new results "not compared" and the earlier call's the reference."""
    return next((m for m in _config_methods(Path(run)) if m in set(methods)), None)


SYNTHETIC_EVALUATION = "synthetic-evaluation"  # the synthetic set measured against the training set (its stage)


def evaluated_synthetic(run: str | Path) -> Path | None:
    """``RUN/synthetic-evaluation`` where it is finished and made from the synthetic set the run holds now, drawn
    from the target the run's config names now, else None."""
    d = Path(run) / SYNTHETIC_EVALUATION
    stages = read_stages(run)
    e = stages.get(SYNTHETIC_EVALUATION)
    if e is None or not (d / "metrics.json").is_file():
        return None
    # (through the synthetic set's own inputs: one another target drew was counted in the findings as this run's)
    if e.get("status") != "complete" or stale_stages(stages, read_model(run)).get(SYNTHETIC_EVALUATION):
        log.warning("%s: the synthetic set's evaluation left out: unfinished, or made from a synthetic set the run no "
                    "longer holds (made again, or drawn from another target)", run)
        return None
    return d


def read_run_config(run: str | Path, config: str | Path | None = None) -> dict[str, Any]:
    """Run directory ``run``'s ``config.yaml`` (or ``config``, a file of the run such as a stage's own
    ``extraction/<m>/config.yaml``) as a dict, with the sets ``audit()`` saved into ``inputs/`` (``train``,
    ``evaluate.heldout``: images given in memory) named where they are now where the recorded absolute path is gone:
    the run was moved or sent on since (its readers looked for them at the old place, "does not exist"). They are
    looked for in the run's ``inputs/``, and a sweep sub-run's (``RUN/sweeps/NAME``, which has none) in its parent's.
    The file's name holds its content's fingerprint, so it is the same set. Every reader of a run's config reads it
    so (the report, :class:`~side_extract.api.Audit`, the sweeps' check of their sub-runs, the step commands).
    """
    run = Path(run)
    d = cfg.load_yaml(run / "config.yaml" if config is None else Path(config))
    if "train" in d:
        d["train"] = run_input(run, d["train"])
    if isinstance(d.get("evaluate"), dict) and "heldout" in d["evaluate"]:
        d["evaluate"]["heldout"] = run_input(run, d["evaluate"]["heldout"])
    return d


def run_input(run: str | Path, spec: Any) -> Any:
    """``spec`` (an image set's spec as a file of ``run`` recorded it) where it is now: a set ``audit()`` saved into
    ``inputs/`` whose recorded absolute path is gone is looked for in the run's ``inputs/``, and a sweep sub-run's in
    its parent's (see :func:`read_run_config`); any other spec as it is."""
    if not (isinstance(spec, str) and (p := Path(spec)).is_absolute() and p.parent.name == "inputs"
            and not p.exists()):
        return spec
    run = Path(run).resolve()
    homes = [run / "inputs"] + ([run.parent.parent / "inputs"] if run.parent.name == "sweeps" else [])
    return next((str(h / p.name) for h in homes if (h / p.name).is_file()), spec)


def check_run_directory(path: str | Path, name: str = "run") -> Path:
    """``path`` if it is a run directory (it holds a run's ``config.yaml``: one that reads as a run config); else a
    ValueError that says what it is instead (a readers' check: the report of a folder holding any ``config.yaml``
    was an empty page written into it). ``name``: the argument it came in."""
    cfg.check_path(path, name)
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{str(p)!r} does not exist (expected a run directory: side run or side demo makes one)")
    if not p.is_dir():
        raise ValueError(f"{str(p)!r} is a file, not a run directory")
    if not (p / "config.yaml").is_file():
        raise ValueError(f"{str(p)!r} is not a run directory (it has no config.yaml: side run or side demo makes one)")
    for up in (1, 2):  # a stage folder holds the config it was made with (extraction/<method>/): the report of one
        # was written into it, and side verify said the run held no extraction
        run, stage = p.parents[up - 1] if len(p.parents) >= up else None, "/".join(p.parts[-up:])
        if run is not None and not (p / MANIFEST).is_file() and stage in read_stages(run):
            raise ValueError(f"{str(p)!r} is the stage folder {stage}/ of run {str(run)!r}, not a run directory: give "
                             f"{str(run)!r}")
    try:
        cfg.from_dict(cfg.RunConfig, cfg.load_yaml(p / "config.yaml"))
    except ValueError as e:
        raise ValueError(f"{str(p)!r} is not a run directory: its config.yaml is not a run's ({e})") from None
    return p


def read_stages(run: str | Path) -> dict[str, dict[str, Any]]:
    """The stage entries of run directory ``run``'s manifest, read only ({} where it has none; unlike
    :class:`RunDir`, which creates the directory)."""
    p = Path(run) / MANIFEST
    return read_manifest(p).get("stages", {}) if p.is_file() else {}



# --------------------------------------------------------------------------------------------------
# run directory


MODEL_INPUT = "model"  # an ``inputs`` key that names the target model, not a run stage


def read_model_entry(run: str | Path) -> dict[str, Any]:
    """What the run's last writer recorded in the manifest of the target the run's config names now
    (:meth:`RunDir.set_model`: ``fingerprint``, ``name``, ``prediction``); {} where nothing is recorded (a run of an
    older release)."""
    p = Path(run) / MANIFEST
    return _model_entry(read_manifest(p)) if p.is_file() else {}


def read_model(run: str | Path) -> str | None:
    """The fingerprint of the target the run's config names now, as its last writer recorded it in the manifest
    (None: not recorded, a run of an older release)."""
    return read_model_entry(run).get("fingerprint")


def _model_entry(manifest: dict[str, Any]) -> dict[str, Any]:
    """A manifest's ``model`` entry ({} where it records none, as an older release's may)."""
    m = manifest.get("model")
    return m if isinstance(m, dict) else {}


def _model_of(manifest: dict[str, Any]) -> str | None:
    return _model_entry(manifest).get("fingerprint")


def remade_inputs(stages: dict[str, dict[str, Any]], name: str, model: str | None = None) -> list[str]:
    """The run stages stage ``name`` was made from (its manifest entry's ``inputs``) that the run no longer holds
    as they were: made again since, under another fingerprint, or gone from the manifest; and ``model``
    (:data:`MODEL_INPUT`) where the stage was made from another target than ``model``, the run's now
    (:func:`read_model`; None: not compared)."""
    entry = stages.get(name) or {}
    out = []
    for k, fp in (entry.get("inputs") or {}).items():
        if k == MODEL_INPUT:
            if model is not None and fp != model:
                out.append(k)
        elif (stages.get(k) or {}).get("fingerprint") != fp:
            out.append(k)
    return out


def stale_stages(stages: dict[str, dict[str, Any]], model: str | None = None) -> dict[str, list[str]]:
    """Each finished stage made from results the run no longer holds -> the stages made again since that it was
    made from, directly or through its inputs (an extraction guided by a classifier trained on surrogate labels
    that ``side cluster`` remade names ``surrogate``); ``model`` where it was made from another target than
    ``model``, the run's now. Read from the inputs each stage records in the manifest; a stage that records none
    (made by an older release) is taken as it is."""
    roots: dict[str, list[str]] = {}

    def of(name: str, seen: tuple[str, ...] = ()) -> list[str]:
        if name not in roots:
            found = remade_inputs(stages, name, model)
            for k in (stages.get(name) or {}).get("inputs") or {}:
                if k in stages and k not in found and k not in seen:
                    found += [r for r in of(k, (*seen, name)) if r not in found]
            roots[name] = found
        return roots[name]

    return {n: of(n) for n, e in stages.items() if e.get("status") == "complete" and of(n)}


def other_target_evaluations(run: str | Path) -> dict[str, str]:
    """Each method whose finished evaluation the run holds but was made, through its extraction, from another target
    than the one its config names now (an ``audit()`` of another model for some methods leaves the others') -> why:
    such an evaluation measures another model's generations, so it is shown, never set against the others. (One made
    from results of this target made again since, a classifier retrained, is compared as it is: the report notes it.)
    """
    stages = read_stages(run)
    return {name.split("/", 1)[1]: "made from another target (the run's config names another model now)"
            for name, roots in stale_stages(stages, read_model(run)).items()
            if name.startswith("evaluation/") and MODEL_INPUT in roots}
