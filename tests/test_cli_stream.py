"""``splitstems stream`` through pipes at real-time pace, Ctrl-C, bad input; device adapters."""

from __future__ import annotations

import _thread
import os
import re
import signal
import subprocess
import sys
import threading
import time
import types
import wave
from pathlib import Path

import numpy as np
import pytest
from signals import as_in_a_terminal

from splitstems import audio
from splitstems.liveio import DeviceInput, DevicePlayer, GrowingWav, WavStreamWriter

RATE = 44100


@pytest.fixture(scope="module")
def music(shared_dir: Path) -> np.ndarray:
    """Three seconds of a MUSDB18 preview's mixture (stereo, 44.1 kHz)."""
    track = sorted((shared_dir / "audio" / "musdb7" / "test").glob("*.stem.mp4"))[1]
    return audio.load(track, offset=2.0, duration=3.0, sample_rate=RATE, n_channels=2)


def _start(model_env: dict[str, str], *args: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "splitstems", "stream", *map(str, args)],
        env={**os.environ, **model_env},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
        preexec_fn=as_in_a_terminal,
    )


def _run(model_env: dict[str, str], *args: object, data: bytes) -> subprocess.CompletedProcess:
    """Run ``splitstems stream ARGS`` to its end with ``data`` on stdin; output captured."""
    return subprocess.run(
        [sys.executable, "-m", "splitstems", "stream", *map(str, args)],
        env={**os.environ, **model_env},
        input=data,
        capture_output=True,
        timeout=120,
    )


def _ready_line(proc: subprocess.Popen) -> str:
    """Wait for the line that says the model is loaded (it comes before any reading)."""
    line = proc.stderr.readline().decode()
    assert line.startswith("stream: "), (line, proc.stderr.read().decode())
    return line


def test_pipe_at_real_time_pace_every_sample_within_latency_and_exactly_aligned(
    model_env: dict[str, str], separator_2stems, music: np.ndarray
) -> None:
    proc = _start(
        model_env, "-", "--format", "f32le", "--rate", RATE, "--channels", 2, "--stdout", "vocals"
    )
    latency = float(re.search(r"latency ([0-9.]+) s", _ready_line(proc)).group(1))
    assert latency <= 0.5
    block = 1024
    written_at = np.zeros(len(music))  # when each input sample had been written
    arrivals: list[tuple[int, float]] = []  # (output bytes so far, time)
    received = bytearray()

    def read() -> None:
        while data := os.read(proc.stdout.fileno(), 1 << 16):
            received.extend(data)
            arrivals.append((len(received), time.monotonic()))

    reader = threading.Thread(target=read)
    reader.start()
    start = time.monotonic()
    for begin in range(0, len(music), block):  # real-time pace
        time.sleep(max(0.0, start + begin / RATE - time.monotonic()))
        chunk = music[begin : begin + block]
        proc.stdin.write(chunk.astype("<f4").tobytes())
        written_at[begin : begin + len(chunk)] = time.monotonic()
    proc.stdin.close()
    reader.join(timeout=60)
    assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()

    out = np.frombuffer(bytes(received), "<f4").reshape(-1, 2)
    assert out.shape == music.shape  # exactly the input's length
    done = 0
    worst = 0.0
    for n_bytes, at in arrivals:  # the oldest sample of each read decides
        n = n_bytes // 8
        if n > done:
            worst = max(worst, at - written_at[done])
            done = n
    assert worst <= latency + 0.5, f"a sample came {worst:.3f} s after it was written"
    live = separator_2stems.live(0.5)  # the same separation, computed here at once
    first = live.push(music)
    expected = np.concatenate([first["vocals"], live.flush()["vocals"]])
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-4)  # sample-aligned


