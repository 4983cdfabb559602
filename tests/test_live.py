"""Live separation: exact alignment and length, the delay bound, bounded state, quality."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from splitstems import audio
from splitstems.config import load_config
from splitstems.live import (
    LIVE_SETTINGS,
    LiveEngine,
    LiveSeparator,
    LiveSettings,
    settings_for,
)


@pytest.fixture(scope="module")
def music(shared_dir: Path) -> np.ndarray:
    """Four seconds of a MUSDB18 preview's mixture (stereo, 44.1 kHz)."""
    track = sorted((shared_dir / "audio" / "musdb7" / "test").glob("*.stem.mp4"))[0]
    return audio.load(track, offset=1.0, duration=4.0, sample_rate=44100, n_channels=2)


def _push_in_blocks(
    live: LiveSeparator, data: np.ndarray, rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], list[tuple[int, int]]]:
    """Push ``data`` in random block sizes; return the joined stems and (input, output) counts."""
    parts: list[dict[str, np.ndarray]] = []
    counts = []
    pos = n_out = 0
    while pos < len(data):
        size = int(rng.integers(1, 5000))
        out = live.push(data[pos : pos + size])
        pos = min(pos + size, len(data))
        n_out += len(out["vocals"])
        counts.append((pos, n_out))
        parts.append(out)
    parts.append(live.flush())
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, counts


def test_settings_for_half_a_second_is_the_best_measured_within_the_budget() -> None:
    config = load_config("spleeter:2stems")
    chosen = settings_for(0.5, config)
    assert chosen == LiveSettings(128, 4, 15, partial=1, blend=(0.75, 0.25))
    assert chosen.delay_samples(config) == 21504  # (4 + 15 - 1 - 1) * 1024 + 4096
    assert settings_for(0.45, config) == LiveSettings(window=64, hop=8, lookahead=8)
    # each delay as printed (to the millisecond), given back, chooses its own setting
    for setting in LIVE_SETTINGS:
        assert settings_for(round(setting.delay(config), 3), config) == setting
        assert settings_for(round(setting.delay(config), 4), config) == setting
    assert chosen.delay(config) <= 0.5
    # the longest delay that fits: nothing in the table between it and 0.5 s
    assert not [s for s in LIVE_SETTINGS if chosen.delay(config) < s.delay(config) <= 0.5]
    with pytest.raises(ValueError, match="below the shortest"):
        settings_for(0.05, config)
    with pytest.raises(ValueError, match="positive"):
        settings_for(float("nan"), config)
    with pytest.raises(ValueError, match="multiple of 64"):
        LiveSettings(window=100, hop=8, lookahead=8)
    with pytest.raises(ValueError, match="partial must be 0 or 1"):
        LiveSettings(128, 4, 15, partial=2)
    for bad in ((), (1.0, 0.0), (1.0, float("nan"))):
        with pytest.raises(ValueError, match="positive weights"):
            LiveSettings(128, 4, 15, blend=bad)
    with pytest.raises(ValueError, match="earlier window must still hold"):
        LiveSettings(128, 4, 6, blend=(0.5, 0.3, 0.2))  # 2 windows back: 8 frames > 6


def test_live_on_the_offline_grid_equals_the_offline_engine_sample_for_sample(
    separator_2stems, rng: np.random.Generator
) -> None:
    # A window of T=512 frames, hop 512, no look-ahead is the original's segment grid: the
    # live path (its framing, model windows, masks, iSTFT tails, flush) must then give
    # exactly the offline output, whatever blocks the input comes in.
    data = (rng.standard_normal((44100 * 13 + 321, 2)) * 0.1).astype(np.float32)
    offline = separator_2stems.separate(data)
    live = LiveSeparator(separator_2stems.engine, settings=LiveSettings(512, 512, 0))
    stems, _ = _push_in_blocks(live, data, rng)
    for name in offline:
        assert stems[name].shape == data.shape
        np.testing.assert_array_equal(stems[name], offline[name])


