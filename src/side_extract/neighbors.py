"""Exact nearest neighbours of query rows among reference rows, streamed in chunks.

Two scores, chosen by ``metric``:

- ``"cosine"``: rows are feature vectors; score = <q / |q|, r / |r|> in [-1, 1]; **higher is closer**.
  A zero row has similarity 0 to everything; scores are clipped to [-1, 1].
- ``"rms-l2"``: rows are flattened pixels, either uint8 in 0..255 or floats in [0, 1]; score =
  sqrt(mean over the D values of (q - r)^2) in [0, 1] (pixels scaled to [0, 1]); **lower is closer**.
  For uint8 rows the squared sums are computed in integer-valued floating point (float32 while
  ``D <= 129``, float64 above), where every product and partial sum is an exact integer, so the
  distances do not depend on the backend, the chunking or the summation order.

Memory stays bounded: queries are processed ``query_chunk`` rows at a time against ``ref_chunk`` reference
rows at a time, keeping only a running top-k per query; the fitted rows are referenced, not copied.
Backends: faiss ``IndexFlatIP`` / ``IndexFlatL2`` (on all GPUs when ``faiss.get_num_gpus() > 0``), one
index per reference chunk, merged; or chunked torch matrix products on ``device``. faiss computes in
float32, so its rms-l2 results are recomputed exactly for the k returned neighbours; for uint8 rows past 129 values
its choice between near ties is checked too (:meth:`NearestNeighborIndex._faiss_knn`).

Every score returned is one float64 formula of its pair, whatever found it: for uint8 pixel rows the exact integer
sums above; for float rows (features under cosine, float pixels under rms-l2) the pair is scored again in float64
from its two rows (:meth:`NearestNeighborIndex._pair_scores`) once the float32 (cosine) or expanded (rms-l2) block
products have found it. So a pair has the same score on faiss and torch, in the k nearest and in the band pairs of
one pass: a generation whose nearest counts in a band for AMS has that pair in the band for UMS. Under cosine the k
nearest are the float64 best, ties to the lowest rows, on every path (a few candidates beyond k are rescored, and more
where their float32 keys cannot rule out a row left out: :meth:`NearestNeighborIndex._widened`), unless more than 64
rows lie within float32 rounding (4 (D + 4) 2^-24) of the k-th, where the float32 keys choose among them (the bound
takes IEEE float32 products: not TF32, ``torch.set_float32_matmul_precision("high")`` on CUDA); of float pixel rows
under rms-l2 (the package's pixels are uint8), which of two rows within float64 rounding is nearer is the search's.

``pairs_within`` (and ``kneighbors(..., on_pairs=...)``, in the same pass) streams every (query,
reference) pair whose score lies in a closed range: what unique-memorization counts need.
"""
from __future__ import annotations

import dataclasses
import logging
import numbers
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from .runs import Progress

log = logging.getLogger(__name__)

Metric = Literal["cosine", "rms-l2"]
Backend = Literal["auto", "faiss", "torch"]
PairsCallback = Callable[[np.ndarray, np.ndarray, np.ndarray], None]

FAISS_QUERY_CHUNK = 65536  # queries per faiss search call (results are k per query: small), at most
FAISS_QUERY_BYTES = 64 * 2**20  # ... as many as fill this many bytes of float32 rows (memory flat in the queries)
COSINE_EXTRA = 4  # candidates beyond k under cosine, rescored in float64 (:meth:`NearestNeighborIndex._widened`)
COSINE_WIDEN = 64  # ... and at most this many beyond k where float32 rounding cannot tell the k-th from the next
FAISS_GPU_MAX_K = 2048  # faiss on GPUs selects at most this many neighbours (GPU_MAX_SELECTION_K)
FINISH_ROWS = 4096  # query rows ordered at a time when the k nearest are put in order (temporaries flat in the queries)


_EXACT_FLOAT32_MAX_D = 129  # 2 * 255^2 * D < 2^24: integer sums of uint8 rows stay exact in float32
# the rows of a block of queries or of reference rows: at most as many as fill this many bytes as the search holds
# them (float64 for pixel rows of more than 129 values; 8,192 reference rows of 64x64 RGB held 805 MB, twice over
# with their squares, where 1,024 held 1.1 GB in all at the same speed)
BLOCK_BYTES = 128 * 2**20
_CACHE_BYTES = 256 * 2**20  # prepared reference chunks are cached below this size


@dataclasses.dataclass(frozen=True)
class Neighbors:
    """Top-k neighbours, best first.

    Attributes
    ----------
    scores : (m, k) float64, cosine similarity (descending) or RMS-L2 distance (ascending)
    indices : (m, k) int64, rows of the fitted reference set
    """

    scores: np.ndarray
    indices: np.ndarray


