"""In-process model compute of the ORIGINAL Spleeter 2.4.2: the TF graph built once.

Run by ``bench_separate.py`` with the python of Spleeter's own virtualenv (TensorFlow
2.12), with ``MODEL_PATH`` pointing at a ``pretrained_models`` folder::

    .spleeter-venv/bin/python benchmarks/graph_spleeter.py INPUT.wav [--repeat 3]

Builds the same graph as Spleeter's estimator in predict mode (``EstimatorSpecBuilder``
on the waveform placeholders of ``InputProviderFactory``: STFT + U-Nets + masks + iSTFT,
``builder.outputs``), restores the checkpoint into one session (with the session config
of ``spleeter.separator.create_estimator``), runs it once to warm up, then times
``repeat`` calls of ``session.run`` only. Prints one JSON object on the last line.
"""

from __future__ import annotations

import argparse
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
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    start = time.perf_counter()
    import tensorflow as tf
    from spleeter.model import EstimatorSpecBuilder, InputProviderFactory
    from spleeter.model.provider import ModelProvider
    from spleeter.utils.configuration import load_configuration

    import_s = time.perf_counter() - start

    waveform = read_wav16(args.input)
    start = time.perf_counter()
    params = load_configuration(args.model)
    params["MWF"] = False
    graph = tf.Graph()
    with graph.as_default():
        provider = InputProviderFactory.get(params)
        features = provider.get_input_dict_placeholders()
        builder = EstimatorSpecBuilder(features, params)
        outputs = dict(builder.outputs)
        outputs.pop("audio_id", None)
        saver = tf.compat.v1.train.Saver()
        model_dir = ModelProvider.default().get(params["model_dir"])
        checkpoint = tf.train.latest_checkpoint(model_dir)
        config = tf.compat.v1.ConfigProto()
        config.gpu_options.per_process_gpu_memory_fraction = 0.7
        session = tf.compat.v1.Session(graph=graph, config=config)
        saver.restore(session, checkpoint)
    build_s = time.perf_counter() - start
    feed = provider.get_feed_dict(features, waveform, np.array(args.input))

    start = time.perf_counter()
    result = session.run(outputs, feed_dict=feed)
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(max(1, args.repeat)):
        start = time.perf_counter()
        result = session.run(outputs, feed_dict=feed)
        times.append(time.perf_counter() - start)
    first = next(iter(result.values()))
    print(
        json.dumps(
            {
                "status": "ok",
                "tool": "spleeter",
                "model": args.model,
                "audio_s": waveform.shape[0] / params["sample_rate"],
                "output_samples": int(first.shape[0]),
                "import_s": import_s,
                "build_s": build_s,
                "warmup_s": warmup_s,
                "times_s": times,
                "tensorflow": tf.__version__,
            }
        )
    )
    session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
