"""Tests of splitstems.audio: decoding, resampling, streaming, atomic encoding, errors."""

from __future__ import annotations

import os
import wave
from pathlib import Path

import numpy as np
import pytest

from splitstems import audio
from splitstems.audio import AudioInfo, AudioWriter, load, probe, save, stream
from splitstems.errors import AudioError, OutputError

SR = 44100


def _require(path: Path) -> Path:
    """Skip (fail under CI=true) when a file of the shared folder is missing."""
    if not path.exists():
        message = f"shared test file missing: {path}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def _tone(n: int, *, rate: int = SR, freq: float = 440.0, n_channels: int = 2) -> np.ndarray:
    """A tonal stereo test signal with a slow envelope (not periodic in a frame)."""
    t = np.arange(n) / rate
    left = 0.5 * np.sin(2 * np.pi * freq * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 1.3 * t))
    right = 0.3 * np.sin(2 * np.pi * 1.5 * freq * t + 0.5)
    return np.stack([left, right][:n_channels], axis=1).astype(np.float32)


def _int16_exact(n: int, n_channels: int = 2, seed: int = 0) -> np.ndarray:
    """Random int16-representable floats, including both extremes."""
    ints = np.random.default_rng(seed).integers(-32768, 32768, (n, n_channels))
    ints[0] = -32768
    ints[1] = 32767
    return (ints / 32768).astype(np.float32)


def _write_wav_int16(path: Path, ints: np.ndarray, rate: int = SR) -> None:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1 if ints.ndim == 1 else ints.shape[1])
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(ints.astype("<i2").tobytes())


def _best_correlation(x: np.ndarray, y: np.ndarray, max_lag: int = 4096) -> tuple[float, int]:
    """Highest correlation of mono x, y over lags of y against x (y[lag:] ~ x)."""
    best = (-1.0, 0)
    for lag in range(-max_lag, max_lag + 1, 1):
        a = x[max(-lag, 0) :]
        b = y[max(lag, 0) :]
        m = min(len(a), len(b))
        if m < len(x) // 2:
            continue
        c = float(np.corrcoef(a[:m], b[:m])[0, 1])
        if c > best[0]:
            best = (c, lag)
    return best


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("bit_depth", [16, 24, "32f", 32])
def test_wav_round_trip_is_exact(tmp_path: Path, bit_depth: int | str) -> None:
    x = _int16_exact(5000)
    path = tmp_path / "x.wav"
    save(path, x, sample_rate=SR, bit_depth=bit_depth)
    y = load(path)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_array_equal(y, x)
    assert probe(path) == AudioInfo(
        duration=pytest.approx(5000 / SR),
        sample_rate=SR,
        n_channels=2,
        codec={16: "pcm_s16le", 24: "pcm_s24le"}.get(bit_depth, "pcm_f32le"),
    )


