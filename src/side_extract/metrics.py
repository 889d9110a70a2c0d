"""Memorization metrics of generated images against the training set (paper-notes.md section 2).

Scores come in two orientations. ``cosine:<extractor>`` is a *similarity* (higher = closer, best = max);
``rms-l2`` is a *distance* on pixels in [0, 1] (lower = closer, best = min). Band rules:

- a band ``[lo, hi)`` holds ``lo <= v < hi``; for cosine one band of a set holds a score of 1 (and values
  rounded past 1): of the bands with ``lo <= 1 <= hi``, the closest (:func:`closest_first`); it holds every
  ``v >= lo``. For distances the "high" band is the one of SMALL values.
- cumulative: ``v >= lo`` for a similarity; ``v < hi`` for a distance. With contiguous bands, a band's
  cumulative region is the union of it and every closer band.

Metrics (eqs. 6-9 of the paper), for N_G generations x and training images x_j:

- AMS(band) = #{x : best_j score(x, x_j) in band} / N_G
- UMS(band) = |union over x of {j : score(x, x_j) in band}| / N_G (every training image in the band counts,
  not only the nearest, so UMS can exceed AMS)
- p95: the 95th percentile of the best similarity; for a distance, the 5th percentile of the best distance
- Carlini et al.: d(x, nn) / (alpha * mean d to the n nearest), on pixel RMS-L2 whatever the similarity;
  centering "generation": the n nearest training images of x (including nn, as in Carlini et al. 2023);
  "reference": mean d from nn to its n nearest *other* training images. Extracted if < 1. 0/0 counts as 0.
- Gu et al.: d1 / d2 (nearest / second nearest pixel distance), memorized if < 1/3. 0/0 counts as 0.
- the N_G law: E[#unique](N) = sum_i 1 - (1 - p_i)^N with p_i = (#generations hitting i) / N_G.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy.special import gammaln

from .data import ImageSet
from .neighbors import NearestNeighborIndex, Neighbors, pixel_rows
from .runs import read_json

log = logging.getLogger(__name__)

Z95 = 1.959963984540054  # the standard normal's 0.975 quantile: every normal-approximation 95 % interval here

Orientation = Literal["similarity", "distance"]
Centering = Literal["generation", "reference"]


# --------------------------------------------------------------------------------------------------
# similarity and bands


@dataclasses.dataclass(frozen=True)
class Similarity:
    """A parsed ``similarity`` option: ``"rms-l2"`` or ``"cosine:<extractor>"``."""

    spec: str

    def __post_init__(self) -> None:
        if self.spec != "rms-l2" and not (self.spec.startswith("cosine:") and len(self.spec) > 7):
            raise ValueError(f"similarity={self.spec!r} must be 'rms-l2' or 'cosine:<extractor>'")

    @property
    def metric(self) -> Literal["cosine", "rms-l2"]:
        return "rms-l2" if self.spec == "rms-l2" else "cosine"

    @property
    def extractor(self) -> str | None:
        return None if self.spec == "rms-l2" else self.spec.split(":", 1)[1]

    @property
    def orientation(self) -> Orientation:
        return "distance" if self.spec == "rms-l2" else "similarity"


@dataclasses.dataclass(frozen=True)
class Band:
    """A named score interval ``[lo, hi)`` (see the module docstring for the exact rules)."""

    name: str
    lo: float
    hi: float

    def __post_init__(self) -> None:
        if not self.name or not self.lo <= self.hi:
            raise ValueError(f"band {self.name!r}=[{self.lo}, {self.hi}) needs a name and lo <= hi")

    def contains(self, v: np.ndarray, orientation: Orientation, bands: Sequence["Band"] | None = None) -> np.ndarray:
        """``lo <= v < hi``; for a similarity, the band of ``bands`` (the set it belongs to; alone, itself) that
        holds a score of 1 (:func:`holder_of_one`) holds every ``v >= lo``: a score of 1 falls in one band, never
        in two ("mid=0.6:1,exact=1:2": the per-band shares summed past 100 %) nor in none (calibrated bands
        low [q, 1), mid [1, 1], high [1, 1])."""
        if orientation == "similarity" and holder_of_one([*(bands or ()), self]) == self.name:
            return v >= self.lo
        return (v >= self.lo) & (v < self.hi)

    def reaches(self, v: np.ndarray, orientation: Orientation) -> np.ndarray:
        """The cumulative threshold: ``v >= lo`` (similarity) or ``v < hi`` (distance)."""
        return v >= self.lo if orientation == "similarity" else v < self.hi


PAPER_COSINE_BANDS = (Band("low", 0.4, 0.5), Band("mid", 0.5, 0.6), Band("high", 0.6, 1.0))


def closest_first(bands: dict[str, Sequence[float]], orientation: Orientation) -> list[str]:
    """The names of ``bands`` (name -> (lo, hi), as metrics.json holds them), the closest band (most memorized)
    first. Ties on the near edge (an empty calibrated band, lo == hi, shares its edge with the next) are broken by
    the far edge: an empty band lies beyond the band it touches, never before it; identical bands (two empty
    calibrated ones) by name, so that the order a set is listed in never matters."""
    if orientation == "similarity":
        return sorted(bands, key=lambda b: (-bands[b][0], -bands[b][1], b))
    return sorted(bands, key=lambda b: (bands[b][1], bands[b][0], b))


def holder_of_one(bands: Sequence[Band]) -> str | None:
    """The name of the band of a cosine set that holds a score of 1 (and values rounded past it): of the bands
    with ``lo <= 1 <= hi``, the closest; None where no band reaches 1."""
    reach = {b.name: (b.lo, b.hi) for b in bands if b.lo <= 1.0 <= b.hi}
    return closest_first(reach, "similarity")[0] if reach else None


def parse_bands(spec: str) -> tuple[Band, ...]:
    """``"low=0.4:0.5,mid=0.5:0.6,high=0.6:1"`` -> Bands; names unique, lo < hi."""
    bands = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            name, rng = part.split("=")
            lo, hi = (float(v) for v in rng.split(":"))
        except ValueError:
            raise ValueError(f"bands={spec!r}: {part!r} must look like name=lo:hi (e.g. high=0.6:1)") from None
        if not lo < hi:
            raise ValueError(f"bands={spec!r}: band {name!r} needs lo < hi, got {lo}:{hi}")
        bands.append(Band(name.strip(), lo, hi))
    return check_bands(bands, f"bands={spec!r}")


def check_bands(bands: Sequence[Band], where: str) -> tuple[Band, ...]:
    """``bands``, refused when there are none, a name repeats (the later band's share replaced the earlier's),
    or two overlap (a score in both would count twice: the per-band shares would sum past
    100 %). ``where``: what the bands came from, for the error."""
    if not bands:
        raise ValueError(f"{where} names no band; it needs at least one")
    names = [b.name for b in bands]
    if len(set(names)) != len(names):
        raise ValueError(f"{where} must name each band once, got {names}")
    ordered = sorted(bands, key=lambda b: (b.lo, b.hi))
    for a, b in zip(ordered, ordered[1:]):
        if b.lo < a.hi:
            raise ValueError(f"{where}: bands {a.name!r} ({a.lo}:{a.hi}) and {b.name!r} ({b.lo}:{b.hi}) overlap; "
                             "each score must fall in one band at most")
    return tuple(bands)


def bands_json(bands: Sequence[Band]) -> dict[str, list[float]]:
    return {b.name: [b.lo, b.hi] for b in bands}


def other_revision(bands: dict[str, Any], similarity: str) -> str | None:
    """Where a bands.json's contents ``bands`` were calibrated on features of another revision of the similarity's
    extractor than this release computes (``extractor_revision``, 1 where unrecorded): "calibrated on X's features
    of before revision N, which computes others"; else None."""
    from .features import extractor_revision

    extractor = Similarity(similarity).extractor
    made, now = bands.get("extractor_revision", 1), extractor_revision(extractor)
    if made == now:
        return None
    return (f"calibrated on {extractor}'s features of "
            + (f"before revision {now}" if isinstance(made, int) and made < now else
               f"revision {made!r}, not this release's {now}") + ", which computes others")


