"""Benchmarks (``side bench``): extraction power across training-set scales, and compute figures.

- :mod:`side_extract.bench.extraction`: SIDE (cluster and teacher labels) vs Cond and UnCond on targets
  trained on class-balanced digits subsets of several sizes, with lambda, K and tau sweeps;
- :mod:`side_extract.bench.compute`: ratios measured side by side in one run (our sampler vs diffusers'
  ``DDIMPipeline``, guided extraction vs its floor, nearest neighbours vs bare faiss), peak RSS of
  ``evaluate``, ``side demo`` wall time.

Each writes ``<name>.json`` (the source of truth, with the machine description and the exact command) and
``<name>.md`` (tables rendered from that JSON by :mod:`side_extract.bench.tables`). This module holds what
both share.
"""
from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..runs import atomic_write_json, atomic_write_text, versions

log = logging.getLogger(__name__)

CALL_PEAK = "the call's"  # a memory row's ``peak_is``: VmHWM reset before the call (else the process's lifetime mark)


def machine_description(threads: int | None = None) -> dict[str, Any]:
    """Where a figure was measured: platform, CPUs, load at the start, torch threads (``threads``: those of the
    processes that were timed, where they are not this one's), library versions."""
    import torch

    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        load = None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        **cpu_model(),
        "code": code_version(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads() if threads is None else threads,
        "cuda": torch.cuda.is_available(),
        "load_average_at_start": load,
        "versions": versions(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # what bf16 and fp32 speeds hang on


def cpu_model() -> dict[str, Any]:
    """The CPU's model name and the instruction-set flags the figures depend on (``/proc/cpuinfo``; empty where it
    is not there): ``processor`` alone read 'x86_64' on every machine, and bf16 ran minutes on one EPYC and seconds
    on another."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in text.split("\n\n")[0].splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return {"cpu_model": fields.get("model name"), "cpu_flags": [f for f in CPU_FLAGS if f in flags]}


def code_version() -> dict[str, Any] | None:
    """The git commit of the code that made a figure and whether its tree had changes (None: not a git checkout):
    the package's version alone did not say which code made a results file."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}


def write_results(out: str | Path, stem: str, data: dict[str, Any],
                  render: Callable[[dict[str, Any]], str]) -> tuple[Path, Path]:
    """Write ``out/<stem>.json``, then ``out/<stem>.md`` (``render(data)``), each atomically; returns both paths.
    The results are written before their table is drawn: a table that cannot be drawn loses no hours of
    measurements (the tables can be drawn again from the JSON), and leaves no earlier run's table beside them."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / f"{stem}.json", data)
    try:
        markdown = render(data)
    except Exception:
        (out / f"{stem}.md").unlink(missing_ok=True)
        log.error("%s was written; its table %s could not be drawn", out / f"{stem}.json", out / f"{stem}.md")
        raise
    atomic_write_text(out / f"{stem}.md", markdown)
    return out / f"{stem}.json", out / f"{stem}.md"


def fmt(v: float | None, digits: int = 3) -> str:
    """A table cell: a number with ``digits`` significant digits, or an em dash for None."""
    return "—" if v is None else f"{v:.{digits}g}"


__all__ = ["CALL_PEAK", "machine_description", "write_results", "fmt"]
