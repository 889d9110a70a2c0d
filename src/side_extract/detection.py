"""Label-free detection of memorized images among generations (Carlini et al. 2023, generate-and-filter).

A model that memorized a training image regenerates it many times. Without the training set:

1. split each image into a ``grid x grid`` grid of tiles; the tiled distance of two images is the max over
   tiles of the per-tile RMS-L2 (pixels in [0, 1]): two images are near-duplicates only if every tile is;
2. link every pair of generations with tiled distance ``< threshold`` (streamed in blocks of pairs);
3. report groups of size ``>= min_size``: maximal cliques (Carlini et al.; made disjoint largest first, a clique
   that overlaps a larger one keeping its other members) or, as
   a documented relaxation that is cheaper on dense graphs, connected components. A component with more than
   :data:`MAX_CLIQUES` maximal cliques (their number grows exponentially: one image generated 100 times with a few
   percent of its pairs just above the threshold has millions) takes its groups greedily instead, each a maximal
   clique grown from the best-linked generation left (``Detection.greedy`` counts such components);
4. with the training set, a group is *verified* when its medoid (the member with the smallest summed tiled
   distance to the others, among its first 256 members) is within ``extraction_threshold`` pixel RMS-L2 of
   a training image; precision = verified groups / groups.
"""
from __future__ import annotations

import dataclasses
import heapq
import logging
import numbers
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components

from . import config as cfg
from .data import ImageSet, check_image_set
from .neighbors import NearestNeighborIndex, pixel_rows

GroupMode = Literal["cliques", "components"]
# the maximal cliques of min_size or more a near-duplicate component may have before its groups are taken greedily
# (listing them took 5.9 GB and more than 90 s for 100 noisy copies of one image with 2 % of their pairs unlinked),
# the maximal cliques of any size (smaller ones are dropped, but each costs its search: a bound on time), and the
# links of a component whose groups are taken greedily at once (its graph alone took 3.3 GB at 12.5 M links)
MAX_CLIQUES = 20_000
MAX_ALL_CLIQUES = 1_000_000
MAX_EXACT_LINKS = 1_000_000
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Detection:
    """Suspected memorized images: groups of mutually near-duplicate generations (rows of the generated set).

    ``verified``, ``nearest_train_index``, ``nearest_train_distance`` and ``precision`` are None without a
    training set; precision is also None when no group was found.
    """

    threshold: float
    grid: int
    min_size: int
    mode: GroupMode
    n_generated: int
    n_edges: int
    groups: list[list[int]]
    representatives: list[int]
    extraction_threshold: float | None = None
    verified: list[bool] | None = None
    nearest_train_index: list[int] | None = None
    nearest_train_distance: list[float] | None = None
    precision: float | None = None
    greedy: int = 0  # components with more than MAX_CLIQUES maximal cliques, whose groups were taken greedily

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["n_groups"] = len(self.groups)
        d["n_suspected"] = int(sum(len(g) for g in self.groups))
        return d


def default_grid(height: int, width: int) -> int:
    """Tiles per side: 4 for images of 16 pixels and more, 2 from 8 (tiles of 4x4 on 8x8 images), else 1."""
    side = min(height, width)
    return 4 if side >= 16 else 2 if side >= 8 else 1


def check_grid(grid: int, height: int, width: int, name: str = "grid") -> None:
    """Refuse a number of tiles per side outside 1..the image's shorter side (``name``: the setting)."""
    if isinstance(grid, bool) or not isinstance(grid, numbers.Integral):  # (2.5 ran as 2 and was recorded 2.5)
        raise ValueError(f"{name}={grid!r} must be an integer number of tiles per side")
    if not 1 <= grid <= min(height, width):
        raise ValueError(f"{name}={grid} must be between 1 and the image side {min(height, width)}")


