"""The surrogate labels: the synthetic set's features, memorization scores, and the clusters kept as labels."""
from __future__ import annotations

import dataclasses

import numpy as np

from .. import config as cfg
from ..data import ImageSet
from ..features import extract_features
from ..runs import (MODEL_INPUT, atomic_save_npz, atomic_write_json, npz_arrays, stage_fingerprint)
from ..memorization import denoising_error, memorization_candidates
from ..surrogate import ClusterLabeler, SurrogateLabels, filter_advice, label_candidates
from .context import AuditContext, _damaged, _stage_npz, extractor_fingerprints, script_fingerprints


def features_stage(ctx: AuditContext, synthetic: ImageSet) -> np.ndarray:
    c = ctx.rc.features
    fp = stage_fingerprint("features", cfg.at_defaults(c, cfg.unread_keys(c)), ctx.fp["synthetic"],
                           *extractor_fingerprints(c.extractor))
    ctx.fp["features"] = fp
    path = ctx.run.path / "features" / "features.npz"
    inputs = {"synthetic": ctx.fp["synthetic"]}
    scripts = script_fingerprints(c.extractor)  # (a file changed under its path was refused naming nothing)
    data = {"extractor file": scripts[0]} if scripts else None
    if ctx.run.begin("features", fp, inputs=inputs, data=data) != "skip" or _damaged(path, "features"):
        feats = extract_features(c.extractor, synthetic, model=ctx.denoiser, device=ctx.device, batch_size=c.batch_size)
        atomic_save_npz(path, features=feats, index=synthetic.ids)
        ctx.run.complete("features", extractor=c.extractor, dim=int(feats.shape[1]))
    return _stage_npz(path, "features")


def memorization_stage(ctx: AuditContext, synthetic: ImageSet) -> np.ndarray | None:
    """Memorization scores of the synthetic set (``memorization.py``), only for memorization-aware labels
    (``surrogate.memorized_fraction`` < 1): (n,) denoising error, lower = more likely memorized; else None."""
    c = ctx.rc.surrogate
    if c.memorized_fraction >= 1.0:
        return None
    settings = {"t": c.memorization_t, "draws": c.memorization_draws, "seed": ctx.rc.sample.seed}
    fp = stage_fingerprint("memorization", settings, ctx.fp["synthetic"], ctx.fp[MODEL_INPUT])
    ctx.fp["memorization"] = fp
    path = ctx.run.path / "memorization" / "scores.npz"
    inputs = {"synthetic": ctx.fp["synthetic"], MODEL_INPUT: ctx.fp[MODEL_INPUT]}
    if ctx.run.begin("memorization", fp, inputs=inputs) != "skip" or _damaged(path, "scores"):
        scores = denoising_error(ctx.denoiser, synthetic.to_float(), c.memorization_t, c.memorization_draws,
                                 ctx.rc.sample.seed, device=ctx.device)
        atomic_save_npz(path, scores=scores, index=synthetic.ids)
        ctx.run.complete("memorization", t=c.memorization_t, draws=c.memorization_draws)
    return _stage_npz(path, "scores")


def surrogate_settings(c: cfg.SurrogateConfig, *, legacy: bool = False) -> dict:
    """What the surrogate labels depend on: every clustering setting it reads (not K under ``select_k``, which picks
    K; ``legacy``: as session 48's rule keyed it, with K), and the memorization-aware ones only when that option is
    on (``memorized_fraction`` < 1), so the paper's labels keep the fingerprint they had before the option existed
    and no cached run is redone."""
    unread = [] if legacy else list(cfg.unread_keys(c))
    d = cfg.to_dict(cfg.at_defaults(c, ["teacher_min_confidence", *unread]))  # (the teacher's stage reads it)
    if c.memorized_fraction >= 1.0:
        for k in ("memorized_fraction", "memorization_t", "memorization_draws"):
            d.pop(k)
    return d


