"""ONNX export: the graph, its check, the onnxruntime backend and the torch-free example.

Real data: Deezer's 2stems checkpoint and 20 s of real music from ``../shared``;
synthetic 4/5-stem checkpoints are written from the real indexes as the convert tests
write them (seeded values, scaled so that the U-Nets' activations stay in range).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import soundfile as sf
from fidelity import MIN_SDR_DB, sdr

from splitstems import audio
from splitstems.cli import main
from splitstems.config import load_config
from splitstems.convert import convert_checkpoint, read_index, write_checkpoint
from splitstems.errors import ModelError
from splitstems.export import (
    MIN_SDR_DB_FLOAT16,
    OnnxModel,
    export_model,
)
from splitstems.separator import Separator, load_model

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "onnx_separate.py"

pytestmark = pytest.mark.usefixtures("use_shared_models")


@pytest.fixture(scope="module")
def music(shared_dir: Path) -> Path:
    """20.4 s of real music (three MUSDB18 excerpts), 44.1 kHz stereo WAV."""
    return shared_dir / "audio" / "reference" / "inputs" / "concat_3.wav"


@pytest.fixture(scope="module")
def song(shared_dir: Path) -> Path:
    """6.8 s of real music, 44.1 kHz stereo 16-bit WAV."""
    return shared_dir / "audio" / "reference" / "inputs" / "BKS_Too_Much.wav"


@pytest.fixture(scope="module")
def export_2stems(tmp_path_factory, model_env, music):
    """The real 2stems exported (float32) with the library call, checked on real music."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in model_env.items():
            patch.setenv(key, value)
        model, config = load_model("spleeter:2stems", progress=False)
        waveform = audio.load(music, sample_rate=config.sample_rate)
        folder = tmp_path_factory.mktemp("onnx-2stems")
        result = export_model(model, config, folder, waveform=waveform)
    return folder, result


def test_2stems_export_matches_torch_on_real_music(export_2stems):
    folder, result = export_2stems
    assert result.onnx_path == folder / "model.onnx" and result.config_path.is_file()
    # both stems through the engine (dynamic batch: 2 segments a call), a tone, T=64 batch 3
    assert set(result.sdr_db) == {"vocals", "accompaniment", "(440 Hz tone)", "(T=64, batch 3)"}
    assert min(result.sdr_db.values()) >= MIN_SDR_DB, result.sdr_db
    assert [p.name for p in sorted(folder.iterdir())] == ["config.json", "model.onnx"]


def test_exported_graph_has_dynamic_batch_and_time(export_2stems):
    folder, _ = export_2stems
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    (source,) = graph.input
    (target,) = graph.output
    dims = [d.dim_param or d.dim_value for d in source.type.tensor_type.shape.dim]
    assert source.name == "magnitudes" and target.name == "estimates"
    assert isinstance(dims[0], str) and isinstance(dims[2], str)  # symbolic: batch, T
    assert dims[1] == 2 and dims[3] == 1024
    out_dims = [d.dim_param or d.dim_value for d in target.type.tensor_type.shape.dim]
    assert out_dims == [dims[0], 2, 2, dims[2], 1024]  # batch, instruments, channels, T, F


def test_config_tells_a_runtime_what_it_needs(export_2stems):
    folder, result = export_2stems
    data = json.loads((folder / "config.json").read_text())
    entry = data["onnx"]
    assert entry["file"] == "model.onnx" and entry["precision"] == "float32"
    assert entry["instruments"] == ["vocals", "accompaniment"] == data["instrument_list"]
    assert (entry["T"], entry["F"], entry["sample_rate"]) == (512, 1024, 44100)
    assert entry["stft"]["frame_length"] == 4096 and entry["stft"]["frame_step"] == 1024
    assert entry["input"]["shape"] == ["batch", 2, "T", 1024]
    from splitstems.weights import sha256

    assert entry["sha256"] == sha256(result.onnx_path)
    assert load_config(folder / "config.json").instruments == ("vocals", "accompaniment")