def read_bands_file(path: str | Path, similarity: str) -> tuple[Band, ...]:
    """Bands from a ``bands.json`` written by ``side calibrate``; its similarity must match."""
    p = Path(path)
    if p.is_dir():  # (said "does not exist" of side calibrate's own output folder)
        raise ValueError(f"bands file {str(p)!r} is a folder: give the bands.json in it ({str(p / 'bands.json')!r})")
    if not p.is_file():
        raise ValueError(f"bands file {str(p)!r} does not exist (write one with `side calibrate`)")
    try:
        data = read_json(p)
    except ValueError as e:
        data, why = None, str(e)
    else:
        why = "no 'bands' mapping"
    if not isinstance(data, dict) or not isinstance(data.get("bands"), dict):
        raise ValueError(f"bands file {str(p)!r} is not a bands.json as `side calibrate` writes it "
                         f"(a JSON object with 'similarity' and 'bands'): {why}")
    if data.get("similarity") != similarity:
        raise ValueError(f"bands file {str(p)!r} was calibrated for similarity={data.get('similarity')!r}, "
                         f"not {similarity!r}")
    if (stale := other_revision(data, similarity)) is not None:  # (a run's own bands.json was refused so; one
        # given as a file was taken without a word)
        raise ValueError(f"bands file {str(p)!r} was {stale}: calibrate again (side calibrate --similarity "
                         f"{similarity})")
    try:  # (overlapping bands counted a score twice, and none failed after every extraction had run)
        bands = [Band(str(name), float(lo), float(hi)) for name, (lo, hi) in data["bands"].items()]
    except (TypeError, ValueError) as e:
        raise ValueError(f"bands file {str(p)!r}: each band must be name: [lo, hi] with lo <= hi ({e})") from None
    return check_bands(bands, f"bands file {str(p)!r}")