def surrogate_stage(ctx: AuditContext, features: np.ndarray, scores: np.ndarray | None = None) -> SurrogateLabels:
    """Cluster labels of the synthetic set (with memorization ``scores``: of its likely-memorized fraction, the
    rest one background label); writes ``labels.npz`` (``labels`` per sample, ``candidates``: the rows that were
    clustered, ``cluster``: their raw K-means ids, ``background``: the background label or -1; centroids,
    cohesion) and ``clusters.json``."""
    c = ctx.rc.surrogate
    if (scores is None) != (c.memorized_fraction >= 1.0):
        raise ValueError(f"memorization scores are {'missing' if scores is None else 'given'} but "
                         f"surrogate.memorized_fraction={c.memorized_fraction} "
                         f"{'asks for them' if scores is None else 'is 1 (the paper labels every sample)'}")
    inputs = {k: ctx.fp[k] for k in ("features", *(["memorization"] if scores is not None else []))}
    fp = stage_fingerprint("surrogate", surrogate_settings(c), *inputs.values())
    entry = ctx.run.stage_entry("surrogate") or {}
    if c.select_k and entry.get("fingerprint") not in (None, fp):  # made under the earlier rule (K keyed under
        # select_k): it keeps its key, and every stage made from it stands, whatever K says now. The K it was keyed
        # with: recorded once found, else the run's config.yaml before this call's
        before = ((ctx.run.config_before or {}).get("surrogate") or {}).get("n_clusters")
        for k in dict.fromkeys((entry.get("keyed_n_clusters"), before, c.n_clusters)):
            if isinstance(k, int) and k >= 2 and entry["fingerprint"] == stage_fingerprint(
                    "surrogate", surrogate_settings(dataclasses.replace(c, n_clusters=k), legacy=True),
                    *inputs.values()):
                fp = entry["fingerprint"]
                if entry.get("keyed_n_clusters") != k and ctx.run.group.main:
                    ctx.run.annotate("surrogate", keyed_n_clusters=k)
                break
    ctx.fp["surrogate"] = fp
    path = ctx.run.path / "surrogate" / "labels.npz"
    if ctx.run.begin("surrogate", fp, inputs=inputs) != "skip" or _damaged(path, "labels", whole=True) or not (
            ctx.run.path / "surrogate" / "clusters.json").is_file():
        lab = ClusterLabeler(n_clusters=c.n_clusters, tau=c.tau, min_size=c.min_size, dropped=c.dropped,
                             n_init=c.n_init, random_state=c.random_state, select_k=c.select_k)
        candidates = (np.arange(len(features)) if scores is None
                      else memorization_candidates(scores, c.memorized_fraction))
        out = label_candidates(lab, features, candidates)
        background = -1 if out.background is None else out.background
        atomic_save_npz(path, labels=out.labels, cluster=lab.cluster_, kept=lab.kept_, cohesion=lab.cohesion_,
                        sizes=lab.sizes_, centroids=lab.centroids_.astype(np.float32), candidates=candidates,
                        background=np.int64(background))
        clusters = lab.clusters()
        labelled = int(np.isin(out.labels, out.targets).sum())
        atomic_write_json(ctx.run.path / "surrogate" / "clusters.json",
                          {"tau": c.tau, "kept": int(lab.kept_.sum()), "n_clusters": lab.n_clusters_,
                           "k_scores": {str(k): v for k, v in lab.k_scores_.items()},
                           "labelled": labelled, "candidates": len(candidates), "background": out.background,
                           "clusters": clusters})
        ctx.run.complete("surrogate", kept=int(lab.kept_.sum()), labelled=labelled, n_clusters=lab.n_clusters_,
                         candidates=len(candidates))
    return SurrogateLabels.load(path)


def _surrogate_advice(ctx: AuditContext, labels: SurrogateLabels) -> str:
    """Which surrogate filter left the classifier too few classes, from the clusters the surrogate stage kept."""
    c = ctx.rc.surrogate
    z = npz_arrays(ctx.run.path / "surrogate" / "labels.npz", "sizes", "cohesion")
    keep = 2 - (labels.background is not None)  # (the background label is a class of its own)
    return "too few clusters pass " + filter_advice(z["sizes"], z["cohesion"], c.tau, c.min_size, keep=keep)
