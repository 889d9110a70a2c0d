"""Surrogate labels for an unlabelled synthetic set (SIDE step 2), scikit-learn's fit/predict contract.

:class:`ClusterLabeler` (the paper's final version):

1. L2-normalise the features (so K-means on them approximates spherical clustering);
2. K-means with K clusters (scikit-learn, ``n_init`` restarts, ``random_state``);
3. cohesion of cluster k = mean cosine similarity of its members to its (normalised) centroid;
4. keep cluster k iff cohesion >= ``tau`` (within float rounding) and size >= ``min_size``;
K can be chosen by cluster quality instead of fixed: with ``select_k`` (candidate Ks), K-means runs for each
candidate and the K with the highest silhouette score (cosine, on the normalised features) is kept; every
candidate's score is recorded (``k_scores_``).

5. labels: each sample's cluster id if its cluster is kept; samples of dropped clusters get -1 and are
   left out of classifier training (``dropped="drop"``, default), or are relabelled to the nearest kept
   centroid (``dropped="relabel"``, the paper's literal wording; this undoes the filter, since every sample
   then trains the classifier).

:class:`TeacherLabeler` (the earlier "time-dependent knowledge distillation" version): a time-independent
classifier trained on clean labelled images labels the synthetic set (``labels_`` from its argmax; with
``min_confidence``, samples whose top probability is lower get -1).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score

from .config import check_int, check_real
from .data import check_float_images, integer_labels
from .runs import npz_arrays

log = logging.getLogger(__name__)


COHESION_ROUNDING = 1e-6  # a cohesion this close below tau is tau (the cosines round by ~1e-16; no tau is finer)


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be 2-D (n, D), got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class ClusterLabeler:
    """K-means surrogate labels with a cohesion filter.

    Parameters
    ----------
    n_clusters : K (the paper: 100; 25 won ``side bench variants`` on digits, the library's default)
    tau : minimum cohesion (mean cosine similarity to the centroid) of a kept cluster (paper: 0.5)
    min_size : minimum members of a kept cluster
    dropped : what happens to samples of dropped clusters: ``"drop"`` (label -1) or ``"relabel"``
    n_init, random_state : passed to scikit-learn's KMeans
    select_k : candidate Ks; when given, K is the candidate with the highest silhouette score and
        ``n_clusters`` is not used

    Attributes
    ----------
    n_clusters_ : the K used (``n_clusters``, or the chosen candidate)
    k_scores_ : {K: silhouette score} of every candidate (empty without ``select_k``)
    centroids_ : (K, D) unit-norm centroids
    cohesion_ : (K,) mean cosine similarity of members to their centroid (nan for an empty cluster)
    sizes_ : (K,) members per cluster
    kept_ : (K,) bool
    cluster_ : (n,) raw K-means assignment
    labels_ : (n,) surrogate label per training sample (cluster id, or -1)
    """

    def __init__(self, n_clusters: int = 25, tau: float = 0.5, min_size: int = 2,
                 dropped: Literal["drop", "relabel"] = "drop", n_init: int = 10, random_state: int | None = 0,
                 select_k: tuple[int, ...] = ()) -> None:
        for name, v, least in (("n_clusters", n_clusters, 2), ("n_init", n_init, 1), ("min_size", min_size, 1)):
            check_int(v, name, least)  # (sklearn's words on KMeans, or a TypeError, at fit)
        for k in select_k:  # (2.5 passed the range check, and sklearn then blamed n_clusters)
            check_int(k, "select_k value", 2)
        check_real(tau, "tau")  # (None or "0.5" was a TypeError of a comparison, at fit)
        if dropped not in ("drop", "relabel"):
            raise ValueError(f"dropped={dropped!r} must be 'drop' or 'relabel'")
        self.n_clusters = n_clusters
        self.select_k = tuple(select_k)
        self.tau = tau
        self.min_size = min_size
        self.dropped = dropped
        self.n_init = n_init
        self.random_state = random_state

    def fit(self, features: np.ndarray) -> "ClusterLabeler":
        if not np.isfinite(np.asarray(features, dtype=float)).all():  # (sklearn's words on missing values)
            raise ValueError("features hold NaN or inf: K-means needs finite features")
        x = _normalise(features)
        n = len(x)
        if not self.select_k and not 2 <= self.n_clusters <= n:
            raise ValueError(f"n_clusters={self.n_clusters} must be between 2 and the number of synthetic images ({n})")
        for k in self.select_k:
            if not 2 <= k < n:  # the silhouette needs at least one cluster with two members
                raise ValueError(f"select_k value {k} must be between 2 and the number of synthetic images minus 1 ({n - 1})")
        if not -1.0 <= self.tau <= 1.0:
            raise ValueError(f"tau={self.tau} must be a cosine similarity in [-1, 1]")
        if self.dropped not in ("drop", "relabel"):
            raise ValueError(f"dropped={self.dropped!r} must be 'drop' or 'relabel'")
        self.k_scores_: dict[int, float] = {}
        if self.select_k:
            fits = {}
            for k in self.select_k:
                fits[k] = KMeans(n_clusters=k, n_init=self.n_init, random_state=self.random_state).fit(x)
                if len(np.unique(fits[k].labels_)) < 2:  # the silhouette is undefined (sklearn's words name no K)
                    raise ValueError(f"K-means with K={k} put all {n} synthetic images in one cluster: their features "
                                     "all point the same way (a collapsed synthetic set?), so select_k cannot score "
                                     "K by the silhouette; set surrogate.n_clusters instead")
                self.k_scores_[k] = float(silhouette_score(x, fits[k].labels_, metric="cosine"))
            self.n_clusters_ = max(self.k_scores_, key=lambda k: (self.k_scores_[k], -k))
            km = fits[self.n_clusters_]
            log.info("K by silhouette: %s -> K=%d", {k: round(v, 4) for k, v in self.k_scores_.items()}, self.n_clusters_)
        else:
            self.n_clusters_ = self.n_clusters
            km = KMeans(n_clusters=self.n_clusters, n_init=self.n_init, random_state=self.random_state).fit(x)
        K = self.n_clusters_
        self.cluster_ = km.labels_.astype(np.int64)
        self.centroids_ = _normalise(km.cluster_centers_)
        cos = np.einsum("nd,nd->n", x, self.centroids_[self.cluster_])
        self.sizes_ = np.bincount(self.cluster_, minlength=K)
        sums = np.bincount(self.cluster_, weights=cos, minlength=K)
        with np.errstate(invalid="ignore", divide="ignore"):
            self.cohesion_ = np.where(self.sizes_ > 0, sums / np.maximum(self.sizes_, 1), np.nan)
        # (within float rounding of tau: a cluster of identical images scored 1 - 1.1e-16 or 1 + 2.2e-16 by chance,
        # and tau 1 dropped one in ten of them, the surest copies a run finds)
        self.kept_ = ((np.nan_to_num(self.cohesion_, nan=-np.inf) >= self.tau - COHESION_ROUNDING)
                      & (self.sizes_ >= self.min_size))
        if not self.kept_.any():
            said = f"all {K} clusters were dropped by " + filter_advice(self.sizes_, self.cohesion_, self.tau,
                                                                         self.min_size, keep=1)
            warnings.warn(said, RuntimeWarning, stacklevel=2)
            self.labels_ = np.full(n, -1, dtype=np.int64)
            return self
        if self.dropped == "drop":
            self.labels_ = np.where(self.kept_[self.cluster_], self.cluster_, -1)
        else:  # only a dropped cluster's samples move: K-means' (Euclidean) and predict's (cosine) rules can disagree
            self.labels_ = np.where(self.kept_[self.cluster_], self.cluster_, self.predict(features))
        log.info("kept %d of %d clusters (tau=%s); %d of %d samples labelled", self.kept_.sum(), K,
                 self.tau, (self.labels_ >= 0).sum(), n)
        return self

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Nearest kept centroid (by cosine similarity) of each row."""
        if not hasattr(self, "kept_"):
            raise ValueError("ClusterLabeler is not fitted yet; call fit first")
        if not self.kept_.any():
            return np.full(len(features), -1, dtype=np.int64)
        kept_ids = np.flatnonzero(self.kept_)
        sims = _normalise(features) @ self.centroids_[kept_ids].T
        return kept_ids[np.argmax(sims, axis=1)].astype(np.int64)

    def fit_predict(self, features: np.ndarray) -> np.ndarray:
        return self.fit(features).labels_

    def clusters(self) -> list[dict[str, Any]]:
        """Each cluster as ``clusters.json`` lists it: id, size, cohesion (None for an empty cluster: its NaN was
        written as 0.0, a real-looking cohesion) and whether the filter kept it."""
        return [{"id": k, "size": int(self.sizes_[k]),
                 "cohesion": None if np.isnan(self.cohesion_[k]) else float(self.cohesion_[k]),
                 "kept": bool(self.kept_[k])} for k in range(self.n_clusters_)]


def filter_advice(sizes: np.ndarray, cohesion: np.ndarray, tau: float, min_size: int, *, keep: int) -> str:
    """Which of the cluster filters (size >= ``min_size``, cohesion >= ``tau``) keeps fewer than ``keep`` of the
    clusters (``sizes``, ``cohesion`` per cluster; NaN for an empty one), and the setting that would keep
    ``keep``: "the size filter (...): set surrogate.min_size <= ..." or "the cohesion filter (...): ..."."""
    big = sizes >= min_size
    if (sizes > 0).sum() < keep:  # (advised min_size <= 0, which the config refuses and which keeps nothing more)
        return (f"K-means: only {(sizes > 0).sum()} of the {len(sizes)} clusters hold any image (the synthetic set's "
                "features collapse onto so few directions: a collapsed synthetic set?): no filter setting keeps "
                + ("some" if keep == 1 else str(keep)) + "; sample a more varied synthetic set or use another feature "
                "extractor")
    some = "some" if keep == 1 else str(keep)
    if big.sum() < keep:  # the size filter alone leaves too few: the advice is about min_size, and tau if need be
        # the largest min_size that keeps ``keep`` clusters of two images or more at this tau (the advice was the
        # keep-th largest size: where those clusters fail tau, following it kept fewer still; a lone image, whose
        # cohesion is 1, is no class to advise); only where none does, tau too
        cohesive = sizes[(np.nan_to_num(cohesion, nan=-np.inf) >= tau - COHESION_ROUNDING) & (sizes >= 2)]
        nth = f"{_nth(keep)} largest" if keep > 1 else "largest"
        plain = int(np.sort(sizes)[::-1][min(keep, len(sizes)) - 1])  # the keep-th largest, whatever its cohesion
        if len(cohesive) >= keep:
            largest = int(np.sort(cohesive)[::-1][keep - 1])
            why = (f", the {nth} of cohesion >= tau={tau} has {largest}" if largest != plain else
                   f", the {nth} {largest}" if keep > 1 else "")
            also = ""
        else:
            largest = plain
            best = _kth_cohesion(cohesion, sizes >= largest, keep)
            why = f", the {nth} {largest}" if keep > 1 else ""
            also = ""
            if best < tau - COHESION_ROUNDING:
                why += (f"; {len(cohesive)} of two images or more pass tau={tau}, and the {_nth_cohesive(keep)} of "
                        f"at least {largest} images has cohesion {best:.4f}")
                also = f" and surrogate.tau <= {_tau_below(best):.3f}"
        return (f"the size filter (min_size={min_size}; the largest has {sizes.max()} images{why}): set "
                f"surrogate.min_size <= {largest}{also} (or use fewer clusters or more synthetic images) to keep "
                f"{some}")
    best = _kth_cohesion(cohesion, big, keep)
    return (f"the cohesion filter (tau={tau}, min_size={min_size}); the {_nth_cohesive(keep)} of at least min_size "
            f"images has cohesion {best:.4f}: set surrogate.tau <= {_tau_below(best):.3f} (or use fewer clusters or "
            f"another feature extractor) to keep {some}")


def _kth_cohesion(cohesion: np.ndarray, eligible: np.ndarray, k: int) -> float:
    """The ``k``-th highest cohesion among the ``eligible`` clusters (an empty cluster's NaN counts as none)."""
    return float(np.sort(np.where(eligible, np.nan_to_num(cohesion, nan=-np.inf), -np.inf))[::-1][k - 1])


def _tau_below(cohesion: float) -> float:
    """An advised tau: rounded down to 3 decimals (a tau rounded up past the cohesion would keep none again)."""
    return math.floor(cohesion * 1000) / 1000


def _nth_cohesive(k: int) -> str:
    return "most cohesive" if k == 1 else f"{_nth(k)} most cohesive"


def _nth(k: int) -> str:
    return {2: "second", 3: "third"}.get(k, f"{k}th")


@dataclasses.dataclass(frozen=True, eq=False)
class SurrogateLabels:
    """The surrogate labels of a synthetic set: ``labels`` (n,) per sample, a cluster id (a class to guide
    toward), -1 (left out of training) or ``background``: the label of the samples outside the memorization
    candidates (memorization-aware labels), which the classifier learns and no generation is guided toward.
    ``background`` is None when every sample was clustered (the paper)."""

    labels: np.ndarray
    background: int | None = None

    @property
    def targets(self) -> np.ndarray:
        """The label values that generations may be guided toward."""
        v = np.unique(self.labels[self.labels >= 0])
        return v[v != self.background] if self.background is not None else v

    @classmethod
    def load(cls, path: str | Path) -> "SurrogateLabels":
        """The labels the surrogate stage wrote (``RUN/surrogate/labels.npz``: ``labels``, and ``background``
        stored as -1 for none; files older than the option have no ``background``), or a ValueError naming a
        damaged file (zlib's bare error, from a damaged ``background``, failed every rerun)."""
        z = npz_arrays(path, "labels", optional=("background",))
        background = int(z["background"]) if "background" in z else -1
        return cls(z["labels"], None if background < 0 else background)


def target_outputs(classes: np.ndarray, background: "tuple[int, ...] | list[int]") -> np.ndarray:
    """Output indices of ``classes`` (label values, one per model output) that generations may be drawn toward:
    every one but the ``background`` label values (the background class of memorization-aware labels). Shared by
    the guidance classifier (method ``side``) and the fine-tuned conditional model (``side-lora``)."""
    return np.flatnonzero(~np.isin(np.asarray(classes), list(background)))


def label_candidates(labeler: "ClusterLabeler", features: np.ndarray, candidates: np.ndarray) -> SurrogateLabels:
    """Fit ``labeler`` on the rows ``candidates`` of ``features`` only; every other row gets the background label
    (one past the cluster ids). With every row a candidate this is ``labeler.fit(features)`` and no background."""
    n = len(features)
    given = np.asarray(candidates)
    if given.dtype == bool:  # (a mask was read as the rows 0 and 1, fitted over and over, without a word)
        raise ValueError(f"candidates is a boolean mask of {given.size}: give the row numbers of the candidates "
                         "(np.flatnonzero(mask))")
    if given.ndim != 1 or (given.size and not np.issubdtype(given.dtype, np.integer)):
        raise ValueError(f"candidates must be a 1-d array of row numbers of features, got shape {given.shape} of "
                         f"{given.dtype}")
    candidates = given.astype(np.int64)
    if len(candidates) and (candidates.min() < 0 or candidates.max() >= n):  # (a negative one wrapped around)
        raise ValueError(f"candidates must be row numbers 0..{n - 1} of the {n} rows of features, got "
                         f"{int(candidates.min())}..{int(candidates.max())}")
    if len(np.unique(candidates)) < len(candidates):
        raise ValueError("candidates names a row more than once (each row is fitted once)")
    labeler.fit(np.asarray(features)[candidates])
    background = int(labeler.n_clusters_)
    labels = np.full(n, background, dtype=np.int64)
    labels[candidates] = labeler.labels_  # back to the rows of ``features``, whatever the candidates' order
    return SurrogateLabels(labels, background if len(np.unique(candidates)) < n else None)


class TeacherLabeler:
    """Labels from a time-independent classifier trained on clean labelled images.

    Parameters
    ----------
    classifier : a trained classifier module, ``classifier(x) -> logits`` (time ignored), in eval mode
    classes : (K,) the label value of each classifier output
    min_confidence : samples whose top softmax probability is below this get -1 (0 keeps all)
    """

    def __init__(self, classifier: torch.nn.Module, classes: np.ndarray, min_confidence: float = 0.0,
                 batch_size: int = 512) -> None:
        self.classifier = classifier
        self.classes = classes
        self.min_confidence = min_confidence
        self.batch_size = batch_size

    def fit(self, x: torch.Tensor) -> "TeacherLabeler":
        """Label the synthetic images ``x`` (n, C, H, W) in [-1, 1]."""
        check_real(self.min_confidence, "min_confidence")  # (None was a comparison's TypeError)
        if not 0.0 <= self.min_confidence < 1.0:
            raise ValueError(f"min_confidence={self.min_confidence} must be in [0, 1)")
        check_int(self.batch_size, "batch_size", 1)  # (0 was range()'s error)
        # one integer label value per output, checked before the classifier runs over the set (floats were cut to
        # integers; too few or too many were found after the whole set was classified)
        classes = integer_labels(self.classes, "classes").astype(np.int64)
        if classes.ndim != 1:
            raise ValueError(f"classes must be one label value per output, got shape {classes.shape}")
        check_float_images(x, "TeacherLabeler.fit: x")
        x = x.float()
        probs = []
        param = next(iter(self.classifier.parameters()), None) if isinstance(self.classifier, torch.nn.Module) else None
        device = x.device if param is None else param.device
        if isinstance(self.classifier, torch.nn.Module):
            self.classifier.eval()
        with torch.no_grad():
            for lo in range(0, len(x), self.batch_size):
                xb = x[lo:lo + self.batch_size].to(device)
                t = torch.zeros(len(xb), dtype=torch.long, device=device)
                probs.append(torch.softmax(self.classifier(xb, t), -1).cpu())
                if probs[-1].shape[1] != len(classes):  # (too few was an IndexError where argmax reached one
                    # missing; too many were ignored without a word)
                    raise ValueError(f"classes has {len(classes)} entries but the classifier has {probs[-1].shape[1]} "
                                     "outputs: give one label value per output")
        p = torch.cat(probs).numpy()
        self.confidence_ = p.max(1)
        self.labels_ = np.where(self.confidence_ >= self.min_confidence, classes[p.argmax(1)], -1)
        self.kept_classes_ = np.unique(self.labels_[self.labels_ >= 0])
        return self
