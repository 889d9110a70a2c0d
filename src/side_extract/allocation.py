"""Budget policies for distinct extractions (beyond the paper): which target class each generation gets.

The paper draws each generation's target cluster uniformly. With ``extract.allocation: adaptive`` the N_G
generations of a method that draws target classes (classifier guidance, or side-lora's conditional model) are made
in ``extract.rounds`` rounds; round 0 draws uniformly, and every later
round moves the budget toward the classes that are still producing *new* images, without looking at the
training data:

1. for each class, group the generations targeted at it so far into near-duplicates: two generations are the
   same image when their pixel RMS distance (uint8 levels / 255, in [0, 1]) is below ``extract.dedup_threshold``
   (connected components, so a chain of near-copies is one image);
2. estimate the class's unseen mass with Good-Turing: U_k = (f1_k + 1) / (n_k + 1), f1_k the images seen
   exactly once among its n_k generations (add-one, so a class with no generations yet has U = 1 and one
   that only repeats itself keeps a small share);
3. draw the next round's targets with probabilities proportional to U_k, from a generator seeded by
   (seed, round), so the allocation is deterministic given the earlier rounds' images.

A class that keeps reproducing one memorized image (f1 = 0) loses budget to classes whose generations are
still all different. UnCond has no classes, so this policy does not apply to it; what does is the other policy
here, *dedup-driven stopping* (``extract.stop_unseen``, every method alike): after each round, the unseen mass of
all the method's generations so far (the same grouping and estimate, pooled over classes) is compared with
``stop_unseen`` and the method stops once it is below (:func:`stop_after`).
"""
from __future__ import annotations

import math
import numbers
from fractions import Fraction

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.metrics import pairwise_distances_chunked

from . import config as cfg
from .data import integer_labels


LINKS_PER_MERGE = 1 << 20  # links merged into the components at a time (about 50 MB of index arrays)


