"""``splitstems stream``: separate a stream as it plays, a fixed fraction of a second behind."""

from __future__ import annotations

import argparse
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from splitstems.cli.options import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    add_model_options,
    add_run_options,
    positive_float,
    positive_int,
)
from splitstems.errors import AudioError, SplitstemsError

if TYPE_CHECKING:
    from splitstems.audio import StreamResampler
    from splitstems.live import LiveSeparator

#: Input blocks waiting for the separation, at most (each up to 32 KiB of input).
QUEUE_BLOCKS = 64


def add_parser(sub: argparse._SubParsersAction, **kwargs: object) -> None:
    """Add the ``stream`` command to ``sub``."""
    st = sub.add_parser(
        "stream",
        help="separate a stream as it plays (file, URL, stdin, sound card), a fixed delay behind",
        **kwargs,
    )
    st.add_argument(
        "input",
        nargs="?",
        metavar="INPUT",
        help="a file, a URL PyAV opens, or - for stdin (none with --input-device)",
    )
    add_model_options(st)
    st.add_argument(
        "--latency",
        type=positive_float,
        default=0.5,
        help="longest delay, in seconds, from a sample in to its stems out (the settings "
        "with the longest delay that fits are used; see docs/live.md)",
    )
    st.add_argument(
        "-o", "--output_path", default=None, help="folder: one growing WAV per stem (default: none)"
    )
    st.add_argument(
        "--stdout", metavar="STEM", default=None, help="write this stem to stdout (default: none)"
    )
    st.add_argument(
        "--format",
        choices=("f32le", "s16le"),
        default=None,
        help="raw PCM in (and on stdout) instead of a container: needs --rate and --channels "
        "unless they are the model's (default: stdin is demuxed by PyAV, stdout is WAV)",
    )
    st.add_argument(
        "--rate",
        type=positive_int,
        default=None,
        help="raw PCM sample rate (default: the model's, 44100)",
    )
    st.add_argument(
        "--channels",
        type=positive_int,
        default=None,
        help="raw PCM channels (default: the model's, 2)",
    )
    st.add_argument(
        "--input-device",
        default=None,
        help="record from this sound device (name or number; 'default'), needs the live extra "
        "(default: none, read INPUT)",
    )
    st.add_argument(
        "--play", metavar="STEM", default=None, help="play this stem on speakers (default: none)"
    )
    st.add_argument(
        "--output-device", default=None, help="sound device for --play (default: the system's)"
    )
    add_run_options(
        st,
        fast_help="bfloat16 on the CPU, float16 on GPUs: faster",
        threads_help="CPU threads for the model (default: 1, which keeps a stream steady when "
        "other processes take a core; $OMP_NUM_THREADS when set)",
    )
    st.set_defaults(handler=run)


def _usage_problem(args: argparse.Namespace) -> str | None:
    if args.input is None and args.input_device is None:
        return "give INPUT (a file, a URL or -) or --input-device"
    if args.input is not None and args.input_device is not None:
        return "give INPUT or --input-device, not both"
    if not (args.output_path or args.stdout or args.play):
        return "give an output: -o DIR, --stdout STEM or --play STEM"
    if args.format is None and (args.rate or args.channels):
        return "--rate and --channels describe raw PCM: give --format too"
    if args.format is not None and args.input_device is not None:
        return "--format describes raw PCM input; a sound device gives samples"
    return None


class _Reader(threading.Thread):
    """Reads input blocks in the background into a bounded queue (the queue bounds memory).

    A full queue holds the reading back (a pipe's writer then waits): counted in ``waits``.
    """

    def __init__(self, opener: Callable[[], Iterator[np.ndarray]]) -> None:
        super().__init__(daemon=True, name="splitstems-stream-reader")
        self.opener = opener
        self.queue: queue.Queue[object] = queue.Queue(maxsize=QUEUE_BLOCKS)
        self.waits = 0

    def run(self) -> None:
        try:
            for block in self.opener():
                try:
                    self.queue.put_nowait(block)
                except queue.Full:
                    self.waits += 1
                    self.queue.put(block)
            self.queue.put(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self.queue.put(exc)

    def blocks(self) -> Iterator[np.ndarray]:
        while True:
            try:  # a timeout keeps Ctrl-C responsive in the main thread
                item = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]

    def read_already(self) -> Iterator[np.ndarray]:
        """Yield the blocks queued now but not taken yet (on Ctrl-C: separated too).

        Only those: the reader may go on filling the queue (a file is read ahead of the
        separation), and what it reads after the Ctrl-C is not waited for.
        """
        for _ in range(self.queue.qsize()):
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return
            if item is None or isinstance(item, BaseException):
                return
            yield item  # type: ignore[misc]


