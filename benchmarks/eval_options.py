"""SDR of spleeter:2stems on MUSDB18 test tracks with each quality option, and combined.

Runs :func:`splitstems.evaluate.evaluate` once per setting (one after another: the
machine is shared) on the MUSDB18 previews in ``../shared/audio/musdb7/test`` (or any
MUSDB18 root with ``--mus-dir``) and prints a Markdown table of the median over tracks of
the per-track median SDR (SiSEC 2018), vocals and accompaniment, with the gain over the
original-equivalent setting.

Examples::

    SPLITSTEMS_MODEL_DIR=../shared/models/spleeter .venv/bin/python benchmarks/eval_options.py
    .venv/bin/python benchmarks/eval_options.py --settings original,mwf --mus-dir ~/musdb18

Results: ``benchmarks/results/eval-<timestamp>.json`` (+ ``.md``), and per-track JSON
files under ``--work`` (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from splitstems.evaluate import evaluate
from splitstems.separator import Separator

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SPLITSTEMS_SHARED", REPO.parent / "shared")).resolve()

#: name → (model, Separator keyword arguments)
SETTINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "original": ("spleeter:2stems", {}),
    "mwf": ("spleeter:2stems", {"MWF": True}),
    "mwf-2iter": ("spleeter:2stems", {"MWF": True, "mwf_iterations": 2}),
    "mwf-exponent-0.7": ("spleeter:2stems", {"MWF": True, "mwf_exponent": 0.7}),
    "overlap-0.25": ("spleeter:2stems", {"overlap": 0.25}),
    "overlap-0.5": ("spleeter:2stems", {"overlap": 0.5}),
    "shifts-2": ("spleeter:2stems", {"shifts": 2}),
    "shifts-4": ("spleeter:2stems", {"shifts": 4}),
    "average": ("spleeter:2stems", {"mask_extension": "average"}),
    "16kHz": ("spleeter:2stems-16kHz", {}),
    "mwf+average": ("spleeter:2stems", {"MWF": True, "mask_extension": "average"}),
    "16kHz+mwf+average+shifts-4": (
        "spleeter:2stems-16kHz",
        {"MWF": True, "mask_extension": "average", "shifts": 4},
    ),
    "16kHz+mwf-exponent-0.7+average+shifts-4": (
        "spleeter:2stems-16kHz",
        {"MWF": True, "mwf_exponent": 0.7, "mask_extension": "average", "shifts": 4},
    ),
    "16kHz+mwf+average+shifts-8": (
        "spleeter:2stems-16kHz",
        {"MWF": True, "mask_extension": "average", "shifts": 8},
    ),
}


def run(
    name: str, mus_dir: Path, work: Path, tracks: list[str] | None, jobs: int, subset: str
) -> dict[str, Any]:
    """Evaluate one setting; return its summary and timing."""
    model, options = SETTINGS[name]
    separator = Separator(model, device="cpu", progress=False, **options)
    start = time.perf_counter()
    summary = evaluate(
        separator.separate,
        mus_dir,
        work / subset / name,
        subset=subset,
        tracks=tracks,
        jobs=jobs,
        progress=False,
        settings={"model": model, **options},
    )
    return {
        "model": model,
        "options": options,
        "scores": summary.scores,
        "tracks": summary.tracks,
        "seconds": round(time.perf_counter() - start, 1),
    }


def table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table: SDR medians and the gain over the original-equivalent setting."""
    base = results.get("original", {}).get("scores", {})
    lines = [
        "| setting | model | vocals SDR | accompaniment SDR | Δ vocals | Δ accompaniment | time |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, result in results.items():
        scores = result["scores"]
        vocals = scores["vocals"]["SDR"]
        accompaniment = scores["accompaniment"]["SDR"]
        d_voc = vocals - base["vocals"]["SDR"] if base else float("nan")
        d_acc = accompaniment - base["accompaniment"]["SDR"] if base else float("nan")
        lines.append(
            f"| {name} | {result['model'].split(':')[-1]} | {vocals:.2f} | {accompaniment:.2f} "
            f"| {d_voc:+.2f} | {d_acc:+.2f} | {result['seconds']:.0f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mus-dir", type=Path, default=SHARED / "audio" / "musdb7")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated")
    parser.add_argument("--subset", default="test", choices=("test", "train"))
    parser.add_argument("--tracks", nargs="+", default=None, help="only these tracks")
    parser.add_argument("--jobs", type=int, default=1, help="tracks scored in parallel")
    parser.add_argument("--work", type=Path, default=None, help="per-track JSON folder")
    args = parser.parse_args()
    os.environ.setdefault("SPLITSTEMS_MODEL_DIR", str(SHARED / "models" / "spleeter"))
    work = args.work or Path(tempfile.mkdtemp(prefix="splitstems-eval-"))
    results: dict[str, dict[str, Any]] = {}
    for name in args.settings.split(","):
        results[name] = run(name, args.mus_dir, work, args.tracks, args.jobs, args.subset)
        s = results[name]["scores"]
        print(
            f"{name}: vocals {s['vocals']['SDR']:.2f} dB, "
            f"accompaniment {s['accompaniment']['SDR']:.2f} dB "
            f"({results[name]['seconds']:.0f} s)",
            flush=True,
        )
    text = table(results)
    print(text)
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    meta = {
        "mus_dir": str(args.mus_dir),
        "subset": args.subset,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    record = {"meta": meta, "results": results}
    (out / f"eval-{args.subset}-{stamp}.json").write_text(json.dumps(record))
    (out / f"eval-{args.subset}-{stamp}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
