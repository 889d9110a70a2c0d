"""side-lora (SIDE's fine-tuning form): the conditional copy of the target computes the target's eps before
training; adapters disabled = the target exactly; label dropout; save/load of peft adapters; resume; the
method in a run with its copy guard."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from side_extract import config as cfg
from side_extract.finetune import ConditionalDenoiser, conditional_unet, finetune, load_finetuned
from side_extract.models.target import load_target
from side_extract.pipeline import run_audit

from test_pipeline import tiny_rc

TINY = cfg.LoraConfig(rank=4, steps=6, batch_size=8, checkpoint_every=3, lr=1e-2)


def _data(n=24, k=3):
    g = torch.Generator().manual_seed(0)
    return torch.rand((n, 1, 8, 8), generator=g) * 2 - 1, np.arange(n) % k


def test_the_conditional_copy_computes_the_targets_eps(tiny_model_dir):
    target = load_target(tiny_model_dir)
    cond = conditional_unet(target.unet, 3)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor(400)
    with torch.no_grad():
        ref = target(x, t)
        for y in (0, 2, 3):  # 3 = the null label
            torch.testing.assert_close(cond(x, t, class_labels=torch.full((4,), y)).sample, ref, rtol=0, atol=0)


def test_adapters_disabled_are_the_target_exactly(tiny_model_dir, tmp_path):
    target = load_target(tiny_model_dir)
    x0, y = _data()
    finetune(target, x0, y, TINY, tmp_path / "lora")
    cd = load_finetuned(target, tmp_path / "lora")
    x, t = torch.randn(4, 1, 8, 8), torch.tensor(300)
    yy = torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        tuned = cd(x, t, yy)
        assert not torch.allclose(tuned, target(x, t))  # training changed it
        with cd.model.disable_adapter():  # peft: the LoRA layers and the saved class embedding off
            off = cd.model(x, t, class_labels=yy).sample
        # the base weights are untouched: off = the target exactly. peft freezes the base weights, and torch takes
        # another (float-rounding) path for weights that require grad, so the target is compared frozen too
        target.unet.requires_grad_(False)
        torch.testing.assert_close(off, target(x, t), rtol=0, atol=0)
    files = sorted(p.name for p in (tmp_path / "lora" / "adapter").iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"] or \
        {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
    # safetensors only: without them peft loaded a pickled adapter_model.bin (or named a "repo id" where none was)
    (tmp_path / "lora" / "adapter" / "adapter_model.safetensors").rename(tmp_path / "lora" / "adapter" / "gone")
    with pytest.raises(ValueError, match=r"adapter' holds no adapter_model.safetensors"):
        load_finetuned(target, tmp_path / "lora")


def test_save_load_round_trip_and_resume_equals_uninterrupted(tiny_model_dir, tmp_path):
    target = load_target(tiny_model_dir)
    x0, y = _data()
    full = finetune(target, x0, y, TINY, tmp_path / "a")
    finetune(target, x0, y, dataclasses.replace(TINY, steps=3), tmp_path / "b")  # interrupted after 3 steps
    resumed = finetune(target, x0, y, TINY, tmp_path / "b")
    assert resumed.resumed_from == 3 and resumed.losses == full.losses
    a, b = load_finetuned(target, tmp_path / "a"), load_finetuned(target, tmp_path / "b")
    x, t, yy = torch.randn(3, 1, 8, 8), torch.tensor(500), torch.tensor([2, 1, 0])
    with torch.no_grad():
        torch.testing.assert_close(a(x, t, yy), b(x, t, yy), rtol=0, atol=0)
    # other data: the checkpoint is not resumed
    other = finetune(target, x0.flip(0), y, TINY, tmp_path / "b")
    assert other.resumed_from == 0
    # a damaged checkpoint file is discarded, not a bare safetensors error on every later run
    finetune(target, x0, y, dataclasses.replace(TINY, steps=3), tmp_path / "c")
    f = tmp_path / "c" / "work" / "checkpoint" / "trainable.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    again = finetune(target, x0, y, TINY, tmp_path / "c")
    assert again.resumed_from == 0 and again.losses == full.losses


def _with_dropout(tiny_model_dir, out, p=0.3):
    """The tiny target with diffusers' ``dropout`` in its resnets (the demo's targets have none)."""
    from diffusers import UNet2DModel

    from side_extract.models.target import save_target

    target = load_target(tiny_model_dir)
    config = {k: v for k, v in dict(target.unet.config).items() if not k.startswith("_")}
    unet = UNet2DModel(**{**config, "dropout": p})
    unet.load_state_dict(target.unet.state_dict())
    save_target(unet, target.scheduler, out)
    return load_target(out)


def test_a_target_with_dropout_resumes_and_reseeds_like_one_without(tiny_model_dir, tmp_path):
    """A target with dropout drew its masks from torch's global generator, which finetune never seeded: a resumed
    fine-tune differed from an uninterrupted one, and the result depended on what the process drew before."""
    target = _with_dropout(tiny_model_dir, tmp_path / "target")
    x0, y = _data()
    torch.manual_seed(1)
    full = finetune(target, x0, y, TINY, tmp_path / "a")
    finetune(target, x0, y, dataclasses.replace(TINY, steps=3), tmp_path / "b")
    torch.manual_seed(2)  # another state of the global generator before the resumed part
    resumed = finetune(target, x0, y, TINY, tmp_path / "b")
    assert resumed.resumed_from == 3 and resumed.losses == full.losses
    torch.manual_seed(3)
    again = finetune(target, x0, y, TINY, tmp_path / "c")
    assert again.losses == full.losses
    x, t, yy = torch.randn(3, 1, 8, 8), torch.tensor(500), torch.tensor([2, 1, 0])
    with torch.no_grad():
        torch.testing.assert_close(load_finetuned(target, tmp_path / "a")(x, t, yy),
                                   load_finetuned(target, tmp_path / "b")(x, t, yy), rtol=0, atol=0)


def test_a_checkpoint_of_another_target_is_not_continued(tiny_model_dir, tmp_path):
    """finetune called without target_fingerprint (as the Python API may) keyed its checkpoint by the data and
    settings only: a fine-tune of target B in a folder holding target A's continued A's adapters on B."""
    a = load_target(tiny_model_dir)
    b = _with_dropout(tiny_model_dir, tmp_path / "b-target", p=0.0)
    with torch.no_grad():  # B: other weights (the same architecture and scheduler)
        for w in b.unet.parameters():
            w.mul_(0.5)
    x0, y = _data()
    finetune(a, x0, y, dataclasses.replace(TINY, steps=3), tmp_path / "lora")
    on_b = finetune(b, x0, y, TINY, tmp_path / "lora")
    fresh = finetune(b, x0, y, TINY, tmp_path / "fresh")
    assert on_b.resumed_from == 0 and on_b.losses == fresh.losses
    again = finetune(b, x0, y, dataclasses.replace(TINY, steps=8), tmp_path / "fresh")  # B's own is continued
    assert again.resumed_from == 6


def test_class_lr_trains_the_labels_without_changing_the_default(tiny_model_dir, tmp_path):
    """lora.class_lr: the class embedding (the only way the labels reach the model) at its own learning rate. At
    lr 1e-4 its entries move by about 1e-4 a step, so the labels change eps by almost nothing; unset, it is lr and
    the fine-tune, its stage key and its checkpoint key are an earlier release's."""
    from side_extract.finetune import lora_settings

    target = load_target(tiny_model_dir)
    x0, y = _data()
    slow = dataclasses.replace(TINY, lr=1e-4)
    assert "class_lr" not in lora_settings(slow)  # (runs made before it keep their fine-tunes)
    assert lora_settings(dataclasses.replace(slow, class_lr=1e-4)) != lora_settings(slow)
    same = finetune(target, x0, y, dataclasses.replace(slow, class_lr=1e-4), tmp_path / "same")
    assert same.losses == finetune(target, x0, y, slow, tmp_path / "default").losses

    def label_effect(directory):
        cd = load_finetuned(target, directory)
        x, t = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor(300)
        with torch.no_grad():
            u, c = cd(x, t), cd(x, t, torch.tensor([0, 1, 2, 0, 1, 2]))
        return float((c - u).norm() / u.norm()), cd.model.base_model.model.class_embedding.modules_to_save

    effect, _ = label_effect(tmp_path / "default")
    finetune(target, x0, y, dataclasses.replace(slow, class_lr=1e-1), tmp_path / "fast")
    fast, emb = label_effect(tmp_path / "fast")
    rows = next(iter(emb.values())).weight.detach()
    assert rows[:3].abs().max() > 0.3  # six steps of Adam at 0.1 (the null row: only by label dropout)
    assert fast > 20 * effect
    with pytest.raises(ValueError, match=r"class_lr=0.0 must be > 0"):
        cfg.LoraConfig(class_lr=0.0)


