"""Separate a WAV file with an exported ONNX model: numpy, onnxruntime and soundfile only.

    splitstems export -p spleeter:2stems --format onnx -o 2stems-onnx
    python examples/onnx_separate.py 2stems-onnx song.wav out/   # or 2stems-onnx/config.json
    # -> out/song/vocals.wav, out/song/accompaniment.wav

This is the reference for porting to other runtimes (C++, onnxruntime-web, mobile): it
computes what ``splitstems separate`` computes (to float rounding), step by step:

1. Spleeter's STFT: prepend ``frame_length`` zeros, pad the end to whole hops,
   periodic Hann window, real FFT (``tf.signal.stft(pad_end=True)``).
2. The model: magnitudes of the first ``F`` bins, cut into segments of ``T`` frames
   (the last padded with zero frames), ``(batch, channels, T, F)`` → estimates
   ``(batch, instruments, channels, T, F)``.
3. Ratio masks ``(e_k^p + eps/n) / (sum_j e_j^p + eps)``, extended above ``F`` (zeros,
   or the mask's mean over frequency with ``mask_extension: average``).
4. Inverse STFT: inverse real FFT, the same window times 2/3, overlap-add; drop the
   prepended zeros and cut to the input's length.

No torch anywhere. The WAV must be at the model's sample rate (44.1 kHz for the
released models): resample it first otherwise.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import soundfile as sf

EPSILON = 1e-10


def hann(n: int) -> np.ndarray:
    """Periodic Hann window (``tf.signal.hann_window(periodic=True)``)."""
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)).astype(np.float32)


def stft(x: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """Spleeter's STFT of ``(channels, samples)`` → ``(channels, frames, n_fft // 2 + 1)``."""
    n_frames = -(-(x.shape[1] + n_fft) // hop)  # ceil: one frame per hop start
    padded = np.zeros((x.shape[0], (n_frames - 1) * hop + n_fft), np.float32)
    padded[:, n_fft : n_fft + x.shape[1]] = x  # a frame of zeros first, zeros at the end
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft, axis=1)[:, ::hop]
    return np.fft.rfft(frames * hann(n_fft), axis=-1).astype(np.complex64)


