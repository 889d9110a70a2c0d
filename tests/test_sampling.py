import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDPMPipeline

from side_extract import config as cfg
from side_extract.data import load_shards
from side_extract.models.target import CallableDenoiser, load_target, model_fingerprint, predict_x0
from side_extract.runs import RunDir, read_json
from side_extract.sampling import (BatchSize, ddim_step, inference_scheduler, sample, sample_generators,
                                   sample_stage)


@pytest.mark.parametrize("kind,eta", [("ddim", 0.0), ("ddim", 0.7), ("ddpm", 0.0)])
def test_parity_with_diffusers_pipelines(tiny_rgb_model_dir, kind, eta):
    d = load_target(tiny_rgb_model_dir)
    n, steps, seed = 3, 4, 11
    ours = sample(d, n, seed=seed, scheduler=kind, steps=steps, eta=eta, batch_size=n)
    gens = sample_generators(seed, np.arange(n))
    if kind == "ddim":
        pipe = DDIMPipeline(unet=d.unet, scheduler=d.scheduler)
        ref = pipe(batch_size=n, generator=gens, eta=eta, num_inference_steps=steps, output_type="np").images
    else:
        pipe = DDPMPipeline(unet=d.unet, scheduler=inference_scheduler(d.scheduler, "ddpm", steps))
        ref = pipe(batch_size=n, generator=gens, num_inference_steps=steps, output_type="np").images
    pipe.set_progress_bar_config(disable=True)
    ours01 = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours01, ref, atol=1e-5, rtol=0)


