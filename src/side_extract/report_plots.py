"""Figures and inline images for the audit report: every one rendered to a ``data:image/png;base64`` URI.

Each plot function takes the report's JSON data (never arrays read behind its back), so that the HTML shows
exactly what ``report.json`` holds. Matplotlib runs on the Agg backend (no display, no fonts fetched).
"""
from __future__ import annotations

import base64
import io
import math
import re
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import matplotlib.text  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]
plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "figure.dpi": 100, "savefig.dpi": 100,
                     "font.family": "DejaVu Sans"})  # bundled with matplotlib: nothing to look up


# method names (folder names under evaluation/, any text) are drawn as they are: "$...$" was parsed as maths, and
# invalid maths ended the report
PLAIN_TEXT = matplotlib.rc_context({"text.parse_math": False})


_SURROGATE = re.compile("[\ud800-\udfff]")


def _drawable(text: str) -> str:
    """``text`` with the bytes that surrogate escapes stand for written ``\\xNN`` (another lone surrogate: ``\\uNNNN``)."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure_uri(fig: plt.Figure) -> str:
    """The figure, laid out tight, as a PNG data URI; closes the figure. A text that is not Unicode (a folder name in
    another encoding, read with Python's surrogate escapes) is drawn with its odd bytes as ``\\xNN`` (matplotlib's font
    code refused it, and the report with it)."""
    for text in fig.findobj(matplotlib.text.Text):
        drawn = text.get_text()
        if isinstance(drawn, str) and _SURROGATE.search(drawn):
            text.set_text(_drawable(drawn))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return _uri(buf.getvalue())


def image_uri(image: np.ndarray, min_size: int = 64) -> str:
    """One uint8 image (H, W[, C]) as a PNG data URI; grayscale stays grayscale (mode L), and images smaller
    than ``min_size`` are upscaled by an integer factor with nearest-neighbour so 8x8 digits stay crisp."""
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    pil = Image.fromarray(img.astype(np.uint8), mode="L" if img.ndim == 2 else "RGB")
    factor = max(1, math.ceil(min_size / max(img.shape[:2])))
    if factor > 1:
        pil = pil.resize((img.shape[1] * factor, img.shape[0] * factor), Image.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=True)
    return _uri(buf.getvalue())


def _grid(n: int, cols: int = 3, w: float = 4.0, h: float = 2.8) -> tuple[plt.Figure, list[plt.Axes]]:
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _from_zero(ax: plt.Axes) -> None:
    """Counts and shares start at 0; an all-zero plot still gets a readable axis."""
    ax.set_ylim(0, max(ax.get_ylim()[1], 1.0))


@PLAIN_TEXT
def histograms_figure(hist: dict[str, Any]) -> str:
    """Each method's best score against the null (density), bands shaded; one panel per method."""
    methods = hist["methods"]
    fig, axes = _grid(len(methods))
    edges = np.asarray(hist["edges"])
    width = np.diff(edges)
    for ax, (name, counts) in zip(axes, methods.items()):
        bands = (hist.get("method_bands") or {}).get(name, hist["bands"])  # its own evaluation's bands
        closest = sorted(bands.items(), key=lambda kv: -kv[1][0] if hist["orientation"] == "similarity"
                         else kv[1][1])  # darkest = closest band
        for (bname, (lo, hi)), col in zip(closest, ("#d9534f", "#f08a6c", "#f9b98c", "#fde0c5", "#fdeee0")):
            if min(hi, edges[-1]) > max(lo, edges[0]):
                ax.axvspan(max(lo, edges[0]), min(hi, edges[-1]), color=col, alpha=0.6, lw=0, label=f"band {bname}")
        for j, (nname, ncounts) in enumerate(hist["null"].items()):
            c = np.asarray(ncounts, float)
            ax.stairs(c / max(c.sum(), 1) / width, edges, color=["0.35", "0.6"][j % 2], lw=1.2,
                      label=f"null: {nname}")
        c = np.asarray(counts, float)
        ax.stairs(c / max(c.sum(), 1) / width, edges, fill=True, alpha=0.6, color=COLORS[0], label=name)
        ax.set_title(name)
        ax.set_xlabel(f"best {hist['similarity']} {hist['orientation']}")
        ax.set_ylabel("density")
        ax.legend(fontsize=7, loc="best")
    return figure_uri(fig)


@PLAIN_TEXT
def ng_law_figure(laws: dict[str, dict[str, Any]]) -> str:
    """Unique training images hit vs N_G: the plug-in law (thin line), observed subsets (dots), rarefied (dashed),
    the extrapolation past N_G (thick)."""
    fig, axes = _grid(len(laws))
    for ax, (method, bands) in zip(axes, laws.items()):
        for i, (band, law) in enumerate(bands.items()):
            col = COLORS[i % len(COLORS)]
            n = np.asarray(law["n_grid"], float)
            ax.plot(n, law["predicted_unique"], color=col, lw=0.8, label=f"{band}: plug-in")
            ext = [(x, e) for x, e in zip(n, law.get("extrapolated_unique") or []) if e is not None]
            if ext:
                ex, ey = zip(*ext)
                last = next((r for r in reversed(law["rarefied_unique"]) if r is not None), None)
                ax.plot([law["n_generated"], *ex], [last, *ey] if last is not None else [ey[0], *ey], color=col,
                        lw=2, label=f"{band}: estimated")
            obs = [(x, o, s or 0.0) for x, o, s in zip(n, law["observed_unique"], law["observed_std"]) if o is not None]
            if obs:
                x, o, s = map(np.asarray, zip(*obs))
                ax.errorbar(x, o, yerr=s, fmt="o", ms=3, color=col, label=f"{band}: observed")
            rare = [(x, r) for x, r in zip(n, law["rarefied_unique"]) if r is not None]
            if rare:
                ax.plot(*zip(*rare), ls="--", lw=1, color=col)
            ax.axvline(law["n_generated"], color="0.7", lw=0.8)
        ax.set_xscale("log")
        _from_zero(ax)
        ax.set_title(method)
        ax.set_xlabel("N_G (generations)")
        ax.set_ylabel("unique training images hit")
        ax.legend(fontsize=7)
    return figure_uri(fig)


