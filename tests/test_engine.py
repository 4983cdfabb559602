"""The engine streams: any chunking gives the whole-track result, lengths are kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fidelity import randomise_batchnorm

from splitstems import audio
from splitstems.config import ModelConfig, load_config
from splitstems.engine import Engine, overlap_frames, pick_device
from splitstems.models.fast import fuse_for_inference
from splitstems.models.unet import SpleeterModel

TINY = ModelConfig(
    name="tiny",
    instrument_list=("voice", "rest"),
    model_dir="tiny",
    frame_length=256,
    frame_step=64,
    T=64,
    F=64,
)


@pytest.fixture(scope="module")
def engine() -> Engine:
    torch.manual_seed(0)
    return Engine(SpleeterModel(TINY), TINY, device="cpu")


def test_chunked_stream_equals_whole(engine, rng):
    x = rng.uniform(-0.5, 0.5, (20_000, 2)).astype(np.float32)
    whole = engine.separate(x)
    for size in (1, 333, 4096, 7000, 50_000):
        chunks = [x[i : i + size] for i in range(0, len(x), size)] if size > 1 else [x[:5], x[5:]]
        parts = list(engine.stream(chunks))
        for name in TINY.instruments:
            joined = np.concatenate([p[name] for p in parts])
            np.testing.assert_array_equal(joined, whole[name])


@pytest.mark.parametrize("n", [1, 63, 64, 255, 256, 4031, 4032, 4033, 4096, 12_345])
def test_output_length_equals_input(engine, rng, n):
    x = rng.uniform(-0.5, 0.5, (n, 2)).astype(np.float32)
    out = engine.separate(x)
    assert set(out) == set(TINY.instruments)
    assert all(v.shape == (n, 2) and v.dtype == np.float32 for v in out.values())


def test_average_extension_stems_sum_to_mixture(rng):
    # Ratio masks sum to one; extended by "average" they cover every bin, so the stems
    # add up to the input whatever the weights: proves STFT, iSTFT and streaming carry.
    torch.manual_seed(1)
    engine = Engine(SpleeterModel(TINY), TINY, device="cpu", mask_extension="average")
    x = rng.uniform(-0.5, 0.5, (10_000, 2)).astype(np.float32)
    parts = list(engine.stream([x[:3000], x[3000:]]))
    total = sum(np.concatenate([p[name] for p in parts]) for name in TINY.instruments)
    np.testing.assert_allclose(total, x, atol=1e-5)


def test_zeros_extension_removes_high_frequencies(engine):
    # Above bin F the mask is zero: a tone at bin 100 (> F = 64) vanishes from every stem.
    t = np.arange(8192) / TINY.sample_rate
    tone = 0.5 * np.sin(2 * np.pi * (100 * TINY.sample_rate / TINY.frame_length) * t)
    out = engine.separate(np.stack([tone, tone], 1).astype(np.float32))
    assert max(np.abs(v[512:-512]).max() for v in out.values()) < 1e-3


def test_batched_segments_match_single(rng):
    torch.manual_seed(0)
    model = SpleeterModel(TINY)
    x = rng.uniform(-0.5, 0.5, (30_000, 2)).astype(np.float32)
    one = Engine(model, TINY, device="cpu", batch_segments=1).separate(x)
    three = Engine(model, TINY, device="cpu", batch_segments=3).separate(x)
    for name in TINY.instruments:
        np.testing.assert_allclose(three[name], one[name], atol=1e-5)


def test_rejects_wrong_channel_count(engine):
    with pytest.raises(ValueError, match="n_samples, 2"):
        engine.separate(np.zeros((100, 3), np.float32))


def test_pick_device_cpu_and_unavailable():
    assert pick_device("cpu").type == "cpu"
    assert pick_device(None).type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")


@pytest.mark.parametrize("overlap", [0.25, 0.5])
def test_overlap_stream_equals_whole_and_keeps_length(rng, overlap):
    torch.manual_seed(0)
    engine = Engine(SpleeterModel(TINY), TINY, device="cpu", overlap=overlap, batch_segments=2)
    x = rng.uniform(-0.5, 0.5, (25_000, 2)).astype(np.float32)
    whole = engine.separate(x)
    parts = list(engine.stream([x[:7000], x[7000:7001], x[7001:]]))
    for name in TINY.instruments:
        np.testing.assert_allclose(np.concatenate([p[name] for p in parts]), whole[name], atol=1e-6)
        assert whole[name].shape == x.shape


def test_overlap_average_extension_still_sums_to_mixture(rng):
    torch.manual_seed(2)
    engine = Engine(SpleeterModel(TINY), TINY, device="cpu", overlap=0.25, mask_extension="average")
    x = rng.uniform(-0.5, 0.5, (15_000, 2)).astype(np.float32)
    out = engine.separate(x)
    np.testing.assert_allclose(sum(out.values()), x, atol=1e-5)


def test_overlap_rejects_bad_values():
    with pytest.raises(ValueError, match="overlap"):
        Engine(SpleeterModel(TINY), TINY, device="cpu", overlap=1.0)


@pytest.mark.parametrize("overlap", [0.9991, 0.999, 0.99, 0.9, 0.877, float("nan"), -0.1])
def test_overlap_whose_step_is_too_small_is_refused(overlap):
    # T = 512 (2stems): 0.9991 rounded to a step of 0 frames (an endless loop), 0.999 to
    # one frame (512 times the work). The step must stay >= T/8: overlap <= 0.875.
    config = load_config("spleeter:2stems")
    assert config.T == 512
    with pytest.raises(ValueError, match=r"overlap .*usable range is 0 to 0\.875"):
        Engine(SpleeterModel(config), config, device="cpu", overlap=overlap)


def test_overlap_limits_are_what_the_engine_derives():
    assert overlap_frames(0.875, 512) == 448  # step 64 = T/8: accepted
    assert overlap_frames(0.5, 512) == 256
    assert overlap_frames(0.0, 512) == 0
    assert overlap_frames(0.5, 4) == 2
    with pytest.raises(ValueError, match="usable range is 0 to 0.75"):
        overlap_frames(0.875, 4)  # rounds to 4 of 4 frames: a step of 0
    with pytest.raises(ValueError, match="0.9991"):
        overlap_frames(0.9991, 512)


@pytest.mark.usefixtures("use_shared_models")
def test_cli_refuses_an_overlap_with_no_step(tmp_path, capsys):
    from splitstems.cli.main import main

    song = tmp_path / "song.wav"
    audio.save(song, np.zeros((4410, 2), np.float32), sample_rate=44100)
    with pytest.raises(SystemExit) as exit_info:
        main(["separate", "-o", str(tmp_path / "out"), "--overlap", "0.9991", str(song)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overlap" in err[0] and "0.9991" in err[0]
    assert "0 to 0.875" in err[0]
    assert not (tmp_path / "out").exists()


def _model_state(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    return {k: (v.clone(), v.data_ptr()) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("precision", ["fast", "float32"])
def test_engine_leaves_the_callers_model_unchanged(rng, fuse, precision):
    torch.manual_seed(0)
    model = SpleeterModel(TINY).train()  # e.g. in the middle of training
    randomise_batchnorm(model)
    before = _model_state(model)
    engine = Engine(model, TINY, device="cpu", precision=precision, fuse=fuse)
    engine.separate(rng.uniform(-0.5, 0.5, (5000, 2)).astype(np.float32))
    assert model.training
    after = model.state_dict()
    for name, (value, pointer) in before.items():
        assert after[name].dtype == value.dtype and after[name].device == value.device
        assert after[name].data_ptr() == pointer
        torch.testing.assert_close(after[name], value, rtol=0, atol=0)


def test_engine_leaves_a_fused_model_unchanged(rng):
    torch.manual_seed(0)
    fused = fuse_for_inference(SpleeterModel(TINY))
    x = torch.rand(1, 2, TINY.T, TINY.F)
    with torch.inference_mode():
        expected = fused(x)
    Engine(fused, TINY, device="cpu", precision="fast")  # bfloat16: its own copy
    assert fused.unets[0].enc_weight[0].dtype == torch.float32
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), expected, rtol=0, atol=0)


def _sine_residual(y: np.ndarray, freq: float, rate: int, block: int) -> np.ndarray:
    """RMS, per block, of what a slowly varying sine at ``freq`` does not explain."""
    out = []
    for i in range(len(y) // block):
        t = np.arange(i * block, (i + 1) * block) / rate
        centred = t - t.mean()
        sin, cos = np.sin(2 * np.pi * freq * t), np.cos(2 * np.pi * freq * t)
        basis = np.stack([sin, cos, centred * sin, centred * cos, centred, np.ones_like(t)], 1)
        seg = y[i * block : (i + 1) * block]
        coef, *_ = np.linalg.lstsq(basis, seg, rcond=None)
        out.append(np.sqrt(np.mean((seg - basis @ coef) ** 2)))
    return np.array(out)


def test_overlap_removes_clicks_at_segment_boundaries(separator_2stems):
    # A pure 440 Hz sine through the real 2stems model: without overlap, the worst
    # deviation from a smooth sine sits at the segment boundaries (the seams); with
    # --overlap 0.5 the blocks around every segment edge are no worse than elsewhere.
    rate, freq, block = 44100, 440.0, 1024
    t = np.arange(40 * rate) / rate
    mono = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    x = np.stack([mono, mono], 1)
    cfg = separator_2stems.config
    for overlap in (0.0, 0.5):
        engine = Engine(separator_2stems.engine.model, cfg, device="cpu", overlap=overlap)
        step = cfg.T - engine.overlap_frames
        edges = {s * step for s in range(1, 8)} | {s * step + cfg.T for s in range(8)}
        # frame f starts at padded sample f * hop; output sample = padded - frame_length
        blocks = {(f * cfg.frame_step - cfg.frame_length) // block for f in edges}
        residual = _sine_residual(engine.separate(x)["vocals"][:, 0], freq, rate, block)
        near = np.zeros(residual.shape, bool)
        for b in blocks:
            if 8 <= b < len(residual) - 8:
                near[b - 4 : b + 5] = True
        inner = ~near
        inner[:8] = inner[-8:] = False
        if overlap == 0.0:
            assert residual[near].max() > residual[inner].max()  # the seams are audible
        else:
            assert residual[near].max() <= residual[inner].max()


def test_ordered_worker_runs_in_order_and_reports_errors():
    from splitstems.engine import OrderedWorker

    done = []
    worker = OrderedWorker(depth=2)
    for i in range(20):
        worker.submit(done.append, i)
    worker.join()
    assert done == list(range(20))

    def fail(_):
        raise OSError("disk full")

    worker = OrderedWorker(depth=1)
    worker.submit(fail, 0)
    try:
        with pytest.raises(OSError, match="disk full"):
            worker.submit(done.append, 1)
            worker.join()
    finally:
        worker.join(raise_errors=False)  # its thread must not outlive the test


def test_ordered_worker_drops_calls_not_started_on_the_way_out():
    import threading

    from splitstems.engine import OrderedWorker

    started, release, done = threading.Event(), threading.Event(), []

    def slow(item):
        started.set()
        release.wait(10)
        done.append(item)

    worker = OrderedWorker(depth=3)
    worker.submit(slow, 0)
    started.wait(10)
    worker.submit(done.append, 1)  # queued behind the running call
    worker.submit(done.append, 2)
    # the running call ends only once join has begun: the queued ones are dropped
    threading.Timer(0.2, release.set).start()
    worker.join(raise_errors=False)  # the way out after an interrupt
    assert done == [0]