def pixel_rows(images: np.ndarray) -> np.ndarray:
    """uint8 images (n, H, W, C) -> (n, H*W*C) uint8 rows (a view when contiguous); RMS-L2 is order-free."""
    images = np.asarray(images)
    if images.ndim < 2:
        raise ValueError(f"images must have shape (n, ...), got {images.shape}")
    return images.reshape(len(images), -1)


def _top_k(key: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest keys of each row and their columns, a tie at the k-th key going to the lowest columns.
    ``torch.topk`` takes any of the tied ones: which of a training set's exact duplicates was "nearest" changed with
    the reference chunking and ``k``. Only rows where such a tie crosses the k-th place (the (k+1)-th key equals
    the k-th) are selected again. Columns ascend within a row."""
    vals, cols = torch.topk(key, min(k + 1, key.shape[1]), dim=1)
    rows = torch.nonzero(vals[:, k] == vals[:, k - 1]).flatten() if vals.shape[1] > k else []
    vals, cols = vals[:, :k], cols[:, :k]
    if len(rows):
        sub, edge = key[rows], vals[rows, k - 1:]
        above, tied = sub > edge, sub == edge
        take = above | (tied & (torch.cumsum(tied, 1) <= k - above.sum(1, keepdim=True)))
        cols[rows] = torch.nonzero(take)[:, 1].view(len(rows), k)  # row-major: k columns per row
    cols = cols.sort(1).values  # in column order, so that candidates joined chunk after chunk lie in row order
    return torch.gather(key, 1, cols), cols


class NearestNeighborIndex:
    """Exact k-nearest-neighbour search by cosine similarity or pixel RMS-L2 (scikit-learn contract).

    Parameters
    ----------
    metric : "cosine" (features, higher = closer) or "rms-l2" (pixels, lower = closer)
    backend : "faiss", "torch", or "auto" (faiss when importable; torch when a band scan shares the pass)
    device : torch device of the torch backend
    query_chunk, ref_chunk : rows per block, on the torch backend at most as many as fill :data:`BLOCK_BYTES`; a
        block holds query_chunk x ref_chunk scores (faiss takes its queries by :data:`FAISS_QUERY_BYTES` of float32
        rows, or query_chunk, the larger)

    Attributes
    ----------
    n_samples_fit_ : number of reference rows
    n_features_in_ : D
    backend_ : the backend "auto" resolved to
    """

    def __init__(self, metric: Metric = "cosine", *, backend: Backend = "auto", device: str = "cpu",
                 query_chunk: int = 1024, ref_chunk: int = 8192) -> None:
        self.metric = metric
        self.backend = backend
        self.device = device
        self.query_chunk = query_chunk
        self.ref_chunk = ref_chunk

    # ---------------------------------------------------------------------------------------------
    def fit(self, X: np.ndarray) -> "NearestNeighborIndex":
        """Remember the reference rows ``X``: (n, D), uint8 or float (not copied)."""
        if self.metric not in ("cosine", "rms-l2"):
            raise ValueError(f"metric={self.metric!r} must be 'cosine' or 'rms-l2'")
        if self.backend not in ("auto", "faiss", "torch"):
            raise ValueError(f"backend={self.backend!r} must be 'auto', 'faiss' or 'torch'")
        for name in ("query_chunk", "ref_chunk"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        X = self._check_rows(X, "X")
        if len(X) == 0:
            raise ValueError("X is empty: the reference set needs at least one row")
        faiss_ok = faiss_available()
        if self.backend == "faiss" and not faiss_ok:
            raise ValueError("backend='faiss' but faiss is not importable; install faiss-cpu or use backend='torch'")
        self.backend_ = "faiss" if self.backend == "faiss" or (self.backend == "auto" and faiss_ok) else "torch"
        self.X_ref_ = X
        self.n_samples_fit_, self.n_features_in_ = X.shape
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cacheable = X.shape[0] * X.shape[1] * 8 <= _CACHE_BYTES
        return self

    def kneighbors(self, Q: np.ndarray, k: int = 1, *, exclude: np.ndarray | None = None, exclude_self: bool = False,
                   pairs_range: tuple[float, float] | None = None, on_pairs: PairsCallback | None = None,
                   pairs_edges: Sequence[float] | None = None, progress: Progress | None = None) -> Neighbors:
        """The ``k`` nearest reference rows of each query row.

        Parameters
        ----------
        Q : (m, D) queries, same kind of rows as the fitted ones
        k : neighbours per query, 1 <= k <= n_samples_fit_ (minus one when excluding)
        exclude : (m,) int, a reference row each query must not match (-1: none)
        exclude_self : the queries are the fitted rows themselves; query i never matches reference i
        pairs_range, on_pairs : also call ``on_pairs(query_rows, ref_rows, scores)`` with every pair whose
            score lies in the closed range ``[lo, hi]``, in the same pass (the torch block code; with
            ``backend="faiss"`` a second pass)
        pairs_edges : the values ``on_pairs`` compares the scores with, where it needs only which side of each a
            pair lies on (a band's ends): under cosine, a pair whose float32 key is farther from every edge and
            from the range's ends than its rounding (:func:`_cosine_key_error`) is passed the key's score, on the
            same side of each as its float64 score, and the others their float64 score (rescoring every pair read
            both of its rows again: an evaluation of 500 generations against 5,000 images took 33 s, not 0.6 s,
            with the paper's cosine bands, which hold most pairs); None: every pair's float64 score
        progress : ``callback(queries_done, m)``

        Returns
        -------
        Neighbors with (m, k) scores and indices; ties are ordered by reference row, and a tie at the k-th place
        keeps the lowest rows (ties of the float64 scores: of uint8 rows under rms-l2, whose keys are exact, and of
        any rows under cosine up to 64 beyond k within float32 rounding of the k-th (:meth:`_widened`); the keys of
        equal float pixel rows under rms-l2 can differ in their last bit).
        """
        self._check_fitted()
        Q = self._check_rows(Q, "Q")
        exclude = self._exclude(exclude, exclude_self, len(Q))
        limit = self.n_samples_fit_ - (exclude is not None)
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):  # (True ran as 1 on faiss; np.int64 was
            # faiss's SWIG TypeError)
            raise ValueError(f"k={k!r} must be an integer number of neighbours")
        k = int(k)
        if not 1 <= k <= limit:
            what = "reference rows minus the excluded one" if exclude is not None else "reference rows"
            raise ValueError(f"k={k} must be between 1 and {limit} ({what})")
        if (on_pairs is None) != (pairs_range is None):
            raise ValueError("pairs_range and on_pairs must be given together")
        if pairs_range is not None:  # (as pairs_within's: lo > hi or a NaN end streamed no pair on torch, and on faiss
            # was refused after its search)
            _check_range(pairs_range)
        use_faiss = self.backend_ == "faiss" and not (self.backend == "auto" and on_pairs is not None)
        fetch = min(self._fetch_cap(k, limit, use_faiss), k + COSINE_EXTRA) if self.metric == "cosine" else k
        keys, idx = self._search(Q, fetch, exclude, use_faiss, pairs_range, on_pairs, progress, pairs_edges)
        nb = self._finish(Q, keys, idx)
        if self.metric == "cosine":
            nb = self._widened(Q, nb, keys.min(1, initial=np.inf), k, fetch, exclude, use_faiss)
        return nb

    def _fetch_cap(self, k: int, limit: int, use_faiss: bool) -> int:
        """The most candidates a cosine query is given: k + :data:`COSINE_WIDEN`, at most ``limit`` (the rows it may
        match) and, on faiss's GPUs, which select at most 2,048, that many; never fewer than k."""
        cap = min(limit, k + COSINE_WIDEN)
        if use_faiss and _faiss().get_num_gpus() > 0:
            cap = min(cap, FAISS_GPU_MAX_K - 1)  # (one more is fetched where a row is excluded)
        return max(k, cap)

    def _search(self, Q: np.ndarray, k: int, exclude: np.ndarray | None, use_faiss: bool,
                pairs_range: tuple[float, float] | None = None, on_pairs: PairsCallback | None = None,
                progress: Progress | None = None, edges: Sequence[float] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` candidates of each query by the search's own keys (unordered), and the in-range pairs."""
        if use_faiss:
            keys, idx = self._faiss_knn(Q, k, exclude, None if on_pairs else progress)
            if on_pairs is not None:
                for q_rows, r_rows, s in self._pairs(Q, *pairs_range, exclude, progress, edges):
                    on_pairs(q_rows, r_rows, s)
            return keys, idx
        keys: np.ndarray | None = None  # filled chunk by chunk (lists of the chunks beside their concatenation held
        idx: np.ndarray | None = None  # two copies of the (m, k) results)
        for q0, q1, best_k, best_i in self._torch_scan(Q, k, exclude, pairs_range, on_pairs, progress, edges):
            if keys is None or idx is None:
                keys, idx = np.empty((len(Q), k), best_k.dtype), np.empty((len(Q), k), best_i.dtype)
            keys[q0:q1], idx[q0:q1] = best_k, best_i
        if keys is None or idx is None:
            keys, idx = np.empty((0, k)), np.empty((0, k), np.int64)
        return keys, idx

    def _widened(self, Q: np.ndarray, nb: Neighbors, last: np.ndarray, k: int, fetch: int,
                 exclude: np.ndarray | None, use_faiss: bool) -> Neighbors:
        """The float64 k nearest under cosine, from ``nb``: the ``fetch`` candidates of the float32 keys, rescored in
        float64 and ordered (:meth:`_finish`). A row not fetched has a float32 key of at most the least fetched one
        (``last``), so a float64 score of at most ``last`` + the float32 error bound: where the k-th rescored
        candidate lies above that, no row left out can beat it or tie it, and the k are the float64 best with ties
        to the lowest rows. A query where it does not (copies of a training image, scores 1e-9 apart) is searched
        once more with :meth:`_fetch_cap`'s k + :data:`COSINE_WIDEN` candidates, or every row it may match where
        fewer: that answer is the float64 best where it has every row, or where its k-th clears the new least key
        likewise; where not, more than that many rows lie within float32 rounding of its k-th, and the float32 keys
        chose among them (widening on to every row made concentrated features or zero rows, every score 0, 40-80x
        slower: 27 s for 0.4 s). Queries with an excluded row and those without (-1) are widened apart, each up to
        the rows it may match."""
        scores, rows = nb.scores[:, :k].copy(), nb.indices[:, :k].copy()
        tol = _cosine_key_error(self.n_features_in_)
        free = np.ones(len(Q), bool) if exclude is None else exclude < 0
        for group, excluding in ((np.flatnonzero(free), False), (np.flatnonzero(~free), True)):
            cap = self._fetch_cap(k, self.n_samples_fit_ - excluding, use_faiss)
            group = group[scores[group, k - 1] <= last[group] + tol] if cap > fetch else group[:0]
            if group.size:
                keys, idx = self._search(Q[group], cap, exclude[group] if excluding else None, use_faiss)
                sub = self._finish(Q[group], keys, idx)
                scores[group], rows[group] = sub.scores[:, :k], sub.indices[:, :k]
        return Neighbors(scores, rows)

    def pairs_within(self, Q: np.ndarray, lo: float, hi: float, *, exclude: np.ndarray | None = None,
                     exclude_self: bool = False, progress: Progress | None = None
                     ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Stream every (query row, reference row, score) with ``lo <= score <= hi``, block by block.

        Memory is bounded by one block and its hits. Use -inf / inf for an open side.
        """
        self._check_fitted()
        Q = self._check_rows(Q, "Q")
        exclude = self._exclude(exclude, exclude_self, len(Q))
        _check_range((lo, hi))
        return self._pairs(Q, lo, hi, exclude, progress)

    def _pairs(self, Q: np.ndarray, lo: float, hi: float, exclude: np.ndarray | None, progress: Progress | None,
               edges: Sequence[float] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for _ in self._torch_scan(Q, 0, exclude, (lo, hi), lambda a, b, c: found.append((a, b, c)), progress,
                                  edges):
            yield from found
            found.clear()

    # ---------------------------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "X_ref_"):
            raise ValueError("this NearestNeighborIndex is not fitted yet; call fit(X) first")

    def _check_rows(self, X: np.ndarray, name: str) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim != 2:
            raise ValueError(f"{name} must be 2-D (n, D), got shape {X.shape}")
        if len(X) == 0:
            raise ValueError(f"{name} has no rows: it needs at least one (n, D) row")
        if X.dtype != np.uint8 and not np.issubdtype(X.dtype, np.floating):
            raise ValueError(f"{name} must be uint8 or float, got {X.dtype}")
        if X.dtype != np.uint8 and not np.isfinite(X).all():  # a NaN row would rank first and hide every neighbour
            bad = np.flatnonzero(~np.isfinite(X).all(1))
            raise ValueError(f"{name} holds non-finite values in {len(bad)} of its {len(X)} rows (the first: "
                             f"{bad[:5].tolist()}); features must be finite (check the extractor and its inputs)")
        if hasattr(self, "n_features_in_") and X.shape[1] != self.n_features_in_:
            raise ValueError(f"{name} has {X.shape[1]} values per row, the fitted set {self.n_features_in_}")
        if hasattr(self, "X_ref_") and name == "Q" and (X.dtype == np.uint8) != (self.X_ref_.dtype == np.uint8):
            raise ValueError(f"Q is {X.dtype} but the fitted rows are {self.X_ref_.dtype}; "
                             "pass both as uint8 or both as float")
        return X

    def _exclude(self, exclude: np.ndarray | None, exclude_self: bool, m: int) -> np.ndarray | None:
        if exclude_self:
            if m != self.n_samples_fit_:
                raise ValueError(f"exclude_self=True needs the query set to be the fitted set "
                                 f"({m} != {self.n_samples_fit_} rows)")
            return np.arange(m, dtype=np.int64)
        if exclude is None:
            return None
        given = np.asarray(exclude)
        if given.shape != (m,):
            raise ValueError(f"exclude must have shape ({m},), got {given.shape}")
        if given.size and not np.issubdtype(given.dtype, np.integer):  # (1.7 excluded row 1)
            raise ValueError(f"exclude must hold integer row numbers, got {given.dtype} values")
        exclude = given.astype(np.int64)
        if ((exclude < -1) | (exclude >= self.n_samples_fit_)).any():  # (row 5 of 5 excluded nothing, without a word)
            bad = exclude[(exclude < -1) | (exclude >= self.n_samples_fit_)]
            raise ValueError(f"exclude holds {bad[:3].tolist()}: each must be a fitted row, "
                             f"0..{self.n_samples_fit_ - 1}, or -1 (none)")
        return exclude

    def _scale(self) -> float:
        """Squared-sum -> mean squared distance in [0, 1] pixel units."""
        return (255.0**2 if self.X_ref_.dtype == np.uint8 else 1.0) * self.n_features_in_

    @property
    def integer_scale(self) -> float | None:
        """For RMS-L2 on uint8 rows, the factor that takes a distance squared back to the exact integer sum of squared
        level differences it was computed from (``round(d**2 * integer_scale)``); None otherwise."""
        return self._scale() if self.metric == "rms-l2" and self.X_ref_.dtype == np.uint8 else None

    def _dtype(self) -> torch.dtype:
        if self.metric == "cosine" or (self.X_ref_.dtype == np.uint8 and self.n_features_in_ <= _EXACT_FLOAT32_MAX_D):
            return torch.float32
        return torch.float64

    def _block_rows(self, rows: int) -> int:
        """``rows`` (a chunk setting), or fewer: as many as fill :data:`BLOCK_BYTES` as the search holds them."""
        return max(1, min(int(rows), BLOCK_BYTES // (self.n_features_in_ * self._dtype().itemsize)))

    def _prep(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows -> (tensor on device, squared norms); cosine rows are L2-normalised."""
        x = torch.from_numpy(np.ascontiguousarray(rows)).to(self.device, self._dtype())
        if self.metric == "cosine":
            return F.normalize(x, dim=1, eps=1e-12), torch.empty(0)
        if rows.dtype != np.uint8:
            x = x - 0.5  # centring shrinks the norms and so the cancellation error of |q|^2 + |r|^2 - 2 q.r
        return x, (x * x).sum(1)

    def _ref_chunk(self, r0: int) -> tuple[torch.Tensor, torch.Tensor]:
        if r0 in self._cache:
            return self._cache[r0]
        out = self._prep(self.X_ref_[r0:r0 + self._block_rows(self.ref_chunk)])
        if self._cacheable:
            self._cache[r0] = out
        return out

    def _torch_scan(self, Q: np.ndarray, k: int, exclude: np.ndarray | None, pairs_range: tuple[float, float] | None,
                    on_pairs: PairsCallback | None, progress: Progress | None, edges: Sequence[float] | None = None
                    ) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        """Per query chunk: top-k keys (higher = closer; minus squared sums for rms-l2) and in-range pairs.

        Inside a block the rms-l2 key is ``2 q.r - |r|^2`` (one fused matrix product; ``|q|^2`` is constant
        per query, so it orders like ``-|q - r|^2``); for uint8 rows every value is an exact integer.
        """
        cos = self.metric == "cosine"
        n, m = self.n_samples_fit_, len(Q)
        if pairs_range is not None:  # the closed range, slightly widened; the exact check is on the scores
            lo, hi = pairs_range
            c = self._scale()
            s_lo = (max(lo, 0.0) ** 2) * c * (1 - 1e-9) - 1e-9 if lo > 0 else None  # squared-sum range
            s_hi = hi * hi * c * (1 + 1e-9) + 1e-9 if np.isfinite(hi) else None
        with torch.no_grad():
            q_rows, r_rows = self._block_rows(self.query_chunk), self._block_rows(self.ref_chunk)
            for q0 in range(0, m, q_rows):
                q1 = min(m, q0 + q_rows)
                q, qn = self._prep(Q[q0:q1])
                ex = None if exclude is None else torch.from_numpy(exclude[q0:q1]).to(self.device)
                if pairs_range is not None:
                    if cos:  # the float32 key is within ``tol`` of the exact score (unit rows; Higham's gamma_D)
                        tol = _cosine_key_error(self.n_features_in_)
                        k_lo, k_hi = lo - tol, hi + tol
                    else:  # S in [s_lo, s_hi]  <=>  key in [|q|^2 - s_hi, |q|^2 - s_lo]
                        k_lo = None if s_hi is None else (qn - s_hi)[:, None]
                        k_hi = None if s_lo is None else (qn - s_lo)[:, None]
                vals, ids = [], []
                for r0 in range(0, n, r_rows):
                    r, rn = self._ref_chunk(r0)
                    key = q @ r.T if cos else torch.addmm(rn[None, :], q, r.T, beta=-1, alpha=2)
                    if ex is not None:
                        rows = torch.nonzero((ex >= r0) & (ex < r0 + len(r))).flatten()
                        key[rows, ex[rows] - r0] = -np.inf
                    if on_pairs is not None:
                        self._emit(key, Q, q0, r0, qn, k_lo, k_hi, lo, hi, on_pairs, edges)
                    if k:
                        v, i = _top_k(key, min(k, key.shape[1]))
                        vals.append(v)
                        ids.append(i + r0)
                if k:  # the chunks' candidates lie in row order, so a tie goes to the lowest row here too
                    best, order = _top_k(torch.cat(vals, 1), k)
                    best_i = torch.gather(torch.cat(ids, 1), 1, order)
                    best = best.double() if cos else best.double() - qn.double()[:, None]  # -> -|q - r|^2
                else:
                    best = torch.zeros((q1 - q0, 0), dtype=torch.float64)
                    best_i = torch.zeros((q1 - q0, 0), dtype=torch.int64)
                if progress is not None:
                    progress(q1, m)
                yield q0, q1, best.cpu().numpy(), best_i.cpu().numpy()

    def _emit(self, key: torch.Tensor, Q: np.ndarray, q0: int, r0: int, qn: torch.Tensor, k_lo: Any, k_hi: Any,
              lo: float, hi: float, on_pairs: PairsCallback, edges: Sequence[float] | None = None) -> None:
        """Pass the block's pairs with score in [lo, hi] to ``on_pairs`` (global rows, float64 scores; the keys
        only preselect, with a margin, the pairs of float rows, which are scored by :meth:`_pair_scores`; under
        cosine with ``edges``, only those within the keys' rounding of an edge or an end, see :meth:`kneighbors`)."""
        mask = torch.isfinite(key)  # an excluded pair's key is -inf: never a pair, whichever bounds are open
        if k_lo is not None and not (isinstance(k_lo, float) and np.isinf(k_lo)):
            mask &= key >= k_lo
        if k_hi is not None and not (isinstance(k_hi, float) and np.isinf(k_hi)):
            mask &= key <= k_hi
        hit = torch.nonzero(mask)
        if not len(hit):
            return
        qi, ri = hit[:, 0], hit[:, 1]
        q_rows, r_rows = qi.cpu().numpy() + q0, ri.cpu().numpy() + r0
        if self._exact_keys:
            s = self._to_scores((key[qi, ri].double() - qn[qi].double()).cpu().numpy())
        elif edges is not None and self.metric == "cosine":
            s = self._to_scores(key[qi, ri].cpu().numpy())
            tol = _cosine_key_error(self.n_features_in_)
            near = np.zeros(len(s), dtype=bool)
            for e in (*edges, lo, hi):
                if np.isfinite(e):
                    near |= np.abs(s - e) <= tol
            if near.any():
                s[near] = self._pair_scores(Q, q_rows[near], r_rows[near])
        else:
            s = self._pair_scores(Q, q_rows, r_rows)
        keep = (s >= lo) & (s <= hi)
        if keep.any():
            on_pairs(q_rows[keep], r_rows[keep], s[keep])

    def _to_scores(self, key: np.ndarray) -> np.ndarray:
        if self.metric == "cosine":
            return np.clip(key.astype(np.float64), -1.0, 1.0)  # float32 rounding can exceed 1 for copies
        return np.sqrt(np.maximum(-key, 0.0) / self._scale())

    @property
    def _exact_keys(self) -> bool:
        """uint8 rows under rms-l2: every key is an exact integer (minus a squared sum), alike on every path."""
        return self.metric == "rms-l2" and self.X_ref_.dtype == np.uint8

    def _pair_scores(self, Q: np.ndarray, q_rows: np.ndarray, r_rows: np.ndarray) -> np.ndarray:
        """Scores of the pairs (``Q[q_rows[i]]``, fitted row ``r_rows[i]``) in float64, from the two rows alone (one
        formula per pair, whichever path and block found it): cosine of the float64 rows, each divided by
        max(|row|, 1e-12) as torch's ``F.normalize``; RMS-L2 by direct differences."""
        if self.metric == "rms-l2":
            return np.sqrt(self._exact_sq_pairs(Q, q_rows, r_rows) / self._scale())
        out = np.empty(len(q_rows))
        step = max(1, 2**22 // max(1, self.n_features_in_))
        for a in range(0, len(q_rows), step):
            q, r = _unit(Q[q_rows[a:a + step]]), _unit(self.X_ref_[r_rows[a:a + step]])
            out[a:a + step] = (q * r).sum(1)
        return np.clip(out, -1.0, 1.0)

    def _finish(self, Q: np.ndarray, keys: np.ndarray, idx: np.ndarray) -> Neighbors:
        """Keys -> scores, rows ordered best first with ties by reference row (float rows: by their float64 scores,
        :meth:`_pair_scores`), a block of ``FINISH_ROWS`` query rows at a time (whole-array sort orders and copies
        held about 3 KB a query row at k = 50 beside the results: the peak of an evaluation of 100,000
        generations)."""
        scores, rows = np.empty(keys.shape, np.float64), np.empty(idx.shape, np.int64)
        for a in range(0, len(keys), FINISH_ROWS):
            b = min(a + FINISH_ROWS, len(keys))
            if self._exact_keys:
                s, key = self._to_scores(keys[a:b]), keys[a:b]
            else:
                s = self._pair_scores(Q, np.repeat(np.arange(a, b), idx.shape[1]), idx[a:b].ravel()).reshape(b - a, -1)
                key = s if self.metric == "cosine" else -s
            order = np.lexsort((idx[a:b], -key), axis=-1)
            rows[a:b] = np.take_along_axis(idx[a:b], order, 1)
            scores[a:b] = np.take_along_axis(s, order, 1)
        return Neighbors(scores, rows)

    # ---------------------------------------------------------------------------------------------
    def _faiss_knn(self, Q: np.ndarray, k: int, exclude: np.ndarray | None, progress: Progress | None
                   ) -> tuple[np.ndarray, np.ndarray]:
        """faiss's search, per reference chunk, merged: keys (higher = closer) and rows, as :meth:`_torch_scan`'s.
        Under rms-l2 its float32 distances are recomputed exactly.
        For uint8 rows past :data:`_EXACT_FLOAT32_MAX_D` values, where float32 sums are no longer exact, faiss's
        choice itself can be wrong between near ties (a review found 1 query in 64 of 3,072 values whose exact
        nearest was not returned): more candidates are fetched and ranked by their exact distances, and a query
        whose k-th exact distance does not lie below what any unfetched row can have (faiss's last fetched
        distance less a bound on its float32 error) is searched again by the exact torch code."""
        faiss = _faiss()
        cos = self.metric == "cosine"
        m, n = len(Q), self.n_samples_fit_
        kk = k + (exclude is not None)
        certify = not cos and self.X_ref_.dtype == np.uint8 and self.n_features_in_ > _EXACT_FLOAT32_MAX_D
        gpus = faiss.get_num_gpus()
        fetch = kk + max(kk, 8) if certify else kk
        if gpus > 0:  # faiss on GPUs selects at most GPU_MAX_SELECTION_K (any fetch >= kk certifies)
            fetch = max(kk, min(fetch, FAISS_GPU_MAX_K))
        floor = np.full(m, np.inf)  # (certify) no unfetched row's exact squared sum lies below it
        q_sq = _row_sq(Q) if certify else None
        keys = np.full((m, 0), -np.inf)
        idx = np.zeros((m, 0), dtype=np.int64)
        r_rows = self._block_rows(self.ref_chunk)
        for r0 in range(0, n, r_rows):
            rows = self.X_ref_[r0:r0 + r_rows]
            r = self._faiss_rows(rows)
            index = faiss.IndexFlatIP(r.shape[1]) if cos else faiss.IndexFlatL2(r.shape[1])
            if gpus > 0:
                index = faiss.index_cpu_to_all_gpus(index)
            index.add(r)
            ck, ci = [], []
            # faiss blocks its own BLAS work internally and returns only k results per query; small query chunks
            # made this 3x slower than one bare search (bench compute), so it takes up to 65,536 queries a call,
            # as many as fill 64 MiB as float32 rows (their copy grew with the queries: 491 MB for 40,000 of
            # 3,072 values) or query_chunk, the larger
            q_chunk = max(self.query_chunk, min(FAISS_QUERY_CHUNK, FAISS_QUERY_BYTES // (4 * self.n_features_in_)))
            for q0 in range(0, m, q_chunk):
                d, i = index.search(self._faiss_rows(Q[q0:q0 + q_chunk]), min(fetch, len(r)))
                ck.append(d.astype(np.float64) if cos else -d.astype(np.float64))
                ci.append(i.astype(np.int64) + r0)
            ck_all, ci_all = np.concatenate(ck), np.concatenate(ci)
            if certify:
                d_f = -ck_all  # faiss's squared sums, each within ``bound`` of the exact one
                bound = _float32_sq_error(self.n_features_in_, q_sq, float(_row_sq(rows).max()))
                if ci_all.shape[1] < len(rows):  # rows left unfetched: none lies nearer than this, exactly
                    floor = np.minimum(floor, d_f[:, -1] - bound)
                # a candidate past the kk-th by more than twice the bound is exactly farther than kk others: out
                near = d_f <= d_f[:, min(kk, d_f.shape[1]) - 1, None] + 2 * bound[:, None]
                qi, cj = np.nonzero(near)
                exact = np.full(d_f.shape, np.inf)
                exact[qi, cj] = self._exact_sq_pairs(Q, qi, ci_all[qi, cj])
                ck_all = -exact
            if exclude is not None:
                ck_all[ci_all == exclude[:, None]] = -np.inf
            keys, idx = np.concatenate([keys, ck_all], 1), np.concatenate([idx, ci_all], 1)
            # a tie goes to the lower row, as in the torch code (faiss returns tied rows in its own order: a stable
            # sort kept that order, and an exact copy's higher row beat its lower one across reference chunks)
            top = np.lexsort((idx, -keys), axis=1)[:, :k]
            keys, idx = np.take_along_axis(keys, top, 1), np.take_along_axis(idx, top, 1)
            if progress is not None:
                progress(min(n, r0 + r_rows) * m // n, m)
        if self._exact_keys and not certify:  # faiss works in float32: recompute the k distances exactly (float
            keys = -self._exact_sq(Q, idx)  # rows: :meth:`_finish` scores them in float64)
        if certify and (again := np.flatnonzero(-keys[:, -1] >= floor)).size:  # (>=: a tie goes to the lower row)
            log.debug("faiss: %d of %d queries searched again exactly (near ties past float32)", len(again), m)
            ex = None if exclude is None else exclude[again]
            found = list(self._torch_scan(Q[again], k, ex, None, None, None))
            keys[again] = np.concatenate([f[2] for f in found])  # (-|q - r|^2, exact for uint8 rows)
            idx[again] = np.concatenate([f[3] for f in found])
        return keys, idx

    def _faiss_rows(self, rows: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(rows, dtype=np.float32)
        if self.metric == "cosine":
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return x

    def _exact_sq(self, Q: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """Squared sums between each query and its listed reference rows (m, j), by direct differences."""
        rows = np.repeat(np.arange(len(Q)), idx.shape[1])
        return self._exact_sq_pairs(Q, rows, idx.ravel()).reshape(idx.shape)

    def _exact_sq_pairs(self, Q: np.ndarray, q_rows: np.ndarray, r_rows: np.ndarray) -> np.ndarray:
        """Squared sums between query rows ``q_rows`` and reference rows ``r_rows`` pairwise, by direct differences
        (float64: exact integers for uint8 rows)."""
        out = np.empty(len(q_rows))
        step = max(1, 2**22 // max(1, self.n_features_in_))
        for a in range(0, len(q_rows), step):
            out[a:a + step] = _sq_sums(_signed(Q[q_rows[a:a + step]]) - _signed(self.X_ref_[r_rows[a:a + step]]))
        return out


def _unit(rows: np.ndarray) -> np.ndarray:
    """Rows in float64, each divided by max(its norm, 1e-12) (a zero row stays zero)."""
    x = rows.astype(np.float64)
    return x / np.maximum(np.sqrt((x * x).sum(1, keepdims=True)), 1e-12)


def _signed(rows: np.ndarray) -> np.ndarray:
    """Rows in a type whose differences and squares are exact: int16 for uint8 rows, else float64."""
    return rows.astype(np.int16 if rows.dtype == np.uint8 else np.float64)


def _sq_sums(rows: np.ndarray) -> np.ndarray:
    """Each row's sum of squares: in int64 for integer rows (exact, and 10x faster than float64 here)."""
    return np.einsum("ij,ij->i", rows, rows, dtype=np.int64 if rows.dtype.kind == "i" else np.float64)


def _row_sq(X: np.ndarray) -> np.ndarray:
    """Each row's squared sum, a block of rows at a time (no float64 copy of all of ``X``)."""
    out = np.empty(len(X))
    step = max(1, 2**22 // max(1, X.shape[1]))
    for a in range(0, len(X), step):
        out[a:a + step] = _sq_sums(_signed(X[a:a + step]))
    return out


def _check_range(pairs_range: Any) -> None:
    """A score range (lo, hi) of numbers with lo <= hi (-inf / inf for an open side)."""
    try:
        lo, hi = pairs_range
    except (TypeError, ValueError):
        raise ValueError(f"pairs_range={pairs_range!r} must be two numbers (lo, hi)") from None
    if not (isinstance(lo, numbers.Real) and isinstance(hi, numbers.Real) and lo <= hi):
        raise ValueError(f"pairs range lo={lo!r}, hi={hi!r}: must be numbers with lo <= hi (no NaN; -inf / inf for an "
                         "open side)")


def _cosine_key_error(d: int) -> float:
    """A bound on the float32 error of a cosine key: the inner product of two rows of ``d`` values each normalised
    in float32, by any summation order (unit rows, Higham's gamma_d, and the normalisations), doubled for margin."""
    return 4 * (d + 4) * 2.0**-24


def _float32_sq_error(d: int, q_sq: np.ndarray, r_sq: float) -> np.ndarray:
    """A bound on faiss's float32 error in the squared distance |q - r|^2 of non-negative rows of ``d`` values,
    computed as |q|^2 + |r|^2 - 2 q.r: each sum of d non-negative products is within gamma_d = d u / (1 - d u) of
    its value in any order (u = 2^-24; Higham, Accuracy and Stability of Numerical Algorithms, 3.1), the two
    subtractions add 2u, and 2 q.r <= |q|^2 + |r|^2; doubled for margin. ``q_sq``: the queries' |q|^2, ``r_sq``
    the largest |r|^2."""
    u = 2.0**-24
    gamma = d * u / (1 - d * u)
    return 2 * (gamma + 2 * u) * 2 * (q_sq + r_sq)


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def faiss_available() -> bool:
    """Whether the faiss backend can run here (faiss-cpu or faiss-gpu installed)."""
    return _faiss() is not None
