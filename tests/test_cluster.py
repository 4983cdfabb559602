"""separate --ray on a real Ray cluster on loopback: faults, retries, resume, the manifest.

One head (2 CPUs) serves the whole module; it is started with ``ray start --head --block``
and stopped by its process id. The stems the cluster writes are compared byte for byte
with those of a local ``separate`` of the same inputs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from splitstems import audio
from splitstems.batch import separate_files
from splitstems.cluster import MANIFEST, SeparateStems, pool_size, read_manifest

RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray on 127.0.0.1, not the LAN address
    "RAY_AUTH_MODE": "disabled",  # loopback only: not the token a local ray.init left in ~/.ray
}
TEMP_PART = re.compile(r"\.(?P<stem>.+)\.(?P<pid>[0-9]+)-[0-9a-f]{8}\.part\.wav")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_address():
    """A Ray head on 127.0.0.1 with 2 CPUs (no dashboard), for the whole module."""
    ray_bin = Path(sys.executable).with_name("ray")
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="rayt", dir="/tmp")  # short: Ray's socket paths
    env = {**os.environ, **RAY_ENV}
    for key in [k for k in env if k.startswith("SPLITSTEMS_")]:
        del env[key]  # the driver must pass its settings on to the workers itself
    log = open(Path(temp) / "head.log", "w+")  # noqa: SIM115
    head = subprocess.Popen(
        [
            str(ray_bin), "start", "--head", "--block", "--port", str(port),
            "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats",
            "--object-store-memory", "300000000", "--temp-dir", temp,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )  # fmt: skip
    saved = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in Path(log.name).read_text():
            assert head.poll() is None, Path(log.name).read_text()
            assert time.monotonic() < deadline, "the Ray head did not start in 120 s"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        head.send_signal(signal.SIGTERM)  # by its id: `ray start --block` stops its children
        try:
            head.wait(5)
        except subprocess.TimeoutExpired:  # it waits ~30 s for lingering workers: its group
            os.killpg(head.pid, signal.SIGKILL)  # (its own session) goes at once
            head.wait()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def clips(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Five songs of MUSDB18's test previews as WAV files: three of 3 s, two looped to 20 s."""
    folder = tmp_path_factory.mktemp("clips")
    sources = sorted((shared_dir / "audio" / "musdb7" / "test").glob("*.mp4"))[:5]
    out = []
    for index, source in enumerate(sources):
        path = folder / f"song{index}.wav"
        wave = audio.load(source, duration=3.0)
        if index >= 3:  # long enough to be caught mid-file
            wave = np.tile(audio.load(source), (3, 1))[: 20 * 44100]
        audio.save(path, wave, sample_rate=44100)
        out.append(path)
    return out


@pytest.fixture(scope="module")
def local_stems(separator_2stems, clips: list[Path], tmp_path_factory) -> Path:
    """The stems a local ``separate`` writes for the clips (the reference)."""
    out = tmp_path_factory.mktemp("local")
    report = separate_files(separator_2stems, clips, out, progress=False)
    assert [r.status for r in report.results] == ["done"] * len(clips)
    return out


