"""Live separation: latency vs SDR vs speed, and the real-time factor at 0.5 s.

Two parts, one after another (the machine is shared: compare numbers of one run):

1. The table. For every entry of :data:`splitstems.live.LIVE_SETTINGS`, and the offline
   engine for reference: the worst-case delay, the model's work per frame relative to
   offline (window / hop), the median over MUSDB18 preview tracks of the per-track
   median SDR (vocals, accompaniment; :func:`splitstems.evaluate.evaluate`, the numbers
   ``splitstems evaluate --latency`` prints) and the real-time factor of a live stream
   (seconds of audio / seconds of compute when the audio is pushed in 1024-sample blocks,
   as a sound card would, one thread).
2. The real-time factor at 0.5 s latency, float32 and ``--fast`` (bfloat16), 1 and 2
   threads, pushed in 1024-sample blocks, against the offline engine
   (``Separator.separate``) on the same audio in the same run; best of ``--repeat``.

Examples::

    .venv/bin/python benchmarks/bench_live.py                 # ~10 min on this machine
    .venv/bin/python benchmarks/bench_live.py --tracks 5 --skip-table

Results: a Markdown table on stdout, ``benchmarks/results/live-<timestamp>.json`` (+ ``.md``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from splitstems import audio
from splitstems.evaluate import evaluate
from splitstems.live import LIVE_SETTINGS, LiveEngine, LiveSeparator, LiveSettings
from splitstems.separator import Separator

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SPLITSTEMS_SHARED", REPO.parent / "shared"))
BLOCK = 1024


def stream_speed(
    separator: Separator, settings: LiveSettings, mix: np.ndarray, threads: int
) -> float:
    """Real-time factor of pushing ``mix`` through a live separator in BLOCK-sample blocks."""
    live = LiveSeparator(separator.engine, settings=settings, threads=threads)
    live.warm_up()
    start = time.perf_counter()
    for begin in range(0, len(mix), BLOCK):
        live.push(mix[begin : begin + BLOCK])
    live.flush()
    return len(mix) / separator.sample_rate / (time.perf_counter() - start)


def offline_speed(separator: Separator, mix: np.ndarray, threads: int) -> float:
    """Real-time factor of the offline engine on the whole of ``mix``."""
    torch.set_num_threads(threads)
    separator.engine.separate(mix[:44100])  # warm-up
    start = time.perf_counter()
    separator.engine.separate(mix)
    return len(mix) / separator.sample_rate / (time.perf_counter() - start)


def describe(settings: LiveSettings) -> str:
    """``window 128, hop 4, look-ahead 15, partial 1, blend 0.75/0.25`` (defaults left out)."""
    text = f"window {settings.window}, hop {settings.hop}, look-ahead {settings.lookahead}"
    if settings.partial:
        text += f", partial {settings.partial}"
    if len(settings.blend) > 1:
        text += ", blend " + "/".join(f"{w:g}" for w in settings.blend)
    return text


def sdr(separate: Any, mus_dir: Path, tracks: list[str]) -> dict[str, float]:  # noqa: ANN401
    summary = evaluate(separate, mus_dir, None, tracks=tracks, progress=False)
    return {name: scores["SDR"] for name, scores in summary.scores.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mus-dir", type=Path, default=SHARED / "audio" / "musdb7")
    parser.add_argument("--tracks", type=int, default=15, help="first N test tracks")
    parser.add_argument(
        "--speed-seconds", type=float, default=30.0, help="seconds of audio for the speed runs"
    )
    parser.add_argument("--repeat", type=int, default=2, help="speed runs: best of N")
    parser.add_argument("--skip-table", action="store_true", help="only the speed part")
    args = parser.parse_args()
    os.environ.setdefault("SPLITSTEMS_MODEL_DIR", str(SHARED / "models" / "spleeter"))

    files = sorted((args.mus_dir / "test").glob("*.stem.mp4"))[: args.tracks]
    names = [f.name.removesuffix(".stem.mp4") for f in files]
    mix = np.concatenate([audio.load(f) for f in files])
    mix = mix[: int(args.speed_seconds * 44100)]
    separator = Separator("spleeter:2stems", device="cpu", progress=False, threads=1)
    fast = Separator("spleeter:2stems", device="cpu", progress=False, threads=1, precision="fast")
    config = separator.config
    rows: list[dict[str, Any]] = []
    if not args.skip_table:
        scores = sdr(separator.separate, args.mus_dir, names)
        rows.append(
            {
                "setting": "offline (original)",
                "latency_s": None,
                "work": 1.0,
                "sdr": scores,
                "rtf_1thread": offline_speed(separator, mix, 1),
            }
        )
        print(rows[-1], flush=True)
        for settings in LIVE_SETTINGS:
            engine = LiveEngine(separator.engine, settings=settings)
            rows.append(
                {
                    "setting": describe(settings),
                    "latency_s": round(settings.delay(config), 3),
                    "work": settings.work,
                    "sdr": sdr(engine.separate, args.mus_dir, names),
                    "rtf_1thread": stream_speed(separator, settings, mix, 1),
                }
            )
            print(rows[-1], flush=True)

    half = LiveSeparator(separator.engine, latency=0.5).settings
    speed: list[dict[str, Any]] = []
    for label, sep in (("float32", separator), ("--fast", fast)):
        for threads in (1, 2):
            live = max(stream_speed(sep, half, mix, threads) for _ in range(args.repeat))
            offline = max(offline_speed(sep, mix, threads) for _ in range(args.repeat))
            speed.append(
                {
                    "precision": label,
                    "threads": threads,
                    "live_rtf": live,
                    "offline_rtf": offline,
                    "live_over_offline": live / offline,
                }
            )
            print(speed[-1], flush=True)

    lines = []
    if rows:
        lines += [
            f"Latency vs quality vs speed: spleeter:2stems, {len(names)} MUSDB18 previews "
            f"(median of per-track median SDR, dB); speed: {len(mix) / 44100:.0f} s pushed "
            f"in {BLOCK}-sample blocks, 1 thread",
            "",
            "| setting | latency | model work | vocals SDR | accompaniment SDR | x real time |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for row in rows:
            lat = "offline" if row["latency_s"] is None else f"{row['latency_s']:.3f} s"
            lines.append(
                f"| {row['setting']} | {lat} | {row['work']:g}x | {row['sdr']['vocals']:.2f} "
                f"| {row['sdr']['accompaniment']:.2f} | {row['rtf_1thread']:.1f} |"
            )
        lines.append("")
    lines += [
        f"Real-time factor at 0.5 s latency ({half.delay(config):.3f} s: {describe(half)}), "
        f"best of {args.repeat}, "
        f"{len(mix) / 44100:.0f} s of audio",
        "",
        "| precision | threads | live (1024-sample pushes) | offline | live / offline |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in speed:
        lines.append(
            f"| {row['precision']} | {row['threads']} | {row['live_rtf']:.1f}x "
            f"| {row['offline_rtf']:.1f}x | {row['live_over_offline']:.2f} |"
        )
    text = "\n".join(lines)
    print(text)
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    meta = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load": os.getloadavg(),
        "torch": torch.__version__,
        "tracks": names,
    }
    (out / f"live-{stamp}.json").write_text(
        json.dumps({"meta": meta, "table": rows, "speed": speed}, indent=1)
    )
    (out / f"live-{stamp}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
