"""Markdown tables of the benchmark results, rendered from their JSON (which holds every figure shown)."""
from __future__ import annotations

from typing import Any

from . import CALL_PEAK, fmt


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def _bands(metrics: dict[str, Any]) -> list[str]:
    order = {"high": 0, "mid": 1, "low": 2}
    return sorted(metrics["ams"], key=lambda b: (order.get(b, 3), b))


def _metric_row(metrics: dict[str, Any], bands: list[str]) -> list[str]:
    cells = [_pct(metrics["ams"][b]) for b in bands] + [_pct(metrics["ums"][b]) for b in bands]
    return cells + [f"{metrics['p95']:.3f}", _pct(metrics["carlini"]["extracted_fraction"]),
                    _pct(metrics["gu"]["memorized_fraction"])]


def _ratio_cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return ""
    if r["ratio"] is None:  # the best baseline's value is 0
        if r["side"] == 0:
            return "0/0"
        # (a higher-is-better metric the baselines never reached: SIDE wins it, and the ✓ was left off)
        cell = "∞" if r.get("better", "higher") == "higher" else "∞ (baseline 0)"  # a distance: the baseline closer
    else:
        cell = f"{r['ratio']:.2f}"
    return cell + (" ✓" if r["side_better"] else "")


def _preamble(title: str, data: dict[str, Any]) -> list[str]:
    """Title, the command that reproduces the results and the machine they were measured on."""
    m = data["machine"]
    return [f"# {title}{' (--quick)' if data.get('quick') else ''}", "",
            f"Command: `{data.get('command') or '(library call)'}`  ",
            f"Machine: {m['platform']}, {m['cpu_count']} CPUs"
            + (f" ({m['cpu_model']}; {', '.join(m.get('cpu_flags') or []) or 'no AVX2/AVX-512/AMX'})"
               if m.get("cpu_model") else "")
            + f", torch {m['torch']} ({m['torch_threads']} thread(s)), load average at start "
            f"{m['load_average_at_start']}; {m['date']}  ",
            *([f"Code: {m['code']['commit'][:12]}{' with local changes' if m['code'].get('dirty') else ''}  "]
              if m.get("code") else [])]


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def render_extraction_markdown(data: dict[str, Any]) -> str:
    """The results as Markdown tables (everything in them is in the JSON)."""
    lines = [*_preamble("Extraction benchmark", data),
             f"Extraction seed {data['seed']}, images {data['size']}x{data['size']}, total {data['seconds']:.0f} s.", ""]
    scales = data["scales"]
    if not scales:
        return "\n".join(lines) + "\n"
    bands = _bands(next(iter(scales[0]["methods"].values())))
    head = ["n_train", "epochs", "method", *[f"AMS {b} %" for b in bands], *[f"UMS {b} %" for b in bands], "p5 dist.",
            "Carlini %", "Gu %"]
    lines += ["## Memorization per method (rms-l2 bands calibrated on held-out digits per training set)", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in scales:
        for method, met in s["methods"].items():
            lines.append("| " + " | ".join([str(s["n_train"]), str(s["target"]["epochs"]), method,
                                            *_metric_row(met, bands)]) + " |")
    side_methods = list(dict.fromkeys(m for s in scales for m in s["ratios"]))
    if side_methods:
        lines += ["", "## SIDE / best baseline (Cond, UnCond)", "",
                  "Ratio > 1 means SIDE extracts more, except p95 (for rms-l2 the 5th percentile of each generation's nearest "
                  "training distance, 'p5 dist.' in the tables above: < 1 means SIDE comes closer); "
                  "✓ marks where SIDE strictly beats the best baseline; ∞: the baselines found none (p95 as a "
                  "distance, ∞ (baseline 0): the best baseline's is 0, closer than SIDE's).", ""]
        keys = [f"ams/{b}" for b in bands] + [f"ums/{b}" for b in bands] + ["p95", "carlini", "gu"]
        head = ["n_train", "SIDE variant", *keys]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for s in scales:
            for sm in side_methods:
                if sm in s["ratios"]:
                    lines.append("| " + " | ".join([str(s["n_train"]), sm,
                                                    *[_ratio_cell(s["ratios"][sm].get(k)) for k in keys]]) + " |")
    for s in scales:
        sw = s.get("sweeps")
        if not sw:
            continue
        for name, label in (("scale", "lambda"), ("n_clusters", "K"), ("tau", "tau")):
            if name not in sw:
                continue
            head = [label, "method", *[f"AMS {b} %" for b in bands], *[f"UMS {b} %" for b in bands], "p5 dist.",
                    "Carlini %", "Gu %"]
            lines += ["", f"## {label} sweep (n_train = {s['n_train']}, N_G = {sw['n_generated']})", "",
                      "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for p in sw[name]["points"]:
                for method, met in p["methods"].items():
                    lines.append("| " + " | ".join([f"{p['value']:g}", method, *_metric_row(met, bands)]) + " |")
            if name == "scale" and "uncond" in sw[name]:
                lines.append("| " + " | ".join(["—", "uncond", *_metric_row(sw[name]["uncond"], bands)]) + " |")
    lines += ["", "Bands per training set:", ""]
    for s in scales:
        edges = ", ".join(f"{b} [{fmt(lo, 3)}, {fmt(hi, 3)})" for b, (lo, hi) in s["bands"].items())
        lines.append(f"- n_train = {s['n_train']}: {edges}; target trained {s['target']['train_seconds']:.0f} s, "
                     f"final loss {s['target']['final_loss']:.4f}; audit {s['audit_seconds']:.0f} s")
    return "\n".join(lines) + "\n"



def _grown(r: dict[str, Any]) -> float:
    """An evaluate RSS row's growth over what was resident before the call (MB)."""
    return r["peak_rss_mb"] - r["rss_before_mb"]


def render_compute_markdown(data: dict[str, Any]) -> str:
    lines = [*_preamble("Compute benchmark", data),
             f"Model: `{data['model']['spec']}` ({'x'.join(map(str, data['model']['sample_shape']))}, "
             f"{data['model']['parameters']:,} parameters); total {data['seconds']:.0f} s.", "",
             "| figure | ours | reference | ratio |", "|---|---|---|---|"]
    s = data.get("sampling")
    if s:
        lines.append(f"| {s['what']} | {s['ours']['median_s']:.3f} s | DDIMPipeline {s['diffusers_ddim_pipeline']['median_s']:.3f} s "
                     f"| **{s['ratio']:.2f}** (images agree to {s['max_abs_pixel_diff']:.1e}) |")
    g = data.get("guidance")
    if g:
        p = g["per_image_ms"]
        lines.append(f"| guided extraction per image ({g['what']}) | {p['guided']:.2f} ms | floor {p['floor']:.2f} ms "
                     f"(unguided {p['unguided']:.2f} + classifier fwd/bwd {p['classifier']:.2f}) | **{g['ratio']:.2f}** "
                     f"(guided / unguided {g['guided_over_unguided']:.2f}) |")
    for r in data.get("neighbors") or []:
        lines.append(f"| {r['what']} | faiss backend {r['faiss_backend']['median_s']:.3f} s; torch backend "
                     f"{r['torch_backend']['median_s']:.3f} s | bare IndexFlatL2 {r['bare_faiss_indexflatl2']['median_s']:.3f} s "
                     f"| **{r['ratio_faiss_backend']:.2f}** (faiss), {r['ratio_torch_backend']:.2f} (torch) |")
    rss = data.get("evaluate_rss")
    if rss:
        own = calls_own_peaks(rss)
        cells = "; ".join(f"N_G {r['n_generated']:,}: {r['peak_rss_mb']:.0f} MB"
                          + (f", +{_grown(r):.0f} MB over {r['rss_before_mb']:.0f} MB before" if own else "")
                          + f" ({r['seconds']:.1f} s)" for r in rss)
        small, large = (f(rss, key=lambda r: r["n_generated"]) for f in (min, max))  # (in any order given)
        base = small["peak_rss_mb"]
        lifetime = "" if own else (
            " (measured before the call's own peak was: the process's lifetime high-water mark, which the data and "
            "the warm-up may have set)")
        # (the peaks' ratio counts the process's imports and data, resident before the call, on both sides: the
        # call's own growth is the figure that scales with N_G)
        grown = (f"; growth over the memory before the call **{_grown(large) / _grown(small):.2f}**"
                 if own and _grown(small) > 0 else "")
        lines.append(f"| peak RSS of evaluate vs {small['n_train']:,} random 8x8 training images (fresh process each, "
                     f"one call per N_G){lifetime} | {cells} | N_G {small['n_generated']:,}: {base:.0f} MB | "
                     f"**{large['peak_rss_mb'] / base:.2f}** (peaks, largest / smallest N_G){grown} |")
    if data.get("demo"):
        d = data["demo"]
        lines.append(f"| `{d['command']}` wall time | {d['wall_s']:.0f} s | — | — |")
    if data.get("busy_demo"):
        b = data["busy_demo"]
        pairs = b.get("pairs")
        how = (f"median of {len(pairs)} idle/busy pairs, the order alternating" if pairs else
               "one idle run, then one busy run: no repeats, one draw of the machine's noise")
        lines.append(f"| `{b['busy']['command']}` beside a CPU-bound competitor vs idle | {b['busy']['wall_s']:.0f} s | "
                     f"idle {b['idle']['wall_s']:.0f} s | **{b['slowdown']:.2f}** (goal <= 2.5; {how}) |")
    lines += ["", "The sampling, guidance and neighbour ratios are medians of per-repeat ratios, the two sides of each "
              "measured in the same repeat with the order alternating; the RSS rows are one call each, in fresh "
              "processes; the busy demo's row says how it was measured. Part times: "
              + ", ".join(f"{k} {fmt(v)} s" for k, v in data["part_seconds"].items()) + "."]
    return "\n".join(lines) + "\n"



def _overrides_cell(ov: dict[str, Any]) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in ov.items()) or "(the base settings)"


def _variants_seed_table(seed_data: dict[str, Any], method: str, chosen: str | None, objective_label: str) -> list[str]:
    scales = seed_data["scales"]
    head = ["variant", "overrides", objective_label]
    for s in scales:
        n = s["n_train"]
        head += [f"{n}: AMS ≤mid %", f"{n}: UMS ≤mid %", f"{n}: Carlini %"]

    def row(label: str, overrides: str, objective: str, metrics_at) -> list[str]:
        cells = [label, overrides, objective]
        for s in scales:
            met = metrics_at(s)
            cells += [_pct(met["ams_cumulative"]["mid"]), _pct(met["ums_cumulative"]["mid"]),
                      _pct(met["carlini"]["extracted_fraction"])]
        return cells

    rows = [row(f"*{b}* (baseline)", "", "", lambda s, b=b: s["baselines"][b]) for b in scales[0]["baselines"]]
    for name, v in seed_data["variants"].items():
        rows.append(row(f"**{name}** (chosen)" if name == chosen else name, _overrides_cell(v["overrides"]),
                        f"{v['objective'][method]:+.3f}", lambda s, name=name: s["variants"][name]["methods"][method]))
        for b in scales[0]["variants"][name].get("own_baselines", {}):
            rows.append(row(f"*{b}* (baseline remade with the variant's settings)", "", "",
                            lambda s, name=name, b=b: s["variants"][name]["own_baselines"][b]))
    return _table(head, rows)


def render_variants_markdown(data: dict[str, Any]) -> str:
    """The variants experiment: every variant on the validation seed, then base and the chosen on held-out."""
    c = data["config"]
    heldout_seed = c["heldout_seed"] if c["heldout_seed"] is not None else "(none)"
    lines = [*_preamble("SIDE variants: chosen on a validation seed, reported on a held-out seed", data),
             f"Images {data['size']}x{data['size']}; validation seed {c['validation_seed']}, held-out seed "
             f"{heldout_seed}; total {data['seconds']:.0f} s (stages found in the cache take no time).", "",
             "Objective (chooses the variant, validation seed only): mean over scales and the metrics "
             f"{', '.join('`' + o + '`' for o in data['objective'])} of log((v + 1/N_G) / (best baseline + 1/N_G)); "
             "0 = on par with the best baseline, +0.10 = about 10 % more. ≤mid = the high and mid bands together "
             "(cumulative).", "", f"Base settings: {_overrides_cell(c['base'])}.", "",
             f"**Not the fair protocol.** SIDE is the best of {len(data['validation']['variants'])} settings (base and "
             "the variants) on one validation seed; Cond and UnCond are not tuned (they run at the base settings, "
             "and again at a variant's only where it changes the sampler). The held-out comparison is one seed "
             "without an interval: a ✓ below marks that seed's comparison, not a result. `side bench fair` gives "
             "every method the same tuning budget and intervals over held-out replicates.", ""]
    keys = ["ams/high", "ams/mid", "ams/low", "ums/high", "ums/mid", "ums/low", "p95", "carlini", "gu"]
    for method in c["methods"]:
        chosen = data["chosen"][method]
        lines += [f"## {method}: validation seed {data['validation']['seed']}", "",
                  *_variants_seed_table(data["validation"], method, chosen, "objective"), ""]
        if "heldout" in data:
            ho = data["heldout"]
            ratio_rows = [[str(s["n_train"]), name, *[_ratio_cell(v["ratios"].get(method, {}).get(k)) for k in keys]]
                          for s in ho["scales"] for name, v in s["variants"].items()]
            lines += [f"## {method}: held-out seed {ho['seed']} (chosen on validation: **{chosen}**)", "",
                      *_variants_seed_table(ho, method, chosen, "objective (held-out)"), "",
                      "Ratio to the best baseline per metric on the held-out seed (✓: strictly better):", "",
                      *_table(["n_train", "variant", *keys], ratio_rows), ""]
    return "\n".join(lines) + "\n"


__all__ = ["render_extraction_markdown", "render_compute_markdown", "render_variants_markdown"]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.3g} s"


