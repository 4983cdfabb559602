"""The command line as users call it: Spleeter's flags, clear errors, exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np
import pytest
from signals import as_in_a_terminal, as_under_nohup

from splitstems import audio
from splitstems.cli import build_parser, main

pytestmark = pytest.mark.usefixtures("use_shared_models")


@pytest.fixture()
def song(tmp_path: Path, rng) -> Path:
    """A 3-second stereo WAV of tones and noise."""
    t = np.arange(3 * 44100) / 44100
    left = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)
    right = 0.3 * np.sin(2 * np.pi * 660 * t)
    path = tmp_path / "in" / "song.wav"
    audio.save(path, np.stack([left, right], 1).astype(np.float32), sample_rate=44100)
    return path


def run(*args: str) -> int:
    return main([str(a) for a in args])


def outputs(root: Path) -> list[str]:
    """Every file under ``root`` except the hidden records of the runs."""
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and not p.name.endswith(".splitstems.json")
    )


def test_separate_writes_stems(song, tmp_path, capsys):
    out = tmp_path / "out"
    assert run("separate", "-p", "spleeter:2stems", "-o", out, song) == 0
    assert outputs(out) == ["song/accompaniment.wav", "song/vocals.wav"]
    assert audio.load(out / "song" / "vocals.wav").shape == (3 * 44100, 2)
    assert "song.wav" in capsys.readouterr().out


def test_codec_bitrate_and_filename_format(song, tmp_path):
    out = tmp_path / "out"
    code = run(
        "separate",
        "-o",
        out,
        "-c",
        "mp3",
        "-b",
        "192k",
        "-f",
        "{foldername}-{filename}_{instrument}.{codec}",
        song,
    )
    assert code == 0
    assert outputs(out) == ["in-song_accompaniment.mp3", "in-song_vocals.mp3"]


def test_offset_duration_and_16khz_model(song, tmp_path):
    out = tmp_path / "out"
    assert (
        run("separate", "-p", "spleeter:2stems-16kHz", "-s", "1", "-d", "1.5", "-o", out, song) == 0
    )
    assert audio.load(out / "song" / "vocals.wav").shape == (66150, 2)


def test_several_inputs_one_bad(song, tmp_path, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "missing.mp3"
    code = run("separate", "-o", out, missing, song)
    captured = capsys.readouterr()
    assert code == 1
    # the error, then one summary line on stderr (it used to be on stdout, and a second
    # "1 of 2 files failed" on stderr)
    assert captured.err.splitlines()[0].startswith("error: ")
    assert "missing.mp3" in captured.err.splitlines()[0]
    assert captured.err.splitlines()[1].startswith("1 done, 0 skipped, 1 failed (")
    assert len(captured.err.splitlines()) == 2
    assert captured.out.splitlines() == [captured.out.splitlines()[0]]  # song.wav's line
    assert outputs(out) == ["song/accompaniment.wav", "song/vocals.wav"]
    other = tmp_path / "in" / "other.wav"
    other.write_bytes(song.read_bytes())
    assert run("separate", "-o", out, "-d", "1", song, other) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.splitlines()[-1].startswith("2 done, 0 skipped, 0 failed (")


def test_rerun_overwrites_and_resume_redoes_what_differs(song, tmp_path, capsys):
    out = tmp_path / "out"
    vocals = out / "song" / "vocals.wav"
    assert run("separate", "-o", out, song) == 0
    assert outputs(out) == ["song/accompaniment.wav", "song/vocals.wav"]  # record: hidden
    assert (out / "song" / ".vocals.wav.splitstems.json").is_file()
    # Another run with other settings writes them (it used to say "skipped").
    assert run("separate", "-o", out, "-d", "2", song) == 0
    assert "skipped" not in capsys.readouterr().out
    assert audio.load(vocals).shape == (2 * 44100, 2)
    assert run("separate", "-o", out, "--resume", song) == 0
    line = capsys.readouterr().out.strip()
    assert line.endswith("(redone: settings differ (duration 2 -> none))"), line
    assert audio.load(vocals).shape == (3 * 44100, 2)
    assert run("separate", "-o", out, "--resume", song) == 0
    assert "skipped, stems complete and made with the same settings" in capsys.readouterr().out
    assert run("separate", "-o", out, "--overwrite", song) == 0  # still accepted
    assert "2 stems in" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        run("separate", "-o", out, "--overwrite", "--resume", song)
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_settings_a_codec_ignores_are_warned_once(song, tmp_path, capsys):
    other = tmp_path / "in" / "other.wav"
    other.write_bytes(song.read_bytes())
    out = tmp_path / "out"
    assert run("separate", "-o", out, "-d", "1", "-b", "320k", song, other) == 0
    err = capsys.readouterr().err
    assert err == "warning: codec wav: lossless, the bitrate 320k is ignored\n"
    assert run("separate", "-o", out, "-d", "1", "-c", "mp3", "--bit-depth", "24", song) == 0
    assert capsys.readouterr().err == "warning: codec mp3: lossy, the bit depth 24 is ignored\n"
    # the defaults, given or not, are quiet
    assert run("separate", "-o", out, "-d", "1", "-c", "flac", song) == 0
    assert run("separate", "-o", out, "-d", "1", "-c", "mp3", "-b", "96k", song) == 0
    assert capsys.readouterr().err == ""


def _bad_files(tmp_path: Path, song: Path) -> dict[str, Path]:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.wav").write_bytes(b"")
    (bad / "notes.mp3").write_text("these are not sounds\n" * 50)
    (bad / "folder.wav").mkdir()
    truncated = bad / "truncated.wav"
    truncated.write_bytes(song.read_bytes()[:30])
    with wave.open(str(bad / "silent.wav"), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(44100)
    return {
        "missing": bad / "missing.wav",
        "empty": bad / "empty.wav",
        "not audio": bad / "notes.mp3",
        "directory": bad / "folder.wav",
        "truncated": truncated,
        "zero-length": bad / "silent.wav",
    }


def test_bad_inputs_give_one_line_errors_and_no_files(song, tmp_path, capsys):
    for kind, path in _bad_files(tmp_path, song).items():
        out = tmp_path / f"out-{kind}"
        code = run("separate", "-o", out, path)
        err = capsys.readouterr().err.strip()
        assert code == 1, kind
        lines = err.splitlines()
        assert lines[0].startswith("error: ") and path.name in lines[0], (kind, err)
        assert "Traceback" not in err
        assert not out.exists() or outputs(out) == [], kind


def test_unwritable_output_directory(song, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    assert run("separate", "-o", blocker / "out", song) != 0
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "file.txt" in err


def test_filename_format_outside_output(song, tmp_path, capsys):
    code = run("separate", "-o", tmp_path / "out", "-f", "../../{instrument}.wav", song)
    assert code == 2
    assert "outside the output directory" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.wav"))


def test_unknown_model_and_broken_config(song, tmp_path, capsys):
    assert run("separate", "-p", "spleeter:3stems", "-o", tmp_path, song) == 2
    assert "spleeter:3stems: unknown model" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text('{"instrument_list": ["vocals", ')
    assert run("separate", "-p", broken, "-o", tmp_path, song) == 2
    err = capsys.readouterr().err
    assert "broken.json" in err and "invalid JSON" in err


def test_models_lists_every_released_model(capsys):
    assert run("models") == 0
    out = capsys.readouterr().out
    for name in ("2stems", "4stems", "5stems", "2stems-16kHz", "4stems-16kHz", "5stems-16kHz"):
        assert f"spleeter:{name} " in out
    line = next(x for x in out.splitlines() if x.startswith("spleeter:2stems "))
    assert "available" in line and "vocals, accompaniment" in line


def test_convert_writes_safetensors(shared_dir, tmp_path, capsys):
    out = tmp_path / "converted"
    assert run("convert", shared_dir / "models" / "spleeter" / "2stems", "-o", out) == 0
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    # The converted folder is a model of its own: -p takes its config.
    song_dir = tmp_path / "sep"
    wav = tmp_path / "tone.wav"
    audio.save(wav, np.full((44100, 2), 0.1, np.float32), sample_rate=44100)
    assert run("separate", "-p", out / "config.json", "-o", song_dir, wav) == 0
    assert outputs(song_dir) == ["tone/accompaniment.wav", "tone/vocals.wav"]


def test_console_script_runs(song, tmp_path, model_env):
    env = {**os.environ, **model_env}
    exe = Path(sys.executable).with_name("splitstems")
    result = subprocess.run(
        [str(exe), "separate", "-o", str(tmp_path / "o"), str(song)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "o" / "song" / "vocals.wav").is_file()
    # the process ends without interpreter teardown: piped output must still be complete
    assert "2 stems in" in result.stdout + result.stderr
    missing = subprocess.run(
        [str(exe), "separate", "-o", str(tmp_path / "o"), str(tmp_path / "nothing.mp3")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert missing.returncode == 1
    assert missing.stderr.splitlines() == [f"error: {tmp_path / 'nothing.mp3'}: file not found"]
    assert missing.stdout == ""


@pytest.mark.parametrize(
    "args,message",
    [
        (["-c", "mp3", "-b", "abc"], "codec mp3: bitrate must look like"),
        (["-c", "mp3", "-b", "64"], "bitrate 64 is outside what libmp3lame can do (32k-320k"),
        (["-c", "mp3", "-b", "500k"], "bitrate 500k is outside what libmp3lame can do (32k-320k"),
        (["-c", "flac", "--bit-depth", "32f"], "flac supports bit_depth 16 or 24"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["-f", "{filename}/{instrument}.mp3"], "ends in .mp3 but the codec is wav"),
        (["-f", ""], "empty filename format"),
    ],
)
def test_bad_options_fail_once_up_front(song, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert run("separate", "-o", out, *args, song) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert err.count("error:") == 1
    assert not out.exists()


@pytest.mark.parametrize(
    "option", [["--mwf-exponent", "0.7"], ["--mwf-exponent", "1"], ["--mwf-iterations", "1"]]
)
def test_wiener_options_need_mwf(song, tmp_path, capsys, option):
    assert run("separate", "-o", tmp_path / "out", *option, song) == 2
    assert f"error: {option[0]} needs --mwf (Wiener filter options)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["-s", "-1"],
        ["-s", "nan"],
        ["-d", "0"],
        ["-d", "inf"],
        ["--overlap", "1"],
        ["--overlap", "0.9"],  # the engine's step check refused these with another format
        ["--overlap", "0.876"],
        ["--batch-segments", "0"],
        ["--mwf-exponent", "0"],
        ["--mwf-exponent", "nan"],
        ["--mwf-iterations", "-1"],
    ],
)
def test_bad_numbers_are_usage_errors(song, tmp_path, capsys, args):
    with pytest.raises(SystemExit) as exit_info:
        run("separate", "-o", tmp_path / "out", *args, song)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("splitstems separate: error: argument ") and err.count("\n") == 1
    assert err.rstrip().endswith("(see splitstems separate --help)")


def test_output_path_that_is_a_file(song, tmp_path, capsys):
    blocker = tmp_path / "taken.wav"
    blocker.write_text("x")
    assert run("separate", "-o", blocker, song) == 2
    assert "taken.wav: output path exists and is not a folder" in capsys.readouterr().err


def test_same_name_inputs_do_not_overwrite_each_other(song, tmp_path, capsys):
    other = tmp_path / "other" / "song.flac"
    audio.save(other, audio.load(song), sample_rate=44100)
    out = tmp_path / "out"
    assert run("separate", "-o", out, song, other) == 1
    assert "would overwrite those of" in capsys.readouterr().err
    assert (
        run(
            "separate",
            "-o",
            out,
            "-f",
            "{foldername}/{filename}/{instrument}.{codec}",
            song,
            other,
            "--overwrite",
        )
        == 0
    )


def test_failed_file_leaves_no_empty_folders(tmp_path):
    silent = tmp_path / "silent.wav"
    with wave.open(str(silent), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(44100)
    out = tmp_path / "out"
    assert run("separate", "-o", out, silent) == 1
    assert not out.exists()


def test_overlap_range_is_the_engines(capsys):
    from splitstems.cli.options import MAX_OVERLAP
    from splitstems.engine import MIN_STEP

    assert MAX_OVERLAP == 1 - MIN_STEP
    parser = build_parser()
    assert parser.parse_args(["separate", "--overlap", "0.875", "x.wav"]).overlap == 0.875
    with pytest.raises(SystemExit):
        parser.parse_args(["separate", "--overlap", "0.9", "x.wav"])
    assert capsys.readouterr().err == (
        "splitstems separate: error: argument --overlap: must be a number from 0 to 0.875: "
        "'0.9' (see splitstems separate --help)\n"
    )
    (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("separate", "evaluate"):
        help_text = " ".join(commands.choices[name].format_help().split())
        assert "overlap of consecutive model segments, 0 to 0.875 (0 is" in help_text


def test_log_lines_look_like_the_commands_own_messages():
    from splitstems.cli.main import LogFormatter

    def line(name: str, level: int, verbose: bool) -> str:
        record = logging.LogRecord(name, level, __file__, 1, "%s: bad", ("a.wav",), None)
        return LogFormatter(verbose=verbose).format(record)

    assert line("splitstems.audio", logging.WARNING, False) == "warning: a.wav: bad"
    assert line("splitstems", logging.ERROR, False) == "error: a.wav: bad"
    assert line("splitstems.engine", logging.INFO, False) == "info: a.wav: bad"
    # --verbose names the logger, as does a line from another library
    assert (
        line("splitstems.audio", logging.WARNING, True) == "warning: splitstems.audio: a.wav: bad"
    )
    assert line("torch", logging.WARNING, False) == "warning: torch: a.wav: bad"


def test_warnings_from_the_library_and_the_command_look_alike(tmp_path, model_env):
    # "warning: codec flac: ..." (printed) beside "WARNING:splitstems.audio:..." (logged)
    x = np.zeros((44100, 2), np.float32)
    x[22050, 0] = np.nan
    audio.save(tmp_path / "nan.wav", x, sample_rate=44100, bit_depth="32f")
    result = subprocess.run(
        [sys.executable, "-m", "splitstems", "separate", "-c", "flac", "-b", "192k"]
        + ["-o", str(tmp_path / "out"), str(tmp_path / "nan.wav")],
        capture_output=True,
        text=True,
        env={**os.environ, **model_env},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "warning: codec flac: lossless, the bitrate 192k is ignored",
        f"warning: {tmp_path / 'nan.wav'}: 1 non-finite sample replaced by 0 (first at 0.500 s)",
    ]


def test_convert_missing_checkpoint(tmp_path, capsys):
    assert run("convert", tmp_path / "nothing", "-o", tmp_path / "c") == 2
    err = capsys.readouterr().err
    assert "nothing: checkpoint not found" in err and ".index.index" not in err


def test_python_dash_m_help(model_env):
    env = {**os.environ, **model_env}
    help_run = subprocess.run(
        [sys.executable, "-m", "splitstems", "separate", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert help_run.returncode == 0 and "--filename_format" in help_run.stdout


def test_help_shows_every_default():
    parser = build_parser()
    (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, command in commands.choices.items():
        formatter = command.formatter_class(command.prog)
        for action in command._actions:
            if not action.option_strings or action.required or action.nargs == 0:
                continue  # positionals, required options and flags (off unless given)
            if action.help == argparse.SUPPRESS:
                continue
            text = formatter._get_help_string(action) % {"default": action.default}
            if "default" not in text:
                missing.append(f"{name} {action.option_strings[-1]}")
    assert missing == []


@pytest.fixture(scope="module")
def long_song(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 240-second tone: stopping it mid-file is easy."""
    path = tmp_path_factory.mktemp("long") / "long.wav"
    t = np.arange(240 * 44100) / 44100
    tone = (0.2 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
    audio.save(path, np.stack([tone, tone], 1), sample_rate=44100)
    return path


def _start_separate(env: dict[str, str], *args: object, **popen: object) -> subprocess.Popen:
    popen.setdefault("preexec_fn", as_in_a_terminal)
    return subprocess.Popen(
        [sys.executable, "-m", "splitstems", "separate", *map(str, args)],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def _wait_for_stems_of(proc: subprocess.Popen, folder: Path) -> None:
    """Return once ``folder`` holds stems being written (``.part`` files)."""
    for _ in range(6000):
        if list(folder.glob(".*.part*")):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no stems being written in {folder}: {proc.communicate()}")


@pytest.mark.parametrize(
    "signum,message",
    [
        (signal.SIGINT, "interrupted"),
        (signal.SIGTERM, "terminated"),
        (signal.SIGHUP, "terminated"),
    ],
    ids=["SIGINT", "SIGTERM", "SIGHUP"],
)
def test_a_signal_mid_batch_stops_cleanly(song, long_song, tmp_path, model_env, signum, message):
    out = tmp_path / "out"
    proc = _start_separate(model_env, "-o", out, song, long_song)
    try:
        _wait_for_stems_of(proc, out / "long")
        assert proc.poll() is None, "finished before it could be stopped"
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, stderr
    assert stderr.splitlines() == [message]  # once, no traceback
    assert stdout.startswith(f"{song}: 2 stems in") and len(stdout.splitlines()) == 1
    # The finished input keeps its stems (and record); the stopped one leaves nothing.
    assert outputs(out) == ["song/accompaniment.wav", "song/vocals.wav"]
    assert sorted(p.name for p in out.rglob(".*")) == [".vocals.wav.splitstems.json"]


def test_sighup_under_nohup_does_not_stop_separate(long_song, tmp_path, model_env):
    out = tmp_path / "out"
    proc = _start_separate(
        model_env,
        "-o",
        out,
        "-d",
        "90",
        long_song,
        preexec_fn=as_under_nohup,
    )
    try:
        _wait_for_stems_of(proc, out / "long")
        assert proc.poll() is None, "finished before the hang-up"
        proc.send_signal(signal.SIGHUP)
        _, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert audio.load(out / "long" / "vocals.wav").shape == (90 * 44100, 2)


def test_spleeter_positional_api(separator_2stems, song, tmp_path):
    paths = separator_2stems.separate_to_file(str(song), str(tmp_path), None, 0.5, 1.0, "mp3")
    assert sorted(p.name for p in paths.values()) == ["accompaniment.mp3", "vocals.mp3"]
    separator_2stems.join()


def test_quality_options_reach_the_engine(song, tmp_path):
    out = tmp_path / "out"
    code = run(
        "separate",
        "-o",
        out,
        "--shifts",
        "2",
        "--mask-extension",
        "average",
        "-p",
        "spleeter:2stems-16kHz",
        "--mwf",
        "-d",
        "1",
        song,
    )
    assert code == 0
    stems = [audio.load(out / "song" / f"{n}.wav") for n in ("vocals", "accompaniment")]
    assert all(s.shape == (44100, 2) for s in stems)
    # average extension + Wiener filter: the stems add back up to the mixture
    mix = audio.load(song, duration=1.0)
    error = np.sum((stems[0] + stems[1] - mix) ** 2) / np.sum(mix**2)
    assert error < 1e-3


_STARTUP = """
import ctypes, gc, sys
import numpy as np
{pause}
from splitstems.cli.main import build_parser, finish_startup
finish_startup(build_parser().parse_args({argv!r}))
class MallInfo2(ctypes.Structure):  # glibc >= 2.33: bytes in blocks mapped on their own
    _fields_ = [(name, ctypes.c_size_t) for name in "abcdefghij"]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
block = np.ones(64 << 20, np.uint8)
kept = libc.mallinfo2().e < 64 << 20  # from the kept heap, not mapped on its own
print(gc.isenabled(), gc.get_freeze_count() > 0, "torch" in sys.modules, kept)
"""


@pytest.mark.parametrize(
    ("pause", "argv", "expected"),
    [
        # the console entry point pauses the collector: torch is imported, start-up
        # frozen, malloc keeps freed memory
        ("gc.disable()", ["separate", "song.wav"], "True True True True"),
        # commands that never need torch do not pay its import
        ("gc.disable()", ["models"], "True True False True"),
        # a server keeps running: its freed memory goes back to the system
        ("gc.disable()", ["serve"], "True True True False"),
        # a caller of main() keeps its collector and its malloc as they were
        ("", ["separate", "song.wav"], "True False False False"),
    ],
)
def test_startup_imports_torch_with_the_collector_paused_then_freezes(pause, argv, expected):
    code = _STARTUP.format(pause=pause, argv=argv)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split() == expected.split()


_INTERRUPTED_IMPORT = """
import gc, sys
gc.disable()  # as the console entry point (run), which imports torch at start-up
class CtrlC:  # Ctrl-C arrives while torch is being imported
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt
sys.meta_path.insert(0, CtrlC())
from splitstems.cli.main import main
sys.exit(main(["separate", "-o", "out", "song.wav"]))
"""


def test_ctrl_c_while_torch_is_imported_is_an_interrupt(tmp_path):
    # One line and exit 130, as later in the command (it was a 17-58 line traceback).
    done = subprocess.run(
        [sys.executable, "-c", _INTERRUPTED_IMPORT],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert (done.returncode, done.stderr) == (130, "interrupted\n")