# --------------------------------------------------------------------------------------------------
# streaming AMS / UMS and the N_G law


@dataclasses.dataclass(frozen=True)
class NGLaw:
    """Unique training images hit as a function of the number of generations N.

    Attributes
    ----------
    n_grid : N values; predicted_unique[i] = sum_j 1 - (1 - p_j)^N, p_j = hits_j / n_generated (plug-in)
    observed_unique : mean over random nested subsets of the generations (None where N > n_generated)
    rarefied_unique : the exact expectation of observed_unique over all N-subsets (hypergeometric), None
        where N > n_generated. At N = n_generated the plug-in prediction falls below the observed count
        when many images were hit only once or twice (p_j from few hits is noisy, 1 - (1 - p)^N concave), and
        it never exceeds the images already hit, however large N: it is no projection to a larger budget.
    extrapolated_unique : the estimate for n_generated < N <= 2 n_generated that does count images not yet hit
        (:func:`extrapolated_unique`, Chao et al. 2014), None elsewhere
    q1, q2 : training images hit by exactly one and exactly two generations (what the estimate rests on)
    hit_probability : (n_train,) p_j (not written to JSON)
    """

    n_generated: int
    n_grid: list[int]
    predicted_unique: list[float]
    observed_unique: list[float | None]
    rarefied_unique: list[float | None]
    observed_std: list[float | None]
    n_repeats: int
    hit_probability: np.ndarray = dataclasses.field(repr=False)
    extrapolated_unique: list[float | None] = dataclasses.field(default_factory=list)
    q1: int = 0
    q2: int = 0

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "hit_probability"}
        return d | {"n_hit": int((self.hit_probability > 0).sum())}


def default_n_grid(n_generated: int, factor: int = 10) -> list[int]:
    g = np.unique(np.round(np.geomspace(1, factor * n_generated, 30)).astype(int))
    return sorted(set(g.tolist()) | {n_generated, 2 * n_generated})


def unseen_estimate(q1: float, q2: float, n: float) -> float:
    """Chao's estimate of the species not yet seen from the singletons ``q1`` and doubletons ``q2`` of ``n``
    sampling units (or individuals): (n - 1) / n * q1^2 / (2 q2), and (n - 1) / n * q1 (q1 - 1) / 2 where q2 = 0
    (Chao1 / Chao2, bias-corrected; Chao et al. 2014, Ecological Monographs 84: 45-67)."""
    if n <= 0:
        return 0.0
    return (n - 1) / n * (q1 * (q1 - 1) / 2 if q2 == 0 else q1 ** 2 / (2 * q2))


