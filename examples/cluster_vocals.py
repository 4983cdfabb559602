"""A folder of songs -> a Ray dataset of their vocals (Parquet), on a Ray cluster.

    pip install 'splitstems[cluster]'
    python examples/cluster_vocals.py SONGS_FOLDER OUT_FOLDER [--address auto] [--workers 4]

Each of the ``--workers`` actors loads the model once (``SeparateStems``); the songs are
decoded, separated and handed on as rows (``path``, ``vocals`` as (n_samples, 2) float32
at 44.1 kHz, ``sample_rate``, ``error``). SONGS_FOLDER must be readable by every node.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import ray

from splitstems.batch import expand_inputs
from splitstems.cluster import SeparateStems


def main() -> None:
    """Separate the folder's songs on Ray and write their vocals as Parquet."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("songs", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--address", default=None, help="Ray address (default: local)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    ray.init(address=args.address)
    paths = [str(p.absolute()) for p in expand_inputs([args.songs])]
    vocals = (
        ray.data.from_items([{"path": p} for p in paths])
        .map_batches(
            SeparateStems,
            fn_constructor_kwargs={"model": "spleeter:2stems"},
            compute=ray.data.ActorPoolStrategy(size=args.workers),
            batch_size=4,
            batch_format="numpy",
            num_cpus=1,
        )
        .select_columns(["path", "vocals", "sample_rate", "error"])
    )
    vocals.write_parquet(str(args.out.absolute()))
    print(f"{len(paths)} songs -> {args.out}")


if __name__ == "__main__":
    main()