def _tiles(images: np.ndarray, grid: int) -> list[np.ndarray]:
    """(n, H, W, C) uint8 -> one (n, D_t) uint8 row block per tile (uneven splits allowed)."""
    h, w = images.shape[1:3]
    check_grid(grid, h, w)
    rows = np.array_split(np.arange(h), grid)
    cols = np.array_split(np.arange(w), grid)
    return [images[:, r[0]:r[-1] + 1, c[0]:c[-1] + 1].reshape(len(images), -1) for r in rows for c in cols]


def _block(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Tiled max RMS-L2 between two sets given as per-tile float64 integer-valued rows (exact squared sums)."""
    out = None
    for ta, tb in zip(a, b):
        s = (ta * ta).sum(1)[:, None] + (tb * tb).sum(1)[None, :] - 2 * ta @ tb.T
        d = torch.sqrt(s.clamp_min(0) / (255.0**2 * ta.shape[1]))
        out = d if out is None else torch.maximum(out, d)
    return out


def tiled_distances(a: np.ndarray, b: np.ndarray, grid: int) -> np.ndarray:
    """(len(a), len(b)) tiled max RMS-L2 between uint8 image stacks (n, H, W, C) of one shape."""
    ta = [torch.from_numpy(t.astype(np.float64)) for t in _tiles(a, grid)]
    tb = [torch.from_numpy(t.astype(np.float64)) for t in _tiles(b, grid)]
    return _block(ta, tb).numpy()


def near_duplicate_pairs(images: np.ndarray, threshold: float, grid: int, *, chunk: int = 1024,
                         device: str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair i < j of ``images`` ((n, H, W, C) uint8) with tiled distance < ``threshold``: (i, j, d)."""
    n = len(images)
    if n == 0:  # (nothing to tile)
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    tiles = _tiles(images, grid)
    found_i, found_j, found_d = [], [], []
    with torch.no_grad():
        for a0 in range(0, n, chunk):
            a = [torch.from_numpy(t[a0:a0 + chunk].astype(np.float64)).to(device) for t in tiles]
            for b0 in range(a0, n, chunk):
                b = [torch.from_numpy(t[b0:b0 + chunk].astype(np.float64)).to(device) for t in tiles]
                d = _block(a, b)
                i, j = torch.nonzero(d < threshold, as_tuple=True)
                keep = (i + a0) < (j + b0)
                i, j = i[keep], j[keep]
                found_i.append(i.cpu().numpy() + a0)
                found_j.append(j.cpu().numpy() + b0)
                found_d.append(d[i, j].cpu().numpy())
    return np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_d)


def _groups(n: int, i: np.ndarray, j: np.ndarray, min_size: int, mode: GroupMode) -> tuple[list[list[int]], int]:
    """The groups of generations ``0 .. n - 1`` linked by the pairs ``(i, j)``, largest first, and how many
    components took theirs greedily (:data:`MAX_CLIQUES`)."""
    adj = sp.coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n)).tocsr()
    _, comp = connected_components(adj, directed=False)
    sizes = np.bincount(comp)
    big = [np.flatnonzero(comp == c) for c in np.flatnonzero(sizes >= min_size)]
    if mode == "components":
        return sorted((m.tolist() for m in big), key=lambda g: (-len(g), g)), 0
    import networkx as nx  # a dependency of torch

    groups, greedy = [], 0
    for members in big:
        sub = adj[members][:, members].tocoo()
        if sub.nnz == len(members) * (len(members) - 1) // 2:  # every pair linked (one image generated many times,
            # the case the detection is for): one clique, whose search took ~n^3 (1,000 copies: 18 s; 2,000: 127 s)
            groups.append(sorted(members.tolist()))
            continue
        cliques: list[list[int]] | None = None
        if sub.nnz <= MAX_EXACT_LINKS:
            g = nx.Graph()
            g.add_nodes_from(range(len(members)))
            g.add_edges_from(zip(sub.row.tolist(), sub.col.tolist()))
            cliques = []
            for count, c in enumerate(nx.find_cliques(g), 1):
                if len(c) >= min_size:
                    cliques.append(sorted(c))
                if len(cliques) > MAX_CLIQUES or count > MAX_ALL_CLIQUES:
                    cliques = None
                    break
        if cliques is None:
            greedy += 1
            found = _greedy_cliques((sub + sub.T).tocsr().astype(bool), min_size)
        else:
            found = _disjoint_cliques(cliques, min_size)
        groups += [sorted(members[c].tolist()) for c in found]
    if greedy:
        log.warning("detection: %d group(s) of near-duplicates had more than %d maximal cliques of detect_min_size or "
                    "more (or %d links); their groups were taken greedily, largest first (maximal cliques, not always "
                    "the largest): detect_mode: components takes each whole, or a lower detect_threshold links fewer "
                    "pairs", greedy, MAX_CLIQUES, MAX_EXACT_LINKS)
    return sorted(groups, key=lambda g: (-len(g), g)), greedy


