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