def test_wav_24_bit_and_float_keep_their_precision(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x24 = (rng.integers(-(2**23), 2**23, (3000, 2)) / 2**23).astype(np.float32)
    save(tmp_path / "a.wav", x24, sample_rate=SR, bit_depth=24)
    np.testing.assert_array_equal(load(tmp_path / "a.wav"), x24)
    xf = rng.uniform(-1.5, 1.5, (3000, 2)).astype(np.float32)  # float wav is not clipped
    save(tmp_path / "b.wav", xf, sample_rate=SR, bit_depth="32f")
    np.testing.assert_array_equal(load(tmp_path / "b.wav"), xf)


def test_int16_wav_written_by_wave_module_decodes_exactly(tmp_path: Path) -> None:
    ints = np.random.default_rng(2).integers(-32768, 32768, (4000, 2)).astype(np.int16)
    _write_wav_int16(tmp_path / "w.wav", ints)
    np.testing.assert_array_equal(load(tmp_path / "w.wav"), ints.astype(np.float32) / 32768)


def test_integer_encoding_clips_and_rounds_like_ffmpeg(tmp_path: Path) -> None:
    x = np.array([[1.0, -1.0], [1.5, -1.5], [0.5 / 32768, 1.5 / 32768], [-0.6 / 32768, 0.0]])
    save(tmp_path / "c.wav", x.astype(np.float32), sample_rate=SR)
    with wave.open(str(tmp_path / "c.wav")) as f:
        ints = np.frombuffer(f.readframes(4), "<i2").reshape(4, 2)
    # lrintf(x * 32768) clipped: round half to even, 1.0 -> 32767
    np.testing.assert_array_equal(ints, [[32767, -32768], [32767, -32768], [0, 2], [-1, 0]])


@pytest.mark.parametrize("bit_depth", [16, 24])
def test_flac_round_trip_is_exact(tmp_path: Path, bit_depth: int) -> None:
    x = _int16_exact(10000)
    save(tmp_path / "x.flac", x, sample_rate=SR, bit_depth=bit_depth)
    np.testing.assert_array_equal(load(tmp_path / "x.flac"), x)
    assert probe(tmp_path / "x.flac").codec == "flac"


@pytest.mark.parametrize(
    ("suffix", "slack"), [("mp3", 0), ("ogg", 1024), ("m4a", 2048), ("wma", 2048)]
)
def test_lossy_round_trip_keeps_length_and_signal(tmp_path: Path, suffix: str, slack: int) -> None:
    x = _tone(SR)  # 1 s
    path = tmp_path / f"x.{suffix}"
    save(path, x, sample_rate=SR, bitrate="192k")
    info = probe(path)
    codecs = {"mp3": {"mp3"}, "ogg": {"vorbis", "opus"}, "m4a": {"aac"}, "wma": {"wmav2"}}
    assert info.codec in codecs[suffix] and info.n_channels == 2
    # Opus (this wheel's ogg fallback when libvorbis is missing) always runs at 48 kHz
    assert info.sample_rate == (48000 if info.codec == "opus" else SR)
    y = load(path)
    # Encoders pad to whole frames; MP3 (LAME header) is trimmed exactly by the decoder.
    assert len(x) <= len(y) <= len(x) + slack
    for channel in range(2):
        corr, lag = _best_correlation(x[:, channel], y[:, channel], max_lag=64)
        assert corr > 0.9
        assert lag == 0  # no encoder delay left over


def test_mono_file_is_duplicated_to_stereo_and_stereo_averaged_to_mono(tmp_path: Path) -> None:
    ints = np.random.default_rng(3).integers(-32768, 32768, 3000).astype(np.int16)
    _write_wav_int16(tmp_path / "m.wav", ints)
    y = load(tmp_path / "m.wav")
    expected = ints.astype(np.float32) / 32768
    assert y.shape == (3000, 2)
    np.testing.assert_array_equal(y[:, 0], expected)
    np.testing.assert_array_equal(y[:, 1], expected)
    x = _int16_exact(3000)
    save(tmp_path / "s.wav", x, sample_rate=SR)
    mono = load(tmp_path / "s.wav", n_channels=1)
    np.testing.assert_allclose(mono[:, 0], x.mean(axis=1), atol=1e-7)


def test_mono_writer_accepts_1d_chunks(tmp_path: Path) -> None:
    x = _int16_exact(2000, n_channels=1)
    with AudioWriter(tmp_path / "m.flac", sample_rate=SR, n_channels=1) as writer:
        writer.write(x[:700, 0])
        writer.write(x[700:])
    assert probe(tmp_path / "m.flac").n_channels == 1
    np.testing.assert_array_equal(load(tmp_path / "m.flac", n_channels=1), x)


def test_resampling_48k_keeps_duration_and_pitch(tmp_path: Path) -> None:
    x = _tone(48000, rate=48000, freq=1000.0)
    save(tmp_path / "h.wav", x, sample_rate=48000, bit_depth="32f")
    y = load(tmp_path / "h.wav", sample_rate=SR)
    assert abs(len(y) - SR) <= 1
    spectrum = np.abs(np.fft.rfft(y[:, 0] * np.hanning(len(y))))
    peak_hz = np.argmax(spectrum) * SR / len(y)
    assert abs(peak_hz - 1000.0) < 2.0
    assert 0.25 < np.max(np.abs(y[:, 0])) < 0.55  # amplitude preserved (0.5 * envelope)


# --------------------------------------------------------------------------- offset, stream


def test_offset_and_duration_are_sample_exact(tmp_path: Path) -> None:
    x = _int16_exact(3 * SR, seed=4)
    save(tmp_path / "x.wav", x, sample_rate=SR)
    y = load(tmp_path / "x.wav", offset=0.5, duration=1.25)
    np.testing.assert_array_equal(y, x[22050 : 22050 + 55125])
    # duration past the end returns what is there
    np.testing.assert_array_equal(load(tmp_path / "x.wav", offset=2.5, duration=10), x[110250:])


def test_offset_beyond_end_raises(tmp_path: Path) -> None:
    save(tmp_path / "x.wav", _int16_exact(SR), sample_rate=SR)
    with pytest.raises(AudioError, match=r"x\.wav: offset 2 s is beyond the end"):
        load(tmp_path / "x.wav", offset=2.0)


def test_seeking_gives_the_same_samples_as_decoding_from_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared_dir: Path
) -> None:
    mp3 = _require(shared_dir / "audio" / "examples" / "audio_example.mp3")
    x = _int16_exact(4 * SR, seed=5)
    save(tmp_path / "x.flac", x, sample_rate=SR)
    seeks: list[int | None] = []
    original = audio._Source._seek

    def spy(self: audio._Source, log: audio._DecodeLog):
        found = original(self, log)
        seeks.append(None if found is None else found[0])
        return found

    monkeypatch.setattr(audio._Source, "_seek", spy)
    for path in (tmp_path / "x.flac", mp3):
        full = load(path)
        monkeypatch.setattr(audio, "_SEEK_MIN_OFFSET", 0.0)
        for offset in (1.7, 3.1):
            start = round(offset * SR)
            part = load(path, offset=offset, duration=0.5)
            np.testing.assert_array_equal(part, full[start : start + 22050])
        monkeypatch.setattr(audio, "_SEEK_MIN_OFFSET", 10.0)
    # the offsets were reached by seeking (to at most 1 s before them), not by decoding
    assert all(position is not None and position > 0 for position in seeks[1:3] + seeks[4:6])


