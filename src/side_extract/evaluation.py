"""Evaluation of generations against the training set, and band calibration from the null.

:func:`evaluate` computes every metric of :mod:`side_extract.metrics` in one streamed pass and returns an
:class:`Evaluation` (``metrics.json`` + the per-generation table); :func:`calibrate` measures the null
distribution of best scores (held-out vs train, train vs rest of train) and proposes bands from it.
The arrow points one way: this module imports :mod:`side_extract.metrics`, never the reverse.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import config as cfg
from .data import (ImageSet, absolute_spec, balanced_first_n, check_image_set, check_levels, load_digits_set,
                   load_image_set, load_shards, resize)
from .detection import check_grid, detect_memorized
from .distributed import check_device
from .metrics import (PAPER_COSINE_BANDS, Band, BandTally, CarliniRatio, GuRatio, NGLaw, Orientation, Similarity,
                      check_bands, check_same_shape, ams, bands_json, best_quantile, carlini_from_neighbors,
                      carlini_n_effective, gu_from_neighbors, holder_of_one, parse_bands, read_bands_file)
from .neighbors import NearestNeighborIndex, pixel_rows
from .runs import Progress, atomic_save_npz, atomic_write_json, atomic_write_text, npz_arrays, read_json, versions

log = logging.getLogger(__name__)



# --------------------------------------------------------------------------------------------------
# evaluation


@dataclasses.dataclass(frozen=True)
class GenerationTable:
    """One row per generation (arrays of length N_G); ``*_index`` are rows of the loaded sets, ``*_id`` their ids."""

    generation_id: np.ndarray
    target_label: np.ndarray  # -1 where the generations carry no label
    nearest_train_index: np.ndarray  # by the chosen similarity
    nearest_train_id: np.ndarray
    similarity: np.ndarray  # best score by the chosen similarity
    band: np.ndarray  # name of the exclusive band of the best score, "" if none
    pixel_nearest_index: np.ndarray
    pixel_distance: np.ndarray  # RMS-L2 to the pixel-nearest training image
    carlini_ratio: np.ndarray
    gu_ratio: np.ndarray
    method: str = ""

    def columns(self) -> dict[str, np.ndarray]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "method"}
        return {"generation_id": d.pop("generation_id"), "method": np.full(len(self.generation_id), self.method)} | d

    def write(self, out_dir: str | Path) -> None:
        """``per_generation.csv`` and ``per_generation.npz`` in ``out_dir``."""
        cols = self.columns()
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(cols)
        floats = {"similarity", "pixel_distance", "carlini_ratio", "gu_ratio"}
        for row in zip(*cols.values()):
            w.writerow([f"{v:.6g}" if k in floats else v for k, v in zip(cols, row)])
        atomic_write_text(Path(out_dir) / "per_generation.csv", buf.getvalue())
        atomic_save_npz(Path(out_dir) / "per_generation.npz", **{k: np.asarray(v) for k, v in cols.items()})


def generation_stats(eval_dir: Path, bands: Sequence[Band], orientation: Orientation, *,
                     columns: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """The per-generation arrays of one evaluation (``eval_dir/per_generation.npz``) that distinct counts and the
    fair benchmark's bootstrap read: the nearest training id (``nn``), Carlini's hit (``carlini``) and, per band,
    whether the generation reaches it (``reach/<band>``: at that band or closer); with the file's ``columns``
    (:class:`GenerationTable`'s names) as they are."""
    z = npz_arrays(Path(eval_dir) / "per_generation.npz", "similarity", "nearest_train_id", "carlini_ratio", *columns)
    sim, nn, carlini = z["similarity"], z["nearest_train_id"], z["carlini_ratio"]
    extra = {c: z[c] for c in columns}
    out = {"nn": nn.astype(np.int64), "carlini": (carlini < 1.0), **extra}
    for b in bands:
        out[f"reach/{b.name}"] = b.reaches(sim, orientation)
    return out


def measured_generations(method: str, metrics: dict[str, Any], made: Path) -> ImageSet:
    """The generations ``method``'s evaluation (its ``metrics.json`` contents) measured: the run's extraction
    (``made``) where it holds them, else, for one that ``side evaluate`` wrote into the run from images elsewhere,
    those images, where they still are what was measured (``Audit.pairs`` and the report: the extraction of that
    name was shown beside another image's nearest training image, or a bare 'holds no shard-*.npz files')."""
    source = (metrics.get("sources") or {}).get("generated")
    measured = (metrics.get("fingerprints") or {}).get("generated")
    here = made.is_dir() and any(made.glob("shard-*.npz"))
    if here:
        gen = load_shards(made)
        if measured is None or gen.fingerprint() == measured:
            return gen
    elsewhere = isinstance(source, str) and bool(source) and Path(source).resolve() != made.resolve()
    if elsewhere and Path(source).exists():
        gen = load_image_set(source, (metrics.get("config") or {}).get("resize"))
        if measured is None or gen.fingerprint() == measured:
            return gen
    name = f"{made.parent.name}/{made.name}"
    if not elsewhere:  # the run's own extraction was what it measured
        raise ValueError(f"{name} changed since it was evaluated: rerun the evaluation" if here else
                         f"{name} holds no shards: {method}'s generations cannot be shown")
    why = (f"side evaluate measured {source!r}, " + ("which is not here" if not Path(source).exists() else
                                                       "whose images changed since"))
    raise ValueError(f"{method}'s generations cannot be shown: {name} " + ("holds other images" if here else
                                                                           "holds no shards") + f", and {why}: "
                     "evaluate again")


def per_generation_stats(run: Path, method: str, bands: Sequence[Band],
                         orientation: Orientation) -> dict[str, np.ndarray]:
    """:func:`generation_stats` of ``method``'s evaluation in run directory ``run``."""
    return generation_stats(Path(run) / "evaluation" / method, bands, orientation)


def distinct_count(stats: dict[str, np.ndarray], band: str = "mid") -> int:
    """Distinct nearest training images among the generations at ``band`` or closer (the fair benchmark's count;
    UMS counts every training image within the band of some generation, so it is never smaller)."""
    return len(np.unique(stats["nn"][stats[f"reach/{band}"]]))


METRIC_SETTINGS = ("carlini_alpha", "carlini_n", "carlini_centering", "gu_threshold")


INCOMPARABLE = ("similarity", "orientation", "bands", "training set", "metric settings")


def incomparable(metrics: dict[str, dict[str, Any]], of: tuple[str, ...] = INCOMPARABLE,
                 reference: str | None = None) -> dict[str, str]:
    """The evaluations (method -> its ``metrics.json``) that cannot be set against ``reference``'s (a run's: its
    config's first evaluated method, :func:`~side_extract.runs.reference_method`, made as the config now says), or,
    without one, against the largest group that agree (the first such group where several are as large: the first
    method's, where none agree), each with why: made with another similarity, orientation, bands, training set
    (``side evaluate --out`` into a run, an earlier call's) or settings of Carlini's and Gu's ratios
    (:data:`METRIC_SETTINGS`: a run's call of some methods under other settings). ``of``: which of these
    (:data:`INCOMPARABLE`) count (the report's table weighs the bands column by column)."""
    if not metrics:
        return {}

    def train(m: dict[str, Any]) -> Any:  # the training set's fingerprint (a set of the same size may differ)
        return (m.get("fingerprints") or {}).get("train")

    def settings(m: dict[str, Any]) -> Any:  # what Carlini's and Gu's ratios were measured with
        return [(m.get("config") or {}).get(k) for k in METRIC_SETTINGS]

    keys = {"similarity": lambda m: m.get("similarity"), "orientation": lambda m: m.get("orientation"),
            "bands": lambda m: m.get("bands"), "training set": lambda m: (m.get("n_train"), train(m)),
            "metric settings": settings}
    said = {"metric settings": "metric settings (" + ", ".join(METRIC_SETTINGS) + ")"}

    def differs(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
        return [said.get(k, k) for k, read in keys.items() if k in of and read(a) != read(b)]

    # (against the first one alone, one odd evaluation listed first left every other one "not compared")
    ms = list(metrics.values())
    first = metrics[reference] if reference in metrics else max(
        ms, key=lambda a: (sum(not differs(a, b) for b in ms), -ms.index(a)))
    return {m: "its evaluation used other " + ", ".join(other) for m, v in metrics.items()
            if (other := differs(v, first))}


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Everything ``side evaluate`` writes; ``to_json()`` is ``metrics.json``."""

    method: str
    n_generated: int
    n_train: int
    similarity: str
    orientation: Orientation
    bands: tuple[Band, ...]
    bands_source: str
    ams: dict[str, float]
    ums: dict[str, float]
    ams_cumulative: dict[str, float]
    ums_cumulative: dict[str, float]
    p95: float
    p95_quantile: float
    carlini: CarliniRatio
    gu: GuRatio
    ng_law: dict[str, NGLaw]
    fingerprints: dict[str, str]
    table: GenerationTable = dataclasses.field(repr=False)
    null: dict[str, Any] | None = None
    detection: Any = None
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    sources: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        rule = ("lo <= s < hi (s >= lo for the closest band with lo <= 1 <= hi); cumulative s >= lo"
                if self.orientation == "similarity"
                else "lo <= d < hi; cumulative d < hi (smaller distance = closer)")
        return {"schema": "side-extract/metrics/1", "method": self.method, "n_generated": self.n_generated,
                "n_train": self.n_train, "similarity": self.similarity, "orientation": self.orientation,
                "band_rule": rule, "bands": bands_json(self.bands), "bands_source": self.bands_source,
                "ams": self.ams, "ums": self.ums, "ams_cumulative": self.ams_cumulative,
                "ums_cumulative": self.ums_cumulative, "p95": self.p95, "p95_quantile": self.p95_quantile,
                "carlini": self.carlini.to_json(), "gu": self.gu.to_json(),
                "ng_law": {k: v.to_json() for k, v in self.ng_law.items()}, "null": self.null,
                "detection": None if self.detection is None else self.detection.to_json(),
                "fingerprints": self.fingerprints, "sources": self.sources, "config": self.config,
                "versions": versions()}

    FILES = ("per_generation.csv", "per_generation.npz", "metrics.json")  # what write() makes

    def write(self, out_dir: str | Path) -> Path:
        """``metrics.json`` + the per-generation table in ``out_dir``; returns the metrics.json path."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").unlink(missing_ok=True)  # the set's mark, written last: an earlier evaluation's beside
        self.table.write(out)  # this one's table, cut short, read as whole
        atomic_write_json(out / "metrics.json", self.to_json())
        return out / "metrics.json"




def _rows(sim: Similarity, images: ImageSet, features: np.ndarray | None, c: cfg.EvaluateConfig, device: str,
          reference: ImageSet, model: Any = None) -> np.ndarray:
    """(n, D) rows to compare: uint8 pixels for rms-l2; float features for cosine, given or extracted with the
    extractor fitted on ``reference`` (the training set), so that every set lands in one feature space."""
    if sim.metric == "rms-l2":
        return pixel_rows(images.images)
    if features is not None:
        features = np.asarray(features)
        if features.ndim != 2 or len(features) != len(images):
            raise ValueError(f"features of {images.name or 'a set'} must be ({len(images)}, D), got {features.shape}")
        return features
    try:
        from .features import extract_features
    except ImportError as e:
        raise ValueError(f"similarity={sim.spec!r} needs side_extract.features, which cannot be imported: {e}") from e
    return extract_features(sim.extractor, images, model=model, reference=reference, device=device,
                            batch_size=c.feature_batch_size)


def neighbor_index(metric: str, c: cfg.EvaluateConfig, device: str) -> NearestNeighborIndex:
    """An unfitted index searching as ``c`` says (``backend``, ``query_chunk``, ``ref_chunk``): every neighbour
    search of an evaluation, the detection's and the copy guard's too."""
    return NearestNeighborIndex(metric, backend=c.backend, device=device, query_chunk=c.query_chunk,
                                ref_chunk=c.ref_chunk)


def heldout_unread(similarity: str, heldout: str) -> str:
    """Why held-out images given to ``evaluate`` with a cosine similarity and no bands would not be read."""
    return (f"held-out images ({heldout}) calibrate bands, but {similarity} without bands takes the paper's cosine "
            f"bands: they would not be read; calibrate with `side calibrate --similarity {similarity} --heldout ...` "
            "and give its bands file, or leave them out")


SCORE_RANGES = {"rms-l2": (0.0, 1.0), "cosine": (-1.0, 1.0)}  # what a score of each kind can be


def warn_unreachable_bands(bands: Sequence[Band], sim: Similarity) -> None:
    """Warn of the bands no score of ``sim`` can fall in (RMS distances of pixels in [0, 1] lie in [0, 1], cosines
    in [-1, 1]): bands on another scale (the paper's L2 edges, 1.41-1.85; 0-255 pixel units; percentages) gave a
    confident 100 % or 0 % without a word. A band reaching past the range from inside it ("exact=1:2" beside a
    cosine band ending at 1) is fine."""
    lo, hi = SCORE_RANGES[sim.metric]
    if out := [b for b in bands if b.lo > hi or b.hi < lo]:
        log.warning("bands %s lie outside the scores %s can take ([%g, %g]): nothing can fall in them; are they on "
                    "another scale (the paper's L2 bands, pixel units 0-255, percentages)?",
                    ", ".join(f"{b.name}={b.lo:g}:{b.hi:g}" for b in out), sim.spec, lo, hi)


def evaluate(generated: ImageSet, train: ImageSet, config: cfg.EvaluateConfig | None = None, *, method: str = "",
             bands: Sequence[Band] | None = None, generated_features: np.ndarray | None = None,
             train_features: np.ndarray | None = None, feature_model: Any = None, device: str = "cpu",
             progress: Progress | None = None, heldout: ImageSet | None = None) -> Evaluation:
    """Every memorization metric of ``generated`` against ``train``.

    Parameters
    ----------
    generated, train : uint8 image sets of one shape (N_G and N images); ``generated.labels`` = target labels
    config : options (similarity, bands, Carlini / Gu, chunks, backend)
    bands : explicit bands; else ``config.bands``, ``config.bands_file``, the paper's bands for cosine, bands
        calibrated on held-out images (``heldout``, else ``config.heldout``), or on the training set's own null
        (train vs rest of train), in that order
    heldout : held-out images (never trained on) in memory, instead of ``config.heldout``'s spec
    generated_features, train_features : (N_G, D) / (N, D) features for cosine, instead of extracting them
    feature_model : the target model, for extractors that need one (``unet``)

    Steps: 1. resolve bands; 2. one streamed pass of the generations against the training set gives each
    generation's nearest neighbours (AMS, p95; eqs. 6-7) and every in-band pair (UMS, eqs. 8-9, N_G law);
    3. pixel RMS-L2 neighbours (the same pass for rms-l2) give Carlini's and Gu's ratios; 4. the table.
    """
    check_image_set(generated, "generated")
    check_image_set(train, "train")
    if config is not None:
        cfg.check_section(config, cfg.EvaluateConfig, "config")  # (a dict was an AttributeError)
    if bands is not None and not all(isinstance(b, Band) for b in bands):
        raise ValueError(f"bands must be Band objects (side_extract.metrics.Band(name, lo, hi)), got {list(bands)!r}")
    if bands is not None:  # (overlapping bands gave AMS past 100 %, a repeated name a wrong share, none a bare error)
        check_bands(bands, "bands")
    check_device(device)  # (device="gpu" was torch's list of device types)
    c = config or cfg.EvaluateConfig()
    sim = Similarity(c.similarity)
    features_unread(sim, generated_features=generated_features, train_features=train_features)
    option_bands = parse_bands(c.bands) if c.bands is not None else None  # fail before any work
    file_bands = (read_bands_file(c.bands_file, sim.spec) if bands is None and option_bands is None
                  and c.bands_file is not None else None)  # (it was read after both sets' features)
    if bands is None and option_bands is None and file_bands is None and sim.metric == "cosine" and heldout is not None:
        raise ValueError(heldout_unread(sim.spec, heldout.name or "images given"))  # (they were silently unread)
    if heldout is not None and (bands is not None or option_bands is not None or c.bands_file is not None):
        given = "bands" if bands is not None else "config.bands" if option_bands is not None else "config.bands_file"
        raise ValueError(f"held-out images ({heldout.name or 'images given'}) calibrate the bands, and {given} gives "
                         "them: they would not be read; leave one out")  # (as the CLI: rms-l2 ignored them in silence)
    for given in (bands, option_bands, file_bands):
        if given is not None:
            warn_unreachable_bands(given, sim)
    check_same_shape(generated, train)
    if c.detect_threshold is not None and c.detect_grid is not None:  # (it was refused after the whole evaluation)
        check_grid(c.detect_grid, *generated.images.shape[1:3], "detect_grid")
    if heldout is not None:  # (before any work)
        check_image_set(heldout, "heldout")
        check_same_shape(heldout, train, "held-out images")
        check_levels(heldout.images, "held-out images")
        check_heldout(heldout, train)
    n_g, n_t = len(generated), len(train)
    if n_t < 2:
        raise ValueError(f"the training set needs at least 2 images (Gu's ratio uses the second nearest), got {n_t}")
    if n_g < 1:
        raise ValueError("the generated set is empty")
    check_levels(train.images, "train")  # (only the training set: a model's generations may be all black)
    _warn_duplicates(train)
    t_rows = _rows(sim, train, train_features, c, device, train, feature_model)
    g_rows = _rows(sim, generated, generated_features, c, device, train, feature_model)
    index = neighbor_index(sim.metric, c, device).fit(t_rows)
    # 1. bands
    null = None
    if bands is not None:
        bands, source = tuple(bands), "argument"
    elif option_bands is not None:
        bands, source = option_bands, "option"
    elif file_bands is not None:
        bands, source = file_bands, f"file:{c.bands_file}"
        fps = read_json(c.bands_file).get("fingerprints")  # (a damaged entry: no word, as before the check)
        calibrated_on = fps.get("train") if isinstance(fps, dict) and isinstance(fps.get("train"), str) else None
        if calibrated_on is not None and calibrated_on != train.fingerprint():  # (applied without a word: edges of a
            # 16 px set's null measured 8 px distances)
            log.warning("bands file %r was calibrated on another training set than %s (fingerprint %s, this one's "
                        "%s: another set, the same at another size, or the same images in another order, which "
                        "leaves its edges as they are): its edges were set by that set's null", c.bands_file,
                        train.name or "the one given", calibrated_on[:12], train.fingerprint()[:12])
    elif sim.metric == "cosine":
        bands, source = PAPER_COSINE_BANDS, "paper-default"
        if not (sim.extractor or "").startswith("torchscript:"):
            log.warning("the paper's cosine bands were set for SSCD descriptors; for %s calibrate bands with "
                        "`side calibrate --similarity %s` and pass --bands-file", sim.extractor, sim.spec)
    elif heldout is not None or c.heldout is not None:
        name = c.heldout if heldout is None else heldout.name or "images given"
        if heldout is None:  # (one given was checked before any work)
            heldout = load_image_set(c.heldout, c.resize)
            check_same_shape(heldout, train, "held-out images")
            check_levels(heldout.images, f"evaluate.heldout={c.heldout!r}")
            check_heldout(heldout, train)
        values = index.kneighbors(_rows(sim, heldout, None, c, device, train, feature_model), 1).scores[:, 0]
        copies = copy_rows(heldout, train)
        bands, source = propose_bands(values, sim.orientation, c.calibration_quantiles, copies), f"heldout:{name}"
        null = {"source": "heldout-vs-train", **null_summary(values, c.calibration_quantiles, sim.orientation, copies)}
    else:
        values = index.kneighbors(t_rows, 1, exclude_self=True).scores[:, 0]
        copies = duplicate_rows(train)
        bands, source = propose_bands(values, sim.orientation, c.calibration_quantiles, copies), "train-null"
        null = {"source": "train-vs-rest", **null_summary(values, c.calibration_quantiles, sim.orientation, copies)}
        log.warning("no bands given for %s: calibrated on the training set's own null (train vs rest of train); "
                    "`side calibrate` with held-out images gives better ones", sim.spec)
    # 2. one pass: nearest neighbours + in-band pairs
    n_eff = carlini_n_effective(c.carlini_n, n_t, c.carlini_centering)
    k_pix = max(2, n_eff if c.carlini_centering == "generation" else 1)
    tally = BandTally(bands, sim.orientation, n_g, n_t, n_repeats=c.ng_repeats, random_state=c.seed)
    nb = index.kneighbors(g_rows, k_pix if sim.metric == "rms-l2" else 1, pairs_range=tally.pairs_range,
                          on_pairs=tally.add, pairs_edges=tally.pairs_edges, progress=progress)
    best, nearest = nb.scores[:, 0], nb.indices[:, 0]
    # 3. pixel ratios
    if sim.metric == "rms-l2":
        pix_index, pix_nb = index, nb
    else:
        pix_index = neighbor_index("rms-l2", c, device).fit(pixel_rows(train.images))
        pix_nb = pix_index.kneighbors(pixel_rows(generated.images), k_pix)
    carlini = carlini_from_neighbors(pix_nb, pix_index, alpha=c.carlini_alpha, n=c.carlini_n,
                                     centering=c.carlini_centering)
    gu = gu_from_neighbors(pix_nb, c.gu_threshold, scale=pix_index.integer_scale)
    # 4. table and results
    band_of = np.full(n_g, "", dtype=object)
    for b in reversed(bands):  # the first listed band wins where user bands overlap
        band_of[b.contains(best, sim.orientation, bands)] = b.name
    labels = generated.labels if generated.labels is not None else np.full(n_g, -1, np.int64)
    table = GenerationTable(generated.ids, labels, nearest, train.ids[nearest], best, band_of.astype(str),
                            pix_nb.indices[:, 0], pix_nb.scores[:, 0], carlini.ratio, gu.ratio, method)
    detection = None
    if c.detect_threshold is not None:
        detection = detect_memorized(generated, c.detect_threshold, min_size=c.detect_min_size, grid=c.detect_grid,
                                     mode=c.detect_mode, train=train, extraction_threshold=c.extraction_threshold,
                                     chunk=c.query_chunk, device=device, index=neighbor_index("rms-l2", c, device))
    p95, q = best_quantile(best, sim.orientation)
    return Evaluation(method, n_g, n_t, sim.spec, sim.orientation, bands, source,
                      ams(best, bands, sim.orientation), tally.ums(),
                      ams(best, bands, sim.orientation, cumulative=True),
                      tally.ums_cumulative(), p95, q, carlini, gu, tally.ng_law(),
                      {"generated": generated.fingerprint(), "train": train.fingerprint()}, table, null, detection,
                      cfg.to_dict(c), {"generated": source_name(generated), "train": source_name(train)})


def source_name(images: ImageSet) -> str | None:
    """What a results file records ``images`` came from: its name, a path as an absolute one (a run made with a
    relative path recorded its extraction as ``run/extraction/x``, read later from another folder as other files:
    the findings counted the run's generations twice, the report showed none)."""
    return absolute_spec(images.name)


def duplicate_counts(images: ImageSet) -> np.ndarray:
    """How many times each distinct image of ``images`` occurs (byte for byte), one count per distinct image."""
    rows = np.ascontiguousarray(images.images.reshape(len(images), -1))
    return np.unique(rows.view(np.dtype((np.void, rows.shape[1]))).ravel(), return_counts=True)[1]


def copies_of(images: ImageSet, train: ImageSet) -> int:
    """How many of ``images`` are byte for byte one of the training images ``train`` (the same shape)."""
    return int(copy_rows(images, train).sum())


def check_heldout(heldout: ImageSet, train: ImageSet) -> None:
    """Refuse held-out images (of the training set's shape) that are all training images, and say how many are,
    before a null is computed: the null leaves exact copies out, and an all-copies null was refused only after it,
    blamed on duplicates in the reference set."""
    what = f"the held-out images ({heldout.name})" if heldout.name else "the held-out images"
    copies = copies_of(heldout, train)
    if copies == len(heldout):
        raise ValueError(f"{what}: every one of its {len(heldout)} images is a training image (an exact copy); "
                         "held-out images must be ones the model never saw")
    if copies:
        log.warning("%s: %d of its %d images are training images (exact copies): the null leaves them out; held-out "
                    "images should be ones the model never saw", what, copies, len(heldout))


def _warn_duplicates(train: ImageSet) -> None:
    """Say so when the training set holds exact duplicates: the metrics follow their literal definitions there."""
    counts = duplicate_counts(train)
    if (counts > 1).any():
        log.warning("the training set holds %d exact duplicates of %d images: UMS counts each copy as its own "
                    "training image; Gu's ratio counts an exact copy of a duplicated image as memorized (0/0) and a "
                    "near copy of it not (d1/d2 near 1). Deduplicate the training set for counts per distinct image",
                    int((counts - 1).sum()), int((counts > 1).sum()))


# --------------------------------------------------------------------------------------------------
# calibration: bands from the null distribution


def _quantiles(values: np.ndarray, levels: Sequence[float], orientation: Orientation) -> dict[str, float]:
    """Tail quantiles of a null: ``levels`` for a distance, ``1 - levels`` for a similarity (keys: the tail share)."""
    return {str(q): float(np.quantile(values, q if orientation == "distance" else 1 - q)) for q in levels}


def _copies(null: np.ndarray, orientation: Orientation, copies: np.ndarray | None = None) -> np.ndarray:
    """Which best scores of a null are exact copies, left out of the band edges: ``copies`` where the caller knows
    them byte for byte (:func:`copy_rows`, :func:`duplicate_rows`), else by score (distance 0, similarity within
    1e-6 of 1: a near copy's cosine can lie closer to 1 than that, and was dropped as a copy)."""
    if copies is not None:
        return np.asarray(copies, dtype=bool)
    return null <= 0 if orientation == "distance" else null >= 1 - 1e-6


def copy_rows(images: ImageSet, train: ImageSet) -> np.ndarray:
    """(n,) bool: which of ``images`` are byte for byte one of the training images."""
    seen = {img.tobytes() for img in train.images}
    return np.array([img.tobytes() in seen for img in images.images], dtype=bool)


def duplicate_rows(images: ImageSet) -> np.ndarray:
    """(n,) bool: which of ``images`` have a byte-for-byte duplicate among the others."""
    rows = np.ascontiguousarray(images.images.reshape(len(images), -1))
    _, inverse, counts = np.unique(rows.view(np.dtype((np.void, rows.shape[1]))).ravel(), return_inverse=True,
                                   return_counts=True)
    return counts[inverse.ravel()] > 1


def null_summary(values: np.ndarray, levels: Sequence[float], orientation: Orientation,
                 copies: np.ndarray | None = None) -> dict[str, Any]:
    """A null as metrics.json and bands.json record it: how many best scores, how many of them exact copies left
    out of the band edges (``copies``: :func:`_copies`), and the tail quantiles of the rest (the band edges
    :func:`propose_bands` drew)."""
    copies = _copies(values, orientation, copies)
    kept = values[~copies] if copies.any() and not copies.all() else values
    return {"n": len(values), "copies_left_out": int(copies.sum()), "quantiles": _quantiles(kept, levels, orientation)}


def check_null_size(n: int, levels: Sequence[float]) -> None:
    """Refuse a null of ``n`` best scores (exact copies left out) too small for its finest quantile ``levels``."""
    q = min(levels)
    least, need = int(np.ceil(0.1 / q)), int(np.ceil(1 / q))
    if n * q < 0.1:
        raise ValueError(
            f"a null of {n} values cannot estimate its {q:g} quantile (it needs at least {least} "
            f"held-out images, and {need} for an edge set by more than the closest few; with {n} the band "
            "edge would be the null's extreme and the closest band would hold almost every generation): give more "
            "held-out images (a run's evaluate.heldout; --heldout of side calibrate, evaluate and demo), coarser "
            "quantiles (evaluate.calibration_quantiles; --calibration-quantiles of side calibrate and evaluate; e.g. "
            "0.05,0.1,0.2) or, to evaluate, fixed bands (evaluate.bands; --bands of side evaluate; e.g. "
            "Carlini's RMS 0.15 style: 'high=0:0.1,mid=0.1:0.15,low=0.15:0.2')")
    # (it named config keys alone, which side calibrate and side demo do not read, and fixed bands to calibrate)


def propose_bands(null: np.ndarray, orientation: Orientation, levels: Sequence[float] = (0.001, 0.01, 0.05),
                  copies: np.ndarray | None = None) -> tuple[Band, ...]:
    """Band edges at tail quantiles of a null distribution of best scores, farthest band first.

    With levels (0.001, 0.01, 0.05) and a distance: high = [0, q_0.001), mid = [q_0.001, q_0.01),
    low = [q_0.01, q_0.05): "high" means closer than all but 0.1 % of non-members. For a similarity, the
    edges are the (1 - level) quantiles: high = [q_0.999, 1], mid = [q_0.99, q_0.999), low = [q_0.95, q_0.99).
    More or fewer levels give bands named ``tail<level>``.

    Exact copies in the null (the reference set holds a duplicate of the image scored: ``copies``, byte for byte,
    else distance 0 or similarity 1) are left out, with a warning: the bands say how close a non-copy comes, and an
    edge at the extreme would leave the closest band empty (distance) or make two bands share the exact copies
    (similarity).
    """
    null = np.asarray(null, dtype=np.float64)
    if null.ndim != 1 or len(null) == 0:
        raise ValueError(f"the null must be a non-empty 1-D array of best scores, got shape {null.shape}")
    if not levels or any(not 0.0 < v < 0.5 for v in levels) or list(levels) != sorted(set(levels)):
        # (as EvaluateConfig.calibration_quantiles: a repeated level was an IndexError, 0 a ZeroDivisionError)
        raise ValueError(f"levels={tuple(levels)} must be strictly increasing values in (0, 0.5)")
    copies = _copies(null, orientation, copies)
    if copies.shape != null.shape:
        raise ValueError(f"copies of shape {copies.shape} must mark each of the null's {len(null)} best scores")
    if copies.any():
        log.warning("%d of the null's %d best scores are exact copies (of an image with a byte-for-byte duplicate "
                    "in the reference set): they are left out of the band edges", int(copies.sum()), len(null))
        null = null[~copies]
        if len(null) == 0:
            raise ValueError("every best score of the null is an exact copy (the reference images all have "
                             "duplicates): no band edge can be estimated; give fixed bands (evaluate.bands)")
    levels = sorted(levels)
    need = int(np.ceil(1 / levels[0]))
    check_null_size(len(null), levels)
    if len(null) * levels[0] < 1:
        log.warning("a null of %d values cannot resolve the %.3g quantile (it needs %d); its band edge lies "
                    "between the null's two most extreme values, so the closest band is wider than its name says",
                    len(null), levels[0], need)
    names = ["high", "mid", "low"] if len(levels) == 3 else [f"tail{q:g}" for q in levels]
    edges = list(_quantiles(null, levels, orientation).values())
    if orientation == "distance":
        out = [Band(names[i], 0.0 if i == 0 else edges[i - 1], edges[i]) for i in range(len(levels))]
    else:
        out = [Band(names[i], edges[i], 1.0 if i == 0 else edges[i - 1]) for i in range(len(levels))]
    for b in out:
        if b.lo == b.hi and not (orientation == "similarity" and holder_of_one(out) == b.name):  # (it holds the
            # scores of 1)
            log.warning("calibrated band %r is empty (lo = hi = %.4g): the null is too coarse", b.name, b.lo)
    return tuple(reversed(out))


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Null distributions of best scores and the bands proposed from them; ``to_json()`` is ``bands.json``.

    ``nulls``: "heldout" (each held-out image vs the training set) and "train" (each training image vs the
    rest of the training set; beside a held-out null, on a draw of the training images: ``drawn_from``,
    :func:`train_null_rows`); the bands come from ``null_source`` ("heldout" when given).
    """

    similarity: str
    orientation: Orientation
    quantile_levels: tuple[float, ...]
    null_source: str
    bands: tuple[Band, ...]
    nulls: dict[str, np.ndarray] = dataclasses.field(repr=False)
    fingerprints: dict[str, str] = dataclasses.field(default_factory=dict)
    sources: dict[str, str] = dataclasses.field(default_factory=dict)
    copies: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)  # each null's exact copies
    drawn_from: dict[str, int] = dataclasses.field(default_factory=dict)  # a null measured on a draw: of how many

    def to_json(self, bins: int = 50) -> dict[str, Any]:
        lo = min(float(v.min()) for v in self.nulls.values())
        hi = max(float(v.max()) for v in self.nulls.values())
        summary = {}
        for name, v in self.nulls.items():
            counts, edges = np.histogram(v, bins=bins, range=(lo, hi if hi > lo else lo + 1e-9))
            summary[name] = {**null_summary(v, self.quantile_levels, self.orientation, self.copies.get(name)),
                             **({"drawn_from": self.drawn_from[name]} if name in self.drawn_from else {}),
                             "histogram": {"edges": edges.tolist(), "counts": counts.tolist()}}
        from .features import extractor_revision

        revision = extractor_revision(Similarity(self.similarity).extractor)
        return {"schema": "side-extract/bands/1", "similarity": self.similarity, "orientation": self.orientation,
                "quantile_levels": list(self.quantile_levels), "null_source": self.null_source,
                "bands": bands_json(self.bands), "null": summary, "fingerprints": self.fingerprints,
                "sources": self.sources,
                # (a revised extractor's: bands of its earlier features are told apart, see cli/evaluate.run_bands)
                **({"extractor_revision": revision} if revision > 1 else {})}

    FILES = ("null.npz", "bands.json")  # what write() makes

    def write(self, out_dir: str | Path) -> Path:
        """``bands.json`` and ``null.npz`` (the raw null values) in ``out_dir``; returns the bands.json path."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bands.json").unlink(missing_ok=True)  # the set's mark, written last (as metrics.json)
        atomic_save_npz(out / "null.npz", **self.nulls)
        atomic_write_json(out / "bands.json", self.to_json())
        return out / "bands.json"


