"""Training data: songs from Spleeter CSVs or MUSDB18 folders, cached chunks, random crops.

The pipeline of the original (``spleeter/dataset.py``), without TensorFlow:

1. Songs come from a CSV (``mix_path,<instrument>_path,...,duration``, paths relative to
   the data root) or straight from a MUSDB18 (``.stem.mp4``) or MUSDB18-HQ (``.wav``
   folders) tree, where ``accompaniment`` is drums + bass + other.
2. Each training song is cut into ``n_chunks_per_song`` chunks of ``chunk_duration``
   seconds, spread over the song with a 0.5 s margin (the original's formula); each
   validation song gives its central 12 s. Every chunk is decoded and resampled once
   and cached as a ``.npy`` file (mix and instruments, ``(sources, channels, samples)``
   float32), so training never decodes audio again. Spleeter caches the spectrograms of
   the chunks; the waveform is the same size at these STFT settings, and a crop's STFT
   costs a few milliseconds, against seconds for a training step.
3. Every training sample is a random ``T``-frame crop of one chunk (chunks shuffled each
   epoch), its magnitude STFT cut to ``F`` bins: the mix is the input, the instruments
   are the targets. Optional augmentation: see :mod:`splitstems.train.augment`.

Everything random is a pure function of ``(random_seed, sample index)``, so a run that
resumes at step ``k`` sees exactly the batches an uninterrupted run sees.

Bad data is found before training starts: a missing or undecodable file, a song shorter
than ``T`` frames, or a stem file without the stream an instrument needs skips that song
with a warning (and the count is reported at the end); instruments of the config that
the data does not have, or no usable song at all, raise :class:`DataError`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from splitstems import audio, dsp
from splitstems.config import ModelConfig
from splitstems.errors import AudioError, ConfigError
from splitstems.files import atomic_write

__all__ = [
    "DataError",
    "AudioRef",
    "Song",
    "Chunk",
    "Skipped",
    "MUSDB_STEMS",
    "MUSDB_VALIDATION",
    "read_csv",
    "musdb_songs",
    "prepare_chunks",
    "chunk_starts",
    "TrainingSet",
    "ValidationSet",
]

log = logging.getLogger(__name__)

#: Seconds left out at both ends of a song when chunks are spread (the original's MARGIN).
MARGIN = 0.5
#: Streams of a MUSDB18 ``.stem.mp4`` (and file names of MUSDB18-HQ, ``mixture`` = 0).
MUSDB_STEMS: dict[str, int] = {"mixture": 0, "drums": 1, "bass": 2, "other": 3, "vocals": 4}
#: Instruments made by summing MUSDB stems.
MUSDB_SUMS: dict[str, tuple[str, ...]] = {"accompaniment": ("drums", "bass", "other")}
#: MUSDB18's official validation split: 14 tracks of its train folder (as in ``musdb``).
MUSDB_VALIDATION: frozenset[str] = frozenset(
    {
        "Actions - One Minute Smile",
        "Alexander Ross - Goodbye Bolero",
        "ANiMAL - Rockshow",
        "Clara Berry And Wooldog - Waltz For My Victims",
        "Fergessen - Nos Palpitants",
        "James May - On The Line",
        "Johnny Lokke - Promises & Lies",
        "Leaf - Summerghost",
        "Meaxic - Take A Step",
        "Patrick Talbot - A Reason To Leave",
        "Skelpolu - Human Mistakes",
        "Traffic Experiment - Sirens",
        "Triviul - Angelsaint",
        "Young Griffo - Pennies",
    }
)
_CACHE_VERSION = 1


class DataError(ConfigError):
    """The training data cannot be used (no usable song, instruments missing, bad CSV)."""


@dataclass(frozen=True)
class AudioRef:
    """One audio stream of a file (``stream`` counts audio streams only)."""

    path: Path
    stream: int = 0


@dataclass(frozen=True)
class Song:
    """One song: the mix first, then one source per instrument, each the sum of its refs."""

    name: str
    sources: tuple[tuple[AudioRef, ...], ...]
    duration: float | None = None


@dataclass(frozen=True)
class Chunk:
    """A cached chunk: ``path`` holds float32 ``(sources, channels, n_samples)``."""

    song: str
    path: Path
    start: float
    n_samples: int


@dataclass(frozen=True)
class Skipped:
    """A song left out of training, and why."""

    song: str
    reason: str


@dataclass
class Prepared:
    """The chunks of a set of songs and the songs that were skipped."""

    chunks: list[Chunk] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    n_songs: int = 0


# --------------------------------------------------------------------------- song lists


def read_csv(
    csv_path: str | os.PathLike[str], data_root: str | os.PathLike[str], config: ModelConfig
) -> list[Song]:
    """Read a Spleeter dataset CSV: ``mix_path,<instrument>_path,...,duration``.

    Paths are relative to ``data_root`` (absolute paths are kept). The ``duration``
    column (seconds) is optional; missing durations are probed from the files.

    Raises:
        DataError: the CSV cannot be read, or it has no column for the mix or one of
            the config's instruments.
    """
    path = Path(csv_path)
    root = Path(data_root)
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = list(reader)
    except FileNotFoundError:
        raise DataError(f"{path}: dataset CSV not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read dataset CSV ({exc})") from None
    names = (config.mix_name, *config.instruments)
    missing = [n for n in names if f"{n}_path" not in columns]
    if missing:
        raise DataError(
            f"{path}: no column {', '.join(f'{n}_path' for n in missing)} for "
            f"{', '.join(missing)} of the config (the CSV has: {', '.join(columns) or 'nothing'})"
        )
    songs = []
    for line, row in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        sources = []
        for name in names:
            value = row.get(f"{name}_path", "")
            ref = Path(value) if Path(value).is_absolute() else root / value
            sources.append((AudioRef(ref if value else Path("")),))
        duration = None
        try:
            duration = float(row["duration"]) if row.get("duration") else None
        except ValueError:
            log.warning("%s line %d: ignoring duration %r", path, line, row.get("duration"))
        if duration is not None and not (math.isfinite(duration) and duration > 0):
            duration = None
        mix = row.get(f"{config.mix_name}_path", "")
        songs.append(Song(f"{path.name}:{line} {mix}", tuple(sources), duration))
    if not songs:
        raise DataError(f"{path}: the CSV lists no songs")
    return songs


def _musdb_source(name: str, track: Path, hq: bool) -> tuple[AudioRef, ...]:
    stems = MUSDB_SUMS.get(name, (name,))
    if hq:
        return tuple(AudioRef(track / f"{stem}.wav") for stem in stems)
    return tuple(AudioRef(track, MUSDB_STEMS[stem]) for stem in stems)


def musdb_songs(
    mus_dir: str | os.PathLike[str], config: ModelConfig
) -> tuple[list[Song], list[Song]]:
    """Return (training, validation) songs of a MUSDB18 or MUSDB18-HQ folder.

    ``mus_dir/train`` holds ``<track>.stem.mp4`` files (MUSDB18) or ``<track>/`` folders
    of ``mixture.wav``, ``drums.wav``, ``bass.wav``, ``other.wav``, ``vocals.wav``
    (MUSDB18-HQ). Training uses ``train`` minus MUSDB's official validation tracks, which
    are the validation set; if none of them is there, ``test`` validates (with a
    warning). The config's mix is the mixture; its instruments must be MUSDB stems or
    ``accompaniment`` (drums + bass + other).

    Raises:
        DataError: no MUSDB tracks in ``mus_dir/train``, or an instrument MUSDB lacks.
    """
    root = Path(mus_dir)
    known = sorted([*MUSDB_STEMS.keys() - {"mixture"}, *MUSDB_SUMS])
    unknown = [i for i in config.instruments if i not in known]
    if unknown:
        raise DataError(
            f"{root}: MUSDB18 has no {', '.join(unknown)} (it has {', '.join(known)}; "
            "accompaniment = drums + bass + other)"
        )

    def tracks(subset: str) -> tuple[list[Path], bool]:
        folder = root / subset
        stems = sorted(folder.glob("*.stem.mp4")) if folder.is_dir() else []
        if stems:
            return stems, False
        dirs = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        return [
            d for d in dirs if (d / "mixture.wav").exists() or (d / "vocals.wav").exists()
        ], True

    def song(track: Path, hq: bool) -> Song:
        name = track.name.removesuffix(".stem.mp4")
        sources = (_musdb_source("mixture", track, hq),) + tuple(
            _musdb_source(i, track, hq) for i in config.instruments
        )
        return Song(name, sources)

    train_tracks, hq = tracks("train")
    if not train_tracks:
        raise DataError(
            f"{root}: no MUSDB18 tracks in {root / 'train'} (expected <track>.stem.mp4 "
            "files, or MUSDB18-HQ <track>/ folders of .wav stems)"
        )
    training = [song(t, hq) for t in train_tracks]
    validation = [s for s in training if s.name in MUSDB_VALIDATION]
    training = [s for s in training if s.name not in MUSDB_VALIDATION]
    if not validation:
        test_tracks, test_hq = tracks("test")
        validation = [song(t, test_hq) for t in test_tracks]
        if validation:
            log.warning(
                "%s: none of MUSDB18's validation tracks is in train/: validating on test/",
                root,
            )
    if not training:
        raise DataError(f"{root}: every track of train/ is a validation track")
    return training, validation


# --------------------------------------------------------------------------- chunks


def chunk_starts(duration: float, *, n_chunks: int, chunk_duration: float) -> list[float]:
    """Start times of a song's chunks, as the original spreads them.

    One chunk: the central one. More: ``k * (duration - chunk - 2 * MARGIN) / (n - 1)
    + MARGIN`` (never below 0), so a song shorter than a chunk gives shorter chunks.
    """
    if n_chunks == 1:
        return [max(duration / 2 - chunk_duration / 2, 0.0)]
    span = duration - chunk_duration - 2 * MARGIN
    return [max(k * span / (n_chunks - 1) + MARGIN, 0.0) for k in range(n_chunks)]


def _file_identity(ref: AudioRef) -> list[object]:
    stat = ref.path.stat()
    return [str(ref.path.resolve()), ref.stream, stat.st_size, stat.st_mtime_ns]


def _cache_path(
    folder: Path, song: Song, start: float, duration: float, config: ModelConfig
) -> Path:
    identity = {
        "version": _CACHE_VERSION,
        "sources": [[_file_identity(r) for r in refs] for refs in song.sources],
        "start": round(start, 6),
        "duration": round(duration, 6),
        "sample_rate": config.sample_rate,
        "n_channels": config.n_channels,
    }
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:20]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(song.name).name)[:60] or "song"
    return folder / f"{stem}-{key}.npy"


def _load_source(refs: tuple[AudioRef, ...], start: float, duration: float, config: ModelConfig):
    total = None
    for ref in refs:
        data = audio.load(
            ref.path,
            offset=start,
            duration=duration,
            sample_rate=config.sample_rate,
            n_channels=config.n_channels,
            stream=ref.stream,
        )
        if total is None:
            total = data
        else:
            n = min(total.shape[0], data.shape[0])
            total = total[:n] + data[:n]
    assert total is not None
    return total


def _decode_chunk(song: Song, start: float, duration: float, config: ModelConfig) -> np.ndarray:
    """Decode all sources of a chunk → float32 ``(sources, channels, n_samples)``."""
    sources = [_load_source(refs, start, duration, config) for refs in song.sources]
    n = min(s.shape[0] for s in sources)
    return np.ascontiguousarray(np.stack([s[:n].T for s in sources]), dtype=np.float32)


def _save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.save would add ".npy" to a name
            np.save(fh, array, allow_pickle=False)

    atomic_write(path, write)


def _n_frames(n_samples: int, config: ModelConfig) -> int:
    """Whole STFT frames in ``n_samples`` (no padding, as the training crops)."""
    if n_samples < config.frame_length:
        return 0
    return 1 + (n_samples - config.frame_length) // config.frame_step


def _check_files(song: Song) -> None:
    """Raise :class:`AudioError` unless every file of the song opens as audio."""
    for refs in song.sources:
        for ref in refs:
            if ref.path == Path(""):
                raise AudioError("empty path in the CSV")
            audio.probe(ref.path, stream=ref.stream)


def _song_duration(song: Song) -> float:
    if song.duration is not None:
        return song.duration
    info = audio.probe(song.sources[0][0].path, stream=song.sources[0][0].stream)
    if info.duration is not None:
        return info.duration
    first = song.sources[0][0]
    return audio.load(first.path, stream=first.stream).shape[0] / 44100.0


def prepare_chunks(
    songs: list[Song],
    config: ModelConfig,
    *,
    cache_dir: str | os.PathLike[str],
    n_chunks: int,
    chunk_duration: float,
    what: str = "training",
    progress: bool = False,
) -> Prepared:
    """Decode (or find in the cache) every chunk of ``songs``; skip unusable songs.

    A song is skipped, with a warning, when a file is missing or cannot be decoded, or
    when none of its chunks has ``T`` frames; a chunk shorter than ``T`` frames of an
    otherwise long enough song is dropped (as the original filters short segments).
    """
    from tqdm import tqdm

    folder = Path(cache_dir)
    out = Prepared(n_songs=len(songs))
    min_samples = (config.T - 1) * config.frame_step + config.frame_length
    bar = tqdm(songs, desc=f"caching {what} chunks", unit="song", disable=not progress)
    for song in bar:
        try:
            chunks = []
            _check_files(song)
            duration = _song_duration(song)
            for start in chunk_starts(duration, n_chunks=n_chunks, chunk_duration=chunk_duration):
                if (duration - start) * config.sample_rate < min_samples:
                    continue  # too short for T frames: the original filters it out too
                path = _cache_path(folder, song, start, chunk_duration, config)
                array = None
                if path.is_file():
                    try:
                        array = np.load(path, mmap_mode="r")
                    except (OSError, ValueError):
                        array = None
                if array is None or array.ndim != 3 or array.shape[0] != len(song.sources):
                    array = _decode_chunk(song, start, chunk_duration, config)
                    _save_npy(path, array)
                if _n_frames(array.shape[2], config) >= config.T:
                    chunks.append(Chunk(song.name, path, start, int(array.shape[2])))
            if not chunks:
                seconds = min_samples / config.sample_rate
                raise AudioError(
                    f"shorter than T={config.T} frames ({seconds:.2f} s at "
                    f"{config.sample_rate} Hz): lower T in the config to use it"
                )
        except (AudioError, OSError, ValueError) as exc:
            reason = str(exc)
            log.warning("skipping %s song %s: %s", what, song.name, reason)
            out.skipped.append(Skipped(song.name, reason))
            continue
        out.chunks.extend(chunks)
    bar.close()
    return out


# --------------------------------------------------------------------------- samples


def _seeded(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in keys])


def magnitudes(waveforms: torch.Tensor, config: ModelConfig, window: torch.Tensor) -> torch.Tensor:
    """Magnitude STFT ``(..., n_samples)`` → ``(..., n_frames, F)`` (frames from sample 0)."""
    spec = dsp.stft_frames(waveforms, window, frame_step=config.frame_step)
    return spec[..., : config.F].abs()


class TrainingSet:
    """Random ``T``-frame crops of cached chunks, as a pure function of the sample index.

    Sample ``i`` belongs to epoch ``i // n_chunks``; each epoch visits every chunk once,
    in an order drawn from ``(seed, epoch)``; the crop (and the augmentation) of sample
    ``i`` is drawn from ``(seed, i)``. Batch ``k`` is samples ``k*B .. k*B+B-1``.
    """

    def __init__(
        self,
        chunks: list[Chunk],
        config: ModelConfig,
        *,
        seed: int,
        batch_size: int,
        augmentation: str = "none",
    ) -> None:
        if not chunks:
            raise DataError("no training chunks")
        from splitstems.train.augment import Augmenter

        self.chunks = chunks
        self.config = config
        self.seed = seed
        self.batch_size = batch_size
        self.arrays = [np.load(c.path, mmap_mode="r") for c in chunks]
        self.window = dsp.hann_window(config.frame_length)
        self.augmenter = Augmenter(augmentation, config)
        self._order_cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        """Return the number of chunks (samples per epoch)."""
        return len(self.chunks)

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = (epoch, _seeded(self.seed, epoch, 1).permutation(len(self)))
        return self._order_cache[1]

    def sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``index``: mix ``(C, T, F)`` and instruments ``(I, C, T, F)`` magnitudes."""
        epoch, position = divmod(index, len(self))
        array = self.arrays[int(self._order(epoch)[position])]
        rng = _seeded(self.seed, index, 2)
        cfg = self.config
        length = (cfg.T - 1) * cfg.frame_step + cfg.frame_length
        waveforms = self.augmenter.crop_waveforms(array, length, rng)  # (S, C, length)
        mags = magnitudes(torch.from_numpy(waveforms), cfg, self.window)  # (S, C, T, F)
        mags = self.augmenter.spectrogram(mags, rng)
        return mags[0], mags[1:]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch of step ``step``: mix ``(B, C, T, F)``, instruments ``(B, I, C, T, F)``."""
        first = step * self.batch_size
        samples = [self.sample(first + b) for b in range(self.batch_size)]
        return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])

    def batches(self, start: int, stop: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield ``(step, mix, instruments)`` for steps ``start .. stop-1``."""
        for step in range(start, stop):
            yield (step, *self.batch(step))


