"""Damaged and foreign ``model.safetensors`` files: one-line errors, checksum records.

Small safetensors files are written here with seeded tensors; the end-to-end cases load
``spleeter:2stems`` from a folder holding a damaged file, through the library and the
command line (a real subprocess: exit 2, one line naming the file and the cause).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from splitstems import weights
from splitstems.config import load_config
from splitstems.errors import ModelError
from splitstems.separator import load_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("SPLITSTEMS_CACHE", str(path))
    for name in ("SPLITSTEMS_MODEL_DIR", "MODEL_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SPLITSTEMS_DOWNLOAD_URL", "http://127.0.0.1:9/unreachable")
    return path


def _small(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    tensors = {
        "a.weight": torch.from_numpy(rng.standard_normal((8, 4, 5, 5)).astype(np.float32)),
        "a.bias": torch.from_numpy(rng.standard_normal(8).astype(np.float32)),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _random(path: Path) -> None:
    path.write_bytes(np.random.default_rng(1).bytes(3000))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _folder(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _trailing(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\0" * 10)


def _header_cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:40])


def _bad_json(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8 + 1] = ord("#")
    path.write_bytes(bytes(data))


def _integers(path: Path) -> None:
    save_file({"a.weight": torch.zeros(3, dtype=torch.int64)}, str(path))


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated": (_truncate, r"truncated \(the header describes 3,232 bytes of tensor data"),
    "header cut": (_header_cut, r"truncated \(the header needs"),
    "random bytes": (_random, "not a safetensors weights file"),
    "empty": (_empty, "empty file"),
    "a folder": (_folder, "is a folder"),
    "trailing bytes": (_trailing, "10 bytes after the last tensor"),
    "corrupt header": (_bad_json, r"corrupt header \(JSONDecodeError"),
    "integer tensors": (_integers, "tensor 'a.weight' is I64; model weights are floating point"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_file_is_one_line_naming_file_and_cause(kind: str, tmp_path: Path) -> None:
    path = _small(tmp_path / "model.safetensors")
    damage, cause = DAMAGE[kind]
    damage(path)
    with pytest.raises(ModelError, match=f"^{path}: {cause}") as info:
        weights.load(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_weights_that_are_not_finite_are_refused(
    dtype: torch.dtype, value: float, tmp_path: Path
) -> None:
    path = tmp_path / "model.safetensors"
    rng = np.random.default_rng(3)
    bias = torch.from_numpy(rng.standard_normal(8).astype(np.float32)).to(dtype)
    bias[5] = value
    big = torch.from_numpy(rng.standard_normal((4, 1000)).astype(np.float32)).to(dtype)
    save_file({"a.bias": bias, "a.weight": big, "b.weight": big.clone()}, str(path))
    problem = "tensor 'a.bias' holds 1 NaN or infinite value (of 8)"
    with pytest.raises(ModelError) as info:
        weights.load(path)
    assert str(info.value) == (
        f"{path}: {problem}; damaged, or saved from a training run that diverged"
    )
    # Cached weights: damaged, never recorded (whatever the record asks for).
    assert weights.verify(path) == problem
    assert weights.verify(path, require_record=True) == problem
    assert not (tmp_path / weights.RECORD).exists()
    with pytest.raises(ModelError, match="NaN or infinite"):
        weights.write_record(path)
    bias[5] = 0.5
    big[1, 999] = value  # the last value of a larger tensor is found too
    save_file({"a.bias": bias, "a.weight": big, "b.weight": big.clone()}, str(path))
    with pytest.raises(ModelError, match=r"^.*: tensor 'a.weight' holds 1 NaN .* \(of 4,000\)"):
        weights.load(path)
    assert weights.verify(path).startswith("tensor 'a.weight' holds 1 NaN")


def test_good_file_loads_and_inspects(tmp_path: Path) -> None:
    path = _small(tmp_path / "model.safetensors")
    header = weights.inspect(path)
    assert {n: (h.dtype, h.shape) for n, h in header.items()} == {
        "a.bias": ("F32", (8,)),
        "a.weight": ("F32", (8, 4, 5, 5)),
    }
    assert set(weights.load(path)) == {"a.bias", "a.weight"}


# --------------------------------------------------------------------------- load_model


@pytest.fixture(scope="module")
def good_2stems(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared 2stems checkpoint converted once for this module."""
    from splitstems.convert import convert_checkpoint

    out = tmp_path_factory.mktemp("good")
    return convert_checkpoint(
        shared_dir / "models" / "spleeter" / "2stems", out, load_config("spleeter:2stems")
    )


def _state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("kind", ["truncated", "random", "wrong tensors", "wrong shape", "NaN"])
def test_load_model_from_a_folder_with_damaged_weights(
    kind: str, good_2stems: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    path = folder / "model.safetensors"
    if kind == "truncated":
        path.write_bytes(good_2stems.read_bytes()[:3_000_000])
        cause = "truncated"
    elif kind == "random":
        _random(path)
        cause = "not a safetensors weights file"
    elif kind == "wrong tensors":
        state = {k.replace("vocals", "drums"): v for k, v in _state(good_2stems).items()}
        save_file(state, str(path))
        cause = r"the weights do not fit the model \(74 missing: unets\.vocals"
    elif kind == "NaN":  # used to give NaN or silent stems, exit 0
        state = _state(good_2stems)
        state["unets.accompaniment.encoder.2.bn.running_var"].fill_(float("nan"))
        save_file(state, str(path))
        cause = (
            r"tensor 'unets.accompaniment.encoder.2.bn.running_var' holds 64 NaN or infinite "
            r"values \(of 64\); damaged, or saved from a training run that diverged$"
        )
    else:
        state = _state(good_2stems)
        state["unets.vocals.output.bias"] = torch.zeros(3)
        save_file(state, str(path))
        cause = r"the weights do not fit the model \(shapes: unets\.vocals\.output\.bias \(3,\), "
        cause += r"expected \(2,\)\)$"
    with pytest.raises(ModelError, match=f"^{path}: {cause}") as info:
        load_model("spleeter:2stems", model_dir=folder)
    assert "\n" not in str(info.value)


def test_damaged_weights_next_to_a_json_config(tmp_path: Path) -> None:
    config = tmp_path / "mine.json"
    config.write_text(json.dumps(load_config("spleeter:2stems").to_json_dict()))
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 7)
    with pytest.raises(ModelError, match=f"^{tmp_path / 'model.safetensors'}: .* too short"):
        load_model(config)