def _greedy_cliques(adj: sp.csr_matrix, min_size: int) -> list[list[int]]:
    """Disjoint cliques of at least ``min_size`` vertices of the symmetric graph ``adj``, taken one by one: among the
    vertices left with ``min_size - 1`` neighbours or more left (only they can be in such a clique), a clique is
    grown from the one with the most, adding each time the candidate linked to the most other candidates (ties:
    the lowest index); a clique too small removes its first vertex only. The candidates' links are counted down as
    candidates leave, so a clique costs O(links) (counted anew at each step: 9 minutes at 5,000 noisy copies)."""
    n = adj.shape[0]
    left = np.ones(n, dtype=bool)
    out = []
    while True:
        degree = _core(adj, left, min_size - 1)
        if not left.any():
            return out
        v = int(np.argmax(np.where(left, degree, -1)))
        cand = left & _row(adj, v)
        links = adj @ cand.astype(np.int64)  # each vertex's links to the candidates
        clique = [v]
        while cand.any():
            u = int(np.argmax(np.where(cand, links, -1)))
            clique.append(u)
            gone = cand & ~_row(adj, u)
            gone[u] = True
            cand &= ~gone
            links -= np.asarray(adj[np.flatnonzero(gone)].sum(0), dtype=np.int64).ravel()
        if len(clique) >= min_size:
            out.append(sorted(clique))
            left[clique] = False
        else:
            left[v] = False


def _core(adj: sp.csr_matrix, left: np.ndarray, k: int) -> np.ndarray:
    """Narrow ``left`` (in place) to its ``k``-core, peeling the vertices with fewer than ``k`` links within it one
    by one; returns each vertex's links within it."""
    degree = adj @ left.astype(np.int64)
    stack = list(np.flatnonzero(left & (degree < k)))
    while stack:
        v = stack.pop()
        if not left[v]:
            continue
        left[v] = False
        near = adj.indices[adj.indptr[v]:adj.indptr[v + 1]]
        degree[near] -= 1
        stack.extend(near[left[near] & (degree[near] < k)].tolist())
    return degree


def _row(adj: sp.csr_matrix, v: int) -> np.ndarray:
    """Row ``v`` of the boolean matrix ``adj`` as a dense mask."""
    mask = np.zeros(adj.shape[0], dtype=bool)
    mask[adj.indices[adj.indptr[v]:adj.indptr[v + 1]]] = True
    return mask


def _disjoint_cliques(cliques: list[list[int]], min_size: int) -> list[list[int]]:
    """Disjoint groups from overlapping maximal cliques, largest first: each step takes the clique with the most
    members not yet taken, those members (a subset of a clique is a clique), while they number ``min_size`` or
    more. A clique that shares members with a larger one keeps the rest (it was dropped whole: one generation
    between two memorized images hid the second image's group)."""
    heap = [(-len(c), c) for c in cliques]
    heapq.heapify(heap)
    taken: set[int] = set()
    out = []
    while heap:
        size, c = heapq.heappop(heap)
        rest = [v for v in c if v not in taken]
        if len(rest) < min_size:
            continue
        if len(rest) < -size:  # shrunk since it was queued: queue it again at its size now
            heapq.heappush(heap, (-len(rest), rest))
            continue
        taken.update(rest)
        out.append(rest)
    return out