class _Outputs:
    """The stems' destinations; output kept exactly as long as the input."""

    def __init__(
        self, writers: dict[str, list[object]], *, rate: int, n_channels: int, model_rate: int
    ) -> None:
        from splitstems.audio import StreamResampler

        self.writers = writers
        self.n_channels = n_channels
        self.resamplers = {stem: StreamResampler(model_rate, rate, n_channels) for stem in writers}
        self.written = dict.fromkeys(writers, 0)

    def write(self, stems: dict[str, np.ndarray], *, limit: int, last: bool = False) -> None:
        from splitstems.audio import to_channels

        for stem, targets in self.writers.items():
            data = to_channels("stream", stems[stem], self.n_channels)
            data = self.resamplers[stem].push(data)
            if last:
                data = np.concatenate([data, self.resamplers[stem].flush()])
                missing = limit - self.written[stem] - len(data)
                if missing > 0:  # the resampler's last few samples
                    data = np.concatenate([data, np.zeros((missing, self.n_channels), np.float32)])
            data = data[: max(0, limit - self.written[stem])]
            if not len(data):
                continue
            self.written[stem] += len(data)
            for target in targets:
                target.write(data)  # type: ignore[attr-defined]

    def close(self) -> None:
        for targets in self.writers.values():
            for target in targets:
                target.close()  # type: ignore[attr-defined]


