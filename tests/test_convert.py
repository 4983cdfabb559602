"""The TensorFlow checkpoint reader, the Keras → PyTorch name mapping and the converter.

Real data: Deezer's 2stems checkpoint (index + data) and the 4stems/5stems indexes and
graphs (``model.meta``) from ``../shared``. Synthetic 4/5-stem checkpoints are written
with :func:`write_checkpoint` from the real indexes (same names, shapes and offsets).
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import stat
import struct
import subprocess
import sys
from pathlib import Path

import crc32c
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from splitstems.config import load_config
from splitstems.convert import (
    IGNORED_VARIABLES,
    TensorInfo,
    _mask_crc,
    _proto_fields,
    _read_varint,
    convert_checkpoint,
    expected_shapes,
    mapping_for,
    read_checkpoint,
    read_index,
    tf_to_state_dict,
    write_checkpoint,
)
from splitstems.errors import CheckpointError

DATA = "model.data-00000-of-00001"
CHECKPOINTS = {
    "spleeter:2stems": "spleeter/2stems",
    "spleeter:4stems": "spleeter-indexes/4stems",
    "spleeter:5stems": "spleeter-indexes/5stems",
}
N_VARIABLES = {"spleeter:2stems": 149, "spleeter:4stems": 297, "spleeter:5stems": 371}


@pytest.fixture(scope="module")
def models_dir(shared_dir: Path) -> Path:
    return shared_dir / "models"


@pytest.fixture(scope="module")
def real_2stems(models_dir: Path) -> Path:
    return models_dir / "spleeter" / "2stems"


@pytest.fixture(scope="module")
def vars_2stems(real_2stems: Path) -> dict[str, np.ndarray]:
    return read_checkpoint(real_2stems)


def _spleeter_model(config):
    unet = pytest.importorskip("splitstems.models.unet")
    return unet.SpleeterModel(config)


def _model_shapes(config) -> dict[str, tuple[int, ...]]:
    state = _spleeter_model(config).state_dict()
    return {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("model.index", DATA, "checkpoint"):
        shutil.copyfile(src / name, dst / name)
    return dst


# --------------------------------------------------------------------------- reader


def test_crc_mask_matches_tensorflow() -> None:
    assert crc32c.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    crc = 0x12345678
    assert _mask_crc(crc) == ((((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_real_indexes_hold_float32_weights_and_only_global_step_besides(
    models_dir: Path, name: str
) -> None:
    index = read_index(models_dir / CHECKPOINTS[name] / "model.index")
    assert len(index) == N_VARIABLES[name]
    step = index["global_step"]
    assert (step.dtype, step.shape, step.size) == ("int64", (), 8)
    others = {k: v for k, v in index.items() if k != "global_step"}
    assert {v.dtype for v in others.values()} == {"float32"}
    assert all(
        re.match(r"(conv2d|conv2d_transpose|batch_normalization)(_\d+)?/", k) for k in others
    )
    # One shard, tensors packed back to back in name order (as TensorFlow writes them).
    infos = sorted(index.values(), key=lambda i: i.name.encode())
    assert {i.shard_id for i in infos} == {0}
    assert [i.offset for i in infos] == list(np.cumsum([0] + [i.size for i in infos[:-1]]))


def test_real_2stems_reads_with_every_crc_verified(
    real_2stems: Path, vars_2stems: dict[str, np.ndarray]
) -> None:
    index = read_index(real_2stems / "model.index")
    assert vars_2stems.keys() == index.keys()
    for name, info in index.items():
        array = vars_2stems[name]
        assert array.shape == info.shape
        assert array.dtype == np.dtype(info.dtype)
        assert array.flags.writeable
    assert int(vars_2stems["global_step"]) == 0
    total = sum(info.size for info in index.values())
    assert total == (real_2stems / DATA).stat().st_size == 78_614_080
    # The same through a prefix, the .index path and a subset of names.
    prefix = read_checkpoint(real_2stems / "model", names=["conv2d/kernel"])
    assert list(prefix) == ["conv2d/kernel"]
    np.testing.assert_array_equal(prefix["conv2d/kernel"], vars_2stems["conv2d/kernel"])
    assert read_checkpoint(real_2stems / "model.index", names=["conv2d/bias"]).keys() == {
        "conv2d/bias"
    }


def test_corrupt_data_byte_fails_crc_naming_the_variable(real_2stems: Path, tmp_path: Path) -> None:
    ckpt = _copy_checkpoint(real_2stems, tmp_path / "ckpt")
    info = read_index(ckpt)["conv2d_3/kernel"]
    with open(ckpt / DATA, "r+b") as fh:
        fh.seek(info.offset + info.size // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(CheckpointError, match=r"conv2d_3/kernel.*crc32c mismatch"):
        read_checkpoint(ckpt)
    # Without verification the (corrupt) bytes come back.
    assert read_checkpoint(ckpt, verify=False)["conv2d_3/kernel"].shape == info.shape


def test_truncated_data_file_names_file_and_variable(real_2stems: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copyfile(real_2stems / "model.index", ckpt / "model.index")
    with open(real_2stems / DATA, "rb") as src, open(ckpt / DATA, "wb") as dst:
        dst.write(src.read(1_000_000))
    with pytest.raises(CheckpointError, match=rf"{DATA}: variable '[^']+'.*beyond the end"):
        read_checkpoint(ckpt)


def test_missing_data_file_is_a_checkpoint_error(real_2stems: Path, tmp_path: Path) -> None:
    shutil.copyfile(real_2stems / "model.index", tmp_path / "model.index")
    with pytest.raises(CheckpointError, match="data file not found"):
        read_checkpoint(tmp_path)


@pytest.mark.parametrize("keep", [0, 30, 2000, 5200])
def test_truncated_index_is_a_checkpoint_error(
    real_2stems: Path, tmp_path: Path, keep: int
) -> None:
    raw = (real_2stems / "model.index").read_bytes()
    (tmp_path / "model.index").write_bytes(raw[:keep])
    with pytest.raises(CheckpointError, match="model.index"):
        read_index(tmp_path / "model.index")


def test_corrupt_index_block_fails_its_checksum(real_2stems: Path, tmp_path: Path) -> None:
    raw = bytearray((real_2stems / "model.index").read_bytes())
    raw[100] ^= 0x01  # inside the data block
    (tmp_path / "model.index").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="block checksum mismatch"):
        read_index(tmp_path / "model.index")


def test_snappy_compressed_block_is_refused(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "model", {"w": np.zeros(3, np.float32)})
    raw = bytearray((tmp_path / "model.index").read_bytes())
    footer = bytes(raw[-48:])
    pos = 0
    for _ in range(2):  # skip the metaindex handle
        _, pos = _read_varint(footer, pos, what="t")
    index_offset, pos = _read_varint(footer, pos, what="t")
    index_size, _ = _read_varint(footer, pos, what="t")
    index_block = bytes(raw[index_offset : index_offset + index_size])
    # Index block entry: shared, non_shared, value_len, key, handle(offset, size).
    k = index_block[1]
    handle = index_block[3 + k :]
    block_offset, hpos = _read_varint(handle, 0, what="t")
    block_size, _ = _read_varint(handle, hpos, what="t")
    trailer = block_offset + block_size
    raw[trailer] = 1  # snappy
    crc = _mask_crc(crc32c.crc32c(bytes(raw[block_offset : trailer + 1])))
    raw[trailer + 1 : trailer + 5] = struct.pack("<I", crc)
    (tmp_path / "model.index").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="snappy"):
        read_index(tmp_path)


def test_checkpoint_file_names_the_prefix(real_2stems: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "run"
    ckpt.mkdir()
    (ckpt / "model.ckpt-42.index").symlink_to(real_2stems / "model.index")
    (ckpt / f"model.ckpt-42{DATA[5:]}").symlink_to(real_2stems / DATA)
    # An absolute path from the machine it was trained on: found next to the file instead.
    (ckpt / "checkpoint").write_text(
        'model_checkpoint_path: "/train/box/run/model.ckpt-42"\n'
        'all_model_checkpoint_paths: "/train/box/run/model.ckpt-42"\n'
    )
    assert read_checkpoint(ckpt, names=["conv2d/bias"])["conv2d/bias"].shape == (16,)
    with pytest.raises(CheckpointError, match="no checkpoint index"):
        read_checkpoint(tmp_path)
    # Text-format escapes: TensorFlow writes non-ASCII bytes as octal.
    (ckpt / "mod\u00e8le.index").symlink_to(real_2stems / "model.index")
    (ckpt / f"mod\u00e8le{DATA[5:]}").symlink_to(real_2stems / DATA)
    (ckpt / "checkpoint").write_text('model_checkpoint_path: "mod\\303\\250le"\n')
    assert read_checkpoint(ckpt, names=["conv2d/bias"])["conv2d/bias"].shape == (16,)


# --------------------------------------------------------------------------- writer


def test_write_checkpoint_round_trips_many_variables(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tensors: dict[str, np.ndarray] = {
        f"layer_{i:03d}/kernel": rng.standard_normal((i % 5 + 1, 3)).astype(np.float32)
        for i in range(300)  # several data blocks and restart points
    }
    tensors["global_step"] = np.array(123456789012, dtype=np.int64)
    tensors["zero_size"] = np.zeros((0, 4), np.float32)
    tensors["scalar64"] = np.array(2.5, dtype=np.float64)
    infos = write_checkpoint(tmp_path / "model", tensors)
    index = read_index(tmp_path / "model.index")
    assert index == infos
    back = read_checkpoint(tmp_path)
    assert back.keys() == tensors.keys()
    for name, value in tensors.items():
        assert back[name].dtype == value.dtype
        np.testing.assert_array_equal(back[name], value)


def test_writer_reproduces_tensorflows_data_file_byte_for_byte(
    real_2stems: Path, vars_2stems: dict[str, np.ndarray], tmp_path: Path
) -> None:
    infos = write_checkpoint(tmp_path / "model", vars_2stems)
    assert infos == read_index(real_2stems)
    assert (tmp_path / DATA).read_bytes() == (real_2stems / DATA).read_bytes()


# --------------------------------------------------------------------------- mapping


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_mapping_covers_every_parameter_and_every_variable(models_dir: Path, name: str) -> None:
    config = load_config(name)
    index = read_index(models_dir / CHECKPOINTS[name] / "model.index")
    mapping = mapping_for(index, config)
    shapes = expected_shapes(config)
    assert mapping.keys() == shapes.keys()
    assert len(mapping) == 74 * len(config.instruments)
    # Every variable is used exactly once, except the documented non-model ones.
    assert len(set(mapping.values())) == len(mapping)
    assert set(index) - set(mapping.values()) == {"global_step"} <= IGNORED_VARIABLES
    for torch_name, tf_name in mapping.items():
        tf_shape = index[tf_name].shape
        torch_shape = tuple(tf_shape[i] for i in (3, 2, 0, 1)) if len(tf_shape) == 4 else tf_shape
        assert torch_shape == shapes[torch_name], torch_name


def test_mapping_names_for_first_and_second_unet(models_dir: Path) -> None:
    mapping = mapping_for(
        read_index(models_dir / CHECKPOINTS["spleeter:4stems"]), load_config("spleeter:4stems")
    )
    assert mapping["unets.vocals.encoder.0.conv.weight"] == "conv2d/kernel"
    assert mapping["unets.vocals.output.bias"] == "conv2d_6/bias"
    assert mapping["unets.drums.encoder.0.conv.weight"] == "conv2d_7/kernel"
    assert mapping["unets.drums.decoder.5.deconv.weight"] == "conv2d_transpose_11/kernel"
    assert (
        mapping["unets.drums.encoder.5.bn.running_var"] == "batch_normalization_17/moving_variance"
    )
    assert mapping["unets.other.decoder.0.bn.weight"] == "batch_normalization_42/gamma"
    assert mapping["unets.other.output.weight"] == "conv2d_27/kernel"


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_expected_shapes_are_spleeter_model_state_dict_shapes(name: str) -> None:
    config = load_config(name)
    assert _model_shapes(config) == expected_shapes(config)


# The original graph (model.meta) is the ground truth of which variable plays which role:
# trace every layer's data input back to the layer that produced it.
_LAYER = re.compile(r"^(conv2d_transpose|conv2d|batch_normalization|concatenate)(_\d+)?$")


def _load_graph(path: Path) -> dict[str, tuple[str, list[str]]]:
    nodes: dict[str, tuple[str, list[str]]] = {}
    what = str(path)
    for number, _, value in _proto_fields(path.read_bytes(), what=what):
        if number != 2:  # MetaGraphDef.graph_def
            continue
        for gnum, _, node in _proto_fields(value, what=what):
            if gnum != 1:  # GraphDef.node
                continue
            name, op, inputs = "", "", []
            for nnum, _, field in _proto_fields(node, what=what):
                if nnum == 1:
                    name = field.decode()
                elif nnum == 2:
                    op = field.decode()
                elif nnum == 3:
                    inputs.append(field.decode())
            nodes[name] = (op, inputs)
    return nodes


def _producers(nodes, start: str, own: str | None = None) -> list[str]:
    """Layers (scopes) whose outputs feed ``start``, walking back through other ops."""
    found: list[str] = []
    stack, seen = [start], set()
    while stack:
        name = stack.pop()
        if name.startswith("^"):
            continue
        name = name.split(":")[0]
        if name in seen:
            continue
        seen.add(name)
        scope = name.split("/")[0]
        if _LAYER.match(scope) and scope != own:
            if scope not in found:
                found.append(scope)
            continue
        stack.extend(reversed(nodes[name][1]))
    return found


def _layer_input(nodes, layer: str) -> list[str]:
    if layer.startswith("conv2d_transpose"):
        start = nodes[f"{layer}/conv2d_transpose"][1][2]
    elif layer.startswith("conv2d"):
        start = nodes[f"{layer}/Conv2D"][1][0]
    else:  # batch_normalization: the inference branch of the Keras learning-phase cond
        fused = sorted(
            n
            for n, (op, _) in nodes.items()
            if n.startswith(f"{layer}/") and op.startswith("FusedBatchNorm")
        )
        start = nodes[fused[0]][1][0]
    return _producers(nodes, start, own=layer)


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_mapping_agrees_with_the_original_graph(models_dir: Path, name: str) -> None:
    config = load_config(name)
    folder = models_dir / CHECKPOINTS[name]
    nodes = _load_graph(folder / "model.meta")
    mapping = mapping_for(read_index(folder), config)

    def layer(torch_name: str) -> str:
        return mapping[torch_name].rsplit("/", 1)[0]

    for u, instrument in enumerate(config.instruments):
        p = f"unets.{instrument}."
        enc = [layer(f"{p}encoder.{i}.conv.weight") for i in range(6)]
        enc_bn = [layer(f"{p}encoder.{i}.bn.weight") for i in range(6)]
        dec = [layer(f"{p}decoder.{j}.deconv.weight") for j in range(6)]
        dec_bn = [layer(f"{p}decoder.{j}.bn.weight") for j in range(6)]
        out = layer(f"{p}output.weight")
        assert _layer_input(nodes, enc[0]) == []  # the mixture spectrogram
        for i in range(6):
            assert _layer_input(nodes, enc_bn[i]) == [enc[i]]
            if i:
                assert _layer_input(nodes, enc[i]) == [enc_bn[i - 1]]
        assert _layer_input(nodes, dec[0]) == [enc[5]]  # raw conv6, not its BatchNorm
        for j in range(6):
            assert _layer_input(nodes, dec_bn[j]) == [dec[j]]
            if j:
                (concat,) = _layer_input(nodes, dec[j])
                skip, up = nodes[f"{concat}/concat"][1][:2]
                assert _producers(nodes, skip) == [enc[5 - j]]
                assert _producers(nodes, up) == [dec_bn[j - 1]]
        assert _layer_input(nodes, out) == [dec_bn[5]]
        if config.model_type == "unet.softmax_unet":
            assert nodes["stack"][1][u] == f"{out}/BiasAdd"
        else:
            assert nodes[f"{instrument}_spectrogram/mul"][1][0] == f"{out}/Sigmoid"


def test_wrong_model_for_the_checkpoint_is_explained(real_2stems: Path, tmp_path: Path) -> None:
    index = read_index(real_2stems)
    with pytest.raises(
        CheckpointError, match=r"holds 2 U-Net\(s\) but model spleeter:4stems needs 4"
    ):
        mapping_for(index, load_config("spleeter:4stems"))
    with pytest.raises(CheckpointError, match=r"holds 2 U-Net\(s\).*spleeter:5stems"):
        convert_checkpoint(real_2stems, tmp_path / "out", load_config("spleeter:5stems"))
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_missing_unexpected_and_misshapen_variables_are_listed(
    vars_2stems: dict[str, np.ndarray],
) -> None:
    config = load_config("spleeter:2stems")
    partial = dict(vars_2stems)
    del partial["batch_normalization_13/moving_mean"]
    with pytest.raises(CheckpointError, match=r"missing 1 .*batch_normalization_13/moving_mean"):
        tf_to_state_dict(partial, config)
    extra = dict(vars_2stems, **{"dense/kernel": np.zeros((2, 2), np.float32)})
    with pytest.raises(CheckpointError, match=r"unexpected variable\(s\): dense/kernel"):
        tf_to_state_dict(extra, config)
    bad = dict(vars_2stems, **{"conv2d_3/bias": np.zeros(7, np.float32)})
    with pytest.raises(CheckpointError, match=r"conv2d_3/bias: \(7,\), expected \(128,\)"):
        tf_to_state_dict(bad, config)
    # Optimizer slots are not model weights: skipped on purpose.
    adam = dict(vars_2stems, **{"conv2d/kernel/Adam": np.zeros(1, np.float32)})
    assert len(tf_to_state_dict(adam, config)) == 148


def test_state_dict_kernels_are_permuted_copies(vars_2stems: dict[str, np.ndarray]) -> None:
    state = tf_to_state_dict(vars_2stems, load_config("spleeter:2stems"))
    conv = vars_2stems["conv2d_8/kernel"]  # HWIO: second U-Net's encoder conv 1
    weight = state["unets.accompaniment.encoder.1.conv.weight"]  # (out, in, H, W)
    assert weight.is_contiguous() and weight.dtype == torch.float32
    assert weight[7, 3, 1, 4].item() == conv[1, 4, 3, 7]
    deconv = vars_2stems["conv2d_transpose_2/kernel"]  # HWOI
    weight = state["unets.vocals.decoder.2.deconv.weight"]  # (in, out, H, W)
    assert tuple(weight.shape) == (256, 64, 5, 5)
    assert weight[200, 60, 2, 0].item() == deconv[2, 0, 60, 200]
    bn = state["unets.vocals.decoder.0.bn.running_var"]
    np.testing.assert_array_equal(bn.numpy(), vars_2stems["batch_normalization_6/moving_variance"])
    # Copies: the caller's arrays are never shared or changed.
    bias = state["unets.vocals.encoder.0.conv.bias"]
    assert bias.data_ptr() != vars_2stems["conv2d/bias"].ctypes.data


# --------------------------------------------------------------------------- conversion


def test_convert_real_2stems_to_safetensors(real_2stems: Path, tmp_path: Path) -> None:
    config = load_config("spleeter:2stems")
    path = convert_checkpoint(real_2stems, tmp_path / "out", config)
    assert path == tmp_path / "out" / "model.safetensors"
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.json", "model.safetensors"]
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["format"] == "pt" and meta["model"] == "spleeter:2stems"
    assert meta["source"].endswith("model.index")
    assert load_config(tmp_path / "out" / "config.json").instruments == config.instruments
    state = load_file(str(path))
    assert len(state) == 148
    model = _spleeter_model(config)
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert all(k.endswith("num_batches_tracked") for k in result.missing_keys)


@pytest.mark.skipif(not hasattr(os, "umask"), reason="POSIX modes")
def test_converted_files_get_the_mode_of_a_plain_open(real_2stems: Path, tmp_path: Path) -> None:
    # model.safetensors used to be 0600 (safetensors' writer) beside a 0644 config.json.
    old = os.umask(0o022)
    try:
        path = convert_checkpoint(real_2stems, tmp_path / "out", load_config("spleeter:2stems"))
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.parent.iterdir()}
    assert modes == {"model.safetensors": 0o644, "config.json": 0o644}


def test_a_checkpoint_holding_nan_is_refused(
    vars_2stems: dict[str, np.ndarray], tmp_path: Path
) -> None:
    tensors = dict(vars_2stems)
    bad = np.array(tensors["batch_normalization_3/moving_variance"])
    bad[[1, 7]] = [np.nan, np.inf]
    tensors["batch_normalization_3/moving_variance"] = bad
    write_checkpoint(tmp_path / "ckpt" / "model", tensors)  # valid crc32c: a diverged run
    with pytest.raises(CheckpointError) as info:
        convert_checkpoint(tmp_path / "ckpt", tmp_path / "out", load_config("spleeter:2stems"))
    assert str(info.value) == (
        f"{tmp_path / 'ckpt' / 'model'}.index: variable 'batch_normalization_3/moving_variance' "
        f"holds 2 NaN or infinite values (of {bad.size}); the checkpoint cannot be used"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["spleeter:4stems", "spleeter:5stems"])
def test_synthetic_checkpoint_from_real_index_converts_and_loads(
    models_dir: Path, tmp_path: Path, name: str
) -> None:
    config = load_config(name)
    real = read_index(models_dir / CHECKPOINTS[name])
    rng = np.random.default_rng(5)
    tensors = {
        n: (
            np.array(1_000_000, np.int64)
            if info.dtype == "int64"
            else rng.standard_normal(info.shape, dtype=np.float32)
        )
        for n, info in real.items()
    }
    written = write_checkpoint(tmp_path / "ckpt" / "model", tensors)
    # Same names, shapes and byte layout as the real data file would have.
    strip = {n: (i.dtype, i.shape, i.offset, i.size) for n, i in real.items()}
    assert {n: (i.dtype, i.shape, i.offset, i.size) for n, i in written.items()} == strip
    path = convert_checkpoint(tmp_path / "ckpt", tmp_path / "out", config)
    state = load_file(str(path))
    mapping = mapping_for(real, config)
    assert state.keys() == mapping.keys()
    for torch_name, tf_name in mapping.items():
        expected = torch.from_numpy(tensors[tf_name])
        if expected.ndim == 4:
            expected = expected.permute(3, 2, 0, 1)
        assert torch.equal(state[torch_name], expected), torch_name
    model = _spleeter_model(config)
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert all(k.endswith("num_batches_tracked") for k in result.missing_keys)
    vocals = model.unets["vocals"].encoder[0].conv.weight
    assert torch.equal(vocals, state["unets.vocals.encoder.0.conv.weight"])


def test_tensor_info_is_a_plain_record() -> None:
    info = TensorInfo("w", "float32", (2, 3), 0, 0, 24, 0)
    assert info.shape == (2, 3) and info.size == 24


def _limit_file_size() -> None:  # in the child: writes past 1 MB fail (as on a full disk)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))


def test_convert_that_cannot_write_is_one_line_and_leaves_nothing(
    real_2stems: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "splitstems", "convert", str(real_2stems), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_limit_file_size,  # noqa: PLW1509 - no threads in the child yet
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"error: {out}: cannot write the converted model (File too large)"
    ]
    assert list(out.iterdir()) == []