def extrapolated_unique(counts: np.ndarray, n_units: int, n: int) -> float | None:
    """Expected distinct training images hit in ``n`` >= ``n_units`` generations, from ``counts`` (per training
    image, how many of the ``n_units`` generations hit it): the incidence-based extrapolation of Chao et al.
    (2014, eq. 9, as coded in the iNEXT package), S_obs + Q0 (1 - (1 - Q1 / (T Q0 + Q1))^(n - T)) with T =
    ``n_units`` and Q0 = :func:`unseen_estimate`. Unlike sum_j 1 - (1 - p_j)^n it counts images not yet hit; it
    is reliable to about twice the budget, so None past 2 T (and below T, where rarefaction is exact)."""
    c = np.asarray(counts)
    return _extrapolated(int((c > 0).sum()), int((c == 1).sum()), int((c == 2).sum()), n_units, n)


def _extrapolated(s_obs: int, q1: int, q2: int, n_units: int, n: int) -> float | None:
    """:func:`extrapolated_unique` from the images hit (``s_obs``), once (``q1``) and twice (``q2``)."""
    if not n_units <= n <= 2 * n_units:
        return None
    q0 = unseen_estimate(q1, q2, n_units)
    if q0 == 0 or q1 == 0:
        return float(s_obs)
    return float(s_obs + q0 * (1 - (1 - q1 / (n_units * q0 + q1)) ** (n - n_units)))


def _law(counts: np.ndarray, first: np.ndarray, n_generated: int, n_grid: Sequence[int] | None) -> NGLaw:
    grid = default_n_grid(n_generated) if n_grid is None else sorted(int(v) for v in n_grid)
    p = counts / n_generated
    pred = [float((1.0 - (1.0 - p) ** n).sum()) for n in grid]
    obs = [(first < n).sum(1) if n <= n_generated else None for n in grid]
    rare: list[float | None] = []
    hit = counts[counts > 0]
    for n in grid:  # 1 - C(N_G - c, n) / C(N_G, n), summed over the images hit
        if n > n_generated:
            rare.append(None)
            continue
        miss = np.zeros(len(hit))
        ok = n_generated - hit >= n
        m = n_generated - hit[ok]
        miss[ok] = np.exp(gammaln(m + 1) - gammaln(m - n + 1) - gammaln(n_generated + 1) + gammaln(n_generated - n + 1))
        rare.append(float((1.0 - miss).sum()))
    s_obs, q1, q2 = len(hit), int((hit == 1).sum()), int((hit == 2).sum())
    return NGLaw(n_generated, grid, pred, [None if o is None else float(o.mean()) for o in obs], rare,
                 [None if o is None else float(o.std()) for o in obs], len(first), p,
                 [_extrapolated(s_obs, q1, q2, n_generated, n) if n > n_generated else None for n in grid], q1, q2)


def ng_law(gen_idx: np.ndarray, train_idx: np.ndarray, n_generated: int, n_train: int, *,
           n_grid: Sequence[int] | None = None, n_repeats: int = 5, random_state: int | None = 0) -> NGLaw:
    """The N_G law from per-generation hits (pairs: generation ``gen_idx[k]`` hit training ``train_idx[k]``).

    1. p_i = (#distinct generations hitting training image i) / N_G;
    2. predicted E[#unique](N) = sum_i 1 - (1 - p_i)^N (linearity of expectation over i.i.d. generations);
    3. observed: for ``n_repeats`` random orders of the generations, #{i hit by one of the first N}.
    """
    gen_idx, train_idx = np.asarray(gen_idx, np.int64), np.asarray(train_idx, np.int64)
    if gen_idx.shape != train_idx.shape or gen_idx.ndim != 1:
        raise ValueError(f"gen_idx {gen_idx.shape} and train_idx {train_idx.shape} must be 1-D of one length")
    if len(gen_idx) and not (0 <= gen_idx.min() and gen_idx.max() < n_generated and 0 <= train_idx.min()
                             and train_idx.max() < n_train):
        raise ValueError(f"hits must index 0..{n_generated - 1} generations and 0..{n_train - 1} training images")
    if n_repeats < 1:
        raise ValueError(f"n_repeats={n_repeats} must be >= 1")
    if n_generated < 1 or n_train < 1:
        raise ValueError(f"n_generated={n_generated} and n_train={n_train} must be >= 1")
    tally = _Hits(n_generated, n_train, n_repeats, random_state)
    tally.add(gen_idx, train_idx)
    return _law(tally.counts, tally.first, n_generated, n_grid)


