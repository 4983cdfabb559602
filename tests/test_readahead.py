"""The read-ahead stops at once when its consumer stops early, and closes its source."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import wave
from pathlib import Path

import numpy as np
import pytest

from splitstems import audio
from splitstems.readahead import prefetch


class Source:
    """A generator-like source that records whether it was closed (and how far it got)."""

    def __init__(self, n_items: int) -> None:
        self.n_items = n_items
        self.closed = threading.Event()
        self.produced = 0

    def __iter__(self):
        try:
            for i in range(self.n_items):
                self.produced += 1
                yield i
        finally:
            self.closed.set()


def _readahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("splitstems-")]


def test_keeps_order_and_reraises():
    assert list(prefetch(iter(range(50)), depth=3)) == list(range(50))

    def broken():
        yield 1
        raise RuntimeError("decoder died")

    got = []
    with pytest.raises(RuntimeError, match="decoder died"):
        for item in prefetch(broken()):
            got.append(item)
    assert got == [1]
    assert not _readahead_threads()


def test_closing_early_ends_the_thread_when_the_source_is_done():
    # 3 items, depth 2: the consumer took one, two wait in the buffer, and the producer,
    # done with its source, waits to say so (the old code blocked there for good).
    source = Source(3)
    before = threading.active_count()
    items = prefetch(iter(source), depth=2)
    assert next(items) == 0
    assert source.closed.wait(10)  # the source is exhausted
    items.close()
    assert not _readahead_threads()
    assert threading.active_count() == before


def test_closing_early_closes_the_source():
    source = Source(1000)
    generator = iter(source)  # held here: only an explicit close() can close it
    items = prefetch(generator, depth=2)
    assert next(items) == 0
    while source.produced < 4:  # two items in the buffer, one waiting to go in
        threading.Event().wait(0.01)
    items.close()
    assert not _readahead_threads()
    assert source.closed.is_set()
    assert source.produced < 10


def test_an_error_in_the_consumer_stops_the_read_ahead():
    source = Source(100)
    generator = iter(source)
    with pytest.raises(ValueError):
        items = prefetch(generator, depth=2)
        try:
            for item in items:
                if item == 1:
                    raise ValueError("cannot write")
        finally:
            items.close()
    assert not _readahead_threads()
    assert source.closed.is_set()


# A batch whose stems cannot be written (the file size limit stands for a full disk).
_FAILING_BATCH = """
import resource, signal, sys, threading
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
from splitstems.cli.main import main
code = main(["separate", sys.argv[1], sys.argv[2], "-o", *sys.argv[3:]])
left = [t.name for t in threading.enumerate()
        if t is not threading.main_thread() and type(t).__name__ != "TMonitor"]
print("exit", code, "threads", left)
"""


def _noise_wav(path: Path, seconds: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pcm = (rng.uniform(-0.3, 0.3, (int(seconds * 44100), 2)) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(2)
        handle.setsampwidth(2)
        handle.setframerate(44100)
        handle.writeframes(pcm.tobytes())


@pytest.mark.parametrize("suffix", ["wav", "flac"])
def test_failing_writes_in_a_batch_leave_no_threads(tmp_path, model_env, separator_2stems, suffix):
    # 65 s = three 30 s chunks: the read-ahead has decoded them all and is about to say
    # "done" when the first stem write fails. Each file must fail with one line, and no
    # read-ahead thread may be left behind (before: one per file, each after a 5 s wait).
    # WAV is read and written in line; FLAC in threads (a read-ahead, an encoder per stem).
    # (separator_2stems has put the converted model in the cache: no big write is needed.)
    _noise_wav(tmp_path / "noise.wav", 65.0, seed=0)
    first = tmp_path / f"song0.{suffix}"
    if suffix == "wav":
        (tmp_path / "noise.wav").rename(first)
    else:
        with audio.AudioWriter(first, sample_rate=44100) as writer:
            writer.write(audio.load(tmp_path / "noise.wav"))
    inputs = [tmp_path / f"song{i}.{suffix}" for i in range(3)]
    for link in inputs[1:]:
        link.symlink_to(first)
    env = {**os.environ, **model_env}
    result = subprocess.run(
        [sys.executable, "-c", _FAILING_BATCH, "-c", suffix, str(tmp_path / "out")]
        + [str(path) for path in inputs],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.stdout.strip().splitlines()[-1] == "exit 1 threads []", result.stderr
    errors = [line for line in result.stderr.splitlines() if "File too large" in line]
    assert len(errors) == 3, result.stderr
    for path in inputs:
        assert sum(f"/{path.stem}/" in line for line in errors) == 1, result.stderr
