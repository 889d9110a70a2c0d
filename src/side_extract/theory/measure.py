"""The memorization divergence of a trained target, unconditional and guided, beside the empirical optimum.

The theorem (paper-notes section 4) compares, for a partition of the training set into classes D_c,
M(D_c; p_c) with M(D_c; p): the class-conditional model memorizes its class no less. SIDE's classes are
the surrogate clusters, and its class-conditional model is the target guided by the time-dependent
classifier, eps_c = eps - lambda sqrt(1 - abar_t) grad log p(c | x_t, t). :func:`measure` estimates, on
the same Monte Carlo points:

- the class-averaged divergences sum_c w_c M(D_c; model), w_c = |D_c| / |D|, for the unconditional model,
  the guided model, and the two empirical optima (kernel densities on D and on D_c, bandwidth ``bandwidth``);
- M(D; p) and M(D; KDE_D) on the whole set;
- the gains (guided - unconditional, and the optimum's), from paired differences.

Algorithm:

1. Each training image's class is the classifier's argmax at t_min (the classes it would guide toward).
2. ``n_points`` training points are drawn without replacement (stratified, :func:`stratified_indices`),
   x = x_i + eps xi; point i belongs to class c_i. Sampling i uniformly over D makes the plain mean of a
   per-class quantity equal to its w_c-weighted average over classes.
3. log q_eps(x) over D and over D_{c_i}, exactly; log KDE_D(x), log KDE_{D_{c_i}}(x), exactly.
4. log p(x) and log p_{c_i}(x) by the probability-flow ODE (:mod:`.likelihood`), from the timestep whose sigma
   is nearest eps (``t_min``), with the *same* Hutchinson
   probes (drawn from per-point generators seeded by (seed, index), so nothing depends on the batch size),
   which keeps the paired gain's noise small.
5. Means with 95% intervals over the points; each claimed ordering is "holds" when the interval of the
   difference lies below 0, "violated" when above, "inconclusive" otherwise.

Cost and accuracy: 2 K model evaluations per point and model (K <= ``n_steps``), each one forward and
``n_probes`` backward passes (the guided one also a classifier forward, backward and double backward).
With the defaults (32 points, 32 steps, 1 probe) an 8x8 digits target (UNet (32, 64)) and a small
classifier take about 10 s on one CPU thread. More points narrow the intervals (~ 1 / sqrt(n_points):
the spread between points, 8-15 nats on 8x8 digits targets, dominates them); more probes cut the Hutchinson
noise, already small (0.6-1.0 nats per point with one, ``benchmarks/results/experiments/theory-figures.md``);
more steps cut the ODE's bias (about 0.7 nats in d = 64 at 32 steps, 0.2 at 64, which the interval does not
include; the gain compares two models on the same points and probes, but whether their biases cancel there
was not measured).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import time
from collections.abc import Callable
from typing import Any
from pathlib import Path

import numpy as np
import torch

from ..config import check_int
from ..models.forms import run_target, weight_dtypes
from ..models.target import Denoiser
from .divergence import Estimate, as_points, check_width, log_q_eps, stratified_indices
from .likelihood import TraceKind, guided_eps_fn, ode_timesteps, pf_ode_log_likelihood, sigmas, timestep_at_sigma

log = logging.getLogger(__name__)

Classifier = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def verdict(diff: Estimate) -> str:
    """'holds' if the 95% interval of a difference claimed <= 0 lies below 0, 'violated' above, else 'inconclusive'."""
    lo, hi = diff.ci95
    return "holds" if hi < 0 else "violated" if lo > 0 else "inconclusive"


@dataclasses.dataclass(frozen=True, eq=False)
class MeasureResult:
    """M of a target, its guided version and the empirical optima (nats, data space [-1, 1]^d).

    Attributes
    ----------
    m_uncond, m_guided : sum_c w_c M(D_c; p), sum_c w_c M(D_c; p_c)
    m_opt_uncond, m_opt_cond : sum_c w_c M(D_c; KDE_D), sum_c w_c M(D_c; KDE_{D_c})
    m_uncond_full, m_opt_full : M(D; p), M(D; KDE_D)
    gain_model : m_guided - m_uncond (paired); the theorem says <= 0
    gain_opt : m_opt_cond - m_opt_uncond (paired); ~ sum_c w_c log w_c for a small bandwidth
    opt_minus_guided : m_opt_cond - m_guided (paired); <= 0 when the optimum memorizes more
    ordering : claim -> "holds" / "violated" / "inconclusive"
    seed : what chose the points and drew their noise and probes (the same seed, settings and model: the same points)
    index, labels : (n,) the training points used and their classes; class_sizes : class -> |D_c|
    log_p_uncond, log_p_guided : (n,) per-point ODE log-likelihoods
    """

    eps: float
    bandwidth: float
    guidance_scale: float
    n_points: int
    n_probes: int
    trace: str
    seed: int
    timesteps: np.ndarray
    sigma_min: float
    dim: int
    m_uncond: Estimate
    m_guided: Estimate
    m_opt_uncond: Estimate
    m_opt_cond: Estimate
    m_uncond_full: Estimate
    m_opt_full: Estimate
    gain_model: Estimate
    gain_opt: Estimate
    opt_minus_guided: Estimate
    ordering: dict[str, str]
    index: np.ndarray
    labels: np.ndarray
    class_sizes: dict[int, int]
    log_p_uncond: np.ndarray
    log_p_guided: np.ndarray
    seconds: float
    n_steps_requested: int | None = None  # the ODE's n_steps as asked (``n_steps`` in to_dict: the K it took)

    def to_dict(self) -> dict:
        """JSON-ready: settings, every estimate with its interval, the ordering verdicts, per-point values."""
        out: dict = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Estimate):
                out[f.name] = v.to_dict()
            elif isinstance(v, np.ndarray):
                out[f.name] = v.tolist()
            elif isinstance(v, dict):
                out[f.name] = {str(k): val for k, val in v.items()}
            else:
                out[f.name] = v
        out["n_steps"] = len(self.timesteps) - 1  # the distinct steps taken (K <= n_steps_requested, the setting)
        return out


def assign_classes(classifier: Classifier, x: torch.Tensor, t: int = 0, batch_size: int = 256) -> np.ndarray:
    """argmax_c classifier(x, t) for every image: (N,) int64."""
    out = []
    with torch.no_grad():
        for s in range(0, len(x), batch_size):
            xb = x[s:s + batch_size]
            out.append(classifier(xb, torch.full((len(xb),), t, dtype=torch.long, device=xb.device)).argmax(1).cpu())
    return torch.cat(out).numpy().astype(np.int64)


def _probe_generators(seed: int, index: np.ndarray) -> list[torch.Generator]:
    """One generator per point, seeded by (seed, training index): probes independent of the batching."""
    return [torch.Generator().manual_seed(int(np.random.SeedSequence([int(seed), 7, int(i)]).generate_state(
        1, np.uint64)[0] >> 1)) for i in index]


def check_options(*, eps: Any = 0.1, bandwidth: Any = None, guidance_scale: Any = 1.0, n_points: Any = 32,
                  n_probes: Any = 1, trace: Any = "hutchinson", batch_size: Any = 32, seed: Any = 0,
                  n_steps: Any = 32, t_min: Any = None, n_data: int | None = None, **_: Any) -> None:
    """:func:`measure`'s settings that need neither the model nor the data, refused with a clear error (``n_data``:
    the training set's size, where known); :func:`measure_run` checks them before it loads and fingerprints the
    target, its classifier and the training set (a bad --eps, --t-min or trace was found after them). ``t_min``'s
    upper end, the schedule's, is checked by :func:`~.likelihood.ode_timesteps`."""
    if trace not in ("hutchinson", "exact"):
        raise ValueError(f"trace={trace!r} must be 'hutchinson' or 'exact'")
    if isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer)) or n_steps < 1:
        raise ValueError(f"n_steps={n_steps!r} must be a positive integer")
    if t_min is not None and (isinstance(t_min, bool) or not isinstance(t_min, (int, np.integer)) or t_min < 0):
        raise ValueError(f"t_min={t_min!r} must be an integer timestep >= 0 (or None: the sigma nearest eps)")
    if not isinstance(n_points, (int, np.integer)) or not 2 <= n_points <= (n_data if n_data is not None else n_points):
        raise ValueError(f"n_points={n_points!r} must be an integer in [2, {n_data if n_data is not None else 'N'}] "
                         "(the training set size)")
    if not (isinstance(eps, numbers.Real) and math.isfinite(eps) and eps > 0):  # (np.float32 was refused)
        raise ValueError(f"eps={eps!r} must be a positive finite number")
    if not (isinstance(guidance_scale, numbers.Real) and math.isfinite(guidance_scale) and guidance_scale >= 0):
        raise ValueError(f"guidance_scale={guidance_scale!r} must be a finite number >= 0")
    width = eps if bandwidth is None else bandwidth
    if not (isinstance(width, numbers.Real) and math.isfinite(width) and width > 0):
        raise ValueError(f"bandwidth={bandwidth!r} must be > 0")
    for name, value in (("eps", eps), ("bandwidth", bandwidth)):  # (a tiny bandwidth was said as eps, by log_q_eps,
        # after the run had loaded)
        if value is not None:
            check_width(name, float(value))  # (in float64: np.float16(0.001) squared underflowed in its own type)
    if trace == "hutchinson" and (not isinstance(n_probes, (int, np.integer)) or n_probes < 1):
        raise ValueError(f"n_probes={n_probes!r} must be a positive integer")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    check_int(seed, "seed")