def test_predict_x0_inverts_the_forward_process_and_matches_diffusers_step():
    # Reference: diffusers' add_noise (x_t = sqrt(abar) x0 + sqrt(1 - abar) eps) and the DDIM step's own
    # pred_original_sample, with and without its clip to clip_sample_range.
    from diffusers import DDIMScheduler
    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=True, clip_sample_range=1.0)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 1, 4, 4, generator=g) * 2 - 1
    eps = torch.randn(3, 1, 4, 4, generator=g)
    t = int(sched.timesteps[3])
    xt = sched.add_noise(x0, eps, torch.full((3,), t))
    torch.testing.assert_close(predict_x0(sched, xt, t, eps), x0, atol=1e-5, rtol=0)
    wild = torch.randn(3, 1, 4, 4, generator=g) * 3  # an eps whose x0 leaves [-1, 1]
    ref = sched.step(wild, t, xt, eta=0.0).pred_original_sample
    assert ref.abs().max() <= 1.0 and predict_x0(sched, xt, t, wild).abs().max() > 1.0
    torch.testing.assert_close(predict_x0(sched, xt, t, wild, 1.0), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("spacing,steps,offset", [("leading", 10, 0), ("leading", 30, 1), ("trailing", 20, 0)])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip_eps", [False, True])
def test_ddim_step_is_diffusers_step_bit_for_bit_where_its_stride_holds(spacing, steps, offset, eta, clip_eps):
    # Where diffusers' step lands on the next scheduled timestep (its stride, 1000 // steps, is the schedule's), our
    # DDIM step (which also steps right on other schedules: test_guidance.py) gives its images exactly, so the
    # figures of every run on such a target are unchanged.
    from diffusers import DDIMScheduler
    sched = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=offset)
    sched.set_timesteps(steps)
    assert (np.diff(sched.timesteps.numpy()) == -(1000 // steps)).all()
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g) * 2  # x0 saturates at times
    for t in sched.timesteps[[0, 1, steps // 2, -1]]:
        ours = ddim_step(sched, x, int(t), eps, sample_generators(1, range(3)), eta=eta, clip_x0=True,
                         eps_from_x0=clip_eps)
        ref = sched.step(eps, t, x, eta=eta, use_clipped_model_output=clip_eps,
                         generator=sample_generators(1, range(3))).prev_sample
        assert torch.equal(ours, ref)


def test_ddim_at_eta_1_where_abar_is_near_0_steps_to_finite_images():
    """At eta 1 the root's term 1 - abar_prev - sigma^2 equals abar_t (1 - abar_prev)^2 / (abar_prev (1 - abar_t)), 2e-8
    at a cosine schedule's t = 999 (abar 2.4e-9), but float32 made it -6e-8: NaN images, said as a model whose eps
    is not finite (diffusers' own step gives the NaN too). The step is DDIM's eq. 12 in float64 up to that term."""
    from diffusers import DDIMScheduler
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing")
    sched.set_timesteps(5)
    t, prev = (int(v) for v in sched.timesteps[:2])
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 1, 4, 4, generator=g), torch.randn(2, 1, 4, 4, generator=g)
    ours = ddim_step(sched, x, t, eps, sample_generators(1, range(2)), eta=1.0, clip_x0=True, eps_from_x0=False)
    a, ap = sched.alphas_cumprod[t].double(), sched.alphas_cumprod[prev].double()
    x0 = ((x.double() - (1 - a).sqrt() * eps.double()) / a.sqrt()).clamp(-1, 1)
    sigma = ((1 - ap) / (1 - a) * (1 - a / ap)).sqrt()
    z = torch.cat([torch.randn(1, 1, 4, 4, generator=gen) for gen in sample_generators(1, range(2))]).double()
    ref = ap.sqrt() * x0 + (a * (1 - ap) ** 2 / (ap * (1 - a))).sqrt() * eps.double() + sigma * z
    assert torch.isfinite(ours).all()
    # (float32 leaves the term's 2e-8 as rounding noise: its root, 1.5e-4 times eps, is what the step cannot keep)
    torch.testing.assert_close(ours.double(), ref, atol=1e-3, rtol=0)


def test_ddim_refuses_a_thresholding_scheduler_before_sampling():
    from diffusers import DDPMScheduler
    base = DDPMScheduler(num_train_timesteps=1000, thresholding=True)
    with pytest.raises(ValueError, match="thresholding"):
        inference_scheduler(base, "ddim", 10)
    assert len(inference_scheduler(base, "ddpm", 10).timesteps) == 10


@pytest.mark.parametrize("kind,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_batch_size_and_offset_independence(tiny_model_dir, kind, eta):
    d = load_target(tiny_model_dir)
    full = sample(d, 7, seed=5, scheduler=kind, steps=3, eta=eta, batch_size=7)
    small = sample(d, 7, seed=5, scheduler=kind, steps=3, eta=eta, batch_size=2)
    torch.testing.assert_close(full, small, atol=1e-5, rtol=0)
    tail = sample(d, 3, seed=5, start=4, scheduler=kind, steps=3, eta=eta, batch_size=3)
    torch.testing.assert_close(full[4:], tail, atol=1e-5, rtol=0)
    other = sample(d, 7, seed=6, scheduler=kind, steps=3, eta=eta, batch_size=7)
    assert (other - full).abs().max() > 1e-2


def test_seeded_determinism(tiny_model_dir):
    d = load_target(tiny_model_dir)
    a = sample(d, 4, seed=1, steps=3)
    b = sample(d, 4, seed=1, steps=3)
    assert torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1


def test_bad_steps(tiny_model_dir):
    with pytest.raises(ValueError, match="steps=5000"):
        sample(load_target(tiny_model_dir), 2, steps=5000)


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_steps_past_the_last_timestep_refused_before_any_stage(kind):
    # diffusers' leading spacing with steps_offset=1 and steps = T starts at timestep T, one past alphas_cumprod:
    # the check before any stage accepted it and the first step failed with an IndexError
    from diffusers import DDPMScheduler

    from side_extract.sampling import check_sampler
    train = DDPMScheduler(num_train_timesteps=20, steps_offset=1)
    with pytest.raises(ValueError, match=r"extract.scheduler=.*steps=20 .*steps_offset=1.*timestep 20"):
        check_sampler(train, kind, 20, "extract")
    check_sampler(train, kind, 19, "extract")  # starts at 19
    check_sampler(DDPMScheduler(num_train_timesteps=20, steps_offset=1, timestep_spacing="trailing"), kind, 20,
                  "extract")


def test_sample_stage_skips_when_unchanged(tiny_model_dir, tmp_path):
    d = load_target(tiny_model_dir)
    c = cfg.SampleConfig(n=10, steps=2, shard_size=4, batch_size=3)
    run = RunDir(tmp_path / "run")
    fp = model_fingerprint(tiny_model_dir)
    s1 = sample_stage(run, d, c, model_fingerprint=fp)
    assert len(s1) == 10 and s1.ids.tolist() == list(range(10))
    assert sorted(p.name for p in (tmp_path / "run" / "synthetic").iterdir()) == [
        "shard-00000.npz", "shard-00001.npz", "shard-00002.npz"]
    mtime = (tmp_path / "run" / "synthetic" / "shard-00000.npz").stat().st_mtime_ns
    s2 = sample_stage(run, d, c, model_fingerprint=fp)
    assert (tmp_path / "run" / "synthetic" / "shard-00000.npz").stat().st_mtime_ns == mtime  # skipped
    np.testing.assert_array_equal(s1.images, s2.images)
    # another batch size is another computation (batched convolutions round differently): redone, never mixed
    s2b = sample_stage(run, d, cfg.SampleConfig(n=10, steps=2, shard_size=4, batch_size=5), model_fingerprint=fp)
    assert (tmp_path / "run" / "synthetic" / "shard-00000.npz").stat().st_mtime_ns != mtime
    assert np.abs(s1.images.astype(int) - s2b.images.astype(int)).max() <= 1
    # a changed config redoes the stage
    s3 = sample_stage(run, d, cfg.SampleConfig(n=6, steps=2, shard_size=4), model_fingerprint=fp)
    assert len(s3) == 6


def test_resume_after_killed_process(tiny_model_dir, tmp_path):
    """A real `side sample` process is killed mid-run; the rerun (`side sample` in this process) resumes and equals an
    uninterrupted run."""
    from typer.testing import CliRunner

    from side_extract.cli.main import app

    args = ["--model", str(tiny_model_dir), "--n", "600", "--steps", "20", "--shard-size", "50", "--batch-size", "50"]
    cmd = [sys.executable, "-m", "side_extract.cli.main", "--no-progress", "sample", *args]
    run = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--out", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # until its second shard is written, however slow the machine (the 15-minute bound only guards against a hang)
    hang = time.time() + 900
    while not (run / "synthetic" / "shard-00001.npz").exists() and proc.poll() is None and time.time() < hang:
        time.sleep(0.05)
    assert proc.poll() is None, f"`side sample` ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = sorted((run / "synthetic").glob("shard-*.npz"))
    assert 2 <= len(done_before) < 12, "the process should have been killed mid-run"
    for shard in done_before:  # whatever the kill interrupted, every file named as a shard is whole
        with np.load(shard) as z:
            assert len(z["images"]) == len(z["index"]) == 50
    assert read_json(run / "manifest.json")["stages"]["synthetic"]["status"] == "running"
    threads = torch.get_num_threads()
    try:
        r = CliRunner().invoke(app, ["--threads", "1", *cmd[3:], "--out", str(run)])
    finally:
        torch.set_num_threads(threads)
    assert r.exit_code == 0, r.output
    entry = read_json(run / "manifest.json")["stages"]["synthetic"]
    assert entry["status"] == "complete" and entry["resumed"] is True
    assert entry["shards_written_now"] == 12 - len(done_before)
    resumed = load_shards(run / "synthetic")
    # reference: the same shards computed in-process without interruption
    d = load_target(tiny_model_dir)
    ref = sample(d, 600, seed=0, steps=20, batch_size=50, clip_eps=cfg.SampleConfig().clip_eps)
    from side_extract.data import to_uint8

    ref_u8 = to_uint8(ref)
    assert np.abs(resumed.images.astype(int) - ref_u8.astype(int)).max() <= 1
    assert resumed.ids.tolist() == list(range(600))


class _OutOfMemoryAbove:
    """The tiny denoiser, raising torch's out-of-memory error for batches larger than ``limit`` (as a GPU
    would); counts the calls that failed."""

    def __init__(self, inner, limit):
        self.inner, self.limit, self.failures = inner, limit, 0
        self.scheduler, self.sample_shape = inner.scheduler, inner.sample_shape

    def __call__(self, x, t):
        if len(x) > self.limit:
            self.failures += 1
            raise torch.OutOfMemoryError(f"CUDA out of memory (fake: batch {len(x)} > {self.limit})")
        return self.inner(x, t)


def test_out_of_memory_halves_the_batch_and_keeps_the_images(tiny_model_dir):
    """A batch that runs out of memory is redone in halves and the stage keeps the smaller size: the images
    equal a run at that size (same per-sample noise, same batches), bit for bit."""
    d = load_target(tiny_model_dir)
    flaky = _OutOfMemoryAbove(d, limit=3)
    size = BatchSize(16)
    got = sample(flaky, 11, seed=4, steps=3, batch_size=size)
    got2 = sample(flaky, 5, seed=4, start=11, steps=3, batch_size=size)  # the next shard of the same stage
    assert size.size == 2 and size.backoffs == [16, 8, 4] and flaky.failures == 3  # no retry in the 2nd shard
    want = torch.cat([sample(d, 11, seed=4, steps=3, batch_size=2),
                      sample(d, 5, seed=4, start=11, steps=3, batch_size=2)])
    torch.testing.assert_close(torch.cat([got, got2]), want, rtol=0, atol=0)
    with pytest.raises(torch.OutOfMemoryError):  # even one image does not fit: the error is raised
        sample(_OutOfMemoryAbove(d, limit=0), 2, seed=4, steps=3, batch_size=2)


def test_bf16_autocast_is_close_to_fp32_and_really_lower_precision(tiny_rgb_model_dir):
    d = load_target(tiny_rgb_model_dir)
    full = sample(d, 6, seed=3, steps=4, batch_size=6)
    low = sample(d, 6, seed=3, steps=4, batch_size=6, precision="bf16")
    diff = (full - low).abs()
    assert low.dtype == torch.float32
    assert 0 < float(diff.mean()) < 0.02 and float(diff.max()) < 0.2  # bf16 keeps 8 bits of mantissa
    with pytest.raises(ValueError, match="precision='fp16'"):
        cfg.SampleConfig(precision="fp16")


def test_each_precision_sets_cudas_float32_mode_while_sampling_and_restores_it(tiny_model_dir):
    """precision='fp32' samples in IEEE float32 on CUDA too: cuDNN's default TF32 convolutions moved an H200's
    unguided images up to 13/255 from the CPU's (scripts/gpu-check). 'tf32' asks for TF32, 'bf16' leaves the flags
    alone. The flags are read inside the denoiser, so every guidance pass runs under them as well, and they are
    given back afterwards. On a CPU, where the flags do nothing, tf32's images are fp32's."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    d = load_target(tiny_model_dir)
    seen = []

    def spy(x, t):
        seen.append((conv.fp32_precision, matmul.fp32_precision))
        return d(x, t)

    spied = CallableDenoiser(spy, d.sample_shape, d.scheduler)
    before = (conv.fp32_precision, matmul.fp32_precision)
    conv.fp32_precision, matmul.fp32_precision = "tf32", "ieee"  # CUDA's defaults
    images = {}
    try:
        for precision, expected in [("fp32", ("ieee", "ieee")), ("tf32", ("tf32", "tf32")),
                                    ("bf16", ("tf32", "ieee"))]:
            seen.clear()
            images[precision] = sample(spied, 2, seed=0, steps=3, batch_size=2, precision=precision)
            assert seen and set(seen) == {expected}, precision
            assert (conv.fp32_precision, matmul.fp32_precision) == ("tf32", "ieee")
    finally:
        conv.fp32_precision, matmul.fp32_precision = before
    assert torch.equal(images["fp32"], images["tf32"])
    with pytest.raises(ValueError, match="precision='fp16'"):
        sample(d, 2, seed=0, steps=3, precision="fp16")


def test_reproducible_gradients_on_an_accelerator_and_nothing_on_the_cpu():
    """On CUDA, guidance gradients through the target differed run to run: made again twice on an H200, 60 of 256
    memguide generations differed (up to 196/255), 52 of 256 SIDE ones guided through the denoised estimate
    (benchmarks/results/gpu-check.md). Inside reproducible_gradients cuDNN is deterministic and attention runs in
    the math kernel only; both are given back afterwards, and on the CPU nothing changes."""
    from side_extract.sampling import reproducible_gradients

    cuda = torch.backends.cuda

    def flags():
        return (torch.backends.cudnn.deterministic, cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(),
                cuda.math_sdp_enabled())

    before = flags()
    assert before[:3] != (False, False, False) and not before[0]  # PyTorch's defaults, else the test proves nothing
    try:
        with reproducible_gradients(torch.device("cuda", 0)):
            assert flags() == (True, False, False, True)
        assert flags() == before
        with pytest.raises(RuntimeError, match="guidance failed"):  # given back when the guidance raises, too
            with reproducible_gradients(torch.device("cuda", 0)):
                raise RuntimeError("guidance failed")
        assert flags() == before
        with reproducible_gradients(torch.device("cpu")):
            assert flags() == before
    finally:  # never leak into later tests, whatever the code under test did
        torch.backends.cudnn.deterministic = before[0]
        cuda.enable_flash_sdp(before[1])
        cuda.enable_mem_efficient_sdp(before[2])
        cuda.enable_math_sdp(before[3])


def test_every_guidance_call_runs_with_reproducible_gradients_on_the_samples_device(tiny_model_dir, monkeypatch,
                                                                                    context_recorder):
    import side_extract.sampling as sampling

    def guidance(x, t, y):
        context_recorder.record()
        assert torch.is_grad_enabled()
        return torch.zeros_like(x)

    monkeypatch.setattr(sampling, "reproducible_gradients", context_recorder)
    d = load_target(tiny_model_dir)
    sample(d, 2, seed=0, steps=3, batch_size=2, guidance=guidance, labels=np.zeros(2, dtype=int), clip_eps=True)
    calls = context_recorder.seen
    assert len(calls) == 3 and all(c == [torch.device("cpu")] for c in calls)
    # on a (simulated) second device, the samples' device
    from fake_device import FAKE, FakeDevice

    calls.clear()
    with FakeDevice():
        sample(load_target(tiny_model_dir, FAKE), 2, seed=0, steps=3, batch_size=2, guidance=guidance,
               labels=np.zeros(2, dtype=int), clip_eps=True, device=FAKE)
    assert len(calls) == 3 and all(c == [FAKE] for c in calls)


def test_extraction_draws_its_own_noise_even_at_the_synthetic_sets_seed(tiny_model_dir):
    """A run (or a benchmark replicate) with sample.seed == extract.seed must not regenerate its synthetic set as
    UnCond's output: the extraction has a noise stream of its own (before the streams, with clip_eps both were
    the same images)."""
    from side_extract.data import to_uint8
    from side_extract.extraction import extract
    from side_extract.sampling import EXTRACTION_STREAM, sample_seed

    den = load_target(tiny_model_dir)
    synthetic = sample(den, 4, seed=3, steps=5, batch_size=4, clip_eps=True)
    c = cfg.ExtractConfig(n=4, seed=3, steps=5, eta=0.0, batch_size=4)
    uncond = extract(den, c, None, 0, 4)["images"]
    assert (np.abs(uncond.astype(int) - to_uint8(synthetic).astype(int)).reshape(4, -1).max(1) > 8).all()
    again = sample(den, 4, seed=3, steps=5, batch_size=4, clip_eps=True, stream=EXTRACTION_STREAM)
    assert np.array_equal(uncond, to_uint8(again))
    # stream 0 keeps the seeds of every synthetic set made before streams existed: SeedSequence((seed, index))
    ref = int(np.random.SeedSequence([3, 7]).generate_state(1, np.uint64)[0])
    assert sample_seed(3, 7) == ref and sample_seed(3, 7, EXTRACTION_STREAM) != ref
    with pytest.raises(ValueError, match="stream=-1"):
        sample_seed(3, 7, -1)


def test_every_noise_stream_is_listed_once_in_sampling():
    """The run's noise streams are numbered in one module, each number used once, and the modules that draw from
    them use those constants (the memorization scores and memorization guidance once had theirs elsewhere)."""
    import side_extract.memorization as memorization
    import side_extract.sampling as sampling

    streams = {k: v for k, v in vars(sampling).items() if k.endswith("_STREAM")}
    assert set(streams) == {"SYNTHETIC_STREAM", "EXTRACTION_STREAM", "MEMORIZATION_STREAM", "MEMGUIDE_STREAM"}
    assert sorted(streams.values()) == list(range(len(streams)))
    assert not [k for k, v in vars(memorization).items() if k.endswith("_STREAM") and streams.get(k) != v]


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_steps_whose_walk_starts_near_the_clean_end_refused_before_any_stage(tiny_model_dir, kind):
    """diffusers' leading spacing puts one step at timestep 0: the sampler returned its starting noise, clamped, as
    the image, without a word. A walk that starts where the image is more signal than noise is refused; trailing
    spacing's one step (from the last timestep) is a real sample."""
    from diffusers import DDPMScheduler

    from side_extract.sampling import check_sampler
    with pytest.raises(ValueError, match=r"extract.scheduler=.*steps=1 .*'leading' starts at timestep 0"):
        check_sampler(DDPMScheduler(num_train_timesteps=1000), kind, 1, "extract")
    with pytest.raises(ValueError, match=r"steps=1 .*timestep 0"):
        sample(load_target(tiny_model_dir), 2, steps=1, scheduler=kind)
    check_sampler(DDPMScheduler(num_train_timesteps=1000), kind, 2, "extract")  # starts at 500: alpha_bar 0.08
    check_sampler(DDPMScheduler(num_train_timesteps=1000, timestep_spacing="trailing"), kind, 1, "extract")
    with pytest.raises(ValueError, match=r"'linspace' starts at timestep 0.*timestep_spacing 'trailing'$"):
        check_sampler(DDPMScheduler(num_train_timesteps=1000, timestep_spacing="linspace"), kind, 1, "extract")


def test_sample_refuses_settings_of_the_wrong_type_by_name():
    """batch_size=2.5 made batches of 3, 3 and 2 and True batches of 1; eta="0.5" was a comparison's TypeError;
    clip_eps="no" was taken as True (a review's find)."""
    from conftest import tiny_scheduler, tiny_unet
    from side_extract.models.target import UNetDenoiser
    from side_extract.sampling import sample

    d = UNetDenoiser(tiny_unet(), tiny_scheduler())
    for kw, said in (({"batch_size": 2.5}, r"batch_size=2.5 must be an integer >= 1"),
                     ({"batch_size": True}, r"batch_size=True must be an integer >= 1"),
                     ({"eta": "0.5"}, r"eta='0.5' must be a number"),
                     ({"clip_eps": "no"}, r"clip_eps='no' must be True or False")):
        with pytest.raises(ValueError, match=said):
            sample(d, 2, steps=1, **kw)


def test_ddpm_sampling_refuses_ddims_eta_and_clip_eps_by_name(tiny_model_dir):
    """sample(..., scheduler="ddpm", eta=0.5) and clip_eps=True were taken without a word: DDPM reads neither, so the
    caller got DDPM's samples believing they had asked for something else. A run's config keeps both whatever its
    scheduler (warned of as inert), and its stages still sample under DDPM."""
    d = load_target(tiny_model_dir)
    for kw in ({"eta": 0.5}, {"clip_eps": True}):
        with pytest.raises(ValueError, match=r"DDIM's settings; scheduler='ddpm' reads neither"):
            sample(d, 2, steps=2, scheduler="ddpm", **kw)
    plain = sample(d, 2, steps=2, scheduler="ddpm")
    assert plain.shape[0] == 2 and torch.isfinite(plain).all()


@pytest.mark.parametrize("schedule", ["sigmoid", "laplace"])
def test_a_schedule_diffusers_ddim_lacks_is_refused_by_name_before_any_stage(schedule):
    """diffusers' DDPMScheduler takes beta_schedule sigmoid and laplace, its DDIMScheduler raises NotImplementedError:
    the default (DDIM) sampler of such a model was a traceback from side run, side sample and audit (a review's
    find). It is a named refusal; DDPM samples it."""
    from diffusers import DDPMScheduler

    from conftest import tiny_unet
    from side_extract.models.target import UNetDenoiser
    from side_extract.sampling import check_sampler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule, timestep_spacing="trailing")
    with pytest.raises(ValueError, match=f"sample.scheduler=ddim: the model's beta_schedule='{schedule}' has no DDIM"):
        check_sampler(sched, "ddim", 10, "sample")
    check_sampler(sched, "ddpm", 10, "sample")
    assert torch.isfinite(sample(UNetDenoiser(tiny_unet(), sched), 2, steps=2, scheduler="ddpm")).all()