def test_push_any_blocks_exact_length_same_output_and_within_the_delay(
    separator_2stems, music: np.ndarray, rng: np.random.Generator
) -> None:
    live = separator_2stems.live(latency=0.5)
    assert live.latency == pytest.approx(live.delay_samples / 44100) and live.latency <= 0.5
    stems, counts = _push_in_blocks(live, music, rng)
    # after every push, sample i is out once the input reaches i + delay_samples
    for n_in, n_out in counts:
        assert n_in - live.delay_samples < n_out <= n_in
    # and the bound is tight (blocks are at most 5000 samples)
    assert max(n_in - n_out for n_in, n_out in counts) > live.delay_samples - 5000
    one_push = live.push(music)  # flush reset the state: a new stream, pushed at once
    rest = live.flush()
    for name, samples in stems.items():
        assert samples.shape == music.shape and samples.dtype == np.float32
        np.testing.assert_array_equal(np.concatenate([one_push[name], rest[name]]), samples)


def test_live_stems_are_close_to_the_offline_stems_and_aligned(
    separator_2stems, music: np.ndarray
) -> None:
    offline = separator_2stems.separate(music)
    live = separator_2stems.live(0.5)
    first = live.push(music)
    stems = {k: np.concatenate([first[k], v]) for k, v in live.flush().items()}

    def snr(estimate: np.ndarray, reference: np.ndarray) -> float:
        error = np.sum((estimate - reference) ** 2)
        return float(10 * np.log10(np.sum(reference**2) / error))

    for name in stems:
        assert snr(stems[name], offline[name]) > 10.0  # the same separation, near enough
        # and aligned: one sample of shift is far worse than none
        shifted = np.concatenate([np.zeros((1, 2), np.float32), stems[name][:-1]])
        assert snr(shifted, offline[name]) < snr(stems[name], offline[name]) - 3.0


def test_state_stays_bounded_on_a_long_stream(separator_2stems) -> None:
    live = LiveSeparator(separator_2stems.engine, settings=LiveSettings(64, 8, 8))
    block = np.zeros((4410, 2), np.float32)  # 0.1 s blocks, 60 s in all
    for _ in range(600):
        live.push(block)
        assert live._mag.shape[1] <= 64 + 8 + 8  # one window and a hop, look-ahead
        assert live._spec.shape[1] <= 8 + 8 + 8  # the frames not decided yet
        assert live._samples.shape[1] < 4096 + 1024
    assert live.n_input == 600 * 4410


def test_separator_latency_runs_the_live_path_for_waveforms(
    separator_2stems, music: np.ndarray
) -> None:
    engine = LiveEngine(separator_2stems.engine, latency=0.5)
    whole = engine.separate(music)
    live = separator_2stems.live(0.5)
    first = live.push(music)
    rest = live.flush()
    for name, samples in whole.items():
        np.testing.assert_allclose(
            samples, np.concatenate([first[name], rest[name]]), rtol=0, atol=1e-5
        )


def test_live_input_is_checked_and_mono_is_duplicated(separator_2stems, music: np.ndarray) -> None:
    live = separator_2stems.live(0.5)
    with pytest.raises(ValueError, match="float samples"):
        live.push(np.zeros((10, 2), np.int16))
    with pytest.raises(ValueError, match="shape"):
        live.push(np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match=r"got \(2, 44100\): channels first"):
        live.push(np.zeros((2, 44100), np.float32))  # not 2 samples of 44100 channels
    with pytest.raises(ValueError, match="at most 64 channels"):
        live.push(np.zeros((100, 65), np.float32))
    assert live.n_input == 0  # refused blocks are not taken in
    live.push(music[:1000])
    with pytest.raises(ValueError, match="3 channel.* a stream that started with 2"):
        live.push(np.zeros((100, 3), np.float32))
    live.flush()
    mono = music[:50000, 0]
    out, rest = live.push(mono), live.flush()
    stereo_out, stereo_rest = live.push(np.stack([mono, mono], axis=1)), live.flush()
    for name in out:
        vocals = np.concatenate([out[name], rest[name]])
        assert vocals.shape == (50000, 2)
        np.testing.assert_array_equal(vocals, np.concatenate([stereo_out[name], stereo_rest[name]]))


