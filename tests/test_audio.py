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


def test_wav_files_are_opened_with_a_small_probe(tmp_path: Path) -> None:
    # FFmpeg analyses ~1 MB of a PCM WAV before its first packet (18 ms an open), and
    # hands it out in 4 KB packets; a WAV file gets a 32 KB probe and 256 KB packets,
    # and decodes to the same samples (5 s: past the probe, several packets).
    ints = np.random.default_rng(5).integers(-32768, 32768, (5 * SR, 2)).astype(np.int16)
    _write_wav_int16(tmp_path / "w.wav", ints)
    options = audio._open_options(str(tmp_path / "w.wav"))
    assert options == {"probesize": "32768", "max_size": "262144"}
    np.testing.assert_array_equal(load(tmp_path / "w.wav"), ints.astype(np.float32) / 32768)
    save(tmp_path / "w.flac", ints.astype(np.float32) / 32768, sample_rate=SR)
    assert audio._open_options(str(tmp_path / "w.flac")) is None  # FFmpeg's defaults
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    assert audio._open_options(str(fifo)) is None  # not opened: no writer, it would block


def test_spdif_in_a_wav_is_still_found_with_the_small_probe(tmp_path: Path) -> None:
    # AC-3 wrapped for S/PDIF in a 16-bit PCM WAV (as DVD rips have it): FFmpeg finds it
    # in the first 64 KB, whatever the probe size; it must not be read as PCM noise.
    import io

    import av

    raw = io.BytesIO()
    with av.open(raw, "w", format="spdif") as container:
        out = container.add_stream("ac3", rate=48000, layout="stereo")
        tone = _tone(48000 * 2, rate=48000)
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(tone.T), format="fltp", layout="stereo"
        )
        frame.sample_rate = 48000
        for packet in [*out.encode(frame), *out.encode(None)]:
            container.mux(packet)
    pcm = np.frombuffer(raw.getvalue(), "<i2")
    _write_wav_int16(tmp_path / "spdif.wav", pcm[: pcm.size // 2 * 2].reshape(-1, 2), 48000)
    assert audio._open_options(str(tmp_path / "spdif.wav")) is not None
    assert probe(tmp_path / "spdif.wav").codec == "ac3"


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
    # a first chunk of its own size (the engine starts on one model segment), same samples
    first = list(stream(tmp_path / "x.wav", chunk_samples=10000, first_chunk_samples=777, **kwargs))
    assert len(first[0]) == 777 and all(len(c) == 10000 for c in first[1:-1])
    np.testing.assert_array_equal(np.concatenate(first), joined)
    with pytest.raises(ValueError, match="positive integers"):
        stream(tmp_path / "x.wav", chunk_samples=10000, first_chunk_samples=0.5)
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


def test_truncated_mp3_is_an_error_but_its_start_still_decodes(
    tmp_path: Path, shared_dir: Path
) -> None:
    mp3 = _require(shared_dir / "audio" / "examples" / "audio_example.mp3")
    (tmp_path / "trunc.mp3").write_bytes(mp3.read_bytes()[:1000])
    with pytest.raises(AudioError, match=r"trunc\.mp3: truncated"):  # even the header
        load(tmp_path / "trunc.mp3")
    # cut mid-stream: reading the whole file fails, what is there decodes as the original
    (tmp_path / "half.mp3").write_bytes(mp3.read_bytes()[:20000])
    with pytest.raises(
        AudioError, match=r"half\.mp3: truncated: decodes to 0\.785 s of the 10\.881 s"
    ):
        load(tmp_path / "half.mp3")
    part = load(tmp_path / "half.mp3", duration=0.7)
    np.testing.assert_array_equal(part, load(mp3, duration=0.7))


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


# --------------------------------------------------------------------------- damaged input


def _encode(
    path: Path,
    x: np.ndarray,
    *,
    muxer: str,
    encoder: str,
    rate: int = SR,
    bit_rate: int | None = None,
    vbr_quality: int | None = None,
    options: dict[str, str] | None = None,
) -> Path:
    """Encode ``x`` with PyAV directly (settings our writer does not offer)."""
    av = pytest.importorskip("av")
    from fractions import Fraction

    with av.open(str(path), "w", format=muxer, options=options or {}) as container:
        out = container.add_stream(encoder, rate=rate)
        ctx = out.codec_context
        ctx.layout = "stereo"
        formats = [f.name for f in ctx.codec.audio_formats]
        ctx.format = next(f for f in ("fltp", "flt", "s16") if f in formats)
        if bit_rate is not None:
            ctx.bit_rate = bit_rate
        if vbr_quality is not None:  # as ffmpeg -q:a
            ctx.qscale = True
            ctx.global_quality = vbr_quality * 118
        size = ctx.frame_size or 4096
        for n, begin in enumerate(range(0, len(x), size)):
            data = x[begin : begin + size]
            if ctx.format.name == "s16":
                data = np.rint(data * 32767).astype(np.int16)
            planar = ctx.format.name.endswith("p")
            array = np.ascontiguousarray(data.T if planar else data.reshape(1, -1))
            frame = av.AudioFrame.from_ndarray(array, format=ctx.format.name, layout="stereo")
            frame.sample_rate, frame.time_base, frame.pts = rate, Fraction(1, rate), n * size
            container.mux(out.encode(frame))
        container.mux(out.encode(None))
    return path


def _all_codecs(folder: Path, seconds: float) -> dict[str, Path]:
    """The same music in every container and codec we read, complete."""
    x = _tone(round(seconds * SR))
    files = {}
    for suffix in ("wav", "flac", "mp3", "ogg", "m4a", "wma"):
        files[suffix] = folder / f"a.{suffix}"
        save(files[suffix], x, sample_rate=SR)
    files["wav 24"] = folder / "a24.wav"
    save(files["wav 24"], x, sample_rate=SR, bit_depth=24)
    files["wav 32f"] = folder / "a32.wav"
    save(files["wav 32f"], x, sample_rate=SR, bit_depth="32f")
    files["flac 24"] = folder / "a24.flac"
    save(files["flac 24"], x, sample_rate=SR, bit_depth=24)
    files["aiff"] = _encode(folder / "a.aiff", x, muxer="aiff", encoder="pcm_s16be")
    files["rf64"] = _encode(
        folder / "rf64.wav", x, muxer="wav", encoder="pcm_s16le", options={"rf64": "always"}
    )
    files["m4a faststart"] = _encode(
        folder / "fast.m4a", x, muxer="ipod", encoder="aac", options={"movflags": "+faststart"}
    )
    files["mp3 cbr 320k"] = _encode(
        folder / "cbr.mp3", x, muxer="mp3", encoder="libmp3lame", bit_rate=320_000
    )
    files["mp3 vbr"] = _encode(
        folder / "vbr.mp3", x, muxer="mp3", encoder="libmp3lame", vbr_quality=4
    )
    no_xing = {"write_xing": "0"}
    files["mp3 cbr without xing"] = _encode(
        folder / "cbr_nox.mp3", x, muxer="mp3", encoder="libmp3lame", options=no_xing
    )
    files["mp3 vbr without xing"] = _encode(
        folder / "vbr_nox.mp3", x, muxer="mp3", encoder="libmp3lame", vbr_quality=2, options=no_xing
    )
    return files


@pytest.fixture(scope="module")
def codec_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """6.8 s of a tone in every codec and container we read (made once)."""
    return _all_codecs(tmp_path_factory.mktemp("codecs"), 6.8)


def test_complete_files_are_never_called_truncated(
    codec_files: dict[str, Path], shared_dir: Path
) -> None:
    # An MP3 without a Xing header has an estimated duration (from the bitrate) that can
    # differ from what it decodes to in both directions: it must not count as truncated.
    for name, path in codec_files.items():
        assert abs(len(load(path)) / SR - 6.8) < 0.1, name
    real = [shared_dir / "audio" / "examples" / "audio_example.mp3"]
    real += sorted((shared_dir / "audio" / "reference" / "inputs").glob("*.wav"))
    for path in real:
        assert len(load(_require(path))) > SR
    for path in sorted((shared_dir / "audio" / "musdb7" / "test").glob("*.stem.mp4"))[:3]:
        for index in range(5):
            assert len(load(path, stream=index)) > SR


@pytest.mark.parametrize("size", [0, 0x7FFFF000, 0xFFFFFFFF])
def test_a_wav_written_to_a_pipe_is_not_truncated(tmp_path: Path, size: int) -> None:
    # Writers that cannot seek back leave a placeholder data size (FFmpeg, SoX)
    x = _int16_exact(44100)
    save(tmp_path / "x.wav", x, sample_rate=SR)
    data = bytearray((tmp_path / "x.wav").read_bytes())
    at = data.index(b"data") + 4
    data[at : at + 4] = size.to_bytes(4, "little")
    (tmp_path / "piped.wav").write_bytes(bytes(data))
    np.testing.assert_array_equal(load(tmp_path / "piped.wav"), x)


@pytest.mark.parametrize(
    ("codec", "cut", "decoded"),
    [
        ("wav", 3000, "0.017"),
        ("wav", 0.5, "3.400"),
        ("wav 32f", 0.5, "3.400"),
        ("wav 24", 0.5, "3.400"),
        ("flac", 0.5, r"3\.\d+"),
        ("mp3", 0.5, r"3\.\d+"),
        ("mp3 vbr", 0.5, r"3\.\d+"),
        ("aiff", 0.5, "3.400"),
        ("m4a faststart", 0.5, r"3\.\d+"),
    ],
)
def test_a_truncated_file_is_an_error_naming_both_lengths(
    tmp_path: Path, codec_files: dict[str, Path], codec: str, cut: float, decoded: str
) -> None:
    path = codec_files[codec]
    data = path.read_bytes()
    damaged = tmp_path / f"cut{path.suffix}"
    damaged.write_bytes(data[: cut if cut > 1 else int(len(data) * cut)])
    message = rf"^{damaged}: truncated: decodes to {decoded} s of the 6\.800 s its header gives$"
    with pytest.raises(AudioError, match=message):
        load(damaged)
    with pytest.raises(AudioError, match=message):  # at the end of the stream
        for _ in stream(damaged, chunk_samples=SR):
            pass
    with pytest.raises(AudioError, match=message):  # a duration past the decoded end
        load(damaged, duration=60)
    assert len(load(damaged, duration=0.01)) == 441  # what is there is fine


# Bytes per sample frame (FLAC: its last frame is cut by a single byte already).
_FRAME_BYTES = {"wav": 4, "wav 24": 6, "wav 32f": 8, "rf64": 4, "aiff": 4, "flac": 1, "flac 24": 1}


@pytest.mark.parametrize("codec", sorted(_FRAME_BYTES))
def test_lossless_files_short_by_a_sample_are_truncated(
    tmp_path: Path, codec_files: dict[str, Path], codec: str
) -> None:
    # Their headers count samples exactly and the codecs have no padding: no tolerance.
    # (0.1 s let a WAV missing 96 ms, or a FLAC missing its last 100 bytes, pass.)
    data = codec_files[codec].read_bytes()
    damaged = tmp_path / f"short{codec_files[codec].suffix}"
    frame = _FRAME_BYTES[codec]
    for cut in (frame, 100, round(0.096 * SR) * frame):
        damaged.write_bytes(data[: len(data) - cut])
        message = r"short\.\w+: truncated: decodes to 6\.\d+ s of the 6\.80+ s its header gives$"
        with pytest.raises(AudioError, match=message):
            load(damaged)


def test_a_sample_short_names_lengths_that_differ(tmp_path: Path) -> None:
    x = _int16_exact(SR)
    save(tmp_path / "x.wav", x, sample_rate=SR)
    (tmp_path / "cut.wav").write_bytes((tmp_path / "x.wav").read_bytes()[:-4])
    with pytest.raises(
        AudioError, match=r"cut\.wav: truncated: decodes to 0\.99998 s of the 1\.00000 s"
    ):
        load(tmp_path / "cut.wav")


def test_a_wav_cut_right_after_its_header_is_truncated(tmp_path: Path) -> None:
    x = _int16_exact(3 * SR)
    _write_wav_int16(tmp_path / "x.wav", np.rint(x * 32768).astype(np.int16))
    (tmp_path / "head.wav").write_bytes((tmp_path / "x.wav").read_bytes()[:44])
    with pytest.raises(
        AudioError, match=r"head\.wav: truncated: decodes to 0\.000 s of the 3\.000 s its header"
    ):
        load(tmp_path / "head.wav")


def test_a_cut_wav_fails_when_opened_not_after_decoding(tmp_path: Path) -> None:
    # A long cut WAV would otherwise be decoded (and separated) to its end first.
    save(tmp_path / "x.wav", _int16_exact(20 * SR), sample_rate=SR)
    data = (tmp_path / "x.wav").read_bytes()
    (tmp_path / "half.wav").write_bytes(data[: 44 + 10 * SR * 4])
    message = r"half\.wav: truncated: decodes to 10\.000 s of the 20\.000 s its header gives$"
    with pytest.raises(AudioError, match=message):
        stream(tmp_path / "half.wav", chunk_samples=SR)  # the call, before any chunk
    # The part before the cut may still be asked for.
    chunks = stream(tmp_path / "half.wav", chunk_samples=SR, offset=1, duration=8)
    assert sum(len(c) for c in chunks) == 8 * SR


def test_an_offset_in_the_part_cut_off_is_truncated(tmp_path: Path) -> None:
    save(tmp_path / "x.wav", _int16_exact(20 * SR), sample_rate=SR)
    data = (tmp_path / "x.wav").read_bytes()
    (tmp_path / "half.wav").write_bytes(data[: 44 + 10 * SR * 4])  # 10 s of 20
    message = r"half\.wav: truncated: decodes to 10\.000 s of the 20\.000 s its header gives$"
    for offset in (5, 12, 25):  # before, after and beyond the cut (a seek from 10 s on)
        with pytest.raises(AudioError, match=message):
            load(tmp_path / "half.wav", offset=offset)
    assert len(load(tmp_path / "half.wav", offset=5, duration=2)) == 2 * SR


def test_an_ogg_file_cut_inside_a_page_is_truncated(
    tmp_path: Path, codec_files: dict[str, Path]
) -> None:
    # Ogg has no total length: a cut file ends at the granule of its last whole page
    data = codec_files["ogg"].read_bytes()
    damaged = tmp_path / "cut.ogg"
    for size in (len(data) - 100, len(data) // 2):
        damaged.write_bytes(data[:size])
        with pytest.raises(
            AudioError,
            match=r"cut\.ogg: truncated: decodes to \d\.\d{3} s, then the file ends inside an "
            r"Ogg page \(Ogg headers give no total length\)$",
        ):
            load(damaged)
    # a cut exactly between two pages cannot be told from a shorter file (documented)
    pages = [i for i in range(len(data)) if data.startswith(b"OggS", i)]
    damaged.write_bytes(data[: pages[len(pages) // 2]])
    assert 0 < len(load(damaged)) < 6.8 * SR
    # junk after the last page is not a cut
    damaged.write_bytes(data + b"\0" * 500)
    assert abs(len(load(damaged)) / SR - 6.8) < 0.1


def test_a_damaged_stem_mp4_is_truncated_in_every_stream(tmp_path: Path, shared_dir: Path) -> None:
    track = _require(shared_dir / "audio" / "musdb7" / "test" / "BKS - Too Much.stem.mp4")
    data = track.read_bytes()
    (tmp_path / "cut.stem.mp4").write_bytes(data[: len(data) // 3])
    for index in range(5):
        with pytest.raises(AudioError, match=r"cut\.stem\.mp4: truncated: .* of the 6\.800 s"):
            load(tmp_path / "cut.stem.mp4", stream=index)


def test_files_cut_in_their_header_are_truncated_or_corrupt(
    tmp_path: Path, codec_files: dict[str, Path]
) -> None:
    for codec in ("flac", "ogg", "m4a"):
        damaged = tmp_path / f"head.{codec}"
        damaged.write_bytes(codec_files[codec].read_bytes()[:3000])
        with pytest.raises(AudioError, match=rf"head\.{codec}: truncated or corrupt audio file"):
            load(damaged)


def _write_float_wav(path: Path, x: np.ndarray) -> None:
    save(path, x, sample_rate=SR, bit_depth="32f")


def test_non_finite_samples_become_zero_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    x = _tone(6 * SR)
    damaged = x.copy()
    damaged[3 * SR, 0] = np.nan
    damaged[3 * SR + 10, 1] = np.inf
    damaged[5 * SR] = -np.inf
    _write_float_wav(tmp_path / "nan.wav", damaged)
    clean = damaged.copy()
    clean[~np.isfinite(clean)] = 0
    warning = f"{tmp_path / 'nan.wav'}: 4 non-finite samples replaced by 0 (first at 3.000 s)"
    with caplog.at_level("WARNING", logger="splitstems.audio"):
        y = load(tmp_path / "nan.wav")
    np.testing.assert_array_equal(y, clean)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("splitstems")] == [warning]
    caplog.clear()
    with caplog.at_level("WARNING", logger="splitstems.audio"):
        chunks = list(stream(tmp_path / "nan.wav", chunk_samples=SR // 3))
    np.testing.assert_array_equal(np.concatenate(chunks), clean)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("splitstems")] == [warning]
    _write_float_wav(tmp_path / "zeros.wav", clean)
    caplog.clear()
    with caplog.at_level("WARNING", logger="splitstems.audio"):
        resampled = load(tmp_path / "nan.wav", sample_rate=22050, warn=False)
        from_offset = load(tmp_path / "nan.wav", offset=4.0)
    np.testing.assert_array_equal(resampled, load(tmp_path / "zeros.wav", sample_rate=22050))
    np.testing.assert_array_equal(from_offset, clean[4 * SR :])
    assert [r.getMessage() for r in caplog.records if r.name.startswith("splitstems")] == [
        f"{tmp_path / 'nan.wav'}: 2 non-finite samples replaced by 0 (first at 5.000 s)"
    ]


def test_non_finite_cleaning_copies_only_when_needed() -> None:
    x = _tone(1000)
    guard = audio.NonFinite("waveform", SR)
    assert guard.clean(x) is x and guard.message() is None
    y = x.copy()
    y[500, 1] = np.nan
    cleaned = guard.clean(y, start=SR)
    assert np.isnan(y[500, 1]) and cleaned[500, 1] == 0  # the input is left alone
    np.testing.assert_array_equal(np.delete(cleaned, 500, 0), np.delete(x, 500, 0))
    huge = np.full((10, 2), 3e37, np.float32)  # finite, but its sum overflows
    assert guard.clean(huge) is huge
    assert guard.message() == "waveform: 1 non-finite sample replaced by 0 (first at 1.011 s)"


# --------------------------------------------------------------------------- encoder limits


@pytest.mark.parametrize(
    ("codec", "bitrate", "allowed"),
    [
        ("mp3", "500k", "32k-320k"),
        ("mp3", "16k", "32k-320k"),
        ("m4a", "448k", "24k-384k"),
        ("ogg", "600k", "8k-512k"),
        ("wma", "16k", "24k-512k"),
    ],
)
def test_a_bitrate_the_encoder_cannot_do_is_refused(
    tmp_path: Path, codec: str, bitrate: str, allowed: str
) -> None:
    message = rf"codec {codec}: bitrate {bitrate} is outside what \w+ can do \({allowed} at"
    with pytest.raises(OutputError, match=message):
        audio.check_encoding(codec, bitrate=bitrate)
    with pytest.raises(AudioError, match=rf"x\.{codec}: bitrate {bitrate} is outside"):
        save(tmp_path / f"x.{codec}", _tone(100), sample_rate=SR, bitrate=bitrate)
    assert list(tmp_path.iterdir()) == []


def test_bitrates_at_the_limits_are_honoured(tmp_path: Path) -> None:
    x = _tone(5 * SR)
    sizes = {}
    for bitrate in ("32k", "320k"):
        assert audio.check_encoding("mp3", bitrate=bitrate) == []
        save(tmp_path / f"{bitrate}.mp3", x, sample_rate=SR, bitrate=bitrate)
        sizes[bitrate] = (tmp_path / f"{bitrate}.mp3").stat().st_size * 8 / 5
    assert sizes == {
        "32k": pytest.approx(32_000, rel=0.05),
        "320k": pytest.approx(320_000, rel=0.05),
    }
    for codec, bitrate in (("m4a", "384k"), ("ogg", "512k"), ("wma", "24k")):
        assert audio.check_encoding(codec, bitrate=bitrate) == []


def test_settings_a_codec_ignores_are_warnings() -> None:
    assert audio.check_encoding("wav") == []
    assert audio.check_encoding("flac", bit_depth=24) == []
    assert audio.check_encoding("wav", bitrate="320k") == [
        "codec wav: lossless, the bitrate 320k is ignored"
    ]
    assert audio.check_encoding("flac", bitrate="96k", bit_depth=16) == [
        "codec flac: lossless, the bitrate 96k is ignored"
    ]
    assert audio.check_encoding("mp3", bit_depth=24) == [
        "codec mp3: lossy, the bit depth 24 is ignored"
    ]
    with pytest.raises(OutputError, match="codec wav: bitrate must look like"):
        audio.check_encoding("wav", bitrate="loud")


# --------------------------------------------------------------------------- stale temp files


def test_a_writer_removes_the_temp_files_a_killed_run_left(tmp_path: Path) -> None:
    import subprocess
    import sys

    from splitstems.files import temp_path

    target = tmp_path / "vocals.wav"
    dead = subprocess.run(  # a process that made a temp file and is gone
        [sys.executable, "-c", "import os, sys; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    stale = tmp_path / f".vocals.{int(dead.stdout)}-0123abcd.part.wav"
    stale.write_bytes(b"RIFF half a stem")
    mine = temp_path(target)  # this process is alive: its temp file stays
    mine.write_bytes(b"being written")
    other = tmp_path / ".drums.999999-0123abcd.part.wav"  # another target's: not ours to judge
    other.write_bytes(b"x")
    save(target, _tone(100), sample_rate=SR)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [mine.name, other.name, "vocals.wav"]
    )


@pytest.mark.parametrize("suffix", ["wav", "flac"])
def test_writer_keeps_no_view_of_the_callers_chunks(tmp_path: Path, suffix: str) -> None:
    # A caller that reuses its buffer after write() must not change what was written
    # (FLAC's frames are 4,608 samples: the end of the first chunk waits for the next).
    first, second = _tone(10_000), _tone(10_000, freq=660.0)
    with AudioWriter(tmp_path / f"kept.{suffix}", sample_rate=SR) as writer:
        buffer = first.copy()
        writer.write(buffer)
        buffer[:] = 0.5  # reused
        writer.write(second)
    expected = np.concatenate([first, second])
    np.testing.assert_allclose(load(tmp_path / f"kept.{suffix}"), expected, atol=1 / 32768)