def test_ctrl_c_keeps_growing_wavs_valid_with_every_sample_read(
    model_env: dict[str, str], music: np.ndarray, tmp_path: Path
) -> None:
    proc = _start(model_env, "-", "--format", "s16le", "-o", tmp_path / "out")
    _ready_line(proc)
    pcm = (music[: RATE * 2] * 32767).astype("<i2")
    proc.stdin.write(pcm.tobytes())  # 2 s, then the stream stays open
    vocals = tmp_path / "out" / "vocals.wav"
    for _ in range(600):  # the file grows while the stream runs
        if vocals.exists() and vocals.stat().st_size > 44 + RATE * 4:
            break
        time.sleep(0.05)
    with wave.open(str(vocals)) as grown:
        assert grown.getnframes() >= RATE  # valid while still being written
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    assert "interrupted" in proc.stderr.read().decode()
    for stem in ("vocals", "accompaniment"):
        with wave.open(str(tmp_path / "out" / f"{stem}.wav")) as done:
            assert done.getnframes() == len(pcm)  # flushed: everything read is separated
            assert done.getframerate() == RATE and done.getnchannels() == 2


def test_input_ending_mid_sample_says_so_and_keeps_what_was_separated(
    model_env: dict[str, str], music: np.ndarray, tmp_path: Path
) -> None:
    data = music[:5000].astype("<f4").tobytes() + b"\x00\x01\x02"
    result = _run(model_env, "-", "--format", "f32le", "-o", tmp_path, data=data)
    assert result.returncode == 1
    errors = [line for line in result.stderr.decode().splitlines() if line.startswith("error")]
    assert errors == [
        "error: stdin: input ends mid-sample (3 bytes after the last whole f32le "
        "frame of 2 channel(s))"
    ]
    with wave.open(str(tmp_path / "vocals.wav")) as kept:
        assert kept.getnframes() == 5000


def test_wav_through_stdin_and_stdout_keeps_length(
    model_env: dict[str, str], music: np.ndarray, tmp_path: Path
) -> None:
    source = tmp_path / "in.wav"
    audio.save(source, music, sample_rate=RATE)
    result = _run(model_env, "-", "--stdout", "accompaniment", data=source.read_bytes())
    assert result.returncode == 0, result.stderr.decode()
    out = tmp_path / "out.wav"
    out.write_bytes(result.stdout)
    decoded = audio.load(out, sample_rate=RATE, n_channels=2)
    assert decoded.shape == music.shape


def test_a_damaged_mp3_packet_on_stdin_is_skipped_with_a_warning_not_the_end(
    model_env: dict[str, str], music: np.ndarray, tmp_path: Path
) -> None:
    # One glitch in a stream (a radio, a pipe) must not end it: the bad packet is skipped,
    # as FFmpeg and the file path do, and said; the rest is separated.
    source = tmp_path / "in.mp3"
    audio.save(source, music, sample_rate=RATE, codec="mp3")
    data = bytearray(source.read_bytes())
    middle = len(data) * 3 // 10  # 200 random bytes there break one packet
    data[middle : middle + 200] = np.random.default_rng(7).integers(0, 256, 200, np.uint8).tobytes()
    damaged = tmp_path / "damaged.mp3"
    damaged.write_bytes(bytes(data))
    result = _run(model_env, "-", "-o", tmp_path / "out", data=bytes(data))
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    assert "stdin:" in stderr and "damaged packet(s) skipped" in stderr
    as_file = audio.load(damaged, sample_rate=RATE, n_channels=2)  # what the file path decodes
    with wave.open(str(tmp_path / "out" / "vocals.wav")) as stem:
        assert abs(stem.getnframes() - len(as_file)) <= 1152  # at most an MP3 frame apart
        assert stem.getnframes() > 0.9 * len(music)


def test_a_wav_cut_short_on_stdin_says_truncated_and_keeps_what_came(
    model_env: dict[str, str], music: np.ndarray, tmp_path: Path
) -> None:
    source = tmp_path / "in.wav"
    audio.save(source, music, sample_rate=RATE)  # 3 s, its header says so
    data = source.read_bytes()
    start = data.index(b"data") + 8  # the samples' first byte
    cut = data[: start + RATE * 4]  # 1 s of 16-bit stereo
    result = _run(model_env, "-", "-o", tmp_path / "out", data=cut)
    assert result.returncode == 1
    errors = [line for line in result.stderr.decode().splitlines() if line.startswith("error")]
    assert errors == [
        "error: stdin: truncated: ends after 1.000 s of the 3.000 s its WAV header gives"
    ]
    with wave.open(str(tmp_path / "out" / "vocals.wav")) as stem:
        assert stem.getnframes() == RATE  # what came is separated and kept
    # a WAV written to a pipe has no length in its header: its end is just the end
    piped = bytearray(cut)
    piped[start - 4 : start] = (0xFFFFFFFF).to_bytes(4, "little")
    result = _run(model_env, "-", "-o", tmp_path / "piped", data=bytes(piped))
    assert result.returncode == 0, result.stderr.decode()