def test_a_shorter_rerun_does_not_return_the_longer_trained_model(tiny_model_dir, tmp_path):
    """A checkpoint past the requested steps cannot be wound back: a 3-step fine-tune in a folder that holds a
    6-step one is the 3-step model (before: the 6-step weights, labelled steps 3)."""
    target = load_target(tiny_model_dir)
    x0, y = _data()
    short = finetune(target, x0, y, dataclasses.replace(TINY, steps=3), tmp_path / "a")
    finetune(target, x0, y, TINY, tmp_path / "b")
    again = finetune(target, x0, y, dataclasses.replace(TINY, steps=3), tmp_path / "b")
    assert again.resumed_from == 0 and again.losses == short.losses
    a, b = load_finetuned(target, tmp_path / "a"), load_finetuned(target, tmp_path / "b")
    x, t, yy = torch.randn(3, 1, 8, 8), torch.tensor(500), torch.tensor([2, 1, 0])
    with torch.no_grad():
        torch.testing.assert_close(a(x, t, yy), b(x, t, yy), rtol=0, atol=0)


def test_load_reads_the_form_that_classes_json_names(tiny_model_dir, tmp_path):
    """A LoRA fine-tune written where a full one was: the folder holds the adapters only, and loading gives the
    LoRA model (before: the stale full unet/ was loaded first)."""
    from peft import PeftModel

    target = load_target(tiny_model_dir)
    x0, y = _data()
    finetune(target, x0, y, dataclasses.replace(TINY, rank="full", steps=2), tmp_path / "f")
    finetune(target, x0, y, dataclasses.replace(TINY, steps=2), tmp_path / "f")
    assert not (tmp_path / "f" / "unet").exists() and (tmp_path / "f" / "adapter").is_dir()
    assert isinstance(load_finetuned(target, tmp_path / "f").model, PeftModel)
    import shutil
    shutil.rmtree(tmp_path / "f" / "adapter")
    with pytest.raises(ValueError, match="adapter/"):
        load_finetuned(target, tmp_path / "f")