def _probe_models(denoiser: Denoiser, classifier: Classifier, train: torch.Tensor, t_min: int) -> None:
    """The target and the classifier called on one training image before any work: where one fails beside weights
    of another dtype than ``train``'s, the error names both (a float64 set beside float32 weights failed in torch's
    words, "Input type (double) and bias type (float)"). A model that casts its input itself is taken as it is."""
    t = torch.full((1,), t_min, dtype=torch.long, device=train.device)
    for what, call, module in (("the classifier", classifier, classifier),
                               ("the target", denoiser, getattr(denoiser, "unet", None))):
        try:
            with torch.no_grad():
                call(train[:1], t)
        except RuntimeError as e:
            weights = weight_dtypes(module)
            if other := sorted(map(str, weights - {train.dtype})):
                raise ValueError(f"{what} failed on train, {train.dtype}, beside its weights in {', '.join(other)} "
                                 f"({e}): give train in {other[0]} (train.to({other[0]}))") from e
            if not weights and train.dtype != torch.float32:  # (a callable's weights are not to be seen)
                raise ValueError(f"{what} failed on one image of train, {train.dtype} ({e}): if its weights are of "
                                 "another dtype, give train in theirs (train.float() for float32)") from e
            raise
    x = train[:1].detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad():  # (a callable under torch.no_grad gave every divergence 0 without a word)
            out = denoiser(x, t)
            through = out.requires_grad and torch.autograd.grad(out.float().sum(), x, allow_unused=True)[0] is not None
    except Exception:  # (a backward that cannot be taken: a forward-only autograd Function, an in-place op on x)
        through = False
    if not through:
        raise ValueError("the target returns no gradient with respect to its input (a callable run under "
                         "torch.no_grad, detaching its output, or going through numpy): the likelihood's divergence "
                         "differentiates through it, and would be 0; let the gradient through")


