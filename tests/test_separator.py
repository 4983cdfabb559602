"""Fidelity: our 2stems output equals what the original Spleeter wrote (>= 50 dB SDR)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fidelity import MIN_SDR_DB, sdr

from splitstems import audio
from splitstems.errors import AudioError, OutputError
from splitstems.separator import Separator, output_paths

REFERENCES = [
    "BKS_Too_Much",
    "Carlos_Gonzalez_A_Place_For_Us",
    "Hollow_Ground_Ill_Fate",
    "concat_3",
]


@pytest.mark.parametrize("name", REFERENCES)
def test_separate_matches_original_spleeter(separator_2stems, shared_dir, name):
    ref_dir = shared_dir / "audio" / "reference"
    waveform = audio.load(ref_dir / "inputs" / f"{name}.wav")
    stems = separator_2stems.separate(waveform)
    assert list(stems) == ["vocals", "accompaniment"]
    for instrument, estimate in stems.items():
        reference = audio.load(ref_dir / "2stems" / "plain" / name / f"{instrument}.flac")
        assert estimate.shape == reference.shape == waveform.shape
        assert sdr(reference, estimate) >= MIN_SDR_DB, (name, instrument)


@pytest.mark.usefixtures("use_shared_models")
def test_fast_mode_stays_within_40_db_of_faithful(separator_2stems, shared_dir):
    fast = Separator("spleeter:2stems", device="cpu", precision="fast")
    ref_dir = shared_dir / "audio" / "reference" / "inputs"
    for name in REFERENCES:
        waveform = audio.load(ref_dir / f"{name}.wav")
        faithful = separator_2stems.separate(waveform)
        quick = fast.separate(waveform)
        for instrument in faithful:
            assert sdr(faithful[instrument], quick[instrument]) >= 40.0, (name, instrument)


def test_reference_spanning_two_segments_is_long_enough(shared_dir, separator_2stems):
    # concat_3 must really cross a segment boundary for the fidelity test to mean that.
    info = audio.probe(shared_dir / "audio" / "reference" / "inputs" / "concat_3.wav")
    assert info.duration * 44100 > separator_2stems.engine.segment_samples


def test_separate_to_file_matches_original(separator_2stems, shared_dir, tmp_path):
    ref_dir = shared_dir / "audio" / "reference"
    paths = separator_2stems.separate_to_file(
        ref_dir / "inputs" / "concat_3.wav", tmp_path, codec="wav", bit_depth="32f"
    )
    assert paths == {
        "vocals": (tmp_path / "concat_3" / "vocals.wav").resolve(),
        "accompaniment": (tmp_path / "concat_3" / "accompaniment.wav").resolve(),
    }
    for instrument, path in paths.items():
        reference = audio.load(ref_dir / "2stems" / "plain" / "concat_3" / f"{instrument}.flac")
        assert sdr(reference, audio.load(path)) >= MIN_SDR_DB
    assert not list(tmp_path.rglob("*.part*"))


def test_separate_accepts_mono_and_other_rates(separator_2stems, rng):
    mono = rng.uniform(-0.3, 0.3, 22050 * 3).astype(np.float32)
    stems = separator_2stems.separate(mono, sample_rate=22050)
    assert all(v.shape == (mono.shape[0], 2) for v in stems.values())
    assert all(np.isfinite(v).all() for v in stems.values())


def test_separate_rejects_empty_waveform(separator_2stems):
    with pytest.raises(AudioError):
        separator_2stems.separate(np.zeros((0, 2), np.float32))


def test_offset_and_duration(separator_2stems, shared_dir, tmp_path):
    source = shared_dir / "audio" / "examples" / "audio_example.mp3"
    paths = separator_2stems.separate_to_file(source, tmp_path, offset=2.0, duration=3.0)
    assert audio.load(paths["vocals"]).shape == (3 * 44100, 2)


def test_bad_input_leaves_no_output(separator_2stems, tmp_path):
    bad = tmp_path / "notes.mp3"
    bad.write_text("this is not audio")
    with pytest.raises(AudioError, match="notes.mp3"):
        separator_2stems.separate_to_file(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.*"))


@pytest.mark.parametrize(
    "fmt", ["../{instrument}.wav", "/etc/{instrument}.wav", "{filename}/../../x{instrument}.wav"]
)
def test_output_paths_stay_inside_destination(tmp_path, fmt):
    with pytest.raises(OutputError, match="outside the output directory"):
        output_paths("song.mp3", tmp_path, ("vocals",), filename_format=fmt)


def test_output_paths_need_distinct_stems(tmp_path):
    with pytest.raises(OutputError, match="two stems"):
        output_paths("song.mp3", tmp_path, ("vocals", "drums"), filename_format="{filename}.wav")
    with pytest.raises(OutputError, match="bad filename format"):
        output_paths("song.mp3", tmp_path, ("vocals",), filename_format="{nope}/{instrument}")
    paths = output_paths(
        Path("a/b/song.mp3"),
        tmp_path,
        ("vocals",),
        codec="mp3",
        filename_format="{foldername}/{filename}-{instrument}.{codec}",
    )
    assert paths["vocals"] == (tmp_path / "b" / "song-vocals.mp3").resolve()


@pytest.mark.usefixtures("use_shared_models")
def test_fingerprint_names_the_config_and_weights(separator_2stems, tmp_path):
    from splitstems.config import load_config

    again = Separator("spleeter:2stems", device="cpu", progress=False)
    assert again.fingerprint() == separator_2stems.fingerprint()
    # a fresh conversion elsewhere writes other file metadata: same tensors, same print
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPLITSTEMS_CACHE", str(tmp_path / "cache"))
        converted_again = Separator("spleeter:2stems", device="cpu", progress=False)
    assert converted_again.weights_path != separator_2stems.weights_path
    assert converted_again.fingerprint() == separator_2stems.fingerprint()
    assert len(again.fingerprint()) == 16
    other_config = Separator("spleeter:2stems-16kHz", device="cpu", progress=False)
    assert other_config.fingerprint() != separator_2stems.fingerprint()
    edited = load_config("spleeter:2stems").to_json_dict()
    edited["separation_exponent"] = 1
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(edited))
    assert Separator(str(path), device="cpu", progress=False).fingerprint() not in {
        separator_2stems.fingerprint(),
        other_config.fingerprint(),
    }


# --------------------------------------------------------------------------- damaged input


def _stems_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_separate_takes_lists_and_never_changes_the_callers_array(separator_2stems, rng):
    waveform = rng.uniform(-0.3, 0.3, (44100 * 2, 2)).astype(np.float32)
    waveform[44100, 1] = np.nan
    before = waveform.copy()
    stems = separator_2stems.separate(waveform)
    np.testing.assert_array_equal(waveform, before)  # NaN included: never cleaned in place
    as_list = separator_2stems.separate(waveform.tolist(), sample_rate=44100)
    assert _stems_equal(stems, as_list)


def test_non_finite_samples_are_zeros_to_the_model_with_one_warning(separator_2stems, rng, caplog):
    waveform = rng.uniform(-0.3, 0.3, (44100 * 3, 2)).astype(np.float32)
    damaged = waveform.copy()
    damaged[44100, 0] = np.nan
    damaged[44100 + 7, 1] = np.inf
    damaged[2 * 44100, 0] = -np.inf
    zeros = np.where(np.isfinite(damaged), damaged, 0)
    with caplog.at_level("WARNING", logger="splitstems"):
        stems = separator_2stems.separate(damaged)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("splitstems")] == [
        "waveform: 3 non-finite samples replaced by 0 (first at 1.000 s)"
    ]
    assert all(np.isfinite(v).all() for v in stems.values())
    assert _stems_equal(stems, separator_2stems.separate(zeros))
    at_22k = separator_2stems.separate(damaged[::2], sample_rate=22050)
    assert all(np.isfinite(v).all() and v.shape == (66150, 2) for v in at_22k.values())


@pytest.mark.parametrize(
    ("shape", "problem"),
    [
        ((2, 44100), r"got \(2, 44100\): channels first\? pass it transposed"),
        ((8, 100), r"got \(8, 100\): channels first"),
        ((1000, 65), r"with at most 64 channels, got \(1000, 65\)"),
        ((100, 2, 2), r"got \(100, 2, 2\)"),
        ((0, 2), r"got \(0, 2\)"),
    ],
)
def test_separate_refuses_shapes_that_are_not_samples_by_channels(separator_2stems, shape, problem):
    with pytest.raises(
        AudioError, match=rf"^waveform: expected shape \(n_samples, n_channels\).*{problem}"
    ):
        separator_2stems.separate(np.zeros(shape, np.float32))


def test_separate_accepts_a_few_samples_of_many_channels(separator_2stems):
    stems = separator_2stems.separate(np.zeros((9, 6), np.float32))  # first 2 channels kept
    assert all(v.shape == (9, 2) for v in stems.values())
    stems = separator_2stems.separate(np.zeros((5, 1), np.float32))
    assert all(v.shape == (5, 2) for v in stems.values())


def test_a_file_with_nan_gives_the_stems_of_the_file_with_zeros(
    separator_2stems, rng, tmp_path, caplog
):
    waveform = rng.uniform(-0.3, 0.3, (44100 * 3, 2)).astype(np.float32)
    zeros = waveform.copy()
    zeros[int(1.5 * 44100), 0] = 0
    damaged = zeros.copy()
    damaged[int(1.5 * 44100), 0] = np.nan
    audio.save(tmp_path / "nan.wav", damaged, sample_rate=44100, bit_depth="32f")
    audio.save(tmp_path / "zeros.wav", zeros, sample_rate=44100, bit_depth="32f")
    with caplog.at_level("WARNING", logger="splitstems"):
        got = separator_2stems.separate_to_file(tmp_path / "nan.wav", tmp_path / "out")
    assert [r.getMessage() for r in caplog.records if r.name.startswith("splitstems")] == [
        f"{tmp_path / 'nan.wav'}: 1 non-finite sample replaced by 0 (first at 1.500 s)"
    ]
    want = separator_2stems.separate_to_file(tmp_path / "zeros.wav", tmp_path / "out")
    for name in got:
        assert got[name].read_bytes() == want[name].read_bytes()


def test_a_truncated_file_leaves_no_output(separator_2stems, shared_dir, tmp_path):
    source = shared_dir / "audio" / "reference" / "inputs" / "BKS_Too_Much.wav"
    data = source.read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 2])
    message = r"cut\.wav: truncated: decodes to 3\.40\d s of the 6\.803 s its header gives$"
    with pytest.raises(AudioError, match=message):
        separator_2stems.separate_to_file(tmp_path / "cut.wav", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("use_shared_models")
def test_a_file_warns_once_whatever_the_number_of_passes(rng, tmp_path, caplog):
    # the MWF reads the file once per pass (6 here): its warnings are said once
    six = rng.uniform(-0.2, 0.2, (44100 * 2, 6)).astype(np.float32)
    six[1000, 0] = np.nan
    audio.save(tmp_path / "six.wav", six, sample_rate=44100, bit_depth="32f")
    separator = Separator(
        "spleeter:2stems", MWF=True, mwf_iterations=5, device="cpu", progress=False
    )
    with caplog.at_level("WARNING", logger="splitstems"):
        separator.separate_to_file(tmp_path / "six.wav", tmp_path / "out")
    assert [r.getMessage() for r in caplog.records if r.name.startswith("splitstems")] == [
        f"{tmp_path / 'six.wav'}: keeping the first 2 of its 6 channels",
        f"{tmp_path / 'six.wav'}: 1 non-finite sample replaced by 0 (first at 0.023 s)",
    ]


@pytest.mark.parametrize(
    ("dtype", "fix"),
    [
        (
            np.int16,
            r"got integer samples \(dtype int16\): pass float samples in \[-1, 1\], "
            r"e\.g\. x / 32768$",
        ),
        (np.int32, r"\(dtype int32\): .*e\.g\. x / 2\*\*31$"),
        (np.uint8, r"\(dtype uint8\): .*e\.g\. \(x - 128\) / 128$"),
        (np.int64, r"\(dtype int64\): .*e\.g\. x / 32768 for 16-bit values$"),
        (np.bool_, r"got dtype bool: pass float samples in \[-1, 1\]$"),
        (np.complex64, r"got complex samples \(dtype complex64\): .*\(x\.real\)$"),
    ],
)
def test_separate_refuses_samples_that_are_not_floats(separator_2stems, rng, dtype, fix):
    # int16 samples were taken as floats: stems 32767 times too loud, and no error
    x = rng.uniform(-0.5, 0.5, (44100, 2))
    samples = (x * 32767).astype(dtype) if dtype != np.bool_ else x > 0
    with pytest.raises(AudioError, match=rf"^waveform: .*{fix}"):
        separator_2stems.separate(samples)
    with pytest.raises(AudioError, match=r"^waveform: got integer samples \(dtype int"):
        separator_2stems.separate([[1, 2], [3, 4]] * 10)  # a list of ints is integers too
    stems = separator_2stems.separate(x.astype(np.float16))  # any float dtype is fine
    assert all(v.dtype == np.float32 and v.shape == x.shape for v in stems.values())


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        (
            {"codec": "mp3", "bitrate": "500k"},
            r"codec mp3: bitrate 500k is outside what "
            r"libmp3lame can do \(32k-320k at 44100 Hz, 2 channels\)$",
        ),
        ({"codec": "flac", "bit_depth": "32f"}, r"codec flac: flac supports bit_depth 16 or 24"),
        ({"codec": "wav", "bit_depth": 20}, r"codec wav: bit_depth must be 16, 24, 32 or '32f'"),
        ({"codec": "ogg", "bitrate": "fast"}, r"codec ogg: bitrate must look like '128k'"),
        ({"codec": "aiff"}, r"codec aiff: unknown codec 'aiff'"),
    ],
)
def test_separate_to_file_refuses_encoding_settings_before_reading(
    separator_2stems, tmp_path, settings, problem
):
    # an OutputError (as documented), before the input is even opened (it is missing here)
    with pytest.raises(OutputError, match=rf"^{problem}"):
        separator_2stems.separate_to_file(tmp_path / "missing.wav", tmp_path / "out", **settings)
    assert not (tmp_path / "out").exists()