def test_guidance_needs_a_trained_null_label_and_takes_per_sample_t(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="label_dropout > 0"):
        cfg.LoraConfig(guidance_scale=2.0, label_dropout=0.0)
    cfg.LoraConfig(guidance_scale=1.0, label_dropout=0.0)  # plain conditional sampling needs no null label
    target = load_target(tiny_model_dir)
    x0, y = _data()
    finetune(target, x0, y, dataclasses.replace(TINY, label_dropout=0.0, steps=2), tmp_path / "n")
    with pytest.raises(ValueError, match="label_dropout=0"):
        load_finetuned(target, tmp_path / "n", guidance_scale=3.0)
    finetune(target, x0, y, dataclasses.replace(TINY, label_dropout=0.5, steps=2), tmp_path / "d")
    w2 = load_finetuned(target, tmp_path / "d", guidance_scale=2.0)
    x, yy = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])
    ts = torch.tensor([100, 400, 900])
    with torch.no_grad():  # a per-sample t (the Denoiser protocol allows shape (B,)) = each row at its own t
        rows = torch.cat([w2(x[i:i + 1], ts[i], yy[i:i + 1]) for i in range(3)])
        torch.testing.assert_close(w2(x, ts, yy), rows, atol=1e-5, rtol=0)


def test_label_dropout_and_guidance_scale(tiny_model_dir, tmp_path):
    """label_dropout = 0.5: about half the training labels are the null label (seen by the model: the null
    row of the class embedding is trained); w = 1 is conditional, w = 0 the null (unconditional) eps."""
    target = load_target(tiny_model_dir)
    x0, y = _data()
    finetune(target, x0, y, dataclasses.replace(TINY, label_dropout=0.5), tmp_path / "d")
    cd = load_finetuned(target, tmp_path / "d")
    emb = dict(cd.model.named_parameters())
    null_row = [v for k, v in emb.items() if "class_embedding" in k and "modules_to_save" in k][0][3]
    assert null_row.abs().sum() > 0
    finetune(target, x0, y, dataclasses.replace(TINY, label_dropout=0.0), tmp_path / "n")
    never = load_finetuned(target, tmp_path / "n")
    row = [v for k, v in dict(never.model.named_parameters()).items() if "class_embedding" in k and "modules_to_save" in k][0][3]
    assert row.abs().sum() == 0  # never trained with the null label
    x, t, yy = torch.randn(2, 1, 8, 8), torch.tensor(700), torch.tensor([0, 1])
    with torch.no_grad():
        w0 = load_finetuned(target, tmp_path / "d", guidance_scale=0.0)
        torch.testing.assert_close(w0(x, t, yy), cd(x, t), atol=1e-5, rtol=0)  # w = 0: the null eps
        w2 = load_finetuned(target, tmp_path / "d", guidance_scale=2.0)
        torch.testing.assert_close(w2(x, t, yy), 2 * cd(x, t, yy) - cd(x, t), atol=1e-5, rtol=0)


