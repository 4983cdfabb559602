"""Benchmark the ONNX export against torch, in one run: model compute, end to end, sizes.

What it measures, on the same machine in the same run (compare the ratios: the
machine is shared and timings are noisy):

* model compute: one batch of real magnitudes ``(batch, 2, 512, 1024)`` through the
  torch model as the engine runs it (fused inference form, float32), and through
  onnxruntime with the float32 and float16 exports and a dynamically quantised int8
  one (``onnxruntime.quantization.quantize_dynamic``; not offered by ``splitstems
  export``, measured here to show why); best of ``--repeat`` after a warm-up;
* end to end in process: ``Engine.separate`` of ``--seconds`` of real music (MUSDB18
  excerpts from the shared folder, looped) with each backend, and the torch-free example
  (``examples/onnx_separate.py``'s ``separate``: numpy STFT + onnxruntime); best of
  ``--repeat``;
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
import sys
import tempfile
import time
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


def _best(fn, repeat: int) -> float:
    fn()  # warm-up (session and kernel set-up)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="spleeter:2stems")
    parser.add_argument("--seconds", type=float, default=60.0, help="end-to-end audio length")
    parser.add_argument("--batch", type=int, default=1, help="segments per model call")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="default: usable CPUs")
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
    samples = torch.from_numpy(np.ascontiguousarray(waveform[: (frames + 3) * config.frame_step].T))
    spec = dsp.stft_frames(
        samples, dsp.hann_window(config.frame_length), frame_step=config.frame_step
    )
    magnitudes = (
        spec[:, :frames, : config.F].abs().unflatten(1, (args.batch, config.T)).transpose(0, 1)
    )
    magnitudes = magnitudes.contiguous()
    torch_engine = Engine(model, config, device="cpu", threads=threads, batch_segments=args.batch)
    rows: list[dict[str, Any]] = []

    def run_torch() -> None:
        with torch.inference_mode():
            torch_engine.estimate(magnitudes)

    rows.append({"backend": "torch float32 (fused)", "compute_s": _best(run_torch, args.repeat)})
    onnx_models = {}
    for name, path in variants.items():
        onnx_model = OnnxModel(path, config, precision=name)
        onnx_model.configure(threads=threads)
        onnx_models[name] = onnx_model
        rows.append(
            {
                "backend": f"onnxruntime {name}",
                "compute_s": _best(lambda m=onnx_model: m(magnitudes), args.repeat),
                "size_mb": path.stat().st_size / 1e6,
                "export_s": export_s[name],
            }
        )

    # end to end, in process
    reference: dict[str, np.ndarray] = {}

    def separate_torch() -> None:
        reference.update(torch_engine.separate(waveform))

    rows[0]["end_to_end_s"] = _best(separate_torch, args.repeat)
    for row, onnx_model in zip(rows[1:], onnx_models.values(), strict=True):
        engine = Engine(
            onnx_model, config, device="cpu", threads=threads, batch_segments=args.batch
        )
        out: dict[str, np.ndarray] = {}
        row["end_to_end_s"] = _best(
            lambda e=engine, o=out: o.update(e.separate(waveform)), args.repeat
        )
        row["sdr_vs_torch_db"] = min(_sdr(reference[k], out[k]) for k in config.instruments)
    example = _example_module()
    out = {}
    example_s = _best(lambda: out.update(example.separate(work / "float32", waveform)), args.repeat)
    rows.append(
        {
            "backend": "example script (numpy + onnxruntime float32, default threads)",
            "end_to_end_s": example_s,
            "sdr_vs_torch_db": min(_sdr(reference[k], out[k]) for k in config.instruments),
        }
    )

    base_compute, base_e2e = rows[0]["compute_s"], rows[0]["end_to_end_s"]
    print(
        f"\n{args.model}, batch {args.batch} x {config.T} frames, {args.seconds:g} s of music, "
        f"{threads} threads, best of {args.repeat}\n"
    )
    print(
        "| backend | model compute s | vs torch | end to end s | x real time | vs torch | "
        "SDR vs torch dB | file MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        compute = row.get("compute_s")
        cells = [
            row["backend"],
            f"{compute:.3f}" if compute else "-",
            f"{base_compute / compute:.2f}x" if compute else "-",
            f"{row['end_to_end_s']:.2f}",
            f"{args.seconds / row['end_to_end_s']:.1f}",
            f"{base_e2e / row['end_to_end_s']:.2f}x",
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
