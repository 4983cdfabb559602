"""Training data: CSVs and MUSDB folders, chunks, crops, augmentation, bad input."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from trainkit import TRACKS, mixed_csv, noise_wav, write_config

from splitstems import audio
from splitstems.config import load_config
from splitstems.train import DataError, train
from splitstems.train.augment import Augmenter, pitch_shift, time_stretch
from splitstems.train.data import (
    TrainingSet,
    chunk_starts,
    musdb_songs,
    prepare_chunks,
    read_csv,
)


def test_chunks_are_spread_as_the_original():
    assert chunk_starts(100.0, n_chunks=2, chunk_duration=20.0) == [0.5, 79.5]
    assert chunk_starts(100.0, n_chunks=3, chunk_duration=20.0) == [0.5, 40.0, 79.5]
    assert chunk_starts(100.0, n_chunks=1, chunk_duration=12.0) == [44.0]  # central
    assert chunk_starts(7.0, n_chunks=2, chunk_duration=20.0) == [0.5, 0.0]  # short song


def test_csv_without_an_instrument_column_fails_before_training(previews, tmp_path):
    csv = tmp_path / "bad.csv"
    csv.write_text("mix_path,vocals_path,duration\na.wav,b.wav,3\n")
    config = write_config(tmp_path, previews, train_csv=str(csv))
    with pytest.raises(DataError, match="accompaniment_path"):
        train(config, data_root=previews, progress=False)
    assert not (tmp_path / "model").exists()  # nothing written


def test_bad_songs_are_skipped_with_a_warning(previews, tmp_path, caplog):
    config = load_config(write_config(tmp_path, previews))
    songs = read_csv(mixed_csv(previews, tmp_path), previews, config)
    with caplog.at_level(logging.WARNING):
        prepared = prepare_chunks(
            songs, config, cache_dir=tmp_path / "cache", n_chunks=2, chunk_duration=20.0
        )
    assert {c.song for c in prepared.chunks} == {songs[0].name}
    reasons = [s.reason for s in prepared.skipped]
    assert len(reasons) == 3 and prepared.n_songs == 4
    assert "missing.wav: file not found" in reasons[0]
    assert "notes.wav: not an audio file" in reasons[1]
    assert "shorter than T=64 frames" in reasons[2]
    assert caplog.text.count("skipping training song") == 3


def test_no_usable_song_is_an_error_before_training(previews, tmp_path):
    csv = tmp_path / "none.csv"
    csv.write_text("mix_path,vocals_path,accompaniment_path\nx.wav,y.wav,z.wav\n")
    config = write_config(tmp_path, previews, train_csv=str(csv))
    with pytest.raises(DataError, match="no usable training song"):
        train(config, data_root=tmp_path, progress=False)


def test_chunk_shorter_than_t_in_the_config_is_refused(previews, tmp_path):
    from splitstems.errors import ConfigError

    config = write_config(tmp_path, previews, chunk_duration=0.1)
    with pytest.raises(ConfigError, match="shorter than T=64 frames"):
        train(config, data_root=previews, progress=False)


def _musdb(tmp_path: Path, shared_dir: Path) -> Path:
    root = tmp_path / "musdb"
    (root / "train").mkdir(parents=True)
    for name in ("Traffic Experiment - Sirens", TRACKS[0]):  # a validation track, a train one
        src = shared_dir / "audio" / "musdb7" / "train" / f"{name}.stem.mp4"
        os.symlink(src, root / "train" / src.name)
    return root


def test_musdb_folder_split_and_accompaniment(shared_dir, tmp_path, previews):
    config = load_config(write_config(tmp_path, previews))
    training, validation = musdb_songs(_musdb(tmp_path, shared_dir), config)
    assert [s.name for s in training] == [TRACKS[0]]
    assert [s.name for s in validation] == ["Traffic Experiment - Sirens"]
    mix, vocals, accompaniment = training[0].sources
    assert [r.stream for r in mix] == [0] and [r.stream for r in vocals] == [4]
    assert [r.stream for r in accompaniment] == [1, 2, 3]
    prepared = prepare_chunks(
        training, config, cache_dir=tmp_path / "cache", n_chunks=1, chunk_duration=12.0
    )
    (chunk,) = prepared.chunks
    cached = np.load(chunk.path)
    path = shared_dir / "audio" / "musdb7" / "train" / f"{TRACKS[0]}.stem.mp4"
    stems = [audio.load(path, stream=k)[: cached.shape[2]].T for k in range(5)]
    np.testing.assert_array_equal(cached[0], stems[0])
    np.testing.assert_array_equal(cached[1], stems[4])
    np.testing.assert_allclose(cached[2], stems[1] + stems[2] + stems[3], atol=1e-6)
    # A second preparation reads the cache (same file, nothing decoded).
    again = prepare_chunks(
        training, config, cache_dir=tmp_path / "cache", n_chunks=1, chunk_duration=12.0
    )
    assert again.chunks == prepared.chunks


def test_musdb_hq_layout_and_missing_instrument(tmp_path, previews):
    root = tmp_path / "hq"
    for name in ("Leaf - Summerghost", "Some Band - Some Song"):
        for stem in ("mixture", "drums", "bass", "other", "vocals"):
            noise_wav(root / "train" / name / f"{stem}.wav", 0.2)
    config = load_config(write_config(tmp_path, previews))
    training, validation = musdb_songs(root, config)
    assert [s.name for s in training] == ["Some Band - Some Song"]
    assert [s.name for s in validation] == ["Leaf - Summerghost"]
    assert [r.path.name for r in training[0].sources[2]] == ["drums.wav", "bass.wav", "other.wav"]
    piano = load_config(write_config(tmp_path, previews, instrument_list=["vocals", "piano"]))
    with pytest.raises(DataError, match="MUSDB18 has no piano"):
        musdb_songs(root, piano)
    with pytest.raises(DataError, match="no MUSDB18 tracks"):
        musdb_songs(tmp_path / "empty", config)


def test_csv_rows_resolve_against_the_data_root(previews, tmp_path):
    config = load_config(write_config(tmp_path, previews))
    songs = read_csv(previews / "train.csv", previews, config)
    assert len(songs) == 2 and songs[0].duration == pytest.approx(6.8, abs=0.1)
    assert all(ref.path.is_file() for song in songs for refs in song.sources for ref in refs)


def test_batches_are_a_pure_function_of_seed_and_step(previews, tmp_path):
    config = load_config(write_config(tmp_path, previews))
    songs = read_csv(previews / "train.csv", previews, config)
    prepared = prepare_chunks(
        songs, config, cache_dir=tmp_path / "cache", n_chunks=2, chunk_duration=20.0
    )
    a = TrainingSet(prepared.chunks, config, seed=3, batch_size=4)
    b = TrainingSet(prepared.chunks, config, seed=3, batch_size=4)
    mix, targets = a.batch(5)
    assert mix.shape == (4, 2, 64, 128) and targets.shape == (4, 2, 2, 64, 128)
    assert torch.equal(mix, b.batch(5)[0]) and torch.equal(targets, b.batch(5)[1])
    assert not torch.equal(mix, a.batch(6)[0])
    # The mix magnitude is about the magnitude of the sum of its stems (a real crop).
    assert float(mix.mean()) > 0
    assert torch.allclose(mix.sum(), (targets.sum(1)).sum(), rtol=0.5)


def test_spectrogram_augmentation_is_the_originals():
    mags = torch.rand(3, 2, 64, 128)
    assert torch.allclose(time_stretch(mags, 1.0), mags)
    assert torch.allclose(pitch_shift(mags, 0.0), mags)
    longer = time_stretch(mags, 1.1)  # 70 frames, central 64 kept
    assert longer.shape == mags.shape
    shorter = time_stretch(mags, 0.9)  # 57 frames, zero-padded in the centre
    assert shorter.shape == mags.shape and float(shorter[..., :3, :].abs().sum()) == 0
    up = pitch_shift(mags, 1.0)  # 135 bins, the low 128 kept
    down = pitch_shift(mags, -1.0)  # 120 bins, zeros above
    assert up.shape == down.shape == mags.shape and float(down[..., 120:].abs().sum()) == 0
    torch.testing.assert_close(up[..., 0], mags[..., 0])  # bin 0 stays in place


def test_audio_augmentation_with_pedalboard_is_seeded(tmp_path, previews):
    pytest.importorskip("pedalboard")
    config = load_config(write_config(tmp_path, previews))
    augmenter = Augmenter("audio", config)
    rng = np.random.default_rng(0)
    chunk = (0.1 * rng.standard_normal((3, 2, 44100))).astype(np.float32)
    length = (config.T - 1) * config.frame_step + config.frame_length
    a = augmenter.crop_waveforms(chunk, length, np.random.default_rng(1))
    b = augmenter.crop_waveforms(chunk, length, np.random.default_rng(1))
    assert a.shape == (3, 2, length) and np.array_equal(a, b)
    assert np.abs(a).max() > 0.01