def test_windows_near_the_start_shrink_to_a_multiple_of_64_and_hold_the_decided_frames(
    separator_2stems, music: np.ndarray
) -> None:
    live = LiveSeparator(separator_2stems.engine, settings=LiveSettings(256, 4, 14))
    sizes = {end: live._window_size(end) for end in (18, 64, 65, 130, 255, 256, 900)}
    assert sizes == {18: 64, 64: 64, 65: 128, 130: 192, 255: 256, 256: 256, 900: 256}
    settings = LiveSettings(128, 8, 8)
    # a stream's first windows are mostly mirror image with a full-size window; shrunk,
    # the stems of its first second differ from what the full window gives, and the
    # rest of the stream (windows past frame 128) is the same
    shrunk = LiveEngine(separator_2stems.engine, settings=settings)
    stems = shrunk.separate(music)

    class FullSize(LiveSeparator):
        def _window_size(self, end: int) -> int:
            return self.settings.window

    import splitstems.live as live_module

    original = live_module.LiveSeparator
    live_module.LiveSeparator = FullSize
    try:
        full = LiveEngine(separator_2stems.engine, settings=settings).separate(music)
    finally:
        live_module.LiveSeparator = original
    start, after = slice(0, 44100), slice(128 * 1024 + 4096, None)
    for name in stems:
        assert stems[name].shape == full[name].shape == music.shape
        assert np.abs(stems[name][start] - full[name][start]).max() > 1e-3
        np.testing.assert_allclose(stems[name][after], full[name][after], rtol=0, atol=1e-5)


def _live_output(separator, settings: LiveSettings, data: np.ndarray) -> dict[str, np.ndarray]:
    live = LiveSeparator(separator.engine, settings=settings)
    first = live.push(data)
    return {k: np.concatenate([first[k], v]) for k, v in live.flush().items()}


def test_blend_is_the_weighted_mean_of_the_newest_and_the_earlier_windows_masks(
    separator_2stems, music: np.ndarray
) -> None:
    # Stems are linear in the masks, and the window before the newest sees a run's frames
    # as a window with hop frames less look-ahead sees them: so blending (0.75, 0.25) gives
    # 0.75 x (look-ahead 15) + 0.25 x (look-ahead 11), after the stream's first run (which
    # has no earlier window), with the partial samples included.
    data = music[: 44100 * 2]
    blended = _live_output(
        separator_2stems, LiveSettings(128, 4, 15, partial=1, blend=(0.75, 0.25)), data
    )
    newest = _live_output(separator_2stems, LiveSettings(128, 4, 15, partial=1), data)
    earlier = _live_output(separator_2stems, LiveSettings(128, 4, 11, partial=1), data)
    after_first_run = slice(4 * 1024, None)
    for name in blended:
        mixed = 0.75 * newest[name] + 0.25 * earlier[name]
        assert np.abs(blended[name] - newest[name])[after_first_run].max() > 1e-3
        np.testing.assert_allclose(
            blended[name][after_first_run], mixed[after_first_run], rtol=0, atol=2e-6
        )


def test_partial_samples_are_the_renormalised_sum_without_the_newest_frame(
    separator_2stems, music: np.ndarray
) -> None:
    # partial=1 changes only the frame step of samples after each run's decided frames
    # (made without the next frame, then renormalised); everywhere else the stems are
    # those of partial=0, and there they stay close (that frame's window is small there).
    data = music[: 44100 * 2]
    with_partial = _live_output(separator_2stems, LiveSettings(128, 4, 15, partial=1), data)
    without = _live_output(separator_2stems, LiveSettings(128, 4, 15), data)
    positions = np.arange(len(data)) + 4096  # padded positions (the model's 4096 zeros first)
    early = (positions // 1024) % 4 == 0  # [D*H, (D+1)*H) for every run's D (multiples of 4)
    for name in with_partial:
        a, b = with_partial[name], without[name]
        np.testing.assert_allclose(a[~early], b[~early], rtol=0, atol=1e-6)
        error = np.sum((a[early] - b[early]) ** 2)
        assert error > 0  # they were made another way
        assert 10 * np.log10(np.sum(b[early] ** 2) / error) > 32  # close: 38-40 dB here (24 dB
        # if the partial sum were not renormalised)