def detect_memorized(generated: ImageSet, threshold: float, *, min_size: int = 10, grid: int | None = None,
                     mode: GroupMode = "cliques", train: ImageSet | None = None, extraction_threshold: float = 0.15,
                     chunk: int = 1024, device: str = "cpu", index: NearestNeighborIndex | None = None) -> Detection:
    """Groups of >= ``min_size`` mutually near-duplicate generations, verified against ``train`` if given.

    Parameters
    ----------
    generated : N_G uint8 images (N_G, H, W, C)
    threshold : link two generations when their tiled max RMS-L2 is < threshold (pixels in [0, 1])
    min_size : smallest group reported (Carlini et al. used cliques of 10 among 500 generations per prompt)
    grid : tiles per side (default :func:`default_grid`)
    mode : "cliques" (maximal cliques, disjoint) or "components" (connected components, a relaxation)
    train, extraction_threshold : verify each group's medoid: pixel RMS-L2 to the nearest training image
        <= extraction_threshold (0.15: Carlini et al.'s Stable Diffusion value)
    chunk, device : generations per block of the pair scan, and its torch device
    index : an unfitted ``"rms-l2"`` :class:`~side_extract.neighbors.NearestNeighborIndex` whose backend and chunks
        the verification searches with (default: ``NearestNeighborIndex("rms-l2", device=device)``)
    """
    check_image_set(generated, "generated")  # (an array was an AttributeError)
    if train is not None:
        check_image_set(train, "train")
    if not threshold > 0:  # (NaN too: it linked no pair)
        raise ValueError(f"threshold={threshold} must be > 0")
    if min_size < 2:
        raise ValueError(f"min_size={min_size} must be >= 2 (a group is at least a pair)")
    if mode not in ("cliques", "components"):
        raise ValueError(f"mode={mode!r} must be 'cliques' or 'components'")
    if len(generated) == 0:
        raise ValueError("detect_memorized needs at least one generation, got none")
    images = generated.images
    g = default_grid(*images.shape[1:3]) if grid is None else grid
    check_grid(g, *images.shape[1:3])
    if index is not None and index.metric != "rms-l2":
        raise ValueError(f"index has metric={index.metric!r}; the verification measures pixel 'rms-l2'")
    cfg.check_int(chunk, "chunk", 1)  # (0 or less: numpy's range error, from the pair scan)
    if train is not None:  # (before the pair scan: they were checked after it)
        if len(train) == 0:  # (refused after the quadratic pair scan)
            raise ValueError("train holds no images: the groups' verification needs at least one training image")
        if not extraction_threshold > 0:  # (NaN or a negative one verified no group, an exact copy included)
            raise ValueError(f"extraction_threshold={extraction_threshold} must be > 0")
        if train.images.shape[1:] != images.shape[1:]:
            raise ValueError(f"generated images {images.shape[1:]} and training images {train.images.shape[1:]} "
                             "differ in shape (H, W, C)")
    i, j, _ = near_duplicate_pairs(images, threshold, g, chunk=chunk, device=device)
    groups, greedy = _groups(len(images), i, j, min_size, mode)
    reps = []
    for members in groups:
        m = np.asarray(members[:256])
        reps.append(int(m[np.argmin(tiled_distances(images[m], images[m], g).sum(1))]))
    out = Detection(threshold, g, min_size, mode, len(images), len(i), groups, reps, greedy=greedy)
    if train is None:
        return out
    if not reps:
        return dataclasses.replace(out, extraction_threshold=extraction_threshold, verified=[],
                                   nearest_train_index=[], nearest_train_distance=[])
    index = NearestNeighborIndex("rms-l2", device=device) if index is None else index
    nb = index.fit(pixel_rows(train.images)).kneighbors(pixel_rows(images[reps]), 1)
    d = nb.scores[:, 0]
    verified = (d <= extraction_threshold).tolist()
    return dataclasses.replace(out, extraction_threshold=extraction_threshold, verified=verified,
                               nearest_train_index=nb.indices[:, 0].tolist(), nearest_train_distance=d.tolist(),
                               precision=float(np.mean(verified)))
