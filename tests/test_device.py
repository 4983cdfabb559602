"""Threads from the CPUs this process may really use, and fewer while others are busy."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from splitstems import device
from splitstems.config import ModelConfig
from splitstems.device import (
    LoadMeter,
    ThreadPlan,
    cgroup_cpu_limit,
    plan_threads,
    usable_cpus,
)
from splitstems.engine import Engine
from splitstems.models.unet import SpleeterModel

TINY = ModelConfig(
    name="tiny",
    instrument_list=("voice", "drums", "rest"),
    model_dir="tiny",
    frame_length=256,
    frame_step=64,
    T=64,
    F=64,
)


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_cgroup_v2_quota_of_the_process_and_its_ancestors(tmp_path):
    root = _tree(
        tmp_path / "fs",
        {
            "cpu.max": "max 100000\n",
            "user.slice/cpu.max": "300000 100000\n",  # 3 CPUs above ...
            "user.slice/job/cpu.max": "150000 100000\n",  # ... 1.5 here: the smaller wins
        },
    )
    own = _tree(tmp_path, {"cgroup": "0::/user.slice/job\n"}) / "cgroup"
    assert cgroup_cpu_limit(root=root, self_cgroup=own) == 1.5
    (root / "user.slice/job/cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(root=root, self_cgroup=own) == 3.0
    (root / "user.slice/cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(root=root, self_cgroup=own) is None


def test_cgroup_v1_quota_and_a_container_root(tmp_path):
    root = _tree(
        tmp_path / "fs",
        {"cpu,cpuacct/cpu.cfs_quota_us": "200000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
    )
    # inside a container the process's own path is not under the mount: its root counts
    own = _tree(tmp_path, {"cgroup": "4:memory:/x\n3:cpu,cpuacct:/docker/abc\n"}) / "cgroup"
    assert cgroup_cpu_limit(root=root, self_cgroup=own) == 2.0
    (root / "cpu,cpuacct/cpu.cfs_quota_us").write_text("-1\n")  # no quota
    assert cgroup_cpu_limit(root=root, self_cgroup=own) is None
    assert cgroup_cpu_limit(root=tmp_path / "none", self_cgroup=tmp_path / "none") is None


def test_plans():
    # idle: one thread per usable CPU, U-Nets one after the other (today's behaviour)
    assert plan_threads(usable=2, others=0.1, n_unets=2) == ThreadPlan(2, 1, 2, 0.1)
    assert plan_threads(usable=2, others=None, n_unets=2) == ThreadPlan(2, 1, 2, None)
    # one core of two busy: one thread each, the two U-Nets side by side
    assert plan_threads(usable=2, others=1.0, n_unets=2) == ThreadPlan(1, 2, 1, 1.0)
    assert plan_threads(usable=2, others=3.0, n_unets=2) == ThreadPlan(1, 2, 1, 3.0)
    # 16 CPUs, one busy: 15 threads, split between the U-Nets
    assert plan_threads(usable=16, others=1.2, n_unets=2) == ThreadPlan(15, 2, 7, 1.2)
    assert plan_threads(usable=2, others=1.0, n_unets=5).unet_workers == 2
    # given threads are kept whatever the load; workers only when asked
    assert plan_threads(usable=2, others=1.0, n_unets=2, threads=2) == ThreadPlan(2, 1, 2, 1.0)
    asked = plan_threads(usable=2, others=0, n_unets=2, threads=4, unet_workers=2)
    assert asked == ThreadPlan(4, 2, 2, 0)


def test_load_meter_sees_a_busy_process():
    meter = LoadMeter()
    assert meter.others() is None  # too short a window to believe
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)
        others = meter.others()
    finally:
        busy.kill()
        busy.wait()
    if others is None:
        pytest.skip("no /proc/stat, or a CPU quota below the CPUs (load not measured)")
    assert others >= device.BUSY_CORES


def test_engine_threads_given_and_refused():
    torch.manual_seed(0)
    before = torch.get_num_threads()
    try:
        engine = Engine(SpleeterModel(TINY), TINY, device="cpu", threads=1)
        assert torch.get_num_threads() == 1 and engine.threads == 1
        engine.separate(np.zeros((3000, 2), np.float32))
        assert engine.last_plan == ThreadPlan(1, 1, 1, None)
        for bad in (0, -1, 1.5, "2", True):
            with pytest.raises(ValueError, match="threads must be a whole number >= 1"):
                Engine(SpleeterModel(TINY), TINY, device="cpu", threads=bad)
    finally:
        torch.set_num_threads(before)


def test_more_threads_than_cpus_are_warned_about(caplog):
    before = torch.get_num_threads()
    many = device.usable_cpus() * 4
    try:
        with caplog.at_level(logging.WARNING, logger="splitstems.engine"):
            Engine(SpleeterModel(TINY), TINY, device="cpu", threads=device.usable_cpus())
            assert [r for r in caplog.records if r.name.startswith("splitstems")] == []
            Engine(SpleeterModel(TINY), TINY, device="cpu", threads=many)
        [record] = [r for r in caplog.records if r.name.startswith("splitstems")]
        assert record.getMessage().startswith(
            f"{many} threads for {device.usable_cpus()} usable CPUs"
        )
    finally:
        torch.set_num_threads(before)


def test_unets_side_by_side_give_the_same_stems_and_leave_no_threads(rng):
    torch.manual_seed(0)
    model = SpleeterModel(TINY)
    x = rng.uniform(-0.5, 0.5, (20_000, 2)).astype(np.float32)
    before = torch.get_num_threads()
    try:
        one = Engine(model, TINY, device="cpu", threads=2).separate(x)
        side = Engine(model, TINY, device="cpu", threads=2, unet_workers=3)
        stems = side.separate(x)
        assert side.last_plan.unet_workers == 3
        for name in TINY.instruments:
            np.testing.assert_array_equal(stems[name], one[name])
        # closing a stream early stops its workers too
        stream = side.stream([x[:5000], x[5000:]])
        next(stream)
        stream.close()
        assert not [t for t in threading.enumerate() if t.name.startswith("splitstems-unet")]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


_AFFINITY = """
import os, torch
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # after torch chose its threads
from splitstems.config import load_config
from splitstems.device import usable_cpus
from splitstems.engine import Engine
from splitstems.models.unet import SpleeterModel
config = load_config("spleeter:2stems")
Engine(SpleeterModel(config), config, device="cpu")
print(usable_cpus(), torch.get_num_threads())
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity")
def test_threads_follow_the_cpus_the_process_may_use():
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_AFFINITY)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1"]  # torch had chosen one per CPU of the machine
    assert usable_cpus() >= 1