def test_separate_with_exported_folder_matches_torch(export_2stems, song, tmp_path):
    folder, _ = export_2stems
    assert (
        main(
            ["separate", "-p", str(folder / "config.json"), "-o", str(tmp_path / "onnx"), str(song)]
        )
        == 0
    )
    assert (
        main(["separate", "-p", "spleeter:2stems", "-o", str(tmp_path / "torch"), str(song)]) == 0
    )
    for stem in ("vocals", "accompaniment"):
        ours = audio.load(tmp_path / "onnx" / song.stem / f"{stem}.wav")
        reference = audio.load(tmp_path / "torch" / song.stem / f"{stem}.wav")
        assert ours.shape == reference.shape
        assert sdr(reference, ours) >= MIN_SDR_DB, stem


def test_separator_runs_onnx_with_mwf_shifts_and_streaming(export_2stems, separator_2stems, music):
    folder, _ = export_2stems
    waveform = audio.load(music, duration=8.0)
    options = {"device": "cpu", "MWF": True, "shifts": 2, "batch_segments": 2}
    onnx_sep = Separator(str(folder / "config.json"), **options)
    torch_sep = Separator("spleeter:2stems", **options)
    assert isinstance(onnx_sep.engine.model, OnnxModel)
    ours, reference = onnx_sep.separate(waveform), torch_sep.separate(waveform)
    for stem in ("vocals", "accompaniment"):
        assert sdr(reference[stem], ours[stem]) >= MIN_SDR_DB, stem
    # streaming: odd-sized chunks give the same stems as the whole waveform at once
    plain = Separator(str(folder / "config.json"), device="cpu")
    pieces = [waveform[i : i + 77_777] for i in range(0, waveform.shape[0], 77_777)]
    streamed: dict[str, list[np.ndarray]] = {"vocals": [], "accompaniment": []}
    for out in plain.engine.stream(pieces):
        for name, samples in out.items():
            streamed[name].append(samples)
    whole = separator_2stems.separate(waveform)
    for stem, parts in streamed.items():
        assert sdr(whole[stem], np.concatenate(parts)) >= MIN_SDR_DB, stem
    assert onnx_sep.fingerprint() != torch_sep.fingerprint()


def test_onnxruntime_threads_come_from_the_plan_and_do_not_spin(export_2stems, music):
    folder, _ = export_2stems
    separator = Separator(str(folder / "config.json"), device="cpu", threads=1)
    separator.separate(audio.load(music, duration=2.0))
    session = separator.engine.model.session()
    options = session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def _no_torch_env(tmp_path: Path) -> dict[str, str]:
    """An environment in which ``import torch`` raises ImportError."""
    fake = tmp_path / "no-torch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch is not available here')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(fake.parent)
    return env


def test_example_script_separates_without_torch_as_separate_does(export_2stems, song, tmp_path):
    folder, _ = export_2stems
    env = _no_torch_env(tmp_path)
    probe = subprocess.run(
        [sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True
    )
    assert probe.returncode != 0 and "torch is not available here" in probe.stderr
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), str(folder), str(song), str(tmp_path / "example")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = tmp_path / "example" / song.stem
    assert sorted(p.name for p in out.iterdir()) == ["accompaniment.wav", "vocals.wav"]
    assert main(["separate", "-p", "spleeter:2stems", "-o", str(tmp_path / "cli"), str(song)]) == 0
    for stem in ("vocals", "accompaniment"):
        ours = audio.load(out / f"{stem}.wav")
        reference = audio.load(tmp_path / "cli" / song.stem / f"{stem}.wav")
        assert ours.shape == reference.shape
        assert sdr(reference, ours) >= MIN_SDR_DB, stem


