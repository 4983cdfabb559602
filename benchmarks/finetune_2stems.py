"""Fine-tune spleeter:2stems on the MUSDB18 preview train tracks; vocals SDR before/after.

    SPLITSTEMS_MODEL_DIR=../shared/models/spleeter .venv/bin/python \
        benchmarks/finetune_2stems.py --steps 200

Trains with ``splitstems.train.train`` straight from the MUSDB18 folder
(``<shared>/audio/musdb7``: 13 train tracks, 2 of MUSDB's validation tracks validate),
starting from the released 2stems weights, Spleeter's loss, Adam lr 1e-4, batch 4. The
previews last 7 s (301 frames), shorter than the released T=512, so training crops are
T=256 frames (the U-Net is fully convolutional; the weights do not depend on T). Before
and after, the 15 preview test tracks are separated with the released inference settings
(T=512, F=1024, ratio masks) and scored with a global SDR (``splitstems.train.metrics``;
not museval's frame median). Prints a Markdown table and writes JSON to
``benchmarks/results/finetune_2stems-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from splitstems import audio
from splitstems.config import load_config
from splitstems.engine import Engine
from splitstems.separator import load_model
from splitstems.train import train
from splitstems.train.metrics import sdr

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SPLITSTEMS_SHARED", ROOT.parent / "shared"))


def score(model: torch.nn.Module, tracks: list[Path]) -> dict[str, dict[str, float]]:
    """Vocals and accompaniment SDR of every track with the released inference settings."""
    config = load_config("spleeter:2stems")  # T=512, F=1024: as a user separates
    engine = Engine(model, config, device="cpu", batch_segments=2)
    out = {}
    for path in tracks:
        mix, drums, bass, other, vocals = (audio.load(path, stream=k) for k in range(5))
        stems = engine.separate(mix)
        out[path.name.removesuffix(".stem.mp4")] = {
            "vocals": sdr(vocals, stems["vocals"]),
            "accompaniment": sdr(drums + bass + other, stems["accompaniment"]),
        }
    return out


def summary(scores: dict[str, dict[str, float]], stem: str) -> tuple[float, float]:
    """Median and mean SDR of a stem over tracks."""
    values = [s[stem] for s in scores.values()]
    return statistics.median(values), statistics.fmean(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--T", type=int, default=256, help="training crop in frames")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--freeze-encoder", action="store_true")
    parser.add_argument("--augment", default="none", choices=("none", "spectrogram", "audio"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="model folder (default: a temp folder)")
    args = parser.parse_args()

    musdb = SHARED / "audio" / "musdb7"
    tests = sorted((musdb / "test").glob("*.stem.mp4"))
    if not tests:
        print(f"no preview test tracks in {musdb / 'test'}", file=sys.stderr)
        return 2
    work = Path(args.out or tempfile.mkdtemp(prefix="splitstems-finetune-"))
    base = load_config("spleeter:2stems").to_json_dict()
    base.update(
        T=args.T,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        train_max_steps=args.steps,
        save_checkpoints_steps=max(args.steps // 2, 1),
        save_summary_steps=10,
        random_seed=args.seed,
        augmentation=args.augment,
        model_dir=str(work / "model"),
        training_cache=str(work / "cache"),
        validation_cache=str(work / "cache"),
    )
    work.mkdir(parents=True, exist_ok=True)
    config_path = work / "finetune.json"
    config_path.write_text(json.dumps(base, indent=2))

    released, _ = load_model("spleeter:2stems")
    t0 = time.perf_counter()
    before = score(released, tests)
    eval_seconds = time.perf_counter() - t0
    print(f"scored the released model on {len(tests)} tracks in {eval_seconds:.0f} s", flush=True)

    result = train(
        config_path,
        mus_dir=musdb,
        init="spleeter:2stems",
        freeze_encoder=args.freeze_encoder,
        device="cpu",
        progress=sys.stderr.isatty(),
    )
    tuned, _ = load_model(result.model_dir / "config.json")
    after = score(tuned, tests)

    losses = [result.losses[s] for s in sorted(result.losses)]
    k = min(10, len(losses))
    lines = [
        f"## Fine-tuning spleeter:2stems on {result.n_songs[0]} MUSDB18 preview train tracks",
        "",
        f"{args.steps} steps, batch {args.batch_size}, T={args.T}, Adam lr {args.lr:g}, "
        f"freeze encoder: {args.freeze_encoder}, augmentation: {args.augment}, seed {args.seed}; "
        f"{torch.get_num_threads()} CPU threads ({platform.processor() or platform.machine()})",
        "",
        f"- training speed: **{result.steps_per_second:.3f} steps/s** "
        f"({1 / result.steps_per_second:.2f} s/step, validation excluded)",
        f"- training loss: {statistics.fmean(losses[:k]):.4f} (first {k} steps) -> "
        f"{statistics.fmean(losses[-k:]):.4f} (last {k})",
    ]
    for record in result.validation:
        sdrs = ", ".join(f"{n} {v:.2f} dB" for n, v in record["val_sdr"].items())
        lines.append(
            f"- validation (2 tracks) at step {record['step']}: loss "
            f"{record['val_loss']:.4f}, SDR {sdrs}"
        )
    lines += [
        "",
        "| test track (7 s preview) | vocals before | vocals after | accomp. before | "
        "accomp. after |",
        "|---|---|---|---|---|",
    ]
    for name in before:
        b, a = before[name], after[name]
        lines.append(
            f"| {name} | {b['vocals']:.2f} | {a['vocals']:.2f} | "
            f"{b['accompaniment']:.2f} | {a['accompaniment']:.2f} |"
        )
    for stem in ("vocals", "accompaniment"):
        (mb, ab), (ma, aa) = summary(before, stem), summary(after, stem)
        lines.append(
            f"| **{stem} median / mean** | {mb:.2f} / {ab:.2f} | {ma:.2f} / {aa:.2f} | | |"
        )
    improved = sum(after[n]["vocals"] > before[n]["vocals"] for n in before)
    lines += ["", f"vocals SDR improved on {improved} of {len(before)} test tracks"]
    print("\n".join(lines))

    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    record = {
        "args": vars(args),
        "steps_per_second": result.steps_per_second,
        "losses": result.losses,
        "validation": result.validation,
        "before": before,
        "after": after,
        "threads": torch.get_num_threads(),
    }
    path = results / f"finetune_2stems-{stamp}.json"
    path.write_text(json.dumps(record, indent=1))
    (results / f"finetune_2stems-{stamp}.md").write_text("\n".join(lines) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