class _Hits:
    """Per training image: how many distinct generations hit it, and its first hit under random orders."""

    def __init__(self, n_generated: int, n_train: int, n_repeats: int, random_state: int | None) -> None:
        rng = np.random.default_rng(random_state)
        self.rank = np.stack([rng.permutation(n_generated) for _ in range(n_repeats)])  # rank of each generation
        self.counts = np.zeros(n_train, np.int64)
        self.first = np.full((n_repeats, n_train), n_generated, np.int64)
        self.n_train = n_train

    def add(self, g: np.ndarray, t: np.ndarray) -> None:
        key = np.unique(g * self.n_train + t)  # a pair counts once even if reported twice
        g, t = key // self.n_train, key % self.n_train
        self.counts += np.bincount(t, minlength=self.n_train)
        for r in range(len(self.rank)):
            np.minimum.at(self.first[r], t, self.rank[r, g])


class BandTally:
    """Streams (generation, training, score) pairs into UMS per band, exclusive and cumulative.

    ``pairs_range`` is the closed score range that every band's region lies in; pass it with ``add`` as
    ``on_pairs``, and ``pairs_edges``, to :meth:`NearestNeighborIndex.kneighbors`. Memory: O(n_bands * n_repeats *
    n_train).
    """

    def __init__(self, bands: Sequence[Band], orientation: Orientation, n_generated: int, n_train: int, *,
                 n_repeats: int = 5, random_state: int | None = 0) -> None:
        self.bands, self.orientation, self.n_generated = tuple(bands), orientation, n_generated
        self.exclusive = {b.name: _Hits(n_generated, n_train, n_repeats, random_state) for b in bands}
        self.cumulative = {b.name: np.zeros(n_train, bool) for b in bands}
        if orientation == "similarity":
            self.pairs_range = (min(b.lo for b in bands), np.inf)
        else:
            self.pairs_range = (-np.inf, max(b.hi for b in bands))
        # the scores ``add`` compares with: which side of each a pair lies on is all it reads of a score
        self.pairs_edges = tuple(sorted({float(e) for b in bands for e in (b.lo, b.hi) if np.isfinite(e)}))

    def add(self, gen_idx: np.ndarray, train_idx: np.ndarray, scores: np.ndarray) -> None:
        for b in self.bands:
            inside = b.contains(scores, self.orientation, self.bands)
            if inside.any():
                self.exclusive[b.name].add(gen_idx[inside], train_idx[inside])
            self.cumulative[b.name][train_idx[b.reaches(scores, self.orientation)]] = True

    def ums(self) -> dict[str, float]:
        return {n: float((h.counts > 0).sum() / self.n_generated) for n, h in self.exclusive.items()}

    def ums_cumulative(self) -> dict[str, float]:
        return {n: float(m.sum() / self.n_generated) for n, m in self.cumulative.items()}

    def ng_law(self, n_grid: Sequence[int] | None = None) -> dict[str, NGLaw]:
        return {n: _law(h.counts, h.first, self.n_generated, n_grid) for n, h in self.exclusive.items()}


def ams(best: np.ndarray, bands: Sequence[Band], orientation: Orientation, *, cumulative: bool = False
        ) -> dict[str, float]:
    """AMS per band from each generation's best score ``best`` (N_G,)."""
    if len(best) == 0:
        raise ValueError("AMS needs at least one generation's best score, got none")
    return {b.name: float((b.reaches(best, orientation) if cumulative else b.contains(best, orientation, bands)).mean())
            for b in bands}


def best_quantile(best: np.ndarray, orientation: Orientation) -> tuple[float, float]:
    """(value, q): the 95th percentile of the best similarity, or the 5th percentile of the best distance."""
    q = 0.95 if orientation == "similarity" else 0.05
    return float(np.quantile(best, q)), q


def ams_ums_dense(scores: np.ndarray, bands: Sequence[Band], orientation: Orientation) -> dict[str, dict[str, float]]:
    """AMS and UMS on a full (N_G, N) score matrix (eqs. 6-9 on the dense matrix), for small sets; the tests check
    the streamed tally against it (it shares the band rules, :class:`Band`, which hand-computed tests pin)."""
    best = scores.max(1) if orientation == "similarity" else scores.min(1)
    n_g = len(scores)
    return {"ams": ams(best, bands, orientation), "ams_cumulative": ams(best, bands, orientation, cumulative=True),
            "ums": {b.name: float(b.contains(scores, orientation, bands).any(0).sum() / n_g) for b in bands},
            "ums_cumulative": {b.name: float(b.reaches(scores, orientation).any(0).sum() / n_g) for b in bands}}


