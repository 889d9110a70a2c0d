"""The run directory and its manifest (:class:`RunDir`): begin, complete and skip a stage."""
from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal


from .. import config as cfg
from ..distributed import SINGLE, ProcessGroup
from .contents import MANIFEST, MODEL_INPUT, _model_of, read_manifest, stale_stages
from .files import _legacies, atomic_write_json, atomic_write_text
from .fingerprints import _torch_threads, versions
from .lock import STAGE_SECTIONS, StageWouldBeReplaced, check_run_path

log = logging.getLogger(__name__)


class RunDir:
    """A run directory and its manifest.

    Parameters
    ----------
    path : the directory (created if missing)
    """

    MANIFEST = MANIFEST

    def __init__(self, path: str | Path, *, replace: bool = True, group: ProcessGroup = SINGLE) -> None:
        self.path = Path(path)
        self.replace = replace
        self.replaced: list[str] = []  # finished stages this writer made again (``begin``)
        self.grown: list[str] = []  # finished stages this writer grew (``grow``)
        self.group = group
        self.config_before: dict[str, Any] | None = None  # the run's settings before this writer's (``write_config``)
        if group.main:  # the others of a launch meet the folder while the main one writes into it: checked there,
            # they saw its first files before its manifest and refused it as no run directory (a clean-clone CI
            # failure of test_the_python_api_under_torchrun, sessions 45 and 46)
            check_run_path(self.path)
        self.path.mkdir(parents=True, exist_ok=True)

    # manifest ----------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        p = self.path / self.MANIFEST
        if not p.exists():
            return {"stages": {}}
        return read_manifest(p)

    def _write_manifest(self, m: dict[str, Any]) -> None:
        atomic_write_json(self.path / self.MANIFEST, m)

    def stage_entry(self, stage: str) -> dict[str, Any] | None:
        return self.manifest()["stages"].get(stage)

    def stage_dir(self, stage: str) -> Path:
        d = self.path / stage
        d.mkdir(parents=True, exist_ok=True)
        return d

    def begin(self, stage: str, fingerprint: str, inputs: dict[str, str] | None = None, *,
              derived: bool = False, data: dict[str, str | None] | None = None,
              legacy: str | Sequence[str] | None = None,
              n_planned: int | None = None) -> Literal["skip", "resume", "fresh"]:
        """Start ``stage``: say whether to skip it, resume it, or start it afresh (its folder cleared). A finished
        stage made with other settings is replaced only where the writer may replace (``--force``) or its inputs
        grew, unless it is ``derived``: a measurement of files the run keeps, made again from them at no loss.
        ``data``: what the stage reads that is no run stage (``"training set"`` -> its fingerprint), recorded so
        that a refusal can name what changed (the fingerprint keys it already). ``legacy``: the fingerprint an
        earlier release gave these same results (its rule keyed settings this one finds unread), or several: an
        entry made under one is taken as this one's, and its fingerprint rewritten.

        On a process other than a launch's main one, the stage must already be complete (the main process ran
        it first): it is only read."""
        entry = self.stage_entry(stage)
        was = (entry or {}).get("fingerprint")
        if self.group.main and was != fingerprint and was in _legacies(legacy):
            m = self.manifest()
            m["stages"][stage] = entry = dict(entry, fingerprint=fingerprint, rekeyed_from=was)
            self._write_manifest(m)
        if not self.group.main:
            if entry is not None and entry.get("fingerprint") == fingerprint and entry.get("status") == "complete":
                return "skip"
            raise RuntimeError(f"process {self.group.rank}: stage {stage} was not completed by the main process")
        if entry is not None and entry.get("fingerprint") == fingerprint:
            if entry.get("status") == "complete":
                log.info("stage %s: inputs and config unchanged, skipped", stage)
                return "skip"
            decision: Literal["skip", "resume", "fresh"] = "resume"
            # an interrupted growth: what it grew from (finished_n, dropped on a resume, let a second one lose the
            # finished images on divergence, and a lower N replace them without --force)
            kept = {k: entry[k] for k in ("grown_from", "grown_from_fingerprints", "finished_n") if k in entry}
        else:
            kept = {}
            decision = "fresh"
            if (refused := self.refusal(stage, fingerprint, inputs, derived=derived, data=data)) is not None:
                raise StageWouldBeReplaced(refused)
            if entry is not None and entry.get("status") == "complete":
                self.replaced.append(stage)
                log.info("stage %s: its finished results were made with other settings or inputs; made again", stage)
            if (self.path / stage).exists():
                if entry is not None:  # said first: killed while removing, the manifest said the old results stood
                    self._mark_running(stage, None, None, clearing=True)  # (readers showed "no image" for them)
                shutil.rmtree(self.path / stage)
        self._mark_running(stage, fingerprint, inputs, **kept, **({"data": data} if data else {}),
                           **({} if n_planned is None else {"n_planned": n_planned}))
        return decision

    def refusal(self, stage: str, fingerprint: str, inputs: dict[str, str] | None = None, *,
                derived: bool = False, changed: Callable[[], Sequence[str]] = tuple,
                data: dict[str, str | None] | None = None, legacy: str | Sequence[str] | None = None) -> str | None:
        """Why :meth:`begin` would refuse ``stage`` with ``fingerprint`` (None: it would not): it is finished with
        other settings or inputs, this writer may not replace, and it is neither ``derived`` nor made from inputs
        that only grew. The message names the inputs made again since, the ``data`` (:meth:`begin`) that changed
        and ``changed()``, the settings the caller found changed (``key old -> new``; asked for only when
        refusing)."""
        entry = self.stage_entry(stage)
        if (entry is None or entry.get("fingerprint") in (fingerprint, *_legacies(legacy))
                or entry.get("status") != "complete"
                or self.replace or derived or self._inputs_grew(entry, inputs)):
            return None
        said = ", ".join(f"{k} {v}" for k, v in entry.items() if k in ("n", "method", "scale")) or "see manifest.json"
        old = entry.get("inputs") or {}
        why = [*(changed() or self._section_changes(stage)),
               *("made from another target" if k == MODEL_INPUT else f"{k} made again"
                 for k, v in (inputs or {}).items() if k in old and old[k] != v),
               *(f"the {k} changed" for k, v in (data or {}).items() if k in (entry.get("data") or {})
                 and entry["data"][k] != v)]
        return (f"{stage} holds finished results made with other settings or inputs ({said})"
                + (f"; changed: {'; '.join(why)}" if why else "")
                + "; rerun with --force to replace them, or use another run directory")

    def _section_changes(self, stage: str) -> list[str]:
        """The settings of ``stage``'s config section (:data:`STAGE_SECTIONS`) that differ between the run's config
        before this writer (``config_before``) and the one it wrote: what a refusal names where its caller did not."""
        section = STAGE_SECTIONS.get(stage.split("/", 1)[0])
        now = self.path / "config.yaml"
        if section is None or self.config_before is None or not now.is_file():
            return []
        try:
            return cfg.differences(self.config_before, cfg.load_yaml(now), (f"{section}.",))
        except ValueError:  # a damaged file: the refusal says the rest
            return []

    def refuse_before(self, planned: dict[str, tuple[Any, ...]]) -> None:
        """Raise :class:`StageWouldBeReplaced` naming every stage of ``planned`` (stage -> its fingerprint, inputs,
        a function giving the settings found changed and, optionally, a dict of :meth:`refusal`'s other keywords) that
        :meth:`begin` would refuse, before any of them begins: a command that is refused leaves each sibling stage
        as it was (one method's extraction grown, or its evaluation cleared, before a later one's refusal). On the
        main process of a launch (call it through ``group.on_main``: the others learn its error)."""
        said = [r for stage, (fp, inputs, changed, *kw) in planned.items()
                if (r := self.refusal(stage, fp, inputs, changed=changed, **(kw[0] if kw else {}))) is not None]
        if said:
            raise StageWouldBeReplaced("; ".join(said))

    def out_of_date(self) -> dict[str, list[str]]:
        """For each stage this writer made again: the finished stages made from its earlier results, directly or
        through others (:func:`stale_stages`; a step command such as ``side cluster`` stops before redoing them)."""
        m = self.manifest()
        stale = stale_stages(m["stages"], _model_of(m))
        out = {}
        for stage in self.replaced:
            later = [n for n, roots in stale.items() if stage in roots]
            if later:
                out[stage] = later
        return out

    def grow(self, stage: str, fingerprint: str, inputs: dict[str, str] | None, from_n: int,
             n_planned: int | None = None) -> Literal["resume"]:
        """Mark a stage of ``from_n`` images (complete, or begun with that many and cut short) as running under
        ``fingerprint``, the same stage with more images (``n_planned``; :func:`shard_stage`): its files are kept
        and it resumes. The entry keeps the fingerprints it grew from (the stages made from it are redone without
        ``replace``: :meth:`begin`)."""
        old = self.stage_entry(stage) or {}
        earlier = [*old.get("grown_from_fingerprints", []), old.get("fingerprint")]
        # the N of the last finished stage it grew from (grows_from's floor): not an N it was cut short making
        finished = old.get("n") if old.get("status") == "complete" else old.get("finished_n")
        self._mark_running(stage, fingerprint, inputs, grown_from=from_n, grown_from_fingerprints=earlier,
                           **({} if n_planned is None else {"n_planned": n_planned}),
                           **({} if finished is None else {"finished_n": finished}))
        self.grown.append(stage)
        return "resume"

    def _inputs_grew(self, entry: dict[str, Any], inputs: dict[str, str] | None) -> bool:
        """Whether a finished stage differs from the one asked for only in inputs that grew since (each input
        named by its stage, as the evaluations name their extraction): the old results describe a stage that no
        longer exists, so redoing them replaces nothing the run still stands for. An input made again with other
        settings is no such case, whoever made it (a step command, an interrupted ``--force`` run): what was made
        from it stays a finished result, and replacing it needs ``replace``."""
        old = entry.get("inputs") or {}
        new = inputs or {}
        changed = [k for k in new if old.get(k) != new[k]]
        return (bool(changed) and set(old) == set(new)
                and all(old[k] in (self.stage_entry(k) or {}).get("grown_from_fingerprints", []) for k in changed))

    def _mark_running(self, stage: str, fingerprint: str | None, inputs: dict[str, str] | None, **info: Any) -> None:
        m = self.manifest()
        m["stages"][stage] = {
            "status": "running",
            "fingerprint": fingerprint,
            "inputs": inputs or {},
            "versions": versions(),
            "torch_threads": _torch_threads(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "started_unix": time.time(),
            **info,
        }
        self._write_manifest(m)

    # A writer allowed to replace finished results (``replace``: ``side extract --force``, ``side run``) that
    # does not finish leaves the work half done: its new stages failed or missing, the old results after them
    # still complete. A rerun with the same settings that stops no later is that writer's work resumed, and may
    # replace what it would have replaced; the manifest's ``replacing`` entry says so until a writer finishes.
    def mark_replacing(self, settings: str, until: int) -> None:
        """Record that a writer allowed to replace finished results, with run settings ``settings`` (a
        fingerprint) up to stage rank ``until``, is at work. An unfinished one with the same settings that went
        further stays recorded as far as it went (a ``side cluster`` in between does not shorten it)."""
        m = self.manifest()
        r = m.get("replacing")
        if isinstance(r, dict) and r.get("settings") == settings and isinstance(r.get("until"), int):
            until = max(until, r["until"])
        m["replacing"] = {"settings": settings, "until": until}
        self._write_manifest(m)

    def resumes_replacing(self, settings: str, until: int) -> bool:
        """Whether a writer with ``settings`` up to ``until`` resumes the unfinished one :meth:`mark_replacing`
        recorded: the same settings, and it stops no later (``side train-classifier`` cut short does not let a
        plain ``side extract`` replace the extraction it left out of date)."""
        r = self.manifest().get("replacing")
        return isinstance(r, dict) and r.get("settings") == settings and until <= r.get("until", -1)

    def done_replacing(self, settings: str, until: int) -> None:
        """A writer finished: the recorded unfinished one is no longer to be resumed when this one covered its
        work (the same settings, as far or further) or went elsewhere (other settings)."""
        m = self.manifest()
        r = m.get("replacing")
        if isinstance(r, dict) and (r.get("settings") != settings or until >= r.get("until", -1)):
            del m["replacing"]
            self._write_manifest(m)

    def fail_running(self, error: BaseException) -> list[str]:
        """Mark every stage still ``running`` as ``failed`` with ``error`` (after an exception); returns them."""
        m = self.manifest()
        failed = [k for k, v in m["stages"].items() if v.get("status") == "running"]
        for k in failed:
            m["stages"][k].update(status="failed", error=f"{type(error).__name__}: {error}"[:500])
        if failed:
            self._write_manifest(m)
        return failed

    def annotate(self, stage: str, **info: Any) -> None:
        """Add ``info`` to ``stage``'s manifest entry, its status and fingerprint as they are."""
        m = self.manifest()
        m["stages"][stage].update(info)
        self._write_manifest(m)

    def reopen(self, stage: str) -> Literal["resume"]:
        """Mark a complete stage whose files went missing as running again (it resumes: what exists is kept)."""
        m = self.manifest()
        m["stages"][stage]["status"] = "running"
        m["stages"][stage].pop("stopped", None)  # where it stopped is decided again when the stage completes
        self._write_manifest(m)
        return "resume"

    def complete(self, stage: str, **info: Any) -> None:
        m = self.manifest()
        entry = m["stages"][stage]
        entry["status"] = "complete"
        entry["seconds"] = round(time.time() - entry.get("started_unix", time.time()), 3)
        entry.update(info)
        self._write_manifest(m)

    def model_entry(self) -> Any:
        """The manifest's record of the run's target (:meth:`set_model`), as it is (None: none)."""
        return self.manifest().get("model")

    def restore_model(self, entry: Any) -> None:
        """Put back the record :meth:`model_entry` returned (a refused writer recorded its target too early)."""
        m = self.manifest()
        if m.get("model") != entry:
            m.pop("model", None)
            if entry is not None:
                m["model"] = entry
            self._write_manifest(m)

    def set_model(self, fingerprint: str, name: str, prediction: str = "epsilon") -> None:
        """Record the target the run's config names now (``name``) by its ``fingerprint`` (:func:`read_model`) and
        what it predicts (``prediction``: epsilon, v_prediction or sample; the report says it): stages made from
        another one are out of date (:func:`stale_stages`); a change is listed among the things this writer made
        again (:meth:`out_of_date`, as :data:`MODEL_INPUT`)."""
        if not self.group.main:
            return
        m = self.manifest()
        before = _model_of(m)
        entry = {"fingerprint": fingerprint, "name": name, "prediction": prediction}
        if m.get("model") == entry:
            return
        m["model"] = entry
        self._write_manifest(m)
        if before is not None and before != fingerprint:
            self.replaced.append(MODEL_INPUT)

    def write_config(self, run_config: Any, stage: str | None = None) -> None:
        """``config.yaml`` of the run, or with ``stage`` of that stage's folder: the config it was made with
        (a run directory that runs one method at a time with other settings, as the benchmarks' replicates do,
        keeps each extraction's own)."""
        if self.group.main:
            path = self.path / (stage or ".") / "config.yaml"
            if stage is None and self.config_before is None and path.is_file():
                try:
                    self.config_before = cfg.load_yaml(path)
                except ValueError:
                    pass  # a damaged file: a refusal names no setting
            atomic_write_text(path, cfg.dump_yaml(run_config))