@pytest.mark.parametrize("rate", [SR, 22050])
def test_stream_chunks_concatenate_to_load(tmp_path: Path, rate: int) -> None:
    x = _tone(3 * rate + 123, rate=rate)
    save(tmp_path / "x.wav", x, sample_rate=rate, bit_depth="32f")
    kwargs = {"offset": 0.3, "duration": 2.1}
    whole = load(tmp_path / "x.wav", **kwargs)
    chunks = list(stream(tmp_path / "x.wav", chunk_samples=10000, **kwargs))
    assert all(len(c) == 10000 for c in chunks[:-1]) and 0 < len(chunks[-1]) <= 10000
    joined = np.concatenate(chunks)
    assert joined.shape == whole.shape
    if rate == SR:
        np.testing.assert_array_equal(joined, whole)
    else:
        assert abs(len(whole) - round(2.1 * SR)) <= 1
        # streaming soxr against one-shot soxr of the exact source segment
        reference = audio.soxr.resample(x[round(0.3 * rate) :][: round(2.1 * rate)], rate, SR)
        np.testing.assert_allclose(joined, reference, atol=1e-4)


def test_stream_whole_file_equals_load_on_mp3(shared_dir: Path) -> None:
    mp3 = _require(shared_dir / "audio" / "examples" / "audio_example.mp3")
    chunks = list(stream(mp3, chunk_samples=44100))
    assert [len(c) for c in chunks[:-1]] == [44100] * (len(chunks) - 1)
    np.testing.assert_array_equal(np.concatenate(chunks), load(mp3))


# --------------------------------------------------------------------------- shared files


def test_shared_mp3_decodes(shared_dir: Path) -> None:
    mp3 = _require(shared_dir / "audio" / "examples" / "audio_example.mp3")
    info = probe(mp3)
    assert (info.codec, info.sample_rate, info.n_channels) == ("mp3", SR, 2)
    assert info.duration == pytest.approx(10.88, abs=0.01)
    y = load(mp3)
    assert y.shape == (479832, 2) and y.dtype == np.float32
    assert 0.1 < np.abs(y).max() < 1.5  # MP3 decodes to float, it can overshoot 1.0


def test_shared_stem_mp4_streams_decode(shared_dir: Path) -> None:
    stems = sorted((shared_dir / "audio" / "musdb7" / "test").glob("*.stem.mp4"))
    path = _require(stems[0] if stems else shared_dir / "audio" / "musdb7" / "test" / "*.stem.mp4")
    mixture = load(path, stream=0)
    vocals = load(path, stream=4)
    assert mixture.shape == vocals.shape and mixture.shape[1] == 2 and len(mixture) > SR
    assert not np.array_equal(mixture, vocals)
    assert probe(path, stream=4).codec == "aac"
    with pytest.raises(AudioError, match="no audio stream 5"):
        load(path, stream=5)


def test_reference_wav_is_int16_over_32768(shared_dir: Path) -> None:
    path = _require(shared_dir / "audio" / "reference" / "inputs" / "BKS_Too_Much.wav")
    with wave.open(str(path)) as f:
        assert f.getsampwidth() == 2
        raw = np.frombuffer(f.readframes(f.getnframes()), "<i2").reshape(-1, f.getnchannels())
    np.testing.assert_array_equal(load(path), raw.astype(np.float32) / 32768)