@PLAIN_TEXT
def sweep_figure(param: str, curves: dict[str, dict[str, Any]]) -> str:
    """Metric (%) vs swept value, one panel per method, one line per metric (reference methods dashed)."""
    fig, axes = _grid(len(curves), cols=2, w=5.2, h=3.4)
    for ax, (method, c) in zip(axes, curves.items()):
        x = c["values"]
        for i, (name, ys) in enumerate(c["series"].items()):
            ax.plot(x, [100 * y if y is not None else np.nan for y in ys], marker="o", ms=3,
                    color=COLORS[i % len(COLORS)], label=name)
        for i, (name, y) in enumerate(c.get("reference", {}).items()):
            ax.axhline(100 * y, ls=":", lw=1, color="0.4")
            ax.text(x[0] if x else 0, 100 * y, f" {name}", fontsize=7, color="0.3", va="bottom")
        _from_zero(ax)
        ax.set_title(f"{method}: sweep of {param}")
        ax.set_xlabel(param)
        ax.set_ylabel("%")
        ax.legend(fontsize=7, ncol=2)
    return figure_uri(fig)


@PLAIN_TEXT
def classifier_figure(classifiers: dict[str, dict[str, Any]]) -> str:
    """Held-out accuracy during training, one line per timestep quartile (or clean)."""
    fig, axes = _grid(len(classifiers))
    for ax, (name, c) in zip(axes, classifiers.items()):
        steps = [h["step"] for h in c["history"] if "accuracy" in h]
        keys = sorted({k for h in c["history"] for k in h.get("accuracy", {})})
        for i, k in enumerate(keys):
            ax.plot(steps, [100 * h["accuracy"].get(k, np.nan) for h in c["history"] if "accuracy" in h],
                    marker="o", ms=3, color=COLORS[i % len(COLORS)], label=k)
        ax.set_ylim(0, 102)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("held-out accuracy (%)")
        ax.legend(fontsize=7)
    return figure_uri(fig)


@PLAIN_TEXT
def clusters_figure(rows: list[dict[str, Any]], bands: list[str], kind: str = "surrogate cluster") -> str:
    """Generations per target label (grey), the part in the closest bands (colours), and the cluster's cohesion."""
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 0.32 * len(rows) + 2)), 3.2))
    x = np.arange(len(rows))
    ax.bar(x, [r["n"] for r in rows], color="0.85", label="generations")
    bottom = np.zeros(len(rows))
    for i, b in enumerate(bands):
        v = np.asarray([r["bands"].get(b, 0) for r in rows], float)
        ax.bar(x, v, bottom=bottom, color=("#d9534f", "#f08a6c")[min(i, 1)], label=f"in band {b}")
        bottom += v
    step = max(1, len(rows) // 40)  # at most ~40 tick labels
    ax.set_xticks(x[::step], [str(r["label"]) for r in rows][::step], fontsize=7)
    ax.set_xlabel(kind)
    ax.set_ylabel("generations")
    ax.set_ylim(0, max(1.0, max(r["n"] for r in rows)) * 1.4)  # room for the legends above the bars
    if any(r.get("cohesion") is not None for r in rows):
        ax2 = ax.twinx()
        coh = np.asarray([np.nan if r.get("cohesion") is None else r["cohesion"] for r in rows], float)
        ax2.plot(x, coh, "k.", label="cohesion")
        lo, hi = float(np.nanmin(coh)), float(np.nanmax(coh))
        span = max(hi - lo, 0.05)
        ax2.set_ylim(lo - 0.05 * span, hi + 0.45 * span)  # the legend sits above the highest point
        ax2.set_ylabel("cohesion")
        ax2.legend(fontsize=7, loc="upper right")
    ax.legend(fontsize=7, loc="upper left")
    return figure_uri(fig)


@PLAIN_TEXT
def theory_figure(rows: list[dict[str, Any]]) -> str:
    """Each memorization divergence (or gain) as a point with its 95% interval."""
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1))
    y = np.arange(len(rows))[::-1]
    means = np.array([r["mean"] for r in rows])
    err = np.array([[r["mean"] - r["ci95_low"] for r in rows], [r["ci95_high"] - r["mean"] for r in rows]])
    ax.errorbar(means, y, xerr=err, fmt="o", color=COLORS[0], capsize=3)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(y, [r["key"] for r in rows])
    ax.set_xlabel("nats (smaller M = more memorization)")
    return figure_uri(fig)