def measure(
    denoiser: Denoiser,
    classifier: Classifier,
    train: torch.Tensor,
    *,
    labels: np.ndarray | None = None,
    eps: float = 0.1,
    bandwidth: float | None = None,
    guidance_scale: float = 1.0,
    n_points: int = 32,
    n_steps: int = 32,
    n_probes: int = 1,
    trace: TraceKind = "hutchinson",
    t_min: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> MeasureResult:
    """Memorization divergences of a target, of its classifier-guided version and of the empirical optimum.

    Parameters
    ----------
    denoiser : the target, eps(x_t, t), with ``scheduler.alphas_cumprod`` and ``sample_shape`` (C, H, W)
    classifier : ``classifier(x, t) -> logits (B, K)``, time-dependent, in eval mode
    train : (N, C, H, W) float in [-1, 1], the training set D
    labels : (N,) int classes of the training images, as the classifier's output indices 0..K-1 (not cluster ids:
        ``ClassifierGuidance.classes`` maps between them); default: the classifier's argmax at ``t_min``
    eps : smoothing scale of q_eps in data units ([-1, 1] pixels); 0.1 is under one grey level step of
        8x8 digits (2/16)
    bandwidth : kernel width of the empirical optimum; default ``eps`` (the KL-optimal width, so
        M(D; KDE_D) = 0, the floor)
    guidance_scale : lambda; 1 is the Bayes class-conditional p(x | c) = p(x) p(c | x) / p(c)
    n_points : Monte Carlo points (training points drawn without replacement; at most N)
    n_steps, n_probes, trace, t_min : the ODE settings (:func:`~.likelihood.pf_ode_log_likelihood`); t_min
        default: the timestep whose sigma is nearest ``eps`` (:func:`~.likelihood.timestep_at_sigma`), so the
        model's density is taken at the noise level of q_eps, where the empirical optimum's is the kernel density
        of width ``eps``. From t_min = 0 (sigma 0.01 on the linear schedule) points eps = 0.1 from their
        training image lie ten kernel widths out of a memorizing model's density, where the ODE's grid does not
        follow it: on the empirical optimum of 30 points in d = 4 and its exact classifier (32 steps, exact
        trace) M came out 102.5 nats [43.7, 161.3] where it is 216, and the gain +12.3 where it is -0.69;
        from the default t_min, 0.715 against 0.702, and -0.699 against -0.693
        (``tests/test_theory.py::test_measure_by_default_reads_the_model_at_the_noise_level_of_eps``)
    batch_size : points per ODE batch (results do not depend on it)
    seed : seeds the choice of points, their noise and their probes

    Returns
    -------
    MeasureResult
    """
    t0 = time.time()
    if not isinstance(train, torch.Tensor) or train.ndim != 4:
        raise ValueError(f"train must be a (N, C, H, W) tensor, got {type(train).__name__} "
                         f"{tuple(getattr(train, 'shape', ()))}")
    if not train.is_floating_point():
        raise ValueError(f"train must be a floating-point tensor in [-1, 1], got {train.dtype} (uint8 pixels: "
                         "x / 127.5 - 1)")
    if tuple(train.shape[1:]) != tuple(denoiser.sample_shape):
        raise ValueError(f"train images have shape {tuple(train.shape[1:])}, the model expects "
                         f"{tuple(denoiser.sample_shape)}")
    n_data = len(train)
    check_options(eps=eps, bandwidth=bandwidth, guidance_scale=guidance_scale, n_points=n_points, n_probes=n_probes,
                  trace=trace, batch_size=batch_size, seed=seed, n_steps=n_steps, t_min=t_min, n_data=n_data)
    bandwidth = float(eps if bandwidth is None else bandwidth)
    ac = denoiser.scheduler.alphas_cumprod
    chosen = t_min is None
    ts = ode_timesteps(ac, n_steps, timestep_at_sigma(ac, float(eps)) if chosen else t_min)  # (validates them early)
    t_min = int(ts[0])
    near = float(sigmas(ac)[t_min])
    if not 0.5 <= near / eps <= 2:  # the model's density at a noise level far from eps is compared with q_eps
        if chosen:  # eps outside the schedule's noise levels: the nearest is taken
            log.warning("eps=%g lies outside the model's noise levels: the ODE starts at t=%d, sigma %.3g, and the "
                        "model's density there is compared with q_eps (t_min, side theory measure --t-min, chooses "
                        "it)", eps, t_min, near)
        else:  # (M 102.5 for 216 in a review's run at t_min=0, eps=0.1, in silence)
            log.warning("t_min=%d (sigma %.3g) is far from eps=%g: the model's density at that noise level is "
                        "compared with q_eps, whose kernels have width eps (M is then not the paper's; leave t_min "
                        "(--t-min) out to start at the sigma nearest eps)", t_min, near, eps)

    train = train.to(device)
    _probe_models(denoiser, classifier, train, t_min)
    if labels is None:
        labels = assign_classes(classifier, train, t_min)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (n_data,):
        raise ValueError(f"labels has shape {labels.shape}, expected ({n_data},)")
    with torch.no_grad():  # the classifier's outputs: a label indexes them (a negative one would wrap around)
        k = int(classifier(train[:1], torch.full((1,), t_min, dtype=torch.long, device=train.device)).shape[-1])
    if labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"labels must be the classifier's output indices 0..{k - 1}; got values "
                         f"{labels.min()}..{labels.max()} (map cluster ids through ClassifierGuidance.classes)")
    classes, counts = np.unique(labels, return_counts=True)
    class_sizes = {int(c): int(k) for c, k in zip(classes, counts)}
    if len(classes) == 1:
        log.warning("all %d training images fall in class %d: the class-conditional divergences equal the "
                    "unconditional ones up to guidance; check the classifier (or, from Python, pass labels=)", n_data,
                    classes[0])

    # 2. points and their noise
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 1]))
    index = np.sort(stratified_indices(n_data, int(n_points), rng))
    pts = as_points(train)
    x = pts[index] + eps * rng.standard_normal((len(index), pts.shape[1]))
    y = labels[index]

    # 3. exact densities
    lq_full = log_q_eps(x, pts, eps)
    lq_cls, lkde_cls = np.empty(len(x)), np.empty(len(x))
    for c in np.unique(y):
        rows = y == c
        members = pts[labels == c]
        lq_cls[rows] = log_q_eps(x[rows], members, eps)
        lkde_cls[rows] = log_q_eps(x[rows], members, bandwidth)
    lkde_full = log_q_eps(x, pts, bandwidth)

    # 4. ODE likelihoods, same probes for both models
    shape = tuple(train.shape[1:])
    xt = torch.from_numpy(x).to(dtype=train.dtype).reshape(-1, *shape)
    lp_u, lp_g = np.empty(len(x)), np.empty(len(x))
    n_batches = math.ceil(len(x) / batch_size)
    res = None
    for b, s in enumerate(range(0, len(x), batch_size)):
        sl = slice(s, s + batch_size)
        xb = xt[sl].to(device)
        kw = dict(n_steps=n_steps, t_min=t_min, trace=trace, n_probes=n_probes)
        res = pf_ode_log_likelihood(denoiser, xb, ac, generator=_probe_generators(seed, index[sl]), **kw)
        lp_u[sl] = res.log_prob
        fn = guided_eps_fn(denoiser, classifier, torch.from_numpy(y[sl]), guidance_scale, ac)
        lp_g[sl] = pf_ode_log_likelihood(fn, xb, ac, generator=_probe_generators(seed, index[sl]), **kw).log_prob
        if progress is not None:
            progress(b + 1, n_batches)
        log.info("theory measure: batch %d/%d", b + 1, n_batches)
    assert res is not None
    for name, lp in (("the target", lp_u), (f"the target guided at scale {guidance_scale:g}", lp_g)):
        if bad := int((~np.isfinite(lp)).sum()):  # (NaN read as an "inconclusive" verdict and was written to JSON)
            raise ValueError(f"the ODE log-likelihood of {name} is not finite at {bad} of {len(lp)} points (NaN or "
                             "inf: the model's output overflowed or diverged there; try fp32 or a smaller guidance "
                             "scale)")

    # 5. estimates
    E = Estimate.from_values
    m_uncond, m_guided = E(lq_cls - lp_u), E(lq_cls - lp_g)
    m_opt_uncond, m_opt_cond = E(lq_cls - lkde_full), E(lq_cls - lkde_cls)
    gain_model, gain_opt = E(lp_u - lp_g), E(lkde_full - lkde_cls)
    opt_minus_guided = E(lp_g - lkde_cls)
    ordering = {
        "conditioning memorizes no less: M(D_c; p_c) - M(D_c; p) <= 0": verdict(gain_model),
        "the conditional empirical optimum memorizes the most: M(D_c; KDE_c) - M(D_c; p_c) <= 0"
        # at the kernel width eps, KDE_c is q_eps itself (M = 0): the claim is then M(D_c; p_c) >= 0, true of any model
        + (" (kernel width = eps: the optimum's M is 0, so this only checks the estimate M >= 0)"
           if bandwidth == float(eps) else ""): verdict(opt_minus_guided),
    }
    sig = sigmas(ac)
    return MeasureResult(
        eps=float(eps), bandwidth=bandwidth, guidance_scale=float(guidance_scale), n_points=len(x),
        n_probes=0 if trace == "exact" else int(n_probes), trace=trace, seed=int(seed), timesteps=ts,
        sigma_min=float(sig[t_min]), dim=pts.shape[1], m_uncond=m_uncond, m_guided=m_guided,
        m_opt_uncond=m_opt_uncond, m_opt_cond=m_opt_cond,
        m_uncond_full=E(lq_full - lp_u), m_opt_full=E(lq_full - lkde_full), gain_model=gain_model,
        gain_opt=gain_opt, opt_minus_guided=opt_minus_guided, ordering=ordering, index=index, labels=y,
        class_sizes=class_sizes, log_p_uncond=lp_u, log_p_guided=lp_g, seconds=round(time.time() - t0, 3),
        n_steps_requested=int(n_steps),
    )


