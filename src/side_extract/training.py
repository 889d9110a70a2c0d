"""Training the classifiers: an explicit loop (SIDE step 3, and the Cond baseline's clean classifier).

Noise-aware classifier p(y | x_t, t):

1. hold out ``eval_fraction`` of each class's images (seeded; rounded down, so every class keeps at least
   one training image and no output of the classifier is left untrained);
2. each step: a batch (x_0, y), t ~ U{0 .. T-1}, eps ~ N(0, I), x_t = add_noise(scheduler, x_0, eps, t)
   (the target's own noise schedule, so the classifier sees exactly the x_t the sampler produces);
3. cross-entropy, AdamW (paper: lr 1e-4);
4. every ``eval_every`` steps, accuracy on the held-out images at each timestep quartile
   (t in [0, T/4), [T/4, T/2), ...), as guided-diffusion logs it, appended to ``log.json``.

A time-independent classifier (``time_mode="none"``) trains on clean x_0 only. Training resumes from
``checkpoint/`` (model in safetensors, optimizer via ``torch.load(weights_only=True)``) only when the checkpoint
was made from the same images, labels, noise schedule, architecture and settings (its resume key); any other
checkpoint is discarded. Each step draws its batch from a generator seeded by (seed, step), so a resumed run
equals an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from safetensors.torch import save_file

from . import config as cfg
from .data import check_float_images, integer_labels
from .distributed import SINGLE, ProcessGroup
from .models.classifier import MIN_TRAIN_TIMESTEPS, Classifier, ClassifierArch, build_classifier
from .models.target import add_noise
from .runs import array_fingerprint, atomic_directory, atomic_write_json, fingerprint_of, read_checkpoint

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ClassifierTrainResult:
    """What :func:`train_classifier` and :func:`fit_label_classifier` return: the trained ``model``; its ``history``
    (one dict per evaluation, every ``eval_every`` steps: ``step``, ``loss``, and where images were held out
    ``accuracy`` and ``balanced_accuracy`` per timestep quartile ``q0``..``q3``, ``clean`` for a clean classifier);
    the last evaluation's ``final_accuracy`` and ``final_balanced_accuracy`` (empty where none was held out);
    ``majority_rate``, the accuracy of always answering the held-out images' most common label; ``heldout_labels``,
    the labels among them (chance for the mean recall is 1 / heldout_labels); and ``rows_per_process``."""

    model: Classifier
    history: list[dict]
    final_accuracy: dict[str, float]
    rows_per_process: int = 0  # rows of each batch this process trained on (the whole batch for one process)
    # the held-out images' most common label's share: the accuracy of always answering it (None: none held out)
    majority_rate: float | None = None
    # the mean recall per label (``balanced_accuracy``) per timestep quartile, beside ``final_accuracy``
    final_balanced_accuracy: dict[str, float] = dataclasses.field(default_factory=dict)
    # the labels among the held-out images (what the mean recall averages over; always answering one of them
    # scores 1 / heldout_labels): a label with fewer than 1 / eval_fraction images has none held out
    heldout_labels: int = 0


def _gen(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


@torch.no_grad()
def predictions_by_quartile(model: Classifier, x0: torch.Tensor, scheduler: SchedulerMixin | None, seed: int = 0,
                            batch_size: int = 512,
                            denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                            ) -> dict[str, torch.Tensor]:
    """The model's predicted output (argmax) for every image of ``x0``, with t drawn uniformly inside each quartile
    of the training timesteps (keys ``q0``..``q3``) or clean (``clean``, without a scheduler).

    With ``denoiser`` (a clean ``model`` used through the denoised estimate, ``guidance.DenoisedGuidance``), the
    model classifies x0_hat(x_t, t) = (x_t - sqrt(1 - abar_t) eps(x_t, t)) / sqrt(abar_t) of the noised images;
    ``scheduler`` is then the denoiser's.
    """
    model.eval()
    g = torch.Generator().manual_seed(seed)
    out = {}
    quartiles = [None] if scheduler is None else range(4)
    n_t = 0 if scheduler is None else scheduler.config.num_train_timesteps
    for q in quartiles:
        predicted = []
        if q is not None:  # every image's t and noise drawn at once: what an image gets does not depend on the
            # batching (they were drawn batch by batch, t and noise in turn: batch_size changed the accuracies)
            t_all = torch.randint(q * n_t // 4, (q + 1) * n_t // 4, (len(x0),), generator=g)
            noise_all = torch.randn(tuple(x0.shape), generator=g)
        for lo in range(0, len(x0), batch_size):
            xb = x0[lo:lo + batch_size]
            if q is None:
                t = torch.zeros(len(xb), dtype=torch.long, device=xb.device)
                xt = xb
            else:
                t = t_all[lo:lo + batch_size].to(xb.device)
                xt = add_noise(scheduler, xb, noise_all[lo:lo + batch_size].to(xb.device, xb.dtype), t)
                if denoiser is not None:
                    abar = scheduler.alphas_cumprod.to(xb.device)[t].view(-1, 1, 1, 1).to(xb.dtype)
                    xt = (xt - (1 - abar).sqrt() * denoiser(xt, t)) / abar.sqrt()
                    t = torch.zeros_like(t)
            predicted.append(model(xt, t.to(xb.device)).argmax(1))
        out["clean" if q is None else f"q{q}"] = torch.cat(predicted) if predicted else torch.zeros(0, dtype=torch.long)
    return out


def accuracy(predicted: torch.Tensor, y: torch.Tensor) -> float:
    """The share of ``predicted`` equal to ``y`` (0 for no images)."""
    return (predicted == y).sum().item() / max(1, len(y))


def balanced_accuracy(predicted: torch.Tensor, y: torch.Tensor) -> float:
    """The mean over the labels present in ``y`` of each label's recall (the share of its images predicted as it):
    1 / (number of labels) for always answering one label, whatever the labels' shares (0 for no images)."""
    labels = torch.unique(y)
    if not len(labels):
        return 0.0
    return sum(((predicted == y) & (y == c)).sum().item() / (y == c).sum().item() for c in labels) / len(labels)