# --------------------------------------------------------------------------------------------------
# Carlini and Gu ratios (pixel RMS-L2)


@dataclasses.dataclass(frozen=True)
class CarliniRatio:
    """Carlini et al.'s ratio; ``ratio`` (N_G,) is not written to JSON."""

    alpha: float
    n: int
    n_effective: int
    centering: Centering
    extracted_fraction: float
    ratio: np.ndarray = dataclasses.field(repr=False)
    threshold: float = 1.0

    def to_json(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "n": self.n, "n_effective": self.n_effective, "centering": self.centering,
                "threshold": self.threshold, "distance": "rms-l2", "extracted_fraction": self.extracted_fraction}


@dataclasses.dataclass(frozen=True)
class GuRatio:
    """Gu et al.'s d1 / d2; ``ratio`` (N_G,) is not written to JSON."""

    threshold: float
    memorized_fraction: float
    ratio: np.ndarray = dataclasses.field(repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "distance": "rms-l2", "memorized_fraction": self.memorized_fraction}


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(num == 0, 0.0, num / den)


def _exact_near(r: np.ndarray, threshold: float, scores: np.ndarray, weights: tuple[float, float],
                scale: float | None) -> np.ndarray:
    """``r`` with each ratio within float rounding of ``threshold`` recomputed exactly: ``r_i = sqrt(S_i0) /
    (w * mean_j sqrt(S_ij))`` over the columns of ``scores`` after the first (``weights``: (w, 0), the first
    column left out of the mean; (w, 1), the first column in it), with S the exact integer squared sums the RMS-L2
    distances came from (``scale``: :attr:`NearestNeighborIndex.integer_scale`; None: ``r`` as it is), in 50
    digits, then rounded to float. The verdict ``r < threshold`` is then the one of the correctly rounded ratio: a
    generation exactly on Gu's 1/3 or on Carlini's 1 was memorized or not by float rounding (5 of 209 such ties
    in a review's sweep)."""
    import decimal

    if scale is None:
        return r
    near = np.flatnonzero((np.abs(r - threshold) <= 1e-9 * abs(threshold)) & (r > 0))
    if len(near) == 0:
        return r
    r = r.copy()
    w, first_in_mean = weights
    with decimal.localcontext() as ctx:
        ctx.prec = 50
        for i in near:
            roots = [decimal.Decimal(int(round(float(d) ** 2 * scale))).sqrt() for d in scores[i]]
            den = roots if first_in_mean else roots[1:]
            r[i] = float(roots[0] / (decimal.Decimal(w) * sum(den) / len(den)))
    return r


def carlini_n_effective(n: int, n_train: int, centering: Centering) -> int:
    """``n`` clamped to the training images available (n_train, or n_train - 1 for "reference"), warning."""
    avail = n_train - (centering == "reference")
    if n < 1:
        raise ValueError(f"carlini n={n} must be at least 1 (the training images each ratio is centred on)")
    if centering not in ("generation", "reference"):
        raise ValueError(f"carlini centering={centering!r} must be 'generation' or 'reference'")
    if avail < 1:
        need = 2 if centering == "reference" else 1
        raise ValueError(f"Carlini's ratio with centering={centering!r} needs at least {need} training images, "
                         f"got {n_train}")
    if n > avail:
        log.warning("carlini n=%d exceeds the %d training images available: using n=%d", n, avail, avail)
    return min(n, avail)


def _check_ratio_settings(*, alpha: float | None = None, threshold: float | None = None) -> None:
    """Carlini's alpha and Gu's threshold, those given, as EvaluateConfig takes them (a NaN fails both)."""
    if alpha is not None and not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"carlini alpha={alpha} must be a finite number > 0")
    if threshold is not None and not 0 < threshold <= 1:
        raise ValueError(f"gu threshold={threshold} must be in (0, 1]")