__all__ = ["measure", "MeasureResult", "assign_classes", "verdict"]


DEFAULT_POINTS = 32  # measure_run's training points when none are asked for (fewer where the set is smaller)


def measure_run(run: str | Path, *, n_points: int | None = None, device: str = "cpu", model: Any = None,
                scheduler: Any = None, sample_shape: Any = None, model_id: str | None = None,
                **kwargs) -> tuple[MeasureResult, Path]:
    """:func:`measure` on a run directory: its target (``config.yaml``: model, train, train_resize) and its
    time-dependent classifier (``classifier/``); writes ``RUN/theory/measure.json``. ``model`` (with
    ``scheduler``, ``sample_shape``, ``model_id`` as ``side_extract.audit`` takes them): the target, needed where the
    run's was a model in memory; its fingerprint must be the one the run's synthetic set was sampled from.
    ``n_points``: training points measured (None: 32, or every one of a smaller training set; more than the set holds
    is refused, as :func:`measure` refuses it). ``kwargs`` go to :func:`measure`."""
    from ..data import load_image_set
    from ..models.classifier import load_classifier
    from ..models.target import check_fits
    from ..runs import (atomic_write_json, check_run_directory, check_run_path, read_run_config, read_stages, run_lock,
                        stale_stages)

    run = check_run_directory(run)
    check_run_path(run, "run")  # (RUN/theory linked elsewhere: measure.json was written where it pointed)
    check_options(**kwargs, **({} if n_points is None else {"n_points": n_points}))  # (before the target, its
    # classifier and the training set load: a bad eps was found after them)
    with run_lock(run):  # one snapshot of the run's stages, and no writer between them and the file
        cfg_path = run / "config.yaml"
        rc = read_run_config(run)
        if not rc.get("train"):
            raise ValueError(f"{str(cfg_path)!r} names no training set ('train'); M needs the training set D: give "
                             "the run one through a step's --config naming train: (e.g. side extract --run RUN "
                             "--config c.yaml, which reuses every finished stage)")
        clf_dir = run / "classifier"
        if not clf_dir.is_dir():
            raise ValueError(f"{str(clf_dir)!r} does not exist: train the time-dependent classifier first "
                             "(the classifier stage writes RUN/classifier/)")
        # the synthetic set's model: the one the classifier's training data came from
        stages = read_stages(run)
        clf_stage = stages.get("classifier") or {}
        if clf_stage.get("status") != "complete":  # (an unfinished one was measured from its last saved weights)
            raise ValueError(f"{str(clf_dir)!r} is not a finished classifier stage (status "
                             f"{clf_stage.get('status')!r} in the manifest): run the audit to the classifier first")
        if remade := stale_stages(stages).get("classifier"):  # (its synthetic set re-sampled since, perhaps from
            # another model: the guided model measured was the old one's classifier beside the new model)
            raise ValueError(f"{str(clf_dir)!r} was trained on results the run no longer holds ({', '.join(remade)} "
                             "made again since): train it again (side train-classifier, or side extract) first")
        sampled_from = (stages.get("synthetic") or {}).get("inputs", {}).get("model")
        target = run_target(str(rc.get("model", "demo")), sampled_from, model, scheduler=scheduler,
                            sample_shape=sample_shape, device=device, model_id=model_id,
                            pass_as="measure_run(..., model=) or side theory measure --model DIR")
        denoiser, model = target.denoiser, target.description
        classifier = load_classifier(clf_dir, device, unet=getattr(denoiser, "unet", None))
        data = load_image_set(rc["train"], rc.get("train_resize"))
        check_fits(data.shape, denoiser.sample_shape, f"training images ({rc['train']})")
        # (an n_points past the training set was lowered to it without a word, while measure() refused it)
        n_points = min(DEFAULT_POINTS, len(data)) if n_points is None else n_points
        res = measure(denoiser, classifier, data.to_float(), n_points=n_points, device=device, **kwargs)
        dest = run / "theory" / "measure.json"
        atomic_write_json(dest, res.to_dict() | {"model": str(model), "train": rc["train"],
                                                 "train_fingerprint": data.fingerprint(),
                                                 "classifier_fingerprint": clf_stage["fingerprint"]})
    return res, dest
