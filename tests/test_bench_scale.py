"""``side bench scale``: the real-size architectures, the cost model's arithmetic, the markdown."""
from __future__ import annotations

import pytest

from side_extract.bench.scale import Audit, ScaleBenchConfig, build_architecture, cost_model, throughput
from side_extract.bench.tables import render_scale_markdown


def test_cifar10_architecture_has_the_published_size():
    """google/ddpm-cifar10-32 (Ho et al.'s CIFAR-10 DDPM) has 35.7M parameters."""
    unet = build_architecture("cifar10-32")
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 1) == 35.7
    assert unet.config.sample_size == 32 and tuple(unet.config.block_out_channels) == (128, 256, 256, 256)


def test_cost_model_by_hand():
    row = {"model": "m", "batch": 4, "side": 2, "denoiser_s_per_image": 0.5, "guided_step_s_per_image": 1.0,
           "classifier_train_s_per_image": 0.25, "denoiser_flops_per_image": 1e9, "classifier_flops_per_image": 1e8}
    small = dict(row, batch=1, denoiser_s_per_image=99.0)  # the largest batch's figures are used
    search = [{"dims": 12, "n_generated": 10, "n_train": 100, "seconds": 2.0}]  # 2e-3 s per pair
    a = Audit(n_synthetic=10, n_generated=20, guided_methods=2, unguided_methods=1, steps=5, classifier_steps=3,
              classifier_batch=4, classifiers=2, n_train=1000)
    rows = {r["stage"]: r for r in cost_model([small, row], search, a, gpu_tflops=2.0)}
    assert rows["synthetic set"]["cpu_s"] == 10 * 5 * 0.5
    assert rows["extraction (guided)"]["cpu_s"] == 20 * 2 * 5 * 1.0
    assert rows["extraction (unguided)"]["cpu_s"] == 20 * 1 * 5 * 0.5
    assert rows["classifier training"]["cpu_s"] == 2 * 3 * 4 * 0.25
    assert rows["search"]["cpu_s"] == pytest.approx(20 * 3 * 1000 * 2e-3)
    # FLOPs: denoiser calls, plus the classifier's forward and its gradient with respect to the input (2x forward;
    # no weight gradients: 3x was counted) per guided call; training's forward and full backward is 3x
    assert rows["extraction (guided)"]["flops"] == 20 * 2 * 5 * (1e9 + 2e8)
    assert rows["classifier training"]["flops"] == 2 * 3 * 4 * 3e8
    assert rows["search"]["flops"] == 20 * 3 * 1000 * 2 * 12
    assert rows["synthetic set"]["gpu1_s"] == 10 * 5 * 1e9 / 2e12
    assert rows["synthetic set"]["gpu8_s"] == rows["synthetic set"]["gpu1_s"] / 8
    # the search's rate from the training-set size nearest the audit's (the largest of all had set a 50,000-image
    # audit's rate from 200,000 images: 10 % low), its largest N_G there; the row it came from is recorded
    search += [{"dims": 12, "n_generated": 40, "n_train": 5000, "seconds": 4.0},  # 2e-5 s per pair
               {"dims": 12, "n_generated": 20, "n_train": 900, "seconds": 0.9},  # 5e-5: nearest 1,000, smaller N_G
               {"dims": 12, "n_generated": 30, "n_train": 1100, "seconds": 3.3}]  # 1e-4: nearest, largest N_G
    rows = {r["stage"]: r for r in cost_model([row], search, a, gpu_tflops=2.0)}
    assert rows["search"]["cpu_s"] == pytest.approx(20 * 3 * 1000 * 1e-4)
    assert rows["search"]["rate_from"] == {"n_generated": 30, "n_train": 1100}


@pytest.mark.slow  # 130 s on this 2-core machine (bfloat16 convolutions on a CPU): the tests below split it
def test_throughput_on_cpu_at_full_size():
    r = throughput("cifar10-32", "cpu", batches=(1,), steps=2)
    assert [x["precision"] for x in r["rows"]] == ["fp32", "bf16"]
    assert 0 < r["bf16_rel_mean_diff"] < 0.05  # bf16 keeps 8 bits of mantissa: about 1 % on eps
    assert r["flops_per_call"] == pytest.approx(12.1e9, rel=0.01)  # 2 x the multiply-adds of one call