def test_side_lora_in_a_run_with_its_copy_guard(tiny_model_dir, tmp_path, one_thread):
    rc = tiny_rc(tiny_model_dir, methods=("side-lora", "uncond"))
    rc = dataclasses.replace(rc, lora=TINY)
    res = run_audit(tmp_path / "run", rc)
    assert set(res.metrics) == {"side-lora", "uncond"}
    m = res.metrics["side-lora"]
    assert 0.0 <= m["copy_guard"]["nearer_synthetic_fraction"] <= 1.0 and m["copy_guard"]["n_synthetic"] == 40
    labels = res.extractions["side-lora"].labels
    classes = json.loads((tmp_path / "run" / "lora" / "classes.json").read_text())["classes"]
    assert set(labels) <= set(classes)
    stamps = {k: v["started_unix"] for k, v in json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"].items()}
    # w only changes sampling: the fine-tuned model is reused, and the new w is used (the images change)
    w2 = run_audit(tmp_path / "run", dataclasses.replace(rc, lora=dataclasses.replace(TINY, guidance_scale=2.0)))
    after = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]
    assert after["lora"]["started_unix"] == stamps["lora"]
    assert after["extraction/side-lora"]["started_unix"] != stamps["extraction/side-lora"]
    assert not np.array_equal(w2.extractions["side-lora"].images, res.extractions["side-lora"].images)
    # how often it checkpoints changes nothing it trains: the stage is kept (it used to fine-tune again)
    run_audit(tmp_path / "run", dataclasses.replace(rc, lora=dataclasses.replace(TINY, checkpoint_every=2)))
    again = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]
    assert again["lora"] == after["lora"]


