"""The job manager's files when a job is deleted while one of them is made (no server)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from splitstems import audio
from splitstems.web.jobs import JobGone, JobManager, JobOptions


def _finished_job(manager: JobManager):
    """A job as a worker leaves it: two stems as WAV in its folder, state done."""
    job = manager.new_job("song.mp3", JobOptions())
    stems = job.folder / "stems"
    noise = np.random.default_rng(0).uniform(-0.1, 0.1, (44100, 2)).astype(np.float32)
    for name in ("vocals", "accompaniment"):
        audio.save(stems / f"{name}.wav", noise, sample_rate=44100)
    job.touch(
        state="done", instruments=("vocals", "accompaniment"), sample_rate=44100, n_samples=44100
    )
    return job


@pytest.mark.parametrize(
    "make",
    [
        lambda m, job: m.stem_file(job, "vocals", "flac"),
        lambda m, job: m.stem_file(job, "vocals", "wav"),
        lambda m, job: m.mix_file(job, {"vocals": 0.0, "accompaniment": 1.0}, "wav"),
        lambda m, job: m.zip_file(job),
    ],
    ids=["stem-flac", "stem-wav", "mix", "zip"],
)
def test_a_file_asked_for_a_deleted_job_is_refused_and_leaves_no_folder(
    tmp_path: Path, make
) -> None:
    manager = JobManager(tmp_path / "jobs")
    job = _finished_job(manager)
    assert make(manager, job).is_file()  # while the job is there, the file is made
    manager.delete(job.id)  # a request that looked the job up just before
    with pytest.raises(JobGone, match="^song.mp3: removed from this server$"):
        make(manager, job)
    assert list((tmp_path / "jobs").iterdir()) == []  # the writer made no folder again