def run(args: argparse.Namespace) -> int:
    """Run ``splitstems stream``; return the exit code."""
    from splitstems import liveio
    from splitstems.separator import Separator

    problem = _usage_problem(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        separator = Separator(
            args.params,
            model_dir=args.model_dir,
            precision="fast" if args.fast else "float32",
            device=args.device,
            threads=args.threads,
        )
        live = separator.live(args.latency)
        live.warm_up()
    except (SplitstemsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    model_rate, model_channels = separator.sample_rate, separator.config.n_channels
    for option, stem in (("--stdout", args.stdout), ("--play", args.play)):
        if stem is not None and stem not in separator.instruments:
            print(
                f"error: {option} {stem}: this model's stems are "
                f"{', '.join(separator.instruments)}",
                file=sys.stderr,
            )
            return EXIT_USAGE
    raw = args.format is not None
    rate = (args.rate or model_rate) if raw else model_rate
    n_channels = (args.channels or model_channels) if raw else model_channels
    device_in = None
    try:
        opener, name, live_source = _source(args, rate, n_channels, model_rate)
        if args.input_device is not None:
            device = None if args.input_device == "default" else _device_id(args.input_device)
            device_in = liveio.DeviceInput(device, sample_rate=rate, n_channels=n_channels)
            opener, name, live_source = device_in.blocks, f"input device {args.input_device}", True
        writers = _writers(args, separator.instruments, rate, n_channels)
    except SplitstemsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    outputs = _Outputs(writers, rate=rate, n_channels=n_channels, model_rate=model_rate)
    s = live.settings
    print(
        f"stream: {separator.config.name}, latency {live.latency:.3f} s (window {s.window}, "
        f"hop {s.hop}, look-ahead {s.lookahead} frames), {rate} Hz, {n_channels} channel(s), "
        f"{'bfloat16/float16' if args.fast else 'float32'}; reading {name}",
        file=sys.stderr,
        flush=True,
    )
    try:
        for targets in writers.values():
            for target in targets:
                if isinstance(target, liveio.DevicePlayer):
                    target.start()
        if device_in is not None:
            device_in.start()
    except SplitstemsError as exc:  # no PortAudio, no such device
        outputs.close()
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return _pump(
        live,
        _Reader(opener),
        outputs,
        name,
        rate=rate,
        n_channels=n_channels,
        live_source=live_source,
        model_rate=model_rate,
        device_in=device_in,
    )


def _pump(
    live: LiveSeparator,
    reader: _Reader,
    outputs: _Outputs,
    name: str,
    *,
    rate: int,
    n_channels: int,
    live_source: bool,
    model_rate: int,
    device_in: object,
) -> int:
    """Move blocks from the reader through the live separator to the outputs."""
    from splitstems.audio import StreamResampler, to_channels

    to_model = StreamResampler(rate, model_rate, n_channels)
    n_in = 0
    first = time.perf_counter()  # then the first block's arrival: the clock of the input
    warned = False
    reader.start()
    error: AudioError | None = None

    def feed(block: np.ndarray) -> None:
        nonlocal n_in
        n_in += len(block)
        data = to_channels(name, to_model.push(block), live.n_channels)
        outputs.write(live.push(data), limit=n_in)

    try:
        try:
            for block in reader.blocks():
                if n_in == 0:
                    first = time.perf_counter()  # the clock of a live input starts here
                feed(block)
                behind = time.perf_counter() - first - n_in / rate
                if live_source and reader.waits and behind > 1.0 and not warned:
                    # a buffer full while the input is not ahead of the clock: a live
                    # source is outrunning the separation (a piped file is just fast)
                    warned = True
                    print(
                        f"warning: separating more slowly than real time ({behind:.1f} s "
                        "behind): the input is held back in a bounded buffer (try --fast or "
                        "a longer --latency)",
                        file=sys.stderr,
                        flush=True,
                    )
        except AudioError as exc:
            error = exc
        except KeyboardInterrupt:
            for block in reader.read_already():  # read before the Ctrl-C: separated too
                feed(block)
            _finish(live, to_model, outputs, n_in, name)
            raise
        _finish(live, to_model, outputs, n_in, name)
    finally:
        if device_in is not None:
            device_in.close()  # type: ignore[attr-defined]
        outputs.close()
    elapsed = time.perf_counter() - first  # from the first block in
    seconds = n_in / rate
    dropped = getattr(device_in, "dropped", 0)
    notes = f"; {dropped / rate:.2f} s of input dropped (overruns)" if dropped else ""
    played_dry = sum(getattr(t, "underruns", 0) for ts in outputs.writers.values() for t in ts)
    if played_dry:
        notes += f"; {played_dry / rate:.2f} s of silence played while waiting (underruns)"
    print(
        f"stream: {seconds:.1f} s separated in {elapsed:.1f} s{notes}",
        file=sys.stderr,
        flush=True,
    )
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _finish(
    live: LiveSeparator, to_model: StreamResampler, outputs: _Outputs, n_in: int, name: str
) -> None:
    """Push what the input resampler holds, flush the separator, write the rest."""
    from splitstems.audio import to_channels

    rest = to_model.flush()
    if len(rest):
        outputs.write(live.push(to_channels(name, rest, live.n_channels)), limit=n_in)
    outputs.write(live.flush(), limit=n_in, last=True)


def _device_id(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def _source(
    args: argparse.Namespace, rate: int, n_channels: int, model_rate: int
) -> tuple[Callable[[], Iterator[np.ndarray]], str, bool]:
    """Return (opener of the input's blocks, its name, whether it is a live stream)."""
    from splitstems import audio, liveio

    if args.input is None:
        return (lambda: iter(())), "", True
    if args.input == "-":
        if args.format:
            return (
                lambda: liveio.raw_blocks(0, "stdin", fmt=args.format, n_channels=n_channels),
                "stdin",
                True,
            )
        return (
            lambda: liveio.decoded_blocks(0, "stdin", sample_rate=rate, n_channels=n_channels),
            "stdin",
            True,
        )
    if "://" in args.input:
        url = args.input
        return (
            lambda: liveio.decoded_blocks(url, url, sample_rate=rate, n_channels=n_channels),
            url,
            True,
        )
    path = Path(args.input)
    if args.format:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise AudioError(f"{path}: cannot open ({exc.strerror or exc})") from None
        return (
            lambda: liveio.raw_blocks(fd, str(path), fmt=args.format, n_channels=n_channels),
            str(path),
            False,
        )
    blocks = audio.stream(path, chunk_samples=4096, sample_rate=rate, n_channels=n_channels)
    return (lambda: blocks), str(path), False


def _writers(
    args: argparse.Namespace, instruments: tuple[str, ...], rate: int, n_channels: int
) -> dict[str, list[object]]:
    from splitstems import liveio
    from splitstems.errors import OutputError

    writers: dict[str, list[object]] = {}
    if args.output_path:
        folder = Path(args.output_path)
        if folder.exists() and not folder.is_dir():
            raise OutputError(f"{folder}: output path exists and is not a folder")
        for stem in instruments:
            writers.setdefault(stem, []).append(
                liveio.GrowingWav(folder / f"{stem}.wav", sample_rate=rate, n_channels=n_channels)
            )
    if args.stdout:
        out = sys.stdout.buffer
        target = (
            liveio.PcmWriter(out, fmt=args.format)
            if args.format
            else liveio.WavStreamWriter(out, sample_rate=rate, n_channels=n_channels)
        )
        writers.setdefault(args.stdout, []).append(target)
    if args.play:
        device = None if args.output_device in (None, "default") else _device_id(args.output_device)
        writers.setdefault(args.play, []).append(
            liveio.DevicePlayer(device, sample_rate=rate, n_channels=n_channels)
        )
    return writers