def near_duplicate_groups(images: np.ndarray, threshold: float, working_memory_mb: int = 64) -> np.ndarray:
    """Component id (n,) of each uint8 image (n, ...): linked when their pixel RMS distance, in [0, 1] (levels / 255),
    is < ``threshold``.

    The distances are computed a block of rows at a time (about ``working_memory_mb`` each), and the links of at
    most :data:`LINKS_PER_MERGE` of them at a time are merged into the components found so far, so memory grows
    with n and the block, not with the number of near-duplicate pairs (all links kept until the end took 2.7 GB for
    8,000 copies of one image, the case dedup-driven stopping is for). They are squared distances in grey levels,
    exact integers in float64, so a pair exactly at the threshold (possible with uint8 images: one pixel 102 levels
    apart in 8x8 is RMS 0.05) is not linked, whatever the rounding. Components are numbered 0, 1, ... in the order
    of their first image."""
    images = np.asarray(images)
    if images.dtype != np.uint8:  # (float images in [0, 1] fell under a limit in grey levels: all one image)
        raise ValueError(f"images must be uint8 (grey levels 0..255, as side-extract's image sets hold them), got "
                         f"{images.dtype}")
    check_threshold(threshold)
    n = len(images)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    x = images.reshape(n, -1).astype(np.float64)
    # RMS < t  <=>  sum of squared level differences S < (255 t)^2 D, with t the decimal the threshold was written
    # as (0.05, not the float just above it); S is an integer, so S < L  <=>  S < ceil(L), computed exactly
    limit = math.ceil((255 * Fraction(repr(float(threshold)))) ** 2 * x.shape[1])
    first = np.arange(n)  # each image's component so far, named by its first image
    step = max(1, LINKS_PER_MERGE // n)  # rows whose links are merged at once: at most LINKS_PER_MERGE links
    start = 0
    for block in pairwise_distances_chunked(x, working_memory=working_memory_mb, metric="euclidean", squared=True):
        for lo in range(0, len(block), step):
            r, c = np.nonzero(block[lo:lo + step] < limit)
            r += start + lo
            if not np.any(first[r] != first[c]):  # every link within a component already
                continue
            # the components so far (an edge from each image to its component's first) and these rows' links
            rows, cols = np.concatenate([np.arange(n), r]), np.concatenate([first, c])
            graph = coo_matrix((np.ones(len(rows), dtype=bool), (rows, cols)), shape=(n, n)).tocsr()
            labels = connected_components(graph, directed=False)[1]
            lowest = np.full(labels.max() + 1, n)
            np.minimum.at(lowest, labels, np.arange(n))
            first = lowest[labels]
        start += len(block)
    return np.unique(first, return_inverse=True)[1].astype(np.int64)


def check_threshold(threshold: float) -> None:
    """Refuse a near-duplicate distance that is not a pixel RMS distance in (0, 1)."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0 < threshold < 1:
        # (a negative one was squared into its positive; NaN met "Invalid literal for Fraction")
        raise ValueError(f"threshold={threshold!r} must be a pixel RMS distance in (0, 1)")


def unseen_mass(groups: np.ndarray) -> float:
    """Good-Turing estimate of the probability that the next generation is new: (f1 + 1) / (n + 1)."""
    if len(groups) == 0:
        return 1.0
    _, counts = np.unique(groups, return_counts=True)
    return float(((counts == 1).sum() + 1) / (len(groups) + 1))


def stop_after(images: np.ndarray, threshold: float, stop_unseen: float) -> tuple[bool, float]:
    """Dedup-driven stopping: whether a method whose generations so far are ``images`` (uint8) stops (their pooled
    :func:`unseen_mass`, near-duplicates below ``threshold`` grouped, is below ``stop_unseen``), and that mass."""
    if isinstance(stop_unseen, bool) or not isinstance(stop_unseen, numbers.Real) or not 0 <= stop_unseen < 1:
        raise ValueError(f"stop_unseen={stop_unseen!r} must be an unseen mass in [0, 1) (NaN never stopped)")
    u = unseen_mass(near_duplicate_groups(images, threshold))
    return u < stop_unseen, u


def class_weights(images: np.ndarray, targets: np.ndarray, n_classes: int, threshold: float) -> np.ndarray:
    """U_k for every class 0..n_classes-1 from the earlier generations ``images`` and their ``targets``."""
    cfg.check_int(n_classes, "n_classes", 1)
    targets = np.asarray(targets)
    if targets.size == 0:  # (round 0: no earlier generations; np.asarray([]) is float64)
        targets = targets.astype(np.int64)
    targets = integer_labels(targets, "targets")  # (0.5 matched no class: its class kept U = 1, a full share)
    if targets.shape != (len(images),):  # (a boolean index error)
        raise ValueError(f"targets has shape {targets.shape}, expected one per image ({len(images)},)")
    outside = targets[(targets < 0) | (targets >= n_classes)]
    if len(outside):  # (generations aimed at them were left out of every class's count without a word)
        raise ValueError(f"targets must be output indices 0..{n_classes - 1}, got {int(outside[0])}")
    w = np.ones(n_classes)
    for k in range(n_classes):
        sel = targets == k
        if sel.any():
            w[k] = unseen_mass(near_duplicate_groups(images[sel], threshold))
    return w


def adaptive_targets(seed: int, round_index: int, n: int, n_classes: int, images: np.ndarray, targets: np.ndarray,
                     threshold: float) -> np.ndarray:
    """The targets (output indices) of ``n`` generations of round ``round_index`` (see the module docstring)."""
    for name, v in (("seed", seed), ("round_index", round_index), ("n", n)):
        cfg.check_int(v, name)
    check_threshold(threshold)  # (checked only where a class had generations: round 0 took any)
    w = class_weights(images, targets, n_classes, threshold)
    rng = np.random.default_rng([seed, round_index, 0xA110C])
    return rng.choice(n_classes, size=n, p=w / w.sum()).astype(np.int64)


__all__ = ["near_duplicate_groups", "unseen_mass", "stop_after", "class_weights", "adaptive_targets"]