def test_a_finished_fine_tune_whose_files_were_damaged_is_fine_tuned_again(tiny_model_dir, tmp_path, one_thread):
    """A finished lora stage was skipped whenever classes.json existed: with its adapter weights cut short or its
    adapter/ folder gone since (a disk fault, a copy interrupted), the run then failed when it loaded the model.
    It is fine-tuned again; a whole one is still kept."""
    import shutil

    rc = dataclasses.replace(tiny_rc(tiny_model_dir, methods=("side-lora",)), lora=TINY)
    run = tmp_path / "run"
    first = run_audit(run, rc, until="extraction").extractions["side-lora"].images
    weights = run / "lora" / "adapter" / "adapter_model.safetensors"
    whole = weights.read_bytes()
    started = json.loads((run / "manifest.json").read_text())["stages"]["lora"]["started_unix"]
    run_audit(run, rc, until="extraction")
    assert json.loads((run / "manifest.json").read_text())["stages"]["lora"]["started_unix"] == started  # kept
    for damage in (lambda: weights.write_bytes(whole[:-100]), lambda: shutil.rmtree(run / "lora" / "adapter")):
        damage()
        shutil.rmtree(run / "extraction")  # (so that the extraction loads the fine-tuned model again)
        again = run_audit(run, rc, until="extraction").extractions["side-lora"].images
        assert weights.read_bytes() == whole  # the same fine-tune: seeded, resumed from its last checkpoint
        np.testing.assert_array_equal(again, first)


def test_saved_whole_reads_the_form_classes_json_names(tiny_model_dir, tmp_path):
    """saved_whole (the lora stage's skip check) looks at the weights of the form classes.json names: the full
    fine-tune's unet/ file, not a leftover adapter/."""
    from side_extract.finetune import saved_whole

    target = load_target(tiny_model_dir)
    x0, y = _data()
    assert not saved_whole(tmp_path / "f")
    finetune(target, x0, y, dataclasses.replace(TINY, rank="full", steps=2), tmp_path / "f")
    assert saved_whole(tmp_path / "f")
    weights = tmp_path / "f" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert not saved_whole(tmp_path / "f")
    (tmp_path / "f" / "classes.json").write_text("{")
    assert not saved_whole(tmp_path / "f")


def test_full_fine_tuning_and_checks(tiny_model_dir, tmp_path):
    target = load_target(tiny_model_dir)
    x0, y = _data()
    finetune(target, x0, y, dataclasses.replace(TINY, rank="full", steps=2), tmp_path / "f")
    assert (tmp_path / "f" / "unet" / "config.json").is_file()
    cd = load_finetuned(target, tmp_path / "f")
    assert isinstance(cd, ConditionalDenoiser) and cd.n_classes == 3
    with pytest.raises(ValueError, match="rank=0"):
        cfg.LoraConfig(rank=0)
    assert cfg.from_dict(cfg.LoraConfig, {"rank": "full"}).rank == "full"
    # at rank full LoRA's keys train nothing: the stage's settings leave them at their defaults, and not at a rank
    from side_extract.finetune import lora_settings

    full = cfg.LoraConfig(rank="full")
    assert lora_settings(dataclasses.replace(full, alpha=8.0, target_modules=("conv1",))) == lora_settings(full)
    assert lora_settings(cfg.LoraConfig(rank=4, alpha=8.0)) != lora_settings(cfg.LoraConfig(rank=4))
    with pytest.raises(ValueError, match="at least 2"):
        finetune(target, x0, np.zeros(len(x0), int), TINY, tmp_path / "x")


def test_copy_guard_in_summary_and_report(tiny_model_dir, tmp_path, one_thread):
    from side_extract.report import write_report

    rc = dataclasses.replace(tiny_rc(tiny_model_dir, methods=("side-lora", "uncond")), lora=TINY)
    run_audit(tmp_path / "run", rc)
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["methods"]["side-lora"]["copy_guard"]["n_synthetic"] == 40
    assert 0 <= s["methods"]["uncond"]["copy_guard"]["nearer_synthetic_fraction"] <= 1  # the reference share
    assert "copy guard" in write_report(tmp_path / "run").read_text()