def carlini_from_neighbors(nb: Neighbors, index: NearestNeighborIndex, *, alpha: float = 0.5, n: int = 50,
                           centering: Centering = "generation") -> CarliniRatio:
    """Carlini's ratio from pixel RMS-L2 neighbours ``nb`` ((N_G, k >= n_effective)) of an index fitted on train."""
    if index.metric != "rms-l2":
        raise ValueError("Carlini's ratio is defined on pixel rms-l2 neighbours")
    _check_ratio_settings(alpha=alpha)
    n_eff = carlini_n_effective(n, index.n_samples_fit_, centering)
    d1 = nb.scores[:, 0]
    if centering == "generation":
        if nb.scores.shape[1] < n_eff:
            raise ValueError(f"need {n_eff} neighbours per generation, got {nb.scores.shape[1]}")
        averaged, first_in_mean = nb.scores[:, :n_eff], 1
    else:
        uniq, inv = np.unique(nb.indices[:, 0], return_inverse=True)
        averaged, first_in_mean = index.kneighbors(index.X_ref_[uniq], n_eff, exclude=uniq).scores[inv], 0
    r = _ratio(d1, alpha * averaged.mean(1))
    if first_in_mean:
        r = _exact_near(r, 1.0, averaged, (alpha, 1), index.integer_scale)
    else:  # (the reference's own neighbours: d1 first, then the n it is averaged over)
        r = _exact_near(r, 1.0, np.concatenate([d1[:, None], averaged], 1), (alpha, 0), index.integer_scale)
    return CarliniRatio(alpha, n, n_eff, centering, float((r < 1.0).mean()), r)


def gu_from_neighbors(nb: Neighbors, threshold: float = 1 / 3, *, scale: float | None = None) -> GuRatio:
    """Gu's ratio d1 / d2 from pixel RMS-L2 neighbours ``nb`` ((N_G, k >= 2)); ``scale``: the index's
    :attr:`~side_extract.neighbors.NearestNeighborIndex.integer_scale`, with which a ratio on the threshold is
    decided exactly."""
    _check_ratio_settings(threshold=threshold)
    if nb.scores.shape[1] < 2:
        raise ValueError("Gu's ratio needs the two nearest training images (k >= 2, at least 2 training images)")
    r = _exact_near(_ratio(nb.scores[:, 0], nb.scores[:, 1]), threshold, nb.scores[:, :2], (1.0, 0), scale)
    return GuRatio(threshold, float((r < threshold).mean()), r)


def check_same_shape(generated: ImageSet, train: ImageSet, what: str = "generated images") -> None:
    """Refuse ``generated`` (``what``: the held-out images, ...) of another shape than ``train``'s, naming both."""
    if generated.images.shape[1:] != train.images.shape[1:]:
        g, t = generated.images.shape[1:], train.images.shape[1:]
        name = f" ({generated.name})" if generated.name else ""
        raise ValueError(f"{what}{name} are {g[0]}x{g[1]}x{g[2]} (HxWxC) but training images are "
                         f"{t[0]}x{t[1]}x{t[2]}; " + ("resize both to one size (--resize SIZE)" if g[2] == t[2] else
                                                      "they differ in channels (grey against colour), which no "
                                                      "resizing changes: give both sets in one colour mode"))


def pixel_ratios(generated: ImageSet, train: ImageSet, *, alpha: float = 0.5, n: int = 50,
                 centering: Centering = "generation", gu_threshold: float = 1 / 3, backend: str = "auto",
                 device: str = "cpu") -> tuple[CarliniRatio, GuRatio]:
    """Carlini's and Gu's ratios of ``generated`` against ``train`` (uint8 images of one shape)."""
    check_same_shape(generated, train)
    _check_ratio_settings(alpha=alpha, threshold=gu_threshold)  # (before the neighbour search)
    if len(generated) == 0:
        raise ValueError("the ratios need at least one generation, got none")
    if len(train) < 2:
        raise ValueError(f"the ratios need at least 2 training images, got {len(train)}")
    index = NearestNeighborIndex("rms-l2", backend=backend, device=device).fit(pixel_rows(train.images))
    nb = index.kneighbors(pixel_rows(generated.images), max(2, carlini_n_effective(n, len(train), centering)))
    return (carlini_from_neighbors(nb, index, alpha=alpha, n=n, centering=centering),
            gu_from_neighbors(nb, gu_threshold, scale=index.integer_scale))
