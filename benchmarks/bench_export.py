"""Benchmark the ONNX export against torch, in one run: model compute, end to end, sizes.

What it measures, on the same machine in the same run (compare the ratios: the
machine is shared and timings are noisy):

* model compute: one batch of real magnitudes ``(batch, 2, 512, 1024)`` through the
  torch model as the engine runs it (fused inference form, float32), and through
  onnxruntime with the float32 and float16 exports and a dynamically quantised int8
  one (``onnxruntime.quantization.quantize_dynamic``; not offered by ``splitstems
  export``, measured here to show why);
* end to end in process: ``Engine.separate`` of ``--seconds`` of real music (MUSDB18
  excerpts from the shared folder, looped) with each backend, and the torch-free example
  (``examples/onnx_separate.py``'s ``separate``: numpy STFT + onnxruntime);
* end to end on the command line: ``splitstems separate -p spleeter:2stems`` and
  ``-p DIR/config.json`` (float32, float16) on a WAV of that music, and the example
  script, each a fresh process (start-up, decoding and encoding included);

each the best of ``--repeat`` after a warm-up, the backends taking turns so that the
load of other processes falls on all of them alike;
* quality: SDR (dB) of each backend's stems against torch float32's;
* the model files' sizes, and how long the export took.

Run::

    .venv/bin/python benchmarks/bench_export.py                 # 2stems, ~2 min
    .venv/bin/python benchmarks/bench_export.py --seconds 180 --threads 1

Prints a markdown table and writes ``benchmarks/results/export-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED = Path(os.environ.get("SPLITSTEMS_SHARED", ROOT.parent / "shared")).resolve()


def _example_module():
    spec = importlib.util.spec_from_file_location(
        "onnx_separate", ROOT / "examples" / "onnx_separate.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    reference = reference.astype(np.float64)
    error = np.sum((reference - estimate) ** 2)
    return float(10 * np.log10(np.sum(reference**2) / max(error, 1e-300)))


def _round_robin(runs: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Best wall time of each run; the runs take turns (load hits them alike); one warm-up."""
    for fn in runs.values():
        fn()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeat):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="spleeter:2stems")
    parser.add_argument("--seconds", type=float, default=60.0, help="end-to-end audio length")
    parser.add_argument("--batch", type=int, default=1, help="segments per model call")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="fixed CPU threads (default: model compute with the usable CPUs, separations "
        "with the plan separate makes)",
    )
    args = parser.parse_args()

    os.environ.setdefault("SPLITSTEMS_MODEL_DIR", str(SHARED / "models" / "spleeter"))
    from splitstems import audio, dsp
    from splitstems.device import set_threads, usable_cpus
    from splitstems.engine import Engine
    from splitstems.export import OnnxModel, export_model
    from splitstems.separator import load_model

    threads = args.threads or usable_cpus()
    set_threads(threads)
    model, config = load_model(args.model, progress=False)
    music = audio.load(SHARED / "audio" / "reference" / "inputs" / "concat_3.wav")
    n = int(args.seconds * config.sample_rate)
    waveform = np.ascontiguousarray(np.resize(music, (n, music.shape[1])))  # looped

    work = Path(tempfile.mkdtemp(prefix="bench-export-"))
    variants: dict[str, Path] = {}
    export_s: dict[str, float] = {}
    for precision in ("float32", "float16"):
        start = time.perf_counter()
        result = export_model(model, config, work / precision, precision=precision)
        export_s[precision] = time.perf_counter() - start
        variants[precision] = result.onnx_path
    from onnxruntime.quantization import QuantType, quantize_dynamic

    (work / "int8").mkdir()
    start = time.perf_counter()
    quantize_dynamic(variants["float32"], work / "int8" / "model.onnx", weight_type=QuantType.QInt8)
    export_s["int8"] = time.perf_counter() - start
    variants["int8"] = work / "int8" / "model.onnx"

    # model compute on real magnitudes
    frames = config.T * args.batch
    need = (frames + 3) * config.frame_step
    samples = torch.from_numpy(np.ascontiguousarray(np.resize(music, (need, music.shape[1])).T))
    spec = dsp.stft_frames(
        samples, dsp.hann_window(config.frame_length), frame_step=config.frame_step
    )
    magnitudes = (
        spec[:, :frames, : config.F].abs().unflatten(1, (args.batch, config.T)).transpose(0, 1)
    )
    magnitudes = magnitudes.contiguous()
    torch_engine = Engine(
        model, config, device="cpu", threads=args.threads, batch_segments=args.batch
    )
    onnx_models = {}
    for name, path in variants.items():
        onnx_models[name] = OnnxModel(path, config, precision=name)
        onnx_models[name].configure(threads=threads)

    def run_torch() -> None:
        with torch.inference_mode():
            torch_engine.estimate(magnitudes)

    compute = _round_robin(
        {
            "torch": run_torch,
            **{name: (lambda m=m: m(magnitudes)) for name, m in onnx_models.items()},
        },
        args.repeat,
    )

    # end to end, in process (the same engine; only the model differs)
    outputs: dict[str, dict[str, np.ndarray]] = {name: {} for name in ("torch", *variants)}
    engines = {"torch": torch_engine}
    for name, onnx_model in onnx_models.items():
        engines[name] = Engine(
            onnx_model, config, device="cpu", threads=args.threads, batch_segments=args.batch
        )
    example = _example_module()
    outputs["example"] = {}
    in_process = _round_robin(
        {
            **{
                name: (lambda e=e, o=outputs[name]: o.update(e.separate(waveform)))
                for name, e in engines.items()
            },
            "example": lambda: outputs["example"].update(
                example.separate(work / "float32", waveform)
            ),
        },
        args.repeat,
    )

    # the command line, file to files (decoding, encoding, start-up included)
    song = work / "song.wav"
    audio.save(song, waveform, sample_rate=config.sample_rate)
    exe = [sys.executable, "-m", "splitstems", "separate", "-o", str(work / "out")]
    if args.threads:
        exe += ["--threads", str(args.threads)]
    commands = {
        "torch": [*exe, "-p", args.model, str(song)],
        **{
            name: [*exe, "-p", str(work / name / "config.json"), str(song)]
            for name in ("float32", "float16")
        },
        "example": [
            sys.executable,
            str(ROOT / "examples" / "onnx_separate.py"),
            str(work / "float32"),
            str(song),
            str(work / "ex"),
        ],
    }
    command_line = _round_robin(
        {
            name: (lambda c=c: subprocess.run(c, check=True, capture_output=True))
            for name, c in commands.items()
        },
        args.repeat,
    )

    labels = {
        "torch": "torch float32 (fused, the default)",
        "float32": "onnxruntime float32",
        "float16": "onnxruntime float16",
        "int8": "onnxruntime int8 (dynamic; not offered)",
        "example": "examples/onnx_separate.py (numpy + onnxruntime float32)",
    }
    rows: list[dict[str, Any]] = []
    for name, label in labels.items():
        row: dict[str, Any] = {"backend": label}
        if name in compute:
            row["compute_s"] = compute[name]
        row["end_to_end_s"] = in_process[name]
        if name in command_line:
            row["command_s"] = command_line[name]
        if name != "torch":
            row["sdr_vs_torch_db"] = min(
                _sdr(outputs["torch"][k], outputs[name][k]) for k in config.instruments
            )
        if name in variants:
            row["size_mb"] = variants[name].stat().st_size / 1e6
            row["export_s"] = export_s[name]
        rows.append(row)

    base = rows[0]
    print(
        f"\n{args.model}, batch {args.batch} x {config.T} frames, {args.seconds:g} s of music, "
        f"{threads} threads, best of {args.repeat} (backends taking turns)\n"
    )
    print(
        "| backend | model compute s | vs torch | in process s | vs torch | command s | "
        "vs torch | SDR vs torch dB | file MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")

    def cell(row: dict[str, Any], key: str, fmt: str) -> list[str]:
        if key not in row:
            return ["-", "-"]
        return [format(row[key], fmt), f"{base[key] / row[key]:.2f}x"]

    for row in rows:
        cells = [
            row["backend"],
            *cell(row, "compute_s", ".3f"),
            *cell(row, "end_to_end_s", ".2f"),
            *cell(row, "command_s", ".2f"),
            f"{row['sdr_vs_torch_db']:.1f}" if "sdr_vs_torch_db" in row else "(reference)",
            f"{row['size_mb']:.1f}" if "size_mb" in row else "-",
        ]
        print("| " + " | ".join(cells) + " |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"export-{stamp}.json"
    import onnxruntime

    path.write_text(
        json.dumps(
            {
                "model": args.model,
                "seconds": args.seconds,
                "batch": args.batch,
                "threads": threads,
                "repeat": args.repeat,
                "torch": torch.__version__,
                "onnxruntime": onnxruntime.__version__,
                "machine": platform.processor() or platform.machine(),
                "python": sys.version.split()[0],
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