def test_cli_float16_export_is_half_the_size_and_close(
    export_2stems, separator_2stems, music, tmp_path, capsys
):
    _, result = export_2stems
    out = tmp_path / "fp16"
    args = ["--precision", "float16", "--check-audio", str(music), "--check-seconds", "12"]
    assert main(["export", "-p", "spleeter:2stems", *args, "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "checking with onnxruntime against torch (12.0 s of audio)" in captured.err
    assert f"wrote {out / 'model.onnx'}" in captured.out
    assert f"dB SDR at worst on {music} (12.0 s) and a 440 Hz tone" in captured.out
    assert 0.45 < (out / "model.onnx").stat().st_size / result.size < 0.55
    assert json.loads((out / "config.json").read_text())["onnx"]["precision"] == "float16"
    waveform = audio.load(music, duration=6.0)
    ours = Separator(str(out / "config.json"), device="cpu").separate(waveform)
    reference = separator_2stems.separate(waveform)
    for stem in ("vocals", "accompaniment"):
        assert MIN_SDR_DB_FLOAT16 <= sdr(reference[stem], ours[stem]) < 120, stem


def test_damaged_export_is_refused_naming_the_file(export_2stems, song, tmp_path, capsys):
    folder, _ = export_2stems
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "config.json").write_bytes((folder / "config.json").read_bytes())
    data = bytearray((folder / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one weight byte changed
    (copy / "model.onnx").write_bytes(bytes(data))
    code = main(["separate", "-p", str(copy / "config.json"), "-o", str(tmp_path / "o"), str(song)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: {copy / 'model.onnx'}: its sha256 differs from the one in config.json "
        "(damaged or replaced); export the model again"
    ]
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.wav"))
    (copy / "model.onnx").unlink()
    with pytest.raises(ModelError, match="exported model file is missing"):
        Separator(str(copy / "config.json"))


def test_without_onnxruntime_the_error_says_what_to_install(export_2stems, song, tmp_path):
    folder, _ = export_2stems
    fake = tmp_path / "no-ort" / "onnxruntime"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no onnxruntime')\n")
    env = dict(os.environ, PYTHONPATH=str(fake.parent))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "splitstems",
            "separate",
            "-p",
            str(folder / "config.json"),
            "-o",
            str(tmp_path / "o"),
            str(song),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: ONNX needs onnxruntime: pip install 'splitstems[export]'"
    )


def test_an_onnx_model_is_not_exported_again(export_2stems):
    folder, _ = export_2stems
    model, config = load_model(str(folder / "config.json"))
    with pytest.raises(ModelError, match="only a torch model can be exported"):
        export_model(model, config, folder / "again")


def _synthetic_checkpoint(models_dir: Path, name: str, dest: Path) -> Path:
    """A checkpoint with the real index's names and shapes, seeded values in a sane range."""
    real = read_index(models_dir / "spleeter-indexes" / name.removeprefix("spleeter:"))
    rng = np.random.default_rng(5)
    tensors = {}
    for key, info in real.items():
        if info.dtype == "int64":
            tensors[key] = np.array(1_000_000, np.int64)
            continue
        values = rng.standard_normal(info.shape, dtype=np.float32)
        if key.endswith("moving_variance"):
            values = np.abs(values) + 0.5
        elif len(info.shape) == 4:  # kernels: keep activations around unit scale
            fan_in = int(np.prod(info.shape[:3]))
            values *= np.float32(1.0 / np.sqrt(fan_in))
        else:
            values *= np.float32(0.1)
        tensors[key] = values
    write_checkpoint(dest / "model", tensors)
    return dest


@pytest.mark.parametrize("name", ["spleeter:4stems", "spleeter:5stems"])
def test_synthetic_4_and_5_stems_export_matches_torch(shared_dir, tmp_path, music, name):
    config = load_config(name)
    checkpoint = _synthetic_checkpoint(shared_dir / "models", name, tmp_path / "ckpt")
    weights = convert_checkpoint(checkpoint, tmp_path / "model", config)
    model, config = load_model(weights.parent / "config.json")
    waveform = audio.load(music, duration=12.0)
    result = export_model(model, config, tmp_path / "onnx", waveform=waveform)
    assert set(result.sdr_db) == {*config.instruments, "(440 Hz tone)", "(T=64, batch 3)"}
    assert min(result.sdr_db.values()) >= MIN_SDR_DB, result.sdr_db
    separator = Separator(str(tmp_path / "onnx" / "config.json"), device="cpu")
    stems = separator.separate(waveform[: 5 * 44100])
    assert tuple(stems) == config.instruments
    assert all(s.shape == (5 * 44100, 2) and np.isfinite(s).all() for s in stems.values())


def test_fast_precision_is_refused_for_an_onnx_model(export_2stems, tmp_path, capsys):
    folder, _ = export_2stems
    song = tmp_path / "song.wav"
    audio.save(song, np.zeros((44100, 2), np.float32), sample_rate=44100)
    code = main(
        ["separate", "--fast", "-p", str(folder / "config.json"), "-o", str(tmp_path), str(song)]
    )
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {folder / 'model.onnx'}: precision 'fast' does not apply to an ONNX model "
        "(its precision is chosen at export: splitstems export --precision)"
    )


def test_export_to_a_file_path_is_one_line_and_writes_nothing(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    assert main(["export", "-p", "spleeter:2stems", "-o", str(taken)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {taken}: output path exists and is not a folder"]
    assert taken.read_text() == "not a folder"


def test_example_script_bad_input_is_one_line(export_2stems, bad_exports, song, tmp_path):
    folder, _ = export_2stems
    slow = tmp_path / "slow.wav"
    audio.save(slow, np.zeros((22050, 2), np.float32), sample_rate=22050)
    cut = tmp_path / "cut.wav"  # the first 20 kB of a 1.2 MB WAV: its header says more
    cut.write_bytes(song.read_bytes()[:20_000])
    blank = tmp_path / "blank.wav"
    audio.save(blank, np.zeros((22050, 2), np.float32), sample_rate=44100)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros((0, 2), np.float32), 44100, subtype="PCM_16")  # a header only
    missing = _edited_copy(folder, tmp_path / "missing")
    (missing / "model.onnx").unlink()
    taken = tmp_path / "taken"
    taken.write_text("a file")
    out = str(tmp_path / "out")
    truncated = bad_exports["truncated"] / "model.onnx"
    cases = [
        ([str(folder), str(slow), out], f"error: {slow}: 22050 Hz, the model needs 44100 Hz"),
        ([str(tmp_path), str(slow), out], f"error: {tmp_path}: not a folder written by splitstems"),
        (
            [str(folder), str(tmp_path / "none.wav"), out],
            f"error: {tmp_path / 'none.wav'}: cannot read",
        ),
        ([str(folder), str(cut), out], f"error: {cut}: truncated: 20000 of "),
        ([str(folder), str(empty), out], f"error: {empty}: no samples"),
        ([str(truncated.parent), str(song), out], f"error: {truncated}: onnxruntime cannot load"),
        ([str(missing), str(song), out], f"error: {missing / 'model.onnx'}: cannot read the model"),
        (
            [str(bad_exports["instruments"]), str(song), out],
            f"error: {bad_exports['instruments'] / 'config.json'}: does not fit model.onnx",
        ),
        (
            [str(bad_exports["F"] / "config.json"), str(song), out],
            f"error: {bad_exports['F'] / 'config.json'}: does not fit model.onnx",
        ),
        (
            [str(folder), str(blank), str(taken)],
            f"error: {taken / 'blank'}: cannot write the stems",
        ),
    ]
    for args, expected in cases:
        result = subprocess.run(
            [sys.executable, str(EXAMPLE), *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(expected), lines
    assert not (tmp_path / "out").exists()


def _tone_wav(path: Path, seconds: float = 2.0) -> np.ndarray:
    """Write a 440 Hz stereo sine (float WAV, 44.1 kHz) to ``path``; return its samples."""
    t = np.arange(int(seconds * 44100)) / 44100
    wave = np.repeat((0.5 * np.sin(2 * np.pi * 440 * t))[:, None], 2, axis=1).astype(np.float32)
    audio.save(path, wave, sample_rate=44100, bit_depth="32f")
    return audio.load(path)


def test_pure_tone_separates_as_torch_does_in_engine_and_example(
    export_2stems, separator_2stems, tmp_path
):
    # onnxruntime's Sigmoid returned 0 below -18 (masks 0.95/0.05 for torch's 0.66/0.34 at
    # loud tone bins): 37-44 dB before the export computed the sigmoid from Exp.
    folder, _ = export_2stems
    tone = tmp_path / "tone.wav"
    waveform = _tone_wav(tone)
    reference = separator_2stems.separate(waveform)
    ours = Separator(str(folder / "config.json"), device="cpu").separate(waveform)
    for stem in ("vocals", "accompaniment"):
        assert sdr(reference[stem], ours[stem]) >= MIN_SDR_DB, stem
    result = subprocess.run(  # the torch-free example, given the config.json path this time
        [sys.executable, str(EXAMPLE), str(folder / "config.json"), str(tone), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for stem in ("vocals", "accompaniment"):
        example = audio.load(tmp_path / "tone" / f"{stem}.wav")
        assert sdr(reference[stem], example) >= MIN_SDR_DB, stem


def _edited_copy(folder: Path, dest: Path, *, onnx_bytes: bytes | None = None, **changes) -> Path:
    """A copy of an export with config keys changed (None: removed; ``onnx_KEY``: in the
    "onnx" entry) or another model.onnx (its sha256 recorded)."""
    dest.mkdir()
    data = json.loads((folder / "config.json").read_text())
    if onnx_bytes is None:
        shutil.copyfile(folder / "model.onnx", dest / "model.onnx")
    else:
        (dest / "model.onnx").write_bytes(onnx_bytes)
        data["onnx"]["sha256"] = hashlib.sha256(onnx_bytes).hexdigest()
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        elif key.startswith("onnx_"):
            data["onnx"][key.removeprefix("onnx_")] = value
        else:
            data[key] = value
    (dest / "config.json").write_text(json.dumps(data))
    return dest


@pytest.fixture(scope="module")
def bad_exports(export_2stems, tmp_path_factory) -> dict[str, Path]:
    """Hand-edited or damaged copies of the 2stems export, by what is wrong with them."""
    folder, _ = export_2stems
    root = tmp_path_factory.mktemp("bad-exports")
    four = ["vocals", "drums", "bass", "other"]
    head = (folder / "model.onnx").read_bytes()[:100_000]
    return {
        "instruments": _edited_copy(
            folder, root / "instr", instrument_list=four, onnx_instruments=four
        ),
        "F": _edited_copy(folder, root / "F", F=512, onnx_F=512),
        "truncated": _edited_copy(folder, root / "trunc", onnx_bytes=head),
        "no-entry": _edited_copy(folder, root / "no-entry", onnx=None),
    }


def test_config_that_does_not_fit_the_graph_is_refused_at_load(
    export_2stems, bad_exports, song, tmp_path, capsys
):
    folder, _ = export_2stems
    expected = {
        "instruments": "lists 4 instruments but model.onnx outputs 2; export the model again",
        "F": "lists 512 frequency bins (F) but model.onnx takes 1024; export the model again",
        "no-entry": "no 'onnx' entry, but model.onnx is beside it: export the model again",
    }
    for case, message in expected.items():
        config = bad_exports[case] / "config.json"
        code = main(["separate", "-p", str(config), "-o", str(tmp_path / case), str(song)])
        assert code == 2, case
        assert capsys.readouterr().err.strip().splitlines() == [f"error: {config}: {message}"]
        assert not (tmp_path / case).exists(), case
    truncated = bad_exports["truncated"] / "model.onnx"
    code = main(["separate", "-p", str(truncated.parent), "-o", str(tmp_path), str(song)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {truncated}: not a readable ONNX model")
    assert main(["separate", "-p", str(folder / "model.onnx"), "-o", str(tmp_path), str(song)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {folder / 'model.onnx'}: that is the ONNX graph; pass its folder or config.json"
    )