def istft(spec: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """Inverse of :func:`stft`: ``(..., frames, bins)`` → ``(..., samples)``, overlap-added."""
    frames = np.fft.irfft(spec, n=n_fft, axis=-1).astype(np.float32) * (hann(n_fft) * 2 / 3)
    *lead, n_frames, _ = frames.shape
    # Overlap-add: frame i covers hops i .. i + ratio - 1, so cut each frame into its
    # `ratio` hop-long blocks and add block r of every frame at hop i + r.
    ratio = n_fft // hop  # 4 for Spleeter (frame_length is a multiple of frame_step)
    blocks = frames.reshape(*lead, n_frames, ratio, hop)
    out = np.zeros((*lead, n_frames + ratio - 1, hop), np.float32)
    for r in range(ratio):
        out[..., r : r + n_frames, :] += blocks[..., r, :]
    return out.reshape(*lead, (n_frames + ratio - 1) * hop)


class Refused(Exception):
    """A one-line reason the script cannot go on (bad export, bad audio, unwritable output)."""


def load_export(path: Path) -> tuple[dict, ort.InferenceSession]:
    """Read an export (its folder or its config.json): the ``"onnx"`` entry and a session.

    Checks what a port should check too: the model file is the one exported (sha256),
    onnxruntime can load it, and its input and output fit the config.
    """
    config_path = path / "config.json" if path.is_dir() else path
    try:
        onnx = json.loads(config_path.read_text())["onnx"]
        model = config_path.parent / onnx["file"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise Refused(f"{path}: not a folder written by splitstems export ({exc!r})") from None
    try:
        data = model.read_bytes()
    except OSError as exc:
        raise Refused(f"{model}: cannot read the model ({exc.strerror})") from None
    if hashlib.sha256(data).hexdigest() != onnx.get("sha256"):
        raise Refused(f"{model}: its sha256 differs from the one in {config_path.name}")
    try:
        session = ort.InferenceSession(data)
    except Exception as exc:  # onnxruntime's own error types
        raise Refused(f"{model}: onnxruntime cannot load it ({str(exc).splitlines()[0]})") from None
    _, channels, _, bins = session.get_inputs()[0].shape
    n_instruments = session.get_outputs()[0].shape[1]
    if (n_instruments, channels, bins) != (len(onnx["instruments"]), onnx["n_channels"], onnx["F"]):
        raise Refused(f"{config_path}: does not fit {model.name}: export the model again")
    return onnx, session


def separate(onnx: dict, session: ort.InferenceSession, waveform: np.ndarray) -> dict:
    """Separate ``(samples, channels)`` float32 audio: instrument → ``(samples, channels)``."""
    n_fft, hop = onnx["stft"]["frame_length"], onnx["stft"]["frame_step"]
    T, F = onnx["T"], onnx["F"]  # noqa: N806 - the config's names
    instruments = onnx["instruments"]

    n_samples = waveform.shape[0]
    spec = stft(waveform.T, n_fft, hop)  # (C, frames, bins)
    n_frames = spec.shape[1]
    n_segments = -(-n_frames // T)
    magnitudes = np.zeros((spec.shape[0], n_segments * T, F), np.float32)
    magnitudes[:, :n_frames] = np.abs(spec[..., :F])
    segments = magnitudes.reshape(spec.shape[0], n_segments, T, F).transpose(1, 0, 2, 3)
    # One segment per run bounds memory; the model also takes several at once.
    estimates = np.concatenate(
        [
            session.run([onnx["output"]["name"]], {onnx["input"]["name"]: segments[s : s + 1]})[0]
            for s in range(n_segments)
        ]
    )  # (segments, instruments, C, T, F)
    estimates = estimates.transpose(1, 2, 0, 3, 4).reshape(len(instruments), spec.shape[0], -1, F)
    estimates = estimates[:, :, :n_frames]  # (instruments, C, frames, F)

    exponent = onnx["masks"]["separation_exponent"]
    powered = estimates**exponent
    masks = (powered + EPSILON / len(instruments)) / (powered.sum(axis=0) + EPSILON)
    extra = spec.shape[-1] - F
    if onnx["masks"]["mask_extension"] == "average":
        fill = np.repeat(masks.mean(axis=-1, keepdims=True), extra, axis=-1)
    else:
        fill = np.zeros((*masks.shape[:-1], extra), np.float32)
    masks = np.concatenate([masks, fill], axis=-1)

    stems = istft(masks * spec, n_fft, hop)  # (instruments, C, samples + padding)
    stems = stems[..., n_fft : n_fft + n_samples]
    return {name: np.ascontiguousarray(stems[i].T) for i, name in enumerate(instruments)}


def read_wav(source: Path, onnx: dict) -> tuple[np.ndarray, int]:
    """Read ``source`` as ``(samples, channels)`` float32 at the model's rate and channels."""
    try:
        waveform, rate = sf.read(source, dtype="float32", always_2d=True)
        with open(source, "rb") as file:
            head = file.read(8)
    except (OSError, sf.LibsndfileError) as exc:
        raise Refused(f"{source}: cannot read it as audio ({exc})") from None
    declared = int.from_bytes(head[4:8], "little") + 8  # a RIFF header gives the file's size
    if head[:4] == b"RIFF" and declared < 0xFFFFFFFF and declared > source.stat().st_size:
        raise Refused(f"{source}: truncated: {source.stat().st_size} of {declared} bytes")
    if waveform.shape[0] == 0:
        raise Refused(f"{source}: no samples")
    if rate != onnx["sample_rate"]:
        raise Refused(f"{source}: {rate} Hz, the model needs {onnx['sample_rate']} Hz")
    channels = onnx["n_channels"]
    if waveform.shape[1] == 1:
        waveform = np.repeat(waveform, channels, axis=1)  # mono: the same on every channel
    return np.ascontiguousarray(waveform[:, :channels]), rate


def write_stems(stems: dict, out: Path, rate: int) -> None:
    """Write each stem as ``out/<instrument>.wav``, 16-bit as ``separate`` (temp file, rename)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, stem in stems.items():
            pcm = np.clip(np.rint(stem * np.float32(32768)), -32768, 32767).astype(np.int16)
            part = out / f".{name}.wav.part"
            sf.write(part, pcm, rate, subtype="PCM_16", format="WAV")
            part.replace(out / f"{name}.wav")
            print(out / f"{name}.wav")
    except (OSError, sf.LibsndfileError) as exc:
        raise Refused(
            f"{out}: cannot write the stems ({getattr(exc, 'strerror', None) or exc})"
        ) from None


def main(argv: list[str]) -> int:
    """``onnx_separate.py EXPORT_DIR INPUT.wav OUTPUT_DIR``."""
    if len(argv) != 3:
        print(
            "usage: python examples/onnx_separate.py EXPORT_DIR INPUT.wav OUTPUT_DIR",
            file=sys.stderr,
        )
        return 2
    folder, source, destination = Path(argv[0]), Path(argv[1]), Path(argv[2])
    try:
        onnx, session = load_export(folder)
        waveform, rate = read_wav(source, onnx)
        stems = separate(onnx, session, waveform)
        write_stems(stems, destination / source.stem, rate)
    except Refused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