# --------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match=r"song\.mp3: file not found$"):
        load(tmp_path / "song.mp3")
    with pytest.raises(AudioError, match="file not found"):
        stream(tmp_path / "song.mp3", chunk_samples=100)  # raised at the call, not later


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="is a directory"):
        probe(tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty\.wav: empty file"):
        load(tmp_path / "empty.wav")


def test_text_file_is_not_audio(tmp_path: Path) -> None:
    (tmp_path / "notes.mp3").write_text("these are my notes, not music\n" * 20)
    with pytest.raises(AudioError, match=r"notes\.mp3: not an audio file \(") as info:
        load(tmp_path / "notes.mp3")
    assert "\n" not in str(info.value)


def test_truncated_mp3_decodes_a_little_or_fails_cleanly(tmp_path: Path, shared_dir: Path) -> None:
    mp3 = _require(shared_dir / "audio" / "examples" / "audio_example.mp3")
    (tmp_path / "trunc.mp3").write_bytes(mp3.read_bytes()[:1000])
    try:
        y = load(tmp_path / "trunc.mp3")
    except AudioError as exc:
        assert "trunc.mp3" in str(exc)
    else:
        assert y.shape[1] == 2 and 0 < len(y) < SR
    # cut mid-stream: what is there decodes, identical to the start of the whole file
    (tmp_path / "half.mp3").write_bytes(mp3.read_bytes()[:20000])
    part = load(tmp_path / "half.mp3")
    assert SR // 2 < len(part) < 2 * SR
    np.testing.assert_array_equal(part[: SR // 2], load(mp3, duration=0.5))


def test_zero_length_wav(tmp_path: Path) -> None:
    _write_wav_int16(tmp_path / "quiet.wav", np.zeros((0, 2), np.int16))
    assert probe(tmp_path / "quiet.wav").n_channels == 2
    with pytest.raises(AudioError, match=r"quiet\.wav: zero-length audio"):
        load(tmp_path / "quiet.wav")


def test_video_without_audio(tmp_path: Path) -> None:
    av = pytest.importorskip("av")
    with av.open(str(tmp_path / "a.mp4"), "w") as container:
        video = container.add_stream("mpeg4", rate=10)
        video.width = video.height = 32
        frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
        container.mux(video.encode(frame))
        container.mux(video.encode(None))
    with pytest.raises(AudioError, match=r"a\.mp4: no audio stream$"):
        load(tmp_path / "a.mp4")


def test_bad_arguments_raise_value_error(tmp_path: Path) -> None:
    save(tmp_path / "x.wav", _int16_exact(100), sample_rate=SR)
    with pytest.raises(ValueError):
        load(tmp_path / "x.wav", offset=-1.0)
    with pytest.raises(ValueError):
        stream(tmp_path / "x.wav", chunk_samples=0)


# --------------------------------------------------------------------------- bad output


def test_save_creates_parent_dirs_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "out" / "song" / "vocals.mp3"
    save(path, _tone(4000), sample_rate=SR)
    assert sorted(p.name for p in path.parent.iterdir()) == ["vocals.mp3"]


def test_save_replaces_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "x.wav"
    path.write_bytes(b"old")
    x = _int16_exact(100)
    save(path, x, sample_rate=SR)
    np.testing.assert_array_equal(load(path), x)


def test_unwritable_output_raises_output_error(tmp_path: Path) -> None:
    (tmp_path / "file.txt").write_text("a regular file, not a directory")
    target = tmp_path / "file.txt" / "out.wav"
    with pytest.raises(OutputError, match=r"out\.wav: .*file\.txt is not a directory"):
        save(target, _tone(100), sample_rate=SR)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_failed_writes_leave_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), AudioWriter(tmp_path / "a.flac", sample_rate=SR) as writer:
        writer.write(_tone(5000))
        raise RuntimeError("interrupted")
    with pytest.raises(ValueError):  # wrong number of channels
        save(tmp_path / "b.wav", np.zeros((10, 2, 2), np.float32), sample_rate=SR)
    with pytest.raises(AudioError, match="flac supports bit_depth 16 or 24"):
        save(tmp_path / "c.flac", _tone(100), sample_rate=SR, bit_depth="32f")
    with pytest.raises(AudioError, match="cannot encode"):  # LAME has no 1 Hz
        save(tmp_path / "d.mp3", _tone(100), sample_rate=1)
    with pytest.raises(AudioError, match="unknown codec"):
        save(tmp_path / "e.xyz", _tone(100), sample_rate=SR, codec="xyz")
    with pytest.raises(AudioError, match="cannot tell the codec"):
        save(tmp_path / "f.xyz", _tone(100), sample_rate=SR)
    assert list(tmp_path.iterdir()) == []


def test_writer_writes_in_chunks_like_save(tmp_path: Path) -> None:
    x = _int16_exact(12345)
    with AudioWriter(tmp_path / "a.wav", sample_rate=SR) as writer:
        for begin in range(0, len(x), 1000):
            writer.write(x[begin : begin + 1000])
        assert not (tmp_path / "a.wav").exists()  # committed only on close
    np.testing.assert_array_equal(load(tmp_path / "a.wav"), x)