def features_unread(sim: Similarity, **given: Any) -> None:
    """Refuse features given for a pixel similarity (rms-l2 compares the images' pixels: they were ignored without a
    word, of any shape)."""
    if sim.metric == "rms-l2" and (named := [k for k, v in given.items() if v is not None]):
        raise ValueError(f"{', '.join(f'{k}=...' for k in named)}: similarity 'rms-l2' compares the images' pixels, "
                         "so features would not be read; leave them out, or measure a cosine:<extractor> similarity")


def calibrate(train: ImageSet, heldout: ImageSet | None = None, config: cfg.EvaluateConfig | None = None, *,
              train_features: np.ndarray | None = None, heldout_features: np.ndarray | None = None,
              feature_model: Any = None, device: str = "cpu", progress: Progress | None = None) -> Calibration:
    """Measure the null of best scores and propose bands (see :func:`propose_bands` for the quantiles): on the
    held-out images ``heldout`` (in memory), else ``config.heldout``'s (a spec, as :func:`evaluate` reads it), else
    on the training set's own null."""
    check_image_set(train, "train")
    if heldout is not None:
        check_image_set(heldout, "heldout")
    if config is not None:
        cfg.check_section(config, cfg.EvaluateConfig, "config")  # (a similarity string was an AttributeError)
    c = config or cfg.EvaluateConfig()
    features_unread(Similarity(c.similarity), train_features=train_features, heldout_features=heldout_features)
    if heldout is None and c.heldout is not None:  # (left unread: the training set's null was taken without a word)
        heldout = load_image_set(c.heldout, c.resize)
    sim = Similarity(c.similarity)
    if len(train) < 2:
        raise ValueError(f"calibration needs at least 2 training images, got {len(train)}")
    check_levels(train.images, "train")
    if heldout is not None:  # (before any work)
        check_same_shape(heldout, train, "held-out images")
        check_levels(heldout.images, "held-out images")
        check_heldout(heldout, train)
    source = "heldout" if heldout is not None else "train"
    copies = {"train": duplicate_rows(train), **({"heldout": copy_rows(heldout, train)} if heldout is not None else {})}
    check_null_size(int((~copies[source]).sum()), c.calibration_quantiles)  # (said after both nulls' searches)
    t_rows = _rows(sim, train, train_features, c, device, train, feature_model)
    index = neighbor_index(sim.metric, c, device).fit(t_rows)
    rows = train_null_rows(len(train), None if heldout is None else len(heldout))
    nulls = {"train": index.kneighbors(t_rows if rows is None else t_rows[rows], 1, progress=progress,
                                       **({"exclude_self": True} if rows is None else {"exclude": rows})).scores[:, 0]}
    if rows is not None:
        copies["train"] = copies["train"][rows]
    fps, sources = {"train": train.fingerprint()}, {"train": source_name(train)}
    if heldout is not None:
        h_rows = _rows(sim, heldout, heldout_features, c, device, train, feature_model)
        nulls["heldout"] = index.kneighbors(h_rows, 1, progress=progress).scores[:, 0]
        fps["heldout"], sources["heldout"] = heldout.fingerprint(), source_name(heldout)
    bands = propose_bands(nulls[source], sim.orientation, c.calibration_quantiles, copies[source])
    return Calibration(sim.spec, sim.orientation, tuple(c.calibration_quantiles), source, bands, nulls, fps, sources,
                       copies, {} if rows is None else {"train": len(train)})


