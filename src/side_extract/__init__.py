"""side-extract: audit diffusion models for memorized training data.

Implements SIDE (Surrogate condItional Data Extraction; Chen, Ma, Zou, Jiang, arXiv 2410.02467), its
baselines (Carlini UnCond / Cond), the memorization metrics (AMS/UMS, 95th percentile, Carlini's and Gu's
ratios) and the paper's theory. The stages are modules (``sampling``, ``features``, ``surrogate``,
``training``, ``extraction``, ``evaluation``, ``report``) chained over a run directory by ``pipeline``;
the ``side`` command line lives in ``side_extract.cli``.
"""
from importlib import metadata

try:
    __version__ = metadata.version("side-extract")
except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"