def test_cifar10_architecture_costs_the_published_flops():
    """Ho et al.'s CIFAR-10 DDPM: about 6 G multiply-adds per 32x32 call in its convolutions and linear layers
    (12,107,907,072 FLOPs, what the counter counted before), and the QK^T and AV products of its attention, 2 x 2 x
    L^2 x 256 FLOPs per layer: five at 16x16 (L = 256) and the middle block's at 4x4 (L = 16). The counter saw none
    of the attention's in the fused CPU kernel."""
    import torch

    from side_extract.bench.scale import flops_per_image

    unet = build_architecture("cifar10-32")
    with torch.no_grad():
        flops = flops_per_image(lambda: unet(torch.zeros((1, 3, 32, 32)), torch.tensor(600)))
    assert sum(type(m).__name__ == "Attention" for m in unet.modules()) == 6
    assert flops == 12_107_907_072 + 5 * 2 * 2 * 256**2 * 256 + 2 * 2 * 16**2 * 256


def test_throughput_and_markdown_on_cpu(monkeypatch):
    """throughput's rows and bf16 parity on a small UNet of the same blocks (the full size: the slow test above)."""
    from side_extract.bench import scale

    monkeypatch.setitem(scale.ARCHITECTURES, "small-16", dict(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8))
    r = throughput("small-16", "cpu", batches=(1,), steps=2)
    assert [x["precision"] for x in r["rows"]] == ["fp32", "bf16"]
    assert 0 < r["bf16_rel_mean_diff"] < 0.05  # bf16 keeps 8 bits of mantissa: about 1 % on eps
    assert r["flops_per_call"] > 0 and all(x["calls_images_per_s"] > 0 for x in r["rows"])
    data = _one_model_without_search()
    md = render_scale_markdown(data)
    assert "a projection, not a measurement" in md and "| m | search |" in md


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="models=.*cifar10-32"):
        ScaleBenchConfig(models=("imagenet",))
    with pytest.raises(ValueError, match="gpu_tflops=0"):
        ScaleBenchConfig(gpu_tflops=0)
    for bad in (float("inf"), float("nan")):  # an infinite throughput projected every GPU time to 0 s
        with pytest.raises(ValueError, match="gpu_tflops=.* must be finite and > 0"):
            ScaleBenchConfig(gpu_tflops=bad)


def test_a_partial_run_writes_its_own_files_beside_the_whole_ones(tmp_path, monkeypatch):
    """`side bench scale --only search` overwrote scale.json (the README's cost table, and its cost model, lost);
    `side bench compute --quick --only X` overwrote compute-quick.json."""
    from side_extract.bench import compute
    from side_extract.bench.scale import run_scale_bench, write_scale_results

    (tmp_path / "scale.json").write_text("{}")
    c = ScaleBenchConfig(search_train=(200,), search_generated=(10,), search_side=8)
    data = run_scale_bench(c, parts=("search",))
    assert [p.name for p in write_scale_results(data, tmp_path)] == ["scale-search.json", "scale-search.md"]
    assert (tmp_path / "scale.json").read_text() == "{}"
    monkeypatch.setattr(compute, "render_compute_markdown", lambda data: "")
    for quick, only, stem in ((True, ["sampling", "guidance"], "compute-quick-sampling-guidance"),
                              (True, [], "compute-quick"), (False, ["demo"], "compute-demo"), (False, [], "compute")):
        paths = compute.write_compute_results({"quick": quick, "config": {"only": only}}, tmp_path)
        assert [p.name for p in paths] == [f"{stem}.json", f"{stem}.md"]


def _one_model_without_search() -> dict:
    """A scale.json of one model whose search was not measured (the search rows are measured at 32x32 only)."""
    return {"machine": {"platform": "p", "cpu_count": 2, "torch": "t", "torch_threads": 1,
                        "load_average_at_start": [0], "date": "d"},
            "config": {"classifier_classes": 100, "gpu_tflops": 30.0}, "seconds": 1.0, "audit": vars(Audit()),
            "cost": cost_model([{"model": "m", "batch": 1, "side": 32, "denoiser_s_per_image": 1.0,
                                 "guided_step_s_per_image": 2.0, "classifier_train_s_per_image": 0.1,
                                 "denoiser_flops_per_image": 1e10, "classifier_flops_per_image": 1e9}], [], Audit(),
                               30.0)}


def test_a_total_says_which_stages_it_leaves_out():
    """The search is measured at one size only: for another model its row shows '-', and 'total here' summed the other
    stages without a word, while the GPU totals on the same line included the search."""
    data = _one_model_without_search()
    assert "m: total here" in render_scale_markdown(data)
    assert "(without search: not measured here at this size)" in render_scale_markdown(data)


def test_scale_results_record_the_threads_its_timed_processes_ran_with(monkeypatch):
    """scale.json's machine said this process's torch threads, not --bench-threads, which the timed subprocesses
    ran with (compute sets its own threads first, so it was right there)."""
    import torch

    from side_extract.bench import scale

    monkeypatch.setattr(scale, "bench_search", lambda c: [])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        data = scale.run_scale_bench(ScaleBenchConfig(threads=1), parts=("search",))
    finally:
        torch.set_num_threads(before)
    assert data["machine"]["torch_threads"] == 1