def class_weights(y: torch.Tensor, num_classes: int, balance: float) -> torch.Tensor:
    """Per-label weights of the cross-entropy (``ClassifierConfig.balance``): label c weighs ``n_c ** -balance``
    for its ``n_c`` rows of ``y``, scaled so that the weights of the rows of ``y`` average 1 (the loss keeps its
    scale); 0 = every row weighs 1 (the paper), 1 = every label weighs the same in total. A label without rows
    gets weight 0 (no row carries it)."""
    counts = torch.bincount(y, minlength=num_classes).to(torch.float64)
    w = torch.where(counts > 0, counts.clamp(min=1) ** -float(balance), torch.zeros_like(counts))
    w = w * len(y) / (w * counts).sum()
    return w.to(torch.float32)


def heldout_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices: ``floor(fraction * n_c)`` of each class's n_c images held out (seeded).

    Rounding down keeps at least one training image in every class, so no classifier output is untrained.
    """
    rng = np.random.default_rng([seed, 0xE7A1])
    train, held = [], []
    for cls in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == cls))
        k = int(np.floor(fraction * len(members)))
        held.append(members[:k])
        train.append(members[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held)).astype(np.int64)


def classifier_settings(c: cfg.ClassifierConfig, *, clean: bool) -> dict[str, Any]:
    """What training classifier ``c`` reads, for its stage's fingerprint and its checkpoints' :func:`resume_key`:
    not the keys it does not read at all (:func:`~side_extract.config.unread_keys`), and for a ``clean`` one
    (Cond's, the teacher's) not the input it guides through either (x_t or x0_hat: it trains the same; the
    extraction's fingerprint names it), nor ``balance`` at 0 (:data:`~side_extract.config.LATER_KEYS`: runs made
    before it keep their classifiers), nor ``data_parallel`` (:data:`~side_extract.config.UNKEYED`: who trains, the
    same classifier up to float rounding)."""
    unread = [*cfg.unread_keys(c, clean=clean), *(["guidance_input"] if clean else [])]
    return cfg.keyed_settings(cfg.at_defaults(c, unread))


def resume_key(arch: ClassifierArch, c: cfg.ClassifierConfig, x0: torch.Tensor, y: torch.Tensor,
               scheduler: SchedulerMixin | None, unet: torch.nn.Module | None = None) -> str:
    """What a checkpoint must have been made from to be continued: the architecture, every setting it reads but the
    step budget (:func:`classifier_settings`: a setting it does not read, changed, threw its checkpoint away), the
    images, the labels, the noise schedule and (UNet-feature classifier) the UNet's weights and config (an act_fn
    or norm_eps changed with the same weights resumed a checkpoint trained on another network)."""
    settings = {k: v for k, v in classifier_settings(c, clean=scheduler is None).items() if k != "steps"}
    sched = None if scheduler is None else {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    backbone = None if unet is None else [array_fingerprint(*(p for _, p in sorted(unet.state_dict().items()))),
                                          {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}]
    return fingerprint_of(cfg.to_dict(arch), settings, array_fingerprint(x0, y), sched, backbone)


def train_classifier(
    arch: ClassifierArch,
    x0: torch.Tensor,
    y: np.ndarray,
    c: cfg.ClassifierConfig,
    *,
    scheduler: SchedulerMixin | None,
    out: str | Path | None = None,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
    group: ProcessGroup = SINGLE,
    unet: torch.nn.Module | None = None,
) -> ClassifierTrainResult:
    """Train a classifier on images ``x0`` (n, C, H, W) in [-1, 1] with labels ``y`` (n,) in 0..K-1.
    ``unet``: the target's UNet, for ``arch.backbone == "unet"`` (only the head is trained).

    ``scheduler`` is the target's noise scheduler (time-dependent classifier) or None (clean classifier).
    With ``out``, checkpoints and ``log.json`` are written there (by the main process) and an interrupted run
    resumes. Under a launch of several processes every process calls this with the same arguments and each
    trains on its rows of every batch (``distributed.py``).
    """
    # (uint8 or 0..255 images, or another size than arch's, trained without a word)
    check_float_images(x0, "x0", (arch.in_channels, arch.image_size, arch.image_size))
    x0 = x0.float()  # (float64 or float16 images met the float32 model's dtype error; bfloat16 numpy's)
    y_t = torch.as_tensor(integer_labels(y), dtype=torch.long)  # (float labels were truncated without a word)
    if len(x0) != len(y_t):
        raise ValueError(f"{len(x0)} images but {len(y_t)} labels")
    if len(x0) < 2:
        raise ValueError(f"need at least 2 labelled images to train a classifier, got {len(x0)}")
    if y_t.min() < 0 or y_t.max() >= arch.num_classes:
        raise ValueError(f"labels must lie in 0..{arch.num_classes - 1}, got {int(y_t.min())}..{int(y_t.max())}")
    if (scheduler is None) != (arch.time_mode == "none"):
        raise ValueError("a time-dependent classifier needs the target's scheduler; a clean one must not get one")
    if scheduler is not None and getattr(scheduler, "alphas_cumprod", None) is None:
        raise ValueError(f"scheduler={scheduler!r} must be the target's diffusers scheduler (noise-aware), or None "
                         "(a clean classifier)")
    n_t = scheduler.config.num_train_timesteps if scheduler is not None else 0
    if scheduler is not None and n_t < MIN_TRAIN_TIMESTEPS:  # (each quartile of t, where the held-out accuracy is
        # measured, needs a timestep: an empty one failed after eval_every steps of training)
        raise ValueError(f"the scheduler has {n_t} training timesteps; a noise-aware classifier needs at least "
                         f"{MIN_TRAIN_TIMESTEPS} (its accuracy is measured per quarter of them)")

    tr, ev = heldout_split(y_t.numpy(), c.eval_fraction if len(x0) >= 20 else 0.0, c.seed)
    n_eval = len(ev)
    x_tr, y_tr, x_ev, y_ev = x0[tr], y_t[tr], x0[ev], y_t[ev]

    with torch.random.fork_rng():
        torch.manual_seed(c.seed)
        model = build_classifier(arch, unet)
    model.to(device)  # before the optimizer loads its state, so the state lands on the model's device
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    start, history = 0, []
    key = resume_key(arch, c, x0, y_t, scheduler, unet if arch.backbone == "unet" else None)
    ckpt = Path(out) / "checkpoint" if out is not None else None
    found = read_checkpoint(ckpt, key, c.steps, "model.safetensors", "classifier", ("history",))  # (read on the host)
    group.barrier()  # every process has read the checkpoint before the main one may discard or replace it
    if found is not None:
        # load_state_dict copies into the model and casts the state to its device
        model.load_state_dict(found.weights)
        opt.load_state_dict(found.optimizer)
        start, history = found.state["step"], found.state["history"]
        # an earlier budget's last step, evaluated because it ended that run: not an entry of this budget's run
        # (extended from 6 to 10 steps at eval_every 4, the log read 4, 6, 8, 10; made at once, 4, 8, 10)
        history = [h for h in history if h["step"] % c.eval_every == 0 or h["step"] == c.steps]
        log.info("classifier: resuming at step %d", start)
    elif ckpt is not None and ckpt.exists() and group.main:
        shutil.rmtree(ckpt)
    n_batch = min(c.batch_size, len(x_tr))
    rows = group.local_rows(n_batch)
    net = group.data_parallel(model, device)
    weights = class_weights(y_tr, arch.num_classes, c.balance).to(device)

    for step in range(start + 1, c.steps + 1):
        model.train()
        g = _gen(c.seed, step)
        idx = torch.randint(0, len(x_tr), (n_batch,), generator=g)
        xb, yb = x_tr[idx], y_tr[idx]
        if scheduler is not None:
            t = torch.randint(0, n_t, (len(xb),), generator=g)
            xb = add_noise(scheduler, xb, torch.randn(xb.shape, generator=g), t)
        else:
            t = torch.zeros(len(xb), dtype=torch.long)
        xb, yb, t = xb[rows], yb[rows], t[rows]  # this process's rows of the global batch
        yb = yb.to(device)
        per_row = F.cross_entropy(net(xb.to(device), t.to(device)), yb, reduction="none") * weights[yb]
        loss = group.local_loss(per_row, n_batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress(step, c.steps)
        if step % c.eval_every == 0 or step == c.steps:
            entry = {"step": step, "loss": round(group.batch_mean(per_row, n_batch), 5)}
            if not np.isfinite(entry["loss"]):  # (every process has the same mean: all stop here; before, NaN weights
                # were saved, the stage completed, and sampling stopped blaming the guidance scale)
                raise ValueError(f"classifier training diverged: the loss is {entry['loss']} at step {step} (lr="
                                 f"{c.lr:g}); lower the lr (nothing was saved past the last checkpoint)")
            if not group.main:
                continue
            if n_eval:
                predicted = predictions_by_quartile(model, x_ev.to(device), scheduler, seed=c.seed)
                entry["accuracy"] = {k: accuracy(p.cpu(), y_ev) for k, p in predicted.items()}
                entry["balanced_accuracy"] = {k: round(balanced_accuracy(p.cpu(), y_ev), 6) for k, p in predicted.items()}
            history.append(entry)
            log.info("classifier step %d: %s", step, entry)
            if ckpt is not None:
                with atomic_directory(ckpt) as tmp:
                    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                              str(tmp / "model.safetensors"))
                    torch.save(opt.state_dict(), tmp / "optimizer.pt")
                    atomic_write_json(tmp / "state.json", {"step": step, "history": history, "resume_key": key})
    model.eval()
    group.check_replicas(model, "classifier")
    if out is not None and group.main:
        atomic_write_json(Path(out) / "log.json", {"history": history, "n_train": len(tr), "n_eval": n_eval,
                                                   "processes": group.world, "rows_per_process": group.local_count(n_batch)})
    final = history[-1].get("accuracy", {}) if history else {}
    final_balanced = history[-1].get("balanced_accuracy", {}) if history else {}
    majority = float(torch.bincount(y_ev).max()) / n_eval if n_eval else None
    return ClassifierTrainResult(model, history, final, group.local_count(n_batch), majority, final_balanced,
                                 len(torch.unique(y_ev)))


def fit_label_classifier(
    x0: torch.Tensor,
    labels: np.ndarray,
    c: cfg.ClassifierConfig,
    *,
    scheduler: SchedulerMixin | None,
    out: str | Path | None = None,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
    name: str = "classifier",
    group: ProcessGroup = SINGLE,
    unet: torch.nn.Module | None = None,
) -> ClassifierTrainResult:
    """A classifier of any label values (cluster ids, classes; -1 = unlabelled, left out), as the pipeline
    trains them: the label values become outputs 0..K-1 in sorted order (``model.arch.classes`` maps them
    back), the architecture follows ``c`` and the images' shape; noise-aware with the target's ``scheduler``,
    time-independent (clean) with None.

    ``x0``: (n, C, H, W) float in [-1, 1]; ``labels``: (n,) int.
    """
    cfg.check_section(c, cfg.ClassifierConfig, "c")  # (a dict, or scheduler="ddpm", was an AttributeError)
    check_float_images(x0, f"{name} x0")  # (the scheduler is checked by train_classifier, before it trains)
    x0 = x0.float()
    labels = integer_labels(labels, f"{name}: labels")
    if labels.shape != (len(x0),):  # ((n, 1) labels passed, and their mask indexed the images' channels)
        raise ValueError(f"{name}: labels must be one per image of x0 ({len(x0)},), got shape {labels.shape}")
    keep = labels >= 0
    classes = np.unique(labels[keep])
    if len(classes) < 2:
        raise ValueError(f"{name}: {len(classes)} labelled class(es) left; a classifier needs at least 2 "
                         "(lower surrogate.tau or use fewer clusters)")
    _, C, H, _ = x0.shape
    arch = ClassifierArch(num_classes=len(classes), in_channels=C, image_size=H, depth=c.depth, width=c.width,
                          time_mode="none" if scheduler is None else c.time_mode, time_embed_dim=c.time_embed_dim,
                          classes=tuple(int(v) for v in classes), time_blocks=c.time_blocks,
                          backbone=c.backbone if scheduler is not None else "resnet")
    return train_classifier(arch, x0[torch.from_numpy(keep)], np.searchsorted(classes, labels[keep]), c,
                            scheduler=scheduler, out=out, device=device, progress=progress, group=group, unet=unet)
