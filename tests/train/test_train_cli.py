"""``splitstems train``: Spleeter's flags, resume, clear errors and exit codes."""

from __future__ import annotations

from trainkit import mixed_csv, write_config

from splitstems.cli import main
from splitstems.train.checkpoint import saved_step


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
