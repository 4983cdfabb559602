"""In-process model compute of splitstems: STFT + U-Nets + masks + iSTFT, no file I/O.

Run by ``bench_separate.py`` with the project's python::

    python benchmarks/graph_splitstems.py INPUT.wav [--model spleeter:2stems] [--fast]
        [--repeat 3] [--model-dir DIR]

Loads the 16-bit WAV, builds ``Separator(model, device='cpu')`` once (``--fast``:
``precision="fast"``), calls ``separator.separate(waveform)`` once to warm up, then
times ``repeat`` calls. Prints one JSON object on the last line of stdout.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
import wave

import numpy as np


def read_wav16(path: str) -> np.ndarray:
    """Return a 16-bit PCM WAV as float32 ``(n_samples, n_channels)`` (int16 / 32768)."""
    with wave.open(path, "rb") as handle:
        if handle.getsampwidth() != 2:
            raise SystemExit(f"{path}: expected 16-bit PCM")
        n_channels = handle.getnchannels()
        data = np.frombuffer(handle.readframes(handle.getnframes()), dtype="<i2")
    return (data.reshape(-1, n_channels).astype(np.float32)) / 32768.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("input")
    parser.add_argument("--model", default="spleeter:2stems")
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import torch

    from splitstems.separator import Separator

    kwargs: dict[str, object] = {"device": "cpu"}
    if args.model_dir:
        kwargs["model_dir"] = args.model_dir
    if args.fast:
        parameters = inspect.signature(Separator).parameters
        if "precision" in parameters:
            kwargs["precision"] = "fast"
        elif "fast" in parameters:
            kwargs["fast"] = True
        else:
            print(json.dumps({"status": "unavailable (Separator has no precision= or fast=)"}))
            return 3
    waveform = read_wav16(args.input)
    start = time.perf_counter()
    separator = Separator(args.model, **kwargs)  # type: ignore[arg-type]
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    stems = separator.separate(waveform)
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(max(1, args.repeat)):
        start = time.perf_counter()
        stems = separator.separate(waveform)
        times.append(time.perf_counter() - start)
    first = next(iter(stems.values()))
    result = {
        "status": "ok",
        "tool": "splitstems",
        "model": args.model,
        "fast": args.fast,
        "audio_s": waveform.shape[0] / separator.sample_rate,
        "output_samples": int(first.shape[0]),
        "build_s": build_s,
        "warmup_s": warmup_s,
        "times_s": times,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