@pytest.mark.usefixtures("use_shared_models")
def test_cli_threads_option(tmp_path, capsys):
    from splitstems import audio
    from splitstems.cli.main import main

    song = tmp_path / "song.wav"
    audio.save(song, np.zeros((4410, 2), np.float32), sample_rate=44100)
    before = torch.get_num_threads()
    try:
        assert main(["separate", "--threads", "1", "-o", str(tmp_path / "out"), str(song)]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit) as stop:
        main(["separate", "--threads", "0", "-o", str(tmp_path / "out"), str(song)])
    assert stop.value.code == 2
    assert "--threads" in capsys.readouterr().err


def test_one_thread_sets_one_and_restores_even_on_errors():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with device.one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="boom"), device.one_thread():
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_models_are_built_and_fused_on_one_thread_then_the_engines_count(monkeypatch):
    # hundreds of small copies: threads splitting each only wait for each other, which on
    # a busy machine made a model's set-up take seconds (see device.one_thread)
    import splitstems.engine as engine_module

    seen = []
    real = engine_module.fuse_for_inference

    def spy(model):
        seen.append(torch.get_num_threads())
        return real(model)

    monkeypatch.setattr(engine_module, "fuse_for_inference", spy)
    before = torch.get_num_threads()
    try:
        torch.manual_seed(0)
        engine = Engine(SpleeterModel(TINY), TINY, device="cpu", threads=2)
        assert seen == [1]
        assert torch.get_num_threads() == engine.threads == 2
    finally:
        torch.set_num_threads(before)


_REUSE = textwrap.dedent(
    """
    import ctypes
    import numpy as np
    from splitstems.device import keep_freed_memory

    class MallInfo2(ctypes.Structure):  # glibc >= 2.33
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    kept = keep_freed_memory()
    block = np.ones(64 << 20, np.uint8)  # above glibc's largest mmap threshold (32 MB)
    mapped = libc.mallinfo2().hblkhd  # bytes in blocks mapped on their own
    del block
    heap = libc.mallinfo2().arena  # bytes the heap holds, free or not
    print(kept, mapped >> 20, heap >> 20)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize("setting", ["", "0"])
def test_freed_memory_is_kept_for_reuse(setting):
    # A 64 MB block: with glibc's defaults mapped on its own and unmapped when freed
    # (the next one is mapped and its pages faulted in again); kept, it comes from the
    # heap and stays there when freed.
    env = {**os.environ, "SPLITSTEMS_KEEP_FREED_MEMORY": setting}
    done = subprocess.run(
        [sys.executable, "-c", _REUSE], capture_output=True, text=True, env=env, check=True
    )
    kept, mapped_mb, heap_mb = done.stdout.split()
    if setting == "0":
        assert kept == "False" and int(mapped_mb) >= 64 and int(heap_mb) < 64
    else:
        assert kept == "True" and int(mapped_mb) == 0 and int(heap_mb) >= 64