def calls_own_peaks(rows: list[dict[str, Any]]) -> bool:
    """Whether every memory row measured the call's own peak (:data:`~side_extract.bench.CALL_PEAK`; rows
    written before it was measured so hold the process's lifetime mark)."""
    return all(r.get("peak_is") == CALL_PEAK for r in rows)


def render_scale_markdown(data: dict[str, Any]) -> str:
    """``side bench scale``: per-model costs, the search, 1 vs 2 processes and the cost model."""
    c = data["config"]
    lines = [*_preamble("Scale benchmark", data), f"Total {data['seconds']:.0f} s.", ""]
    models = data.get("models") or []
    if models:
        lines += ["## Models (random weights; seconds per image, this machine)", "",
                  *_table(["model", "params", "batch", "denoiser call", "bf16 call (ratio)", "bf16 rel. diff",
                           "guided step (ratio)", "classifier train step", "GFLOP / call", "peak RSS MB"],
                          [[r["model"], f"{r['parameters'] / 1e6:.1f}M", str(r["batch"]),
                            fmt(r["denoiser_s_per_image"]),
                            f"{fmt(r['denoiser_bf16_s_per_image'])} ({r.get('bf16_over_fp32', float('nan')):.2f}x)",
                            fmt(r["bf16_rel_mean_diff"], 2),
                            f"{fmt(r['guided_step_s_per_image'])} ({r.get('guided_over_call', float('nan')):.2f}x)",
                            fmt(r["classifier_train_s_per_image"]), fmt(r["denoiser_flops_per_image"] / 1e9),
                            fmt(r["peak_rss_mb"], 4)] for r in models]), "",
                  "bf16 rel. diff: mean |eps_bf16 - eps_fp32| / mean |eps_fp32| of one call at t = 600 (autocast); "
                  "a guided step is one denoiser call plus the noise-aware classifier's forward and backward "
                  f"({models[0]['classifier_parameters'] / 1e6:.2f}M parameters, K = {c['classifier_classes']}).", ""]
    search = data.get("search") or []
    if search:
        lines += ["## Exact nearest-neighbour search and metrics (`evaluate`, pixel RMS-L2)", "",
                  *_table(["training images", "dims", "N_G", "seconds", "training set MB", "RSS before MB",
                           "peak RSS MB"],
                          [[f"{r['n_train']:,}", str(r["dims"]), f"{r['n_generated']:,}", fmt(r["seconds"]),
                            fmt(r["train_set_mb"], 4), fmt(r["rss_before_mb"], 4), fmt(r["peak_rss_mb"], 4)]
                           for r in search]), "",
                  "RSS before: the process after making its random training set and a warm-up evaluation ("
                  + ("in use then; peak: the call's own, from there" if calls_own_peaks(search) else
                     "measured before the call's own peak was: both are the process's lifetime high-water mark")
                  + "); the search streams reference chunks and keeps a running top-k, and holds the training set "
                  "in memory.", ""]
    p = data.get("processes")
    if p:
        lines += ["## One and two processes (`side sample --model demo`, torchrun)", ""]
        if "skipped" in p:
            lines += [f"Skipped: {p['skipped']}.", ""]
        else:
            lines += [f"{p['n']} images: {p['wall_s_1']} s with 1 process, {p['wall_s_2']} s with 2 (speed-up "
                      f"{p['speedup']}x, interpreter start included); images identical: {p['identical']}.", ""]
    cost = data.get("cost") or []
    if cost:
        a = data["audit"]
        lines += ["## Cost model", "",
                  f"An audit of N_syn {a['n_synthetic']:,} synthetic images, N_G {a['n_generated']:,} generations for "
                  f"each of {a['guided_methods']} guided and {a['unguided_methods']} unguided method(s), "
                  f"{a['steps']} DDIM steps, {a['classifiers']} classifiers x {a['classifier_steps']:,} steps of "
                  f"{a['classifier_batch']}, search against {a['n_train']:,} training images. 'Here' multiplies "
                  "this machine's measured seconds per image (largest measured batch) by the counts. The GPU "
                  f"columns are a projection, not a measurement: FLOPs / an assumed {c['gpu_tflops']:g} TFLOP/s "
                  "sustained per GPU, whatever the precision (an H200 measured 20 in IEEE fp32, 66 in tf32, 110 in "
                  "bf16 for the CIFAR-10 DDPM architecture: scripts/gpu-check), every stage split evenly between the "
                  "GPUs."
                  + "".join(f" The search's time here scales the seconds per pair measured at N_G "
                            f"{r['rate_from']['n_generated']:,} against {r['rate_from']['n_train']:,} training images "
                            f"({r['model']}): the audit's N_G is extrapolated from there."
                            for r in cost if r.get("rate_from")), "",
                  *_table(["model", "stage", "TFLOP", "here (1 process)", "1 GPU (projected)", "8 GPUs (projected)"],
                          [[r["model"], r["stage"], fmt(r["flops"] / 1e12), _duration(r["cpu_s"]),
                            _duration(r["gpu1_s"]), _duration(r["gpu8_s"])] for r in cost])]
        for name in dict.fromkeys(r["model"] for r in cost):
            rows = [r for r in cost if r["model"] == name]
            here = sum(r["cpu_s"] or 0 for r in rows)
            unmeasured = [r["stage"] for r in rows if r["cpu_s"] is None]  # (left out of the sum without a word,
            # where the GPU totals on the same line include them)
            lines += ["", f"{name}: total here {_duration(here)}"
                      + (f" (without {', '.join(unmeasured)}: not measured here at this size)" if unmeasured else "")
                      + f"; 1 GPU {_duration(sum(r['gpu1_s'] for r in rows))}, "
                      f"8 GPUs {_duration(sum(r['gpu8_s'] for r in rows))} (projected)."]
    return "\n".join(lines) + "\n"