def _run_cli(args: list[str], model_env: dict[str, str], **popen) -> subprocess.Popen:
    env = {**os.environ, **model_env, **RAY_ENV}
    return subprocess.Popen(
        [sys.executable, "-m", "splitstems", "separate", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **popen,
    )


def _cli(args: list[str], model_env: dict[str, str]) -> tuple[int, str, str]:
    proc = _run_cli(args, model_env)
    stdout, stderr = proc.communicate(timeout=300)
    return proc.returncode, stdout, stderr


def _assert_same_stems(out: Path, local: Path, names: list[str]) -> None:
    """Every stem of ``names`` is byte-identical to the local run's; nothing else is there."""
    for name in names:
        for stem in ("vocals", "accompaniment"):
            got = out / name / f"{stem}.wav"
            assert got.read_bytes() == (local / name / f"{stem}.wav").read_bytes(), got
        found = sorted(p.name for p in (out / name).iterdir())
        # no temp file, no second copy: two stems and their record
        assert found == [".vocals.wav.splitstems.json", "accompaniment.wav", "vocals.wav"]


def _no_temp_files(out: Path) -> None:
    assert not [p for p in out.rglob("*") if ".part" in p.name]


def test_pool_size_fits_the_cluster():
    assert pool_size({"CPU": 8.0}, cpus_per_worker=2, gpus_per_worker=0, n_tasks=100) == 4
    assert pool_size({"CPU": 8.0}, cpus_per_worker=1, gpus_per_worker=0, n_tasks=3) == 3
    got = pool_size({"CPU": 16.0, "GPU": 2.0}, cpus_per_worker=1, gpus_per_worker=0.5, n_tasks=50)
    assert got == 4
    with pytest.raises(Exception, match="no room for one worker"):
        pool_size({"CPU": 8.0}, cpus_per_worker=1, gpus_per_worker=1, n_tasks=5)


def _finished(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    """Wait for ``proc``; a command still running after ``timeout`` s is killed and fails."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: it and what it started
        stdout, stderr = proc.communicate()
        pytest.fail(f"still running after {timeout} s: {stderr[-2000:]}")
    return proc.returncode, stdout, stderr


def _ray_processes_under(folder: str) -> list[str]:
    """``pid command`` of the processes run with ``RAY_TMPDIR=folder`` (a Ray started there).

    Found by their environment: Ray renames its workers and agents (``ray::_Worker``).
    """
    found = []
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            if proc.name.isdigit() and f"RAY_TMPDIR={folder}".encode() in environ:
                found.append(f"{proc.name} {(proc / 'cmdline').read_bytes()[:80]!r}")
        except OSError:  # gone, or not ours
            continue
    return [line for line in found if int(line.split()[0]) != os.getpid()]


def test_an_address_with_no_cluster_fails_at_once_with_one_line(clips, model_env, tmp_path):
    port = _free_port()  # bound, then closed: nothing listens there
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        out = tmp_path / "out"
        proc = _run_cli(["--ray", address, str(clips[0]), "-o", str(out)], model_env,
                        start_new_session=True)  # fmt: skip
        code, stdout, stderr = _finished(proc, 60)
        assert code == 2, stderr
        assert stderr.count("\n") == 1, stderr  # one line, ours
        assert stderr.startswith(f"error: cannot connect to Ray at {address}: "), stderr
        assert not out.exists()


def test_a_stale_recorded_cluster_fails_auto_and_plain_ray_starts_one(
    clips, local_stems, model_env, tmp_path
):
    temp = tempfile.mkdtemp(prefix="rays", dir="/tmp")  # short: Ray's socket paths
    try:
        recorded = Path(temp) / "ray" / "ray_current_cluster"  # as a killed head leaves it
        recorded.parent.mkdir()
        recorded.write_text(f"127.0.0.1:{_free_port()}")
        env = {**model_env, "RAY_TMPDIR": temp}
        out = tmp_path / "out"
        args = [str(clips[0]), "-o", str(out)]
        proc = _run_cli(["--ray", "auto", *args], env, start_new_session=True)
        code, stdout, stderr = _finished(proc, 60)
        assert code == 2, stderr
        assert stderr.count("\n") == 1, stderr
        assert stderr.startswith(f"error: cannot connect to Ray at {recorded.read_text()}, "
                                 f"the Ray recorded in {recorded}: "), stderr  # fmt: skip
        assert not out.exists()

        proc = _run_cli(["--ray", *args], env, start_new_session=True)  # a new Ray, here
        code, stdout, stderr = _finished(proc, 180)
        assert code == 0, stderr
        assert f"warning: the Ray recorded in {recorded} " in stderr
        _assert_same_stems(out, local_stems, [clips[0].stem])
        deadline = time.monotonic() + 30
        while _ray_processes_under(temp) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _ray_processes_under(temp)  # the Ray it started stopped with it
    finally:
        for line in _ray_processes_under(temp):  # only if the test failed
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split()[0]), signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def test_bad_file_fails_alone_not_retried_and_clash_settled(
    ray_address, clips, local_stems, model_env, tmp_path
):
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    for clip in clips[:2]:
        shutil.copy(clip, inputs / clip.name)
    (inputs / "bad.wav").write_text("not audio")
    shutil.copy(clips[2], inputs / "sub" / "song0.wav")  # its stems would land on song0's
    out = tmp_path / "out"
    code, stdout, stderr = _cli(["--ray", ray_address, str(inputs), "-o", str(out)], model_env)
    assert code == 1, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, stderr
    assert f"error: {inputs / 'bad.wav'}: not an audio file" in errors[0]
    sub, first = inputs / "sub" / "song0.wav", inputs / "song0.wav"
    clash = f"{sub}: its stems would overwrite those of {first} "
    assert clash in errors[1]  # both named as given
    assert "2 done, 0 skipped, 2 failed" in stderr
    _assert_same_stems(out, local_stems, ["song0", "song1"])
    _no_temp_files(out)

    lines = read_manifest(out / MANIFEST)
    assert len((out / MANIFEST).read_text().splitlines()) == 4  # one line per input
    bad = lines[str((inputs / "bad.wav").resolve())]
    assert bad["status"] == "failed" and bad["attempts"] == 1  # its own error: not retried
    assert "not an audio file" in bad["error"]
    good = lines[str((inputs / "song1.wav").resolve())]
    assert good["status"] == "done" and good["error"] == ""
    assert good["outputs"] == {
        "vocals": "song1/vocals.wav",
        "accompaniment": "song1/accompaniment.wav",
    }
    assert good["audio_seconds"] == 3.0 and good["compute_seconds"] > 0
    assert re.fullmatch(r"127\.0\.0\.1:[0-9]+", good["worker"])


def test_a_model_that_cannot_load_leaves_no_output_folder(ray_address, clips, model_env, tmp_path):
    out = tmp_path / "out" / "stems"  # neither exists yet
    args = ["--ray", ray_address, "-p", "spleeter:4stems", str(clips[0]), "-o", str(out)]
    code, stdout, stderr = _cli(args, model_env)  # 4stems: not here, and no download
    assert code == 2, stderr
    assert stderr.startswith("error: a Ray worker (127.0.0.1:"), stderr
    assert not (tmp_path / "out").exists()


def test_missing_inputs_fail_on_the_driver_without_a_worker(ray_address, model_env, tmp_path):
    import ray
    from ray._private import state

    def pool_actors() -> int:  # every _Worker actor the cluster has had, alive or dead
        return sum(a["ActorClassName"] == "_Worker" for a in state.actors().values())

    out = tmp_path / "out"
    missing = [tmp_path / "nothing-here.wav", tmp_path / "nor-here.mp3"]
    ray.init(address=ray_address, logging_level="ERROR")
    try:
        before = pool_actors()
        code, stdout, stderr = _cli(["--ray", ray_address, *map(str, missing), "-o", str(out)],
                                    model_env)  # fmt: skip
        after = pool_actors()
    finally:
        ray.shutdown()
    assert code == 1, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {path}: file not found" for path in missing]
    assert "0 done, 0 skipped, 2 failed" in stderr
    assert after == before  # no worker was started, no model loaded
    lines = read_manifest(out / MANIFEST)
    assert [lines[str(p)]["attempts"] for p in missing] == [0, 0]


def test_worker_killed_mid_file_is_retried_on_another(
    ray_address, clips, local_stems, model_env, tmp_path
):
    import ray
    from ray._private import state  # the GCS actor table: Ray's state without a dashboard

    out = tmp_path / "out"
    ray.init(address=ray_address, logging_level="ERROR")
    try:
        proc = _run_cli(["--ray", ray_address, *map(str, clips[2:]), "-o", str(out)], model_env)
        killed = None
        deadline = time.monotonic() + 180

        def workers() -> set[int]:  # the pool's processes, once their models are loaded
            actors = state.actors().values()
            return {
                a["Pid"]
                for a in actors
                if a["ActorClassName"] == "_Worker" and a["State"] == "ALIVE"
            }

        known = workers()
        while killed is None and proc.poll() is None and time.monotonic() < deadline:
            for part in out.glob("song[34]/.vocals.*.part.wav"):  # a long stem, mid-write
                pid = int(TEMP_PART.fullmatch(part.name)["pid"])
                known = known if pid in known else workers()
                assert pid in known, (pid, known)
                os.kill(pid, signal.SIGKILL)
                assert part.exists()  # killed before it could finish that file
                killed = (part.parent.name, pid)
                break
            time.sleep(0.01)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        ray.shutdown()
    assert killed is not None, "no stem was seen being written"
    assert proc.returncode == 0, stderr
    names = [clip.stem for clip in clips[2:]]
    _assert_same_stems(out, local_stems, names)
    _no_temp_files(out)
    lines = {Path(k).stem: v for k, v in read_manifest(out / MANIFEST).items()}
    name, pid = killed
    assert lines[name]["status"] == "done" and lines[name]["attempts"] == 2
    assert lines[name]["worker"] != f"127.0.0.1:{pid}"
    assert [lines[n]["attempts"] for n in names if n != name] == [1] * (len(names) - 1)
    # one line of ours says so; Ray's many-line raylet report (in colour) stays out
    clip = next(c for c in clips if c.stem == name)
    said = [line for line in stderr.splitlines() if "retrying" in line]
    assert len(said) == 1, stderr
    assert said[0].startswith(f"warning: {clip}: its Ray worker 127.0.0.1:{pid} died ("), said
    assert said[0].endswith("); retrying (attempt 2 of 4)"), said
    assert "\x1b[" not in stdout + stderr and "raylet" not in stdout + stderr, (stdout, stderr)


def test_resume_after_the_driver_is_killed(ray_address, clips, local_stems, model_env, tmp_path):
    out = tmp_path / "out"
    args = ["--ray", ray_address, *map(str, clips), "-o", str(out)]
    proc = _run_cli(args, model_env, start_new_session=True)
    deadline = time.monotonic() + 180
    while not (out / MANIFEST).is_file() or "done" not in (out / MANIFEST).read_text():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # the driver, mid-run
    proc.communicate()
    killed_run = {Path(k).stem: v for k, v in read_manifest(out / MANIFEST).items()}
    finished = set(killed_run)
    assert 0 < len(finished) < len(clips)

    code, stdout, stderr = _cli([*args, "--resume"], model_env)
    assert code == 0, stderr
    names = [clip.stem for clip in clips]
    _assert_same_stems(out, local_stems, names)
    _no_temp_files(out)
    skipped = {
        line.split(".wav:")[0].rsplit("/", 1)[1]
        for line in stdout.splitlines()
        if ": skipped" in line
    }
    assert finished <= skipped  # what the killed run finished is kept
    text = (out / MANIFEST).read_text().splitlines()
    lines = [json.loads(line) for line in text]
    assert [Path(line["input"]).stem for line in lines] == names  # one line each, in order
    assert {line["status"] for line in lines} <= {"done", "skipped"}
    assert {Path(line["input"]).stem for line in lines if line["status"] == "skipped"} == skipped
    assert all(line["audio_seconds"] > 0 for line in lines)
    now = {Path(line["input"]).stem: line for line in lines}
    kept = ("compute_seconds", "worker", "attempts", "finished")
    for name, made in killed_run.items():  # skipped: keeps what making its stems cost, where
        assert now[name]["status"] == "skipped" and made["compute_seconds"] > 0
        assert {k: now[name][k] for k in kept} == {k: made[k] for k in kept}


def test_sigterm_stops_the_driver_as_usual_leaving_no_temp_files(
    ray_address, clips, model_env, tmp_path
):
    out = tmp_path / "out"
    proc = _run_cli(["--ray", ray_address, *map(str, clips[3:]), "-o", str(out)], model_env)
    deadline = time.monotonic() + 180
    while not list(out.glob("*/.vocals.*.part.wav")):  # mid-file
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr  # the command's own handler, not Ray's
    assert stderr.rstrip().endswith("terminated")
    _no_temp_files(out)


def test_ray_data_block_turns_a_folder_into_a_dataset_of_vocals(
    ray_address, clips, separator_2stems, model_env, tmp_path
):
    import ray

    folder = tmp_path / "songs"
    folder.mkdir()
    for clip in clips[:2]:
        shutil.copy(clip, folder / clip.name)
    (folder / "broken.wav").write_bytes(b"RIFF")
    ray.init(address=ray_address, logging_level="ERROR", runtime_env={"env_vars": model_env})
    try:
        paths = sorted(str(p) for p in folder.glob("*.wav"))
        rows = (
            ray.data.from_items([{"path": p} for p in paths])
            .map_batches(
                SeparateStems,
                fn_constructor_kwargs={"model": "spleeter:2stems", "threads": 1},
                compute=ray.data.ActorPoolStrategy(size=1),
                batch_size=2,
                batch_format="numpy",
                num_cpus=1,
            )
            .select_columns(["path", "vocals", "error"])
            .take_all()
        )
    finally:
        ray.shutdown()
    got = {Path(row["path"]).name: row for row in rows}
    assert sorted(got) == ["broken.wav", "song0.wav", "song1.wav"]
    assert "broken.wav" in got["broken.wav"]["error"] and len(got["broken.wav"]["vocals"]) == 0
    for clip in clips[:2]:
        row = got[clip.name]
        assert row["error"] == ""
        want = separator_2stems.separate(audio.load(clip))["vocals"]
        assert row["vocals"].shape == want.shape == (132300, 2)
        np.testing.assert_allclose(row["vocals"], want, atol=1e-5)