@pytest.mark.parametrize(
    "args,message",
    [
        (["-"], "give an output"),
        (["--stdout", "vocals"], "give INPUT"),
        (
            ["-", "--stdout", "drums"],
            "--stdout drums: this model's stems are vocals, accompaniment",
        ),
        (["-", "--stdout", "vocals", "--latency", "0.1"], "below the shortest"),
        (["-", "--stdout", "vocals", "--rate", "8000"], "give --format too"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(
    model_env: dict[str, str], args: list[str], message: str
) -> None:
    result = _run(model_env, *args, data=b"")
    assert result.returncode == 2
    assert result.stderr.decode().strip().splitlines()[-1].startswith("error: ")
    assert message in result.stderr.decode()


# -------------------------------------------------------------- device adapters


class _Status:
    """What PortAudio passes as ``status`` (sounddevice.CallbackFlags)."""

    def __init__(self, input_overflow: bool = False) -> None:
        self.input_overflow = input_overflow

    def __bool__(self) -> bool:
        return self.input_overflow


def test_device_input_replays_a_recorded_callback_sequence_and_counts_overruns(
    rng: np.random.Generator,
) -> None:
    device = DeviceInput(
        None, sample_rate=RATE, n_channels=2, max_seconds=3 * 256 / RATE, block_samples=256
    )
    recorded = [rng.standard_normal((256, 2)).astype(np.float32) for _ in range(5)]
    for index, block in enumerate(recorded):  # as PortAudio's thread would call it
        buffer = block.copy()
        device.callback(buffer, 256, None, _Status(input_overflow=index == 1))
        buffer[:] = 0  # PortAudio reuses its buffer: the queue must hold copies
    assert device.overflows == 1
    assert device.dropped == 2 * 256  # the queue holds 3 blocks: the last 2 were dropped
    device.close()
    got = list(device.blocks())
    assert len(got) == 3
    for block, expected in zip(got, recorded[:3], strict=True):
        np.testing.assert_array_equal(block, expected)


def test_device_player_plays_queued_samples_in_order_then_silence() -> None:
    player = DevicePlayer(None, sample_rate=RATE, n_channels=2, max_seconds=1.0)
    samples = np.arange(2 * 700, dtype=np.float32).reshape(700, 2)
    player.write(samples[:300])
    player.write(samples[300:])
    played = []
    for frames in (256, 256, 256):  # the callbacks PortAudio makes
        out = np.full((frames, 2), 99.0, np.float32)
        player.callback(out, frames, None, _Status())
        played.append(out)
    joined = np.concatenate(played)
    np.testing.assert_array_equal(joined[:700], samples)
    np.testing.assert_array_equal(joined[700:], 0.0)
    assert player.underruns == 768 - 700
    player.write(samples[:300])
    player.write(np.ones((RATE + 10, 2), np.float32))  # more than max_seconds: oldest go
    assert player.dropped == 310
    out = np.zeros((RATE + 5, 2), np.float32)
    player.callback(out, RATE + 5, None, _Status())
    np.testing.assert_array_equal(out[:RATE], 1.0)
    np.testing.assert_array_equal(out[RATE:], 0.0)


def test_growing_wav_is_valid_after_every_write_and_wav_stream_header(tmp_path: Path) -> None:
    path = tmp_path / "stem.wav"
    writer = GrowingWav(path, sample_rate=RATE, n_channels=2)
    for n in (100, 250):
        writer.write(np.zeros((n, 2), np.float32))
        with wave.open(str(path)) as reading:  # not closed yet: the header is current
            assert reading.getnframes() in (100, 350)
    writer.close()
    with wave.open(str(path)) as done:
        assert done.getnframes() == 350
    stream_path = tmp_path / "stream.wav"
    with open(stream_path, "wb") as out:
        WavStreamWriter(out, sample_rate=RATE, n_channels=2).write(
            np.full((1000, 2), 0.5, np.float32)
        )
    decoded = audio.load(stream_path, sample_rate=RATE, n_channels=2)
    assert decoded.shape == (1000, 2)
    np.testing.assert_allclose(decoded, 0.5, atol=1e-4)


class _FakeSoundDevice(types.ModuleType):
    """sounddevice as PortAudio would drive it, replaying a recorded input sequence.

    No sound devices exist here: InputStream calls the callback with the recorded
    blocks (as PortAudio's thread would), OutputStream pulls 512 frames at a time into
    ``played``; when the recording is over and played out, Ctrl-C is sent.
    """

    class PortAudioError(Exception):
        pass

    def __init__(self, recording: list[np.ndarray]) -> None:
        super().__init__("sounddevice")
        self.recording = recording
        self.played: list[np.ndarray] = []
        self.opened: list[dict[str, object]] = []
        fake = self

        class InputStream:
            def __init__(self, **kwargs: object) -> None:
                fake.opened.append({"kind": "input", **kwargs})
                self.callback = kwargs["callback"]

            def start(self) -> None:
                def replay() -> None:
                    for block in fake.recording:
                        self.callback(block.copy(), len(block), None, _Status())
                        time.sleep(len(block) / RATE / 4)  # 4x real time
                    time.sleep(1.5)  # the last stems come out, and are played
                    _thread.interrupt_main()  # Ctrl-C

                threading.Thread(target=replay, daemon=True).start()

            def stop(self) -> None:
                pass

            def close(self) -> None:
                pass

        class OutputStream:
            def __init__(self, **kwargs: object) -> None:
                fake.opened.append({"kind": "output", **kwargs})
                self.callback = kwargs["callback"]
                self.running = True

            def start(self) -> None:
                def pull() -> None:
                    while self.running:
                        out = np.empty((512, 2), np.float32)
                        self.callback(out, 512, None, _Status())
                        fake.played.append(out)
                        time.sleep(512 / RATE / 4)

                threading.Thread(target=pull, daemon=True).start()

            def stop(self) -> None:
                self.running = False

            def close(self) -> None:
                pass

        self.InputStream = InputStream
        self.OutputStream = OutputStream


def test_input_device_to_speakers_and_files_with_recorded_callbacks(
    use_shared_models: None,
    music: np.ndarray,
    separator_2stems,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from splitstems.cli.main import main

    recording = [music[i : i + 1024] for i in range(0, RATE, 1024)]  # 1 s in 1024 blocks
    fake = _FakeSoundDevice(recording)
    monkeypatch.setitem(sys.modules, "sounddevice", fake)
    code = main(["stream", "--input-device", "3", "--play", "vocals", "-o", str(tmp_path / "out")])
    assert code == 130  # stopped by Ctrl-C, outputs flushed and closed
    assert [(o["kind"], o["device"], o["samplerate"]) for o in fake.opened] == [
        ("output", None, RATE),
        ("input", 3, RATE),
    ]
    recorded = np.concatenate(recording)
    live = separator_2stems.live(0.5)
    first = live.push(recorded)
    expected = {k: np.concatenate([first[k], v]) for k, v in live.flush().items()}
    with wave.open(str(tmp_path / "out" / "vocals.wav")) as saved:
        assert saved.getnframes() == len(recorded)  # every recorded sample, separated
        pcm = np.frombuffer(saved.readframes(saved.getnframes()), "<i2").reshape(-1, 2)
    np.testing.assert_allclose(pcm / 32768, expected["vocals"], atol=2e-4)
    # the speakers got the vocals in order, with silence wherever the player ran dry
    played = np.concatenate(fake.played)
    played = played[np.any(played != 0, axis=1)]
    vocals = expected["vocals"][np.any(expected["vocals"] != 0, axis=1)]
    assert len(played) == len(vocals)
    np.testing.assert_allclose(played, vocals, atol=1e-4)


def test_url_input_through_a_local_server(
    model_env: dict[str, str], music: np.ndarray, tmp_path: Path
) -> None:
    import functools
    import http.server

    audio.save(tmp_path / "song.wav", music[: RATE // 2], sample_rate=RATE)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        ok = subprocess.run(
            [
                sys.executable,
                "-m",
                "splitstems",
                "stream",
                f"{base}/song.wav",
                "--stdout",
                "vocals",
                "--format",
                "s16le",
            ],
            env={**os.environ, **model_env},
            capture_output=True,
            timeout=120,
        )
        missing = subprocess.run(
            [
                sys.executable,
                "-m",
                "splitstems",
                "stream",
                f"{base}/none.wav",
                "-o",
                tmp_path / "out",
            ],
            env={**os.environ, **model_env},
            capture_output=True,
            timeout=120,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert ok.returncode == 0, ok.stderr.decode()
    assert len(ok.stdout) == (RATE // 2) * 2 * 2  # s16le stereo, the input's length
    assert missing.returncode == 1
    assert "none.wav: cannot open as audio (Server returned 404 Not Found)" in (
        missing.stderr.decode()
    )


def test_separate_latency_writes_the_live_separation(
    use_shared_models: None,
    music: np.ndarray,
    separator_2stems,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from splitstems.cli.main import main

    source = tmp_path / "song.wav"
    audio.save(source, music[:RATE], sample_rate=RATE, bit_depth="32f")
    mix = audio.load(source)
    assert (
        main(
            ["separate", str(source), "-o", str(tmp_path), "--latency", "0.5", "--bit-depth", "32f"]
        )
        == 0
    )
    live = separator_2stems.live(0.5)
    first = live.push(mix)
    expected = np.concatenate([first["vocals"], live.flush()["vocals"]])
    np.testing.assert_allclose(audio.load(tmp_path / "song" / "vocals.wav"), expected, atol=1e-5)
    assert main(["separate", str(source), "-o", str(tmp_path), "--latency", "0.5", "--mwf"]) == 2
    assert "error: live separation works with ratio masks" in capsys.readouterr().err


def test_blocks_read_before_a_ctrl_c_are_handed_over_not_dropped() -> None:
    from splitstems.cli.stream import _Reader

    blocks = [np.full((100, 2), k, np.float32) for k in range(5)]
    reader = _Reader(lambda: iter(blocks))
    reader.start()
    reader.join(timeout=10)
    first = next(reader.blocks())  # the stream took one, then Ctrl-C came
    rest = list(reader.read_already())  # what was read already: all of it, in order
    assert [b[0, 0] for b in [first, *rest]] == [0, 1, 2, 3, 4]
    assert list(reader.read_already()) == []  # and nothing twice


def test_ctrl_c_does_not_wait_for_what_the_reader_reads_after_it() -> None:
    # a file is read ahead of the separation: the reader refills the queue as it is
    # emptied, so taking "until empty" after a Ctrl-C went on to the end of the file
    from splitstems.cli.stream import QUEUE_BLOCKS, _Reader

    reader = _Reader(lambda: (np.zeros((10, 2), np.float32) for _ in range(QUEUE_BLOCKS + 5)))
    reader.start()
    deadline = time.monotonic() + 10
    while reader.queue.qsize() < QUEUE_BLOCKS:  # full: the reader waits to put more
        assert time.monotonic() < deadline
        time.sleep(0.01)
    queued = reader.read_already()
    next(queued)  # one taken: the reader puts the next block it had read
    while reader.queue.qsize() < QUEUE_BLOCKS:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    taken = 1 + sum(1 for _ in queued)
    assert taken == QUEUE_BLOCKS  # what was queued at the Ctrl-C, not what came after
    assert sum(1 for _ in reader.blocks()) == 5  # the rest, then the reader ends
    reader.join(timeout=10)
    assert not reader.is_alive()