class ValidationSet:
    """Validation chunks: the central ``T`` frames (loss) and the whole chunk (SDR)."""

    def __init__(self, chunks: list[Chunk], config: ModelConfig) -> None:
        self.chunks = chunks
        self.config = config
        self.window = dsp.hann_window(config.frame_length)

    def __len__(self) -> int:
        """Return the number of validation chunks."""
        return len(self.chunks)

    def crop(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Central ``T`` frames of chunk ``index``: mix ``(C, T, F)``, ``(I, C, T, F)``."""
        cfg = self.config
        array = np.load(self.chunks[index].path, mmap_mode="r")
        n_frames = _n_frames(array.shape[2], cfg)
        first = max(n_frames // 2 - cfg.T // 2, 0)  # the original's time_crop
        begin = first * cfg.frame_step
        length = (cfg.T - 1) * cfg.frame_step + cfg.frame_length
        waveforms = torch.from_numpy(np.array(array[:, :, begin : begin + length]))
        mags = magnitudes(waveforms, cfg, self.window)
        return mags[0], mags[1:]

    def waveforms(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Chunk ``index``: mix ``(n, C)`` and instruments ``(I, n, C)``, float32."""
        array = np.load(self.chunks[index].path, mmap_mode="r")
        return np.array(array[0].T), np.array(array[1:].transpose(0, 2, 1))