TRAIN_NULL_LEAST = 1000  # training images the train null is measured on at least where held-out images set the bands
TRAIN_NULL_SEED = 0


def train_null_rows(n_train: int, n_heldout: int | None) -> np.ndarray | None:
    """The training rows whose nearest other training image :func:`calibrate` measures (None: every one). Where
    held-out images set the bands, the training set's own null is shown beside theirs, not used: it is measured on
    as many training images as there are held-out ones (at least :data:`TRAIN_NULL_LEAST`), a fixed draw, where it
    searched every one, O(N^2): 21 of 27 s of side calibrate on 20,000 images at 32 px with 2,000 held out (a scale
    review's find), and about 9 times that at 60,000."""
    m = None if n_heldout is None else max(n_heldout, TRAIN_NULL_LEAST)
    if m is None or m >= n_train:
        return None
    return np.sort(np.random.default_rng(TRAIN_NULL_SEED).choice(n_train, m, replace=False))


def held_out_set(train: str | None, heldout: str | None, resize_to: int | None = None) -> ImageSet | None:
    """The held-out images to calibrate bands on for a training set named ``train``: ``heldout``'s images, else the
    digits outside ``digits:N`` (:func:`digits_complement`), else None (the training images against each other);
    resized to ``resize_to`` as the training set is. What a run, ``side calibrate`` and ``side evaluate`` take."""
    if heldout is not None:
        return load_image_set(heldout, resize_to)
    if str(train).startswith("digits:"):
        return digits_complement(str(train), resize_to)
    return None


def digits_complement(spec: str, resize_to: int | None = None) -> ImageSet:
    """The held-out digits for a ``digits:N`` training spec: every bundled digit not in that subset, resized to
    ``resize_to`` px square as the training set is (``train_resize``, ``--resize``)."""
    if not spec.startswith("digits:"):
        raise ValueError(f"digits_complement needs a 'digits:N' spec, got {spec!r}")
    full = load_digits_set()
    try:
        n = int(spec.split(":", 1)[1])
    except ValueError:
        raise ValueError(f"data spec {spec!r}: expected digits:N with an integer N") from None
    if not 1 <= n < len(full):
        raise ValueError(f"{spec!r}: the complement is empty unless 1 <= N < {len(full)}")
    rest = np.setdiff1d(np.arange(len(full)), balanced_first_n(full.labels, n))
    out = full.subset(rest)
    images = out.images if resize_to is None else resize(out.images, resize_to)
    return ImageSet(images, out.labels, out.ids, f"digits minus {spec}")