def test_side_lora_takes_the_adaptive_allocation(tiny_model_dir, tmp_path, one_thread):
    """extract.allocation adaptive applies to side-lora's clusters as to the classifier's (it drew them uniformly,
    with a warning): one shard per round, each later round's targets the allocation's draw from the earlier rounds
    (computed here from ``allocation.adaptive_targets`` directly), not the uniform draw; the fingerprint names the
    allocation, and the stage is made again bit for bit after its last round is lost."""
    from side_extract.allocation import adaptive_targets
    from side_extract.data import load_shards
    from side_extract.extraction import draw_targets
    from side_extract.pipeline import method_guidance

    rc = dataclasses.replace(tiny_rc(tiny_model_dir, methods=("side-lora",), n=12, allocation="adaptive", rounds=3),
                             lora=TINY)
    run = tmp_path / "run"
    first = run_audit(run, rc, until="extraction").extractions["side-lora"]
    stage = run / "extraction" / "side-lora"
    assert len(list(stage.glob("shard-*.npz"))) == 3  # one shard per round: each round waits for the earlier ones
    den, _ = method_guidance(run, rc, "side-lora", load_target(tiny_model_dir))
    outputs, classes, c = den.target_outputs, den.classes, rc.extract
    slot = {int(classes[o]): k for k, o in enumerate(outputs)}
    for r in (1, 2):
        begin = 4 * r
        prev = np.array([slot[int(v)] for v in first.labels[:begin]])
        want = classes[outputs[adaptive_targets(c.seed, r, 4, len(outputs), first.images[:begin], prev,
                                                c.dedup_threshold)]]
        np.testing.assert_array_equal(first.labels[begin:begin + 4], want)
    uniform_labels = classes[outputs[draw_targets(c.seed, np.arange(12), len(outputs))]]
    np.testing.assert_array_equal(first.labels[:4], uniform_labels[:4])  # the first round: no earlier images
    assert not np.array_equal(first.labels[4:], uniform_labels[4:])
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    max(stage.glob("shard-*.npz")).unlink()
    again = run_audit(run, rc, until="extraction").extractions["side-lora"]
    np.testing.assert_array_equal(again.images, first.images)
    np.testing.assert_array_equal(again.labels, first.labels)
    uniform = dataclasses.replace(rc, extract=dataclasses.replace(rc.extract, allocation="uniform"))
    run_audit(run, uniform, until="extraction")
    after = json.loads((run / "manifest.json").read_text())["stages"]
    assert after["extraction/side-lora"]["fingerprint"] != stages["extraction/side-lora"]["fingerprint"]
    assert after["lora"]["fingerprint"] == stages["lora"]["fingerprint"]  # sampling only: the fine-tune is kept
    np.testing.assert_array_equal(load_shards(stage).labels, uniform_labels)


def test_a_diverged_fine_tune_is_refused_not_saved_and_its_stage_not_completed(tiny_model_dir, tmp_path, one_thread):
    """A fine-tune whose loss went NaN (lora.lr 100) was saved, its stage completed with final_loss NaN, and every
    later run reused it to fail at sampling ("check the weights and the scheduler"). It now stops at the first
    non-finite loss naming lora.lr, and writes no adapters."""
    target = load_target(tiny_model_dir)
    x0, y = _data()
    with pytest.raises(ValueError, match=r"side-lora diverged: the loss is nan at step \d+ \(lora.lr=1e\+06\)"):
        finetune(target, x0, y, dataclasses.replace(TINY, steps=8, lr=1e6), tmp_path / "lora")
    assert not (tmp_path / "lora" / "adapter").exists() and not (tmp_path / "lora" / "classes.json").exists()
    rc = tiny_rc(tiny_model_dir, methods=("side-lora",), n=4)
    rc = dataclasses.replace(rc, lora=cfg.LoraConfig(rank=4, steps=5, batch_size=8, lr=1e6))
    for _ in range(2):  # the rerun fine-tunes again (the same error), not a sampling failure of a NaN model
        with pytest.raises(ValueError, match="side-lora diverged"):
            run_audit(tmp_path / "run", rc, until="extraction")
        lora = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["lora"]
        assert lora["status"] != "complete", lora


