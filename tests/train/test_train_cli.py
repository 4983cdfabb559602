"""``splitstems train``: Spleeter's flags, resume, clear errors and exit codes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from signals import as_in_a_terminal, as_under_nohup
from trainkit import mixed_csv, write_config

from splitstems.cli import main
from splitstems.train.checkpoint import LOG, saved_step


def test_train_then_resume_from_the_command_line(previews, tmp_path, capsys):
    csv = mixed_csv(previews, tmp_path)  # 1 good song, 3 bad ones: skipped and counted
    config = write_config(tmp_path, previews, train_csv=str(csv), save_checkpoints_steps=2)
    out = tmp_path / "m"
    args = ["train", "-p", str(config), "-d", str(previews), "-o", str(out), "--no-validation"]
    assert main([*args, "--steps", "3"]) == 0
    assert saved_step(out) == 3
    captured = capsys.readouterr()
    assert "steps/s" in captured.out
    assert "3 of 4 songs skipped" in captured.err
    assert main([*args, "--steps", "3"]) == 2  # a run is there: --resume or another folder
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--steps", "5", "--resume"]) == 0
    assert saved_step(out) == 5


def test_train_reports_bad_data_in_one_line(previews, tmp_path, capsys):
    csv = tmp_path / "bad.csv"
    csv.write_text("mix_path,drums_path\na.wav,b.wav\n")
    config = write_config(tmp_path, previews, train_csv=str(csv))
    assert main(["train", "-p", str(config), "-d", str(previews)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "vocals_path" in err and "Traceback" not in err


@pytest.mark.parametrize("inherited", ["default", "ignored"])
def test_sighup_saves_and_stops_unless_ignored(previews, tmp_path, inherited):
    """SIGHUP stops `train` like SIGTERM (checkpoint saved, exit 129); under nohup it
    is ignored and the run goes on to its last step."""
    config = write_config(tmp_path, previews, save_summary_steps=2, save_checkpoints_steps=1000)
    out = tmp_path / "m"
    steps = 100_000 if inherited == "default" else 30
    ignore = inherited == "ignored"
    proc = subprocess.Popen(
        [sys.executable, "-m", "splitstems", "train", "-p", str(config), "-d", str(previews)]
        + ["-o", str(out), "--no-validation", "--steps", str(steps)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=as_under_nohup if ignore else as_in_a_terminal,
    )
    try:
        log = out / LOG
        for _ in range(6000):  # until step 2 is logged: the training loop runs
            if (log.is_file() and log.read_text().strip()) or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGHUP)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    if ignore:
        assert proc.returncode == 0, stderr
        assert saved_step(out) == steps
    else:
        assert proc.returncode == 128 + signal.SIGHUP, stderr
        assert 2 <= saved_step(out) < steps
        assert f"interrupted: checkpoint saved at step {saved_step(out)}" in stderr