def test_cli_separate_with_damaged_weights_exits_2_with_one_line(
    shared_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "models" / "2stems"
    _small(folder / "model.safetensors")
    _truncate(folder / "model.safetensors")
    env = os.environ | {"SPLITSTEMS_CACHE": str(tmp_path / "cache")}
    env.pop("SPLITSTEMS_MODEL_DIR", None)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "splitstems",
            "separate",
            "--model-dir",
            str(tmp_path / "models"),
            "-o",
            str(tmp_path / "out"),
            str(shared_dir / "audio" / "examples" / "audio_example.mp3"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"error: {folder / 'model.safetensors'}: truncated (the header describes 3,232 bytes "
        "of tensor data, the file holds 3,132 bytes)"
    ]
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- records


def test_verify_records_then_trusts_an_unchanged_stamp(tmp_path: Path) -> None:
    path = _small(tmp_path / "model.safetensors")
    assert not (tmp_path / weights.RECORD).exists()
    assert weights.verify(path) is None  # no record (an older version's entry): hashed, recorded
    record = json.loads((tmp_path / weights.RECORD).read_text())
    assert record["sha256"] == weights.sha256(path)
    stat = path.stat()
    assert record["stamp"] == [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    # An unchanged stamp is trusted without reading the file: a wrong recorded sha256
    # goes unnoticed until the file changes (the price of a fast start).
    (tmp_path / weights.RECORD).write_text(json.dumps(record | {"sha256": "0" * 64}))
    assert weights.verify(path) is None


def test_verify_catches_a_changed_or_truncated_file(tmp_path: Path) -> None:
    path = _small(tmp_path / "model.safetensors")
    weights.write_record(path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(0, 1))  # another mtime, even on a coarse clock
    assert "is not the one recorded at conversion" in weights.verify(path)
    _truncate(path)
    assert weights.verify(path).startswith("truncated")
    _folder(path)
    assert weights.verify(path) == "is a folder, not a safetensors weights file"


def test_verify_of_an_old_entry_with_a_damaged_file_writes_no_record(tmp_path: Path) -> None:
    path = _small(tmp_path / "model.safetensors")
    _truncate(path)
    assert weights.verify(path).startswith("truncated")
    assert not (tmp_path / weights.RECORD).exists()


def test_verify_with_a_known_source_wants_a_current_record(tmp_path: Path) -> None:
    # Whole, finite weights without a record cannot be told from weights damaged where
    # it does not show (zeros written over them): where the source is known, they are
    # "unrecorded" (the cache rebuilds them); elsewhere they are recorded as found.
    path = _small(tmp_path / "model.safetensors")
    assert weights.verify(path, require_record=True) == weights.NO_RECORD
    assert not (tmp_path / weights.RECORD).exists()
    weights.write_record(path)
    record = json.loads((tmp_path / weights.RECORD).read_text())
    assert record["version"] == 2 and record["sha256"] == weights.sha256(path)
    assert weights.verify(path, require_record=True) is None
    # A version 1 record may hold the sha256 of a damaged file (version 1 recorded any
    # whole file it found): it is no longer enough.
    (tmp_path / weights.RECORD).write_text(json.dumps(record | {"version": 1}))
    assert weights.verify(path, require_record=True) == weights.NO_RECORD
    assert weights.verify(path) is None  # no source known: checked in full, recorded again
    assert json.loads((tmp_path / weights.RECORD).read_text())["version"] == 2


def test_tensor_digest_ignores_metadata_and_is_kept_in_the_record(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(5)
    tensors = {
        "b": torch.randn(3, 4, generator=gen),
        "a": torch.randn(7, generator=gen),
        "scalar": torch.tensor(1.5, dtype=torch.float64),  # 0-d: no bytes view in torch
    }
    first, second = tmp_path / "one" / "model.safetensors", tmp_path / "two" / "model.safetensors"
    for path, metadata in ((first, {"source": "x"}), (second, {"source": "elsewhere"})):
        path.parent.mkdir()
        save_file(tensors, str(path), metadata=metadata)
    assert first.read_bytes() != second.read_bytes()
    digest = weights.tensor_digest(first)
    assert weights.tensor_digest(second) == digest  # same tensors, other file
    changed = {**tensors, "a": tensors["a"] + 1}
    save_file(changed, str(second))
    assert weights.tensor_digest(second) != digest
    # A record of this very file holds the digest: read from it, not recomputed.
    weights.write_record(first)
    record = json.loads((first.parent / weights.RECORD).read_text())
    assert record["tensors"] == digest
    record["tensors"] = "from the record"
    (first.parent / weights.RECORD).write_text(json.dumps(record))
    assert weights.tensor_digest(first) == "from the record"
    save_file(changed, str(first))  # another file now: its stamp differs
    assert weights.tensor_digest(first) == weights.tensor_digest(second)