def test_the_fine_tunes_inputs_are_checked_before_training(tiny_model_dir, tmp_path):
    """Images of another size trained and were saved, as did NaN images and 0-255 pixels; float labels were
    truncated into classes (0.2 and 0.7 both class 0); labels of another length or a float64 set met torch's
    errors. Each is refused now, by name, before anything is written."""
    target = load_target(tiny_model_dir)
    x0, y = _data()
    one = dataclasses.replace(TINY, steps=1)
    cases = [((x0[:, :, :4, :4], y), r"x0: images are \(1, 4, 4\) \(C, H, W\) but the model's are \(1, 8, 8\)"),
             ((torch.full_like(x0, float("nan")), y), "x0: images hold NaN"),
             (((x0 + 1) * 127.5, y), r"x0: images must lie in \[-1, 1\]"),
             ((x0, y + 0.5), "labels must hold integers, got float64"),
             ((x0, y[:20]), r"labels must be one per image of x0 \(24,\), got shape \(20,\)"),
             ((x0.numpy(), y), "x0: images must be a float torch tensor")]
    for (x, labels), match in cases:
        with pytest.raises(ValueError, match=match):
            finetune(target, x, labels, one, tmp_path / "lora")
        assert not (tmp_path / "lora").exists()
    # a float64 set is the same images: trained as float32 (as every other form of the images)
    assert finetune(target, x0.double(), y, one, tmp_path / "f64").losses == finetune(target, x0, y, one,
                                                                                    tmp_path / "f32").losses


@pytest.mark.parametrize("rank", [4, "full"])
def test_a_fine_tune_of_another_target_is_refused(tiny_model_dir, tmp_path, rank):
    """load_finetuned put one target's adapters on another's base weights of the same shapes without a word (a
    model nobody trained), and took a full fine-tune for any target (it ignores the base weights); another number
    of classes in classes.json was torch's list of size mismatches."""
    from conftest import tiny_scheduler, tiny_unet

    from side_extract.models.target import save_target
    target = load_target(tiny_model_dir)
    save_target(tiny_unet(seed=1), tiny_scheduler(), tmp_path / "other")
    x0, y = _data()
    c = dataclasses.replace(TINY, rank=rank, steps=2, checkpoint_every=2)
    finetune(target, x0, y, c, tmp_path / "f")
    load_finetuned(target, tmp_path / "f")
    with pytest.raises(ValueError, match=r"/f' was fine-tuned from another target"):
        load_finetuned(load_target(tmp_path / "other"), tmp_path / "f")
    if rank == "full":
        return
    meta = json.loads((tmp_path / "f" / "classes.json").read_text())
    (tmp_path / "f" / "classes.json").write_text(json.dumps({**meta, "classes": [0, 1, 2, 3]}))
    with pytest.raises(ValueError, match=r"does not fit the target with the 4 classes and null label that classes."
                                         r"json names: size mismatch for .*class_embedding"):
        load_finetuned(target, tmp_path / "f")


def test_finetune_faults_of_a_review(tiny_model_dir, tmp_path):
    """A target whose unet/config.json holds a key UNet2DModel takes no more (diffusers loads it with a warning) failed
    the fine-tune with a TypeError, after the run's earlier stages; a full fine-tune whose class embedding has other
    rows than classes.json names loaded, its null label reading a class's eps; an out that is a file was found at
    the first checkpoint; loading advanced the caller's random state."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "unet" / "config.json").read_text())
    (model / "unet" / "config.json").write_text(json.dumps({**config, "image_size": 8}))
    target = load_target(model)
    x0, y = _data()
    short = dataclasses.replace(TINY, steps=2)
    finetune(target, x0, y, short, tmp_path / "lora")
    torch.manual_seed(5)
    drawn = torch.rand(3)
    torch.manual_seed(5)
    assert load_finetuned(target, tmp_path / "lora").classes.tolist() == [0, 1, 2]
    assert torch.equal(torch.rand(3), drawn)  # (loading drew the model's throwaway weights from the caller's RNG)

    target = load_target(tiny_model_dir)
    full = tmp_path / "full"
    finetune(target, x0, y, dataclasses.replace(short, rank="full"), full)
    meta = json.loads((full / "classes.json").read_text())
    (full / "classes.json").write_text(json.dumps({**meta, "classes": [0, 1]}))
    with pytest.raises(ValueError, match="class embedding has 4 rows, not 3"):
        load_finetuned(target, full)

    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="out .*file' is a file"):
        finetune(target, x0, y, dataclasses.replace(short, checkpoint_every=1), tmp_path / "file")
