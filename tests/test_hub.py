"""Model lookup, cache and download, without the network.

Release archives are rebuilt from the shared 2stems checkpoint and served from
``file://`` URLs and a local HTTP server on 127.0.0.1; the registry's sha256 is patched
to the test archive's. Every test uses its own ``SPLITSTEMS_CACHE``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from splitstems import hub, weights
from splitstems.config import load_config
from splitstems.errors import DownloadError, ModelError

FILES = ("checkpoint", "model.data-00000-of-00001", "model.index", "model.meta")


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("SPLITSTEMS_CACHE", str(path))
    monkeypatch.delenv("SPLITSTEMS_MODEL_DIR", raising=False)
    monkeypatch.delenv("MODEL_PATH", raising=False)
    monkeypatch.setenv("SPLITSTEMS_DOWNLOAD_URL", "http://127.0.0.1:9/unreachable")
    return path


@pytest.fixture(scope="module")
def checkpoint_2stems(shared_dir: Path) -> Path:
    return shared_dir / "models" / "spleeter" / "2stems"


def _build_archive(path: Path, members: dict[str, Path | bytes]) -> str:
    """Write a .tar.gz (stored deflate: fast) and return its sha256."""
    with tarfile.open(path, "w:gz", compresslevel=0) as tar:
        for arcname, source in members.items():
            if isinstance(source, Path):
                tar.add(source, arcname=arcname)
            else:
                info = tarfile.TarInfo(arcname)
                info.size = len(source)
                tar.addfile(info, io.BytesIO(source))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory, checkpoint_2stems: Path) -> Path:
    """Test release assets: ``root/`` (files at the archive root, as Deezer's), ``nested/``
    (a ``./2stems/`` top folder) and ``evil/`` (a ``../evil`` member)."""
    folder = tmp_path_factory.mktemp("releases")
    layouts: dict[str, dict[str, Path | bytes]] = {
        "root": {name: checkpoint_2stems / name for name in FILES},
        "nested": {f"./2stems/{name}": checkpoint_2stems / name for name in FILES},
        "evil": {"model.index": b"x", "../evil": b"pwned"},
    }
    sums = {}
    for kind, members in layouts.items():
        (folder / kind).mkdir()
        sums[kind] = _build_archive(folder / kind / "2stems.tar.gz", members)
    (folder / "sums.json").write_text(json.dumps(sums))
    return folder


def _use_release(monkeypatch: pytest.MonkeyPatch, releases: Path, kind: str, base: str) -> None:
    sums = json.loads((releases / "sums.json").read_text())
    monkeypatch.setitem(
        hub.REGISTRY, "2stems", dataclasses.replace(hub.REGISTRY["2stems"], sha256=sums[kind])
    )
    monkeypatch.setenv("SPLITSTEMS_DOWNLOAD_URL", base)


@pytest.fixture()
def server(releases: Path) -> Iterator[tuple[str, list[str]]]:
    """Serve ``releases`` on 127.0.0.1; yields (base URL, list of requested paths)."""
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(releases))
    )
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", requests
    finally:
        httpd.shutdown()
        httpd.server_close()


def _cache_entries(cache: Path) -> set[str]:
    if not cache.exists():
        return set()
    return {p.name for p in cache.iterdir()} - {".locks"}


# --------------------------------------------------------------------------- download


def test_download_from_file_url_converts_into_the_cache(
    releases: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use_release(monkeypatch, releases, "root", (releases / "root").as_uri())
    path = hub.download_checkpoint("2stems", progress=False)
    assert path == cache / "2stems" / "model.safetensors"
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == ["checksum.json", "config.json", "model.safetensors"]
    assert load_config(path.parent / "config.json").instruments == ("vocals", "accompaniment")
    assert _cache_entries(cache) == {"2stems"}  # no temp files left behind
    # Both 2stems configs resolve to it now, without any network.
    monkeypatch.setenv("SPLITSTEMS_DOWNLOAD_URL", "http://127.0.0.1:9/unreachable")
    for name in ("spleeter:2stems", "spleeter:2stems-16kHz"):
        assert hub.resolve_weights(load_config(name), download=False) == path


def test_download_over_http_once_then_cached(
    releases: Path,
    cache: Path,
    server: tuple[str, list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base, requests = server
    _use_release(monkeypatch, releases, "nested", f"{base}/nested/")
    config = load_config("spleeter:2stems")
    first = hub.resolve_weights(config, progress=False)
    assert first == cache / "2stems" / "model.safetensors"
    assert requests == ["/nested/2stems.tar.gz"]
    assert hub.resolve_weights(config, progress=False) == first
    assert hub.download_checkpoint("spleeter:2stems-16kHz", progress=False) == first
    assert len(requests) == 1


def test_concurrent_downloads_fetch_once(
    releases: Path,
    cache: Path,
    server: tuple[str, list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base, requests = server
    _use_release(monkeypatch, releases, "root", f"{base}/root")
    barrier = threading.Barrier(3)
    results: list[Path | BaseException] = []

    def fetch() -> None:
        barrier.wait()
        try:
            results.append(hub.download_checkpoint("2stems", progress=False))
        except BaseException as exc:  # noqa: BLE001 - reported below
            results.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == [cache / "2stems" / "model.safetensors"] * 3
    assert requests == ["/root/2stems.tar.gz"]


def test_wrong_sha256_fails_and_leaves_nothing(
    releases: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use_release(monkeypatch, releases, "root", (releases / "root").as_uri())
    good = hub.REGISTRY["2stems"].sha256
    monkeypatch.setitem(
        hub.REGISTRY, "2stems", dataclasses.replace(hub.REGISTRY["2stems"], sha256="0" * 64)
    )
    with pytest.raises(DownloadError, match=f"expected {'0' * 64}, got {good}"):
        hub.download_checkpoint("2stems", progress=False)
    assert _cache_entries(cache) == set()


def test_archive_escaping_its_folder_is_refused(
    releases: Path, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use_release(monkeypatch, releases, "evil", (releases / "evil").as_uri())
    with pytest.raises(DownloadError, match=r"unsafe archive member '\.\./evil'"):
        hub.download_checkpoint("2stems", progress=False)
    assert _cache_entries(cache) == set()
    assert not (cache / "evil").exists() and not (tmp_path / "evil").exists()


def test_archive_with_a_link_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("model.index")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(DownloadError, match="links and special files"):
        hub._safe_extract(archive, tmp_path / "out", source="test")


def test_offline_without_cache_explains_where_to_put_files(cache: Path) -> None:
    config = load_config("spleeter:2stems")
    with pytest.raises(ModelError) as info:
        hub.resolve_weights(config, progress=False)
    message = str(info.value)
    assert "could not download 2stems from http://127.0.0.1:9/unreachable/2stems.tar.gz" in message
    assert "unpack 2stems.tar.gz" in message and "<dir>/2stems/" in message
    assert "SPLITSTEMS_MODEL_DIR" in message and "--model-dir" in message
    with pytest.raises(ModelError, match="downloading is disabled.*SPLITSTEMS_MODEL_DIR"):
        hub.resolve_weights(config, download=False)
    assert _cache_entries(cache) == set()


def test_download_url_and_cache_dir_follow_the_environment(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert hub.cache_dir() == cache
    monkeypatch.delenv("SPLITSTEMS_DOWNLOAD_URL")
    assert hub.download_url("spleeter:4stems-16kHz") == (
        "https://github.com/deezer/spleeter/releases/download/v1.4.0/4stems.tar.gz"
    )
    monkeypatch.setenv("SPLITSTEMS_DOWNLOAD_URL", "https://mirror.example/spleeter/")
    assert hub.download_url("5stems") == "https://mirror.example/spleeter/5stems.tar.gz"
    with pytest.raises(ModelError, match="no released checkpoint"):
        hub.download_checkpoint("7stems")


# --------------------------------------------------------------------------- local folders


def test_model_dir_env_with_pretrained_models_layout(
    shared_dir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPLITSTEMS_MODEL_DIR", str(shared_dir / "models" / "spleeter"))
    first = hub.resolve_weights(load_config("spleeter:2stems"), download=False)
    assert first.parent.parent == cache / "converted"
    assert load_config(first.parent / "config.json").F == 1024  # the base config
    mtime = first.stat().st_mtime_ns
    monkeypatch.setattr(
        "splitstems.convert.convert_checkpoint",
        lambda *a, **k: pytest.fail("converted twice"),
    )
    second = hub.resolve_weights(load_config("spleeter:2stems-16kHz"), download=False)
    assert second == first and second.stat().st_mtime_ns == mtime
    available = {m.name: m.available for m in hub.list_models()}
    assert available == {
        "spleeter:2stems": True,
        "spleeter:4stems": False,
        "spleeter:5stems": False,
        "spleeter:2stems-16kHz": True,
        "spleeter:4stems-16kHz": False,
        "spleeter:5stems-16kHz": False,
    }


def test_changed_checkpoint_is_converted_again(
    checkpoint_2stems: Path, cache: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in FILES:
        (folder / name).symlink_to(checkpoint_2stems / name)
    config = load_config("spleeter:2stems")
    # model_dir may also point at the checkpoint folder itself.
    first = hub.resolve_weights(config, model_dir=folder, download=False)
    (folder / "model.index").unlink()
    (folder / "model.index").write_bytes((checkpoint_2stems / "model.index").read_bytes())
    second = hub.resolve_weights(config, model_dir=folder, download=False)
    assert second != first and second.is_file() and first.is_file()


def test_folder_with_converted_files_is_used_directly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        "splitstems.convert.convert_checkpoint", lambda *a, **k: pytest.fail("no conversion")
    )
    models = tmp_path / "models"
    (models / "2stems").mkdir(parents=True)
    (models / "2stems" / "model.safetensors").write_bytes(b"weights")
    config = load_config("spleeter:2stems-16kHz")
    assert hub.resolve_weights(config, model_dir=models) == models / "2stems" / "model.safetensors"
    monkeypatch.setenv("SPLITSTEMS_MODEL_DIR", str(models))
    assert hub.resolve_weights(config) == models / "2stems" / "model.safetensors"
    # A folder holding the files directly; a config.json for other instruments is skipped.
    direct = tmp_path / "direct"
    direct.mkdir()
    (direct / "model.safetensors").write_bytes(b"weights")
    assert hub.resolve_weights(config, model_dir=direct) == direct / "model.safetensors"
    (direct / "config.json").write_text(json.dumps(load_config("spleeter:4stems").to_json_dict()))
    with pytest.raises(ModelError, match=f"looked in: .*{direct}"):
        hub.resolve_weights(config, model_dir=direct, download=False)


def test_json_config_finds_weights_next_to_it_or_in_its_model_dir(
    checkpoint_2stems: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = load_config("spleeter:2stems").to_json_dict() | {"model_dir": "my_model"}
    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    (cfg_dir / "mine.json").write_text(json.dumps(data))
    config = load_config(cfg_dir / "mine.json")
    with pytest.raises(ModelError, match="not a released model"):
        hub.resolve_weights(config)
    # Spleeter's training output layout in <config folder>/<model_dir>: converted once.
    (cfg_dir / "my_model").mkdir()
    for name in FILES:
        (cfg_dir / "my_model" / name).symlink_to(checkpoint_2stems / name)
    converted = hub.resolve_weights(config)
    assert converted.name == "model.safetensors" and converted.parent.name.startswith("my_model-")
    # model_dir relative to the working directory.
    monkeypatch.chdir(tmp_path)
    (cfg_dir / "my_model").rename(tmp_path / "my_model")
    moved = hub.resolve_weights(config)  # the same files by another path: no new conversion
    assert moved == converted
    # Converted weights next to the config win.
    (cfg_dir / "model.safetensors").write_bytes(b"weights")
    assert hub.resolve_weights(config) == cfg_dir / "model.safetensors"


# --------------------------------------------------------------------------- cache repair


def _no_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        "splitstems.convert.convert_checkpoint",
        lambda *a, **k: pytest.fail("converted again"),
    )


def _tensor_digest(path: Path) -> str:
    """sha256 of the tensor data (the header's metadata order varies between conversions)."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(0, 1))  # another mtime, even on a coarse clock


def _truncate(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(3_000_000)


def _make_folder(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _truncate_old_entry(path: Path) -> None:  # an entry of an older version: no record
    (path.parent / weights.RECORD).unlink()
    _truncate(path)


POISONED = "unets.vocals.encoder.1.bn.running_var"


def _poison(path: Path) -> None:
    """Set one tensor to NaN in place (a damaged file: its bytes, not its structure)."""
    info = weights.inspect(path)[POISONED]
    start = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    with open(path, "r+b") as fh:
        fh.seek(start + info.begin)
        fh.write(np.full(info.shape, np.nan, np.float32).tobytes())
    os.utime(path, ns=(0, 1))


def _poison_old_entry(path: Path) -> None:
    (path.parent / weights.RECORD).unlink()
    _poison(path)


def _zero_unrecorded(path: Path) -> None:
    """The review's case: record removed, 20 MB of the weights overwritten with zeros."""
    (path.parent / weights.RECORD).unlink()
    with open(path, "r+b") as fh:
        fh.seek(10 << 20)
        fh.write(bytes(20 << 20))


def _zero_under_an_old_record(path: Path) -> None:
    """Zeros, then a version 1 record of them (what version 1 wrote for an unrecorded file)."""
    _zero_unrecorded(path)
    stat = path.stat()
    (path.parent / weights.RECORD).write_text(
        json.dumps(
            {
                "version": 1,
                "file": path.name,
                "sha256": weights.sha256(path),
                "stamp": [stat.st_size, stat.st_mtime_ns, stat.st_ino],
            }
        )
    )


NAN = f"tensor {POISONED!r} holds 32 NaN or infinite values (of 32)"
UNRECORDED = f"{weights.NO_RECORD}, so it cannot be verified"
REPAIRS = {
    "truncated": (_truncate, "truncated (the header describes 78,614,072 bytes"),
    "changed bytes": (_flip_last_byte, "its sha256 ("),
    "a folder": (_make_folder, "is a folder, not a safetensors weights file"),
    "old entry, truncated": (_truncate_old_entry, "truncated"),
    "NaN weights": (_poison, NAN),
    "old entry, NaN weights": (_poison_old_entry, NAN),
    "no record, zeros": (_zero_unrecorded, None),
    "old record of zeros": (_zero_under_an_old_record, None),
}


@pytest.mark.parametrize("kind", REPAIRS)
def test_damaged_converted_entry_is_converted_again_with_a_warning(
    kind: str, checkpoint_2stems: Path, cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = load_config("spleeter:2stems")
    first = hub.resolve_weights(config, model_dir=checkpoint_2stems, download=False)
    digest = _tensor_digest(first)
    damage, cause = REPAIRS[kind]
    damage(first)
    with caplog.at_level(logging.WARNING, logger="splitstems.hub"):
        again = hub.resolve_weights(config, model_dir=checkpoint_2stems, download=False)
    assert again == first and _tensor_digest(again) == digest
    [message] = [r.getMessage() for r in caplog.records if r.name.startswith("splitstems")]
    if cause is None:  # whole and finite, but nothing vouches for it: not trusted
        assert message.startswith(f"{first}: {UNRECORDED}; converting ")
    else:
        assert message.startswith(f"{first}: damaged cache entry ({cause}")
    assert message.endswith(f"; converting {checkpoint_2stems / 'model.index'} again")
    assert "\n" not in message
    assert weights.verify(again) is None
    assert {p.name for p in (cache / "converted").iterdir()} == {first.parent.name}


def test_converted_entry_records_once_and_is_then_trusted(
    checkpoint_2stems: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config("spleeter:2stems")
    old = os.umask(0o022)
    try:
        first = hub.resolve_weights(config, model_dir=checkpoint_2stems, download=False)
    finally:
        os.umask(old)
    record = json.loads((first.parent / weights.RECORD).read_text())
    assert record["version"] == 2 and record["sha256"] == weights.sha256(first)
    # Files as a plain open() makes them (the weights used to be 0600).
    modes = {p.name: p.stat().st_mode & 0o777 for p in first.parent.iterdir()}
    assert modes == dict.fromkeys(["model.safetensors", "config.json", weights.RECORD], 0o644)
    _no_conversion(monkeypatch)
    assert hub.resolve_weights(config, model_dir=checkpoint_2stems, download=False) == first


def test_unrecorded_converted_entry_in_a_read_only_cache_is_used_with_a_warning(
    checkpoint_2stems: Path, cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = load_config("spleeter:2stems")
    first = hub.resolve_weights(config, model_dir=checkpoint_2stems, download=False)
    (first.parent / weights.RECORD).unlink()
    shutil.rmtree(cache / ".locks")
    (cache / ".locks").write_bytes(b"")  # no lock can be taken: the cache cannot be written
    with caplog.at_level(logging.WARNING, logger="splitstems.hub"):
        assert hub.resolve_weights(config, model_dir=checkpoint_2stems, download=False) == first
    [message] = [r.getMessage() for r in caplog.records if r.name.startswith("splitstems")]
    assert message.startswith(
        f"{first}: {weights.NO_RECORD}, and it cannot be converted again ({cache}: cannot write"
    )
    assert message.endswith("; using it as found (whole, finite)")
    _poison(first)  # damaged where it shows: an error, not a warning
    with pytest.raises(ModelError, match=f"^{cache}: cannot write to the model cache"):
        hub.resolve_weights(config, model_dir=checkpoint_2stems, download=False)


def test_unrecorded_download_entry_is_checked_then_recorded_or_fetched_again(
    checkpoint_2stems: Path,
    releases: Path,
    cache: Path,
    server: tuple[str, list[str]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # cache/2stems/ as an older version left it, or as placed by hand (as the offline
    # error says): no source here, so whole and finite weights are kept and recorded,
    # without a download (offline users keep working).
    from splitstems.convert import convert_checkpoint

    config = load_config("spleeter:2stems")
    placed = convert_checkpoint(checkpoint_2stems, cache / "2stems", config)
    digest = _tensor_digest(placed)
    assert hub.resolve_weights(config) == placed  # SPLITSTEMS_DOWNLOAD_URL unreachable
    assert json.loads((cache / "2stems" / weights.RECORD).read_text())["version"] == 2
    # Damaged where it shows (NaN), without a record: refused offline, fetched online.
    _poison_old_entry(placed)
    with pytest.raises(ModelError) as info:
        hub.resolve_weights(config, download=False)
    assert str(info.value).startswith(
        f"{placed}: {NAN}; the cached weights are damaged and "
        "cannot be fetched again (downloading is disabled)"
    )
    base, requests = server
    _use_release(monkeypatch, releases, "root", f"{base}/root")
    with caplog.at_level(logging.WARNING, logger="splitstems.hub"):
        assert hub.resolve_weights(config, progress=False) == placed
    assert requests == ["/root/2stems.tar.gz"] and _tensor_digest(placed) == digest
    [message] = [r.getMessage() for r in caplog.records if r.name.startswith("splitstems")]
    assert message == f"{placed}: damaged cache entry ({NAN}); downloading it again"


def test_damaged_download_entry_is_downloaded_again(
    releases: Path,
    cache: Path,
    server: tuple[str, list[str]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    base, requests = server
    _use_release(monkeypatch, releases, "root", f"{base}/root")
    config = load_config("spleeter:2stems")
    first = hub.resolve_weights(config, progress=False)
    digest = _tensor_digest(first)
    _truncate(first)
    # Offline, the damage is one line that names the file and the cause.
    with pytest.raises(ModelError) as info:
        hub.resolve_weights(config, download=False)
    message = str(info.value)
    assert message.startswith(f"{first}: truncated (") and "\n" not in message
    assert "downloading is disabled" in message
    with caplog.at_level(logging.WARNING, logger="splitstems.hub"):
        again = hub.resolve_weights(config, progress=False)
    assert again == first and _tensor_digest(again) == digest
    assert requests == ["/root/2stems.tar.gz"] * 2
    [message] = [r.getMessage() for r in caplog.records if r.name.startswith("splitstems")]
    assert message.split(" (")[0] == f"{first}: damaged cache entry"
    assert message.endswith("; downloading it again")
    assert _cache_entries(cache) == {"2stems"}


def test_hand_placed_cache_entry_that_is_damaged_is_one_line(cache: Path, tmp_path: Path) -> None:
    data = load_config("spleeter:2stems").to_json_dict() | {"model_dir": "mine"}
    (cache / "mine").mkdir(parents=True)
    (cache / "mine" / "model.safetensors").write_bytes(b"")
    (tmp_path / "mine.json").write_text(json.dumps(data))
    with pytest.raises(ModelError) as info:
        hub.resolve_weights(load_config(tmp_path / "mine.json"))
    assert str(info.value).startswith(
        f"{cache / 'mine' / 'model.safetensors'}: empty file, not a safetensors weights file; "
        "the cached weights are damaged and cannot be fetched again (it is not a released model)"
    )


def test_folders_left_by_a_killed_conversion_are_removed(
    checkpoint_2stems: Path, cache: Path
) -> None:
    config = load_config("spleeter:2stems")
    first = hub.resolve_weights(config, model_dir=checkpoint_2stems, download=False)
    converted = first.parent.parent
    name = first.parent.name
    for path in converted.iterdir():
        shutil.rmtree(path)
    stale = converted / f".{name}-k1ll3d_x"
    (stale / "converted").mkdir(parents=True)
    (stale / "converted" / "model.safetensors").write_bytes(b"half")
    other = converted / ".2stems-0000000000000000-k1ll3d_x"  # another entry's: not ours to remove
    other.mkdir()
    assert hub.resolve_weights(config, model_dir=checkpoint_2stems, download=False) == first
    assert {p.name for p in converted.iterdir()} == {name, other.name}


def test_unwritable_cache_is_one_line(checkpoint_2stems: Path, cache: Path) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(b"")  # a file where the cache folder should be
    with pytest.raises(ModelError) as info:
        hub.resolve_weights(
            load_config("spleeter:2stems"), model_dir=checkpoint_2stems, download=False
        )
    message = str(info.value)
    assert message.startswith(f"{cache}: cannot write to the model cache (")
    assert "SPLITSTEMS_CACHE" in message and "\n" not in message


# --------------------------------------------------------------------------- cache keys


def test_same_checkpoint_by_other_paths_is_converted_once(
    shared_dir: Path, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config("spleeter:2stems")
    absolute = shared_dir / "models" / "spleeter"
    first = hub.resolve_weights(config, model_dir=absolute, download=False)
    _no_conversion(monkeypatch)
    link = tmp_path / "linked"
    link.symlink_to(absolute)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    relative = os.path.relpath(absolute, work)
    assert relative.startswith("..")
    for other in (relative, link, link / "2stems", absolute / "2stems" / ".." / "2stems"):
        assert hub.resolve_weights(config, model_dir=other, download=False) == first
    monkeypatch.setenv("SPLITSTEMS_MODEL_DIR", relative)
    assert hub.resolve_weights(config, download=False) == first
    assert len(list((cache / "converted").iterdir())) == 1


# --------------------------------------------------------------------------- MODEL_PATH


def test_spleeter_model_path_is_honoured_below_our_own_settings(
    shared_dir: Path, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config("spleeter:2stems")
    monkeypatch.setenv("MODEL_PATH", str(shared_dir / "models" / "spleeter"))
    converted = hub.resolve_weights(config, download=False)
    assert converted.parent.parent == cache / "converted"
    assert {m.name for m in hub.list_models() if m.available} == {
        "spleeter:2stems",
        "spleeter:2stems-16kHz",
    }
    ours = tmp_path / "ours"
    (ours / "2stems").mkdir(parents=True)
    (ours / "2stems" / "model.safetensors").write_bytes(b"weights")
    monkeypatch.setenv("SPLITSTEMS_MODEL_DIR", str(ours))
    assert hub.resolve_weights(config, download=False) == ours / "2stems" / "model.safetensors"
    explicit = tmp_path / "explicit"
    explicit.mkdir()
    (explicit / "model.safetensors").write_bytes(b"weights")
    assert (
        hub.resolve_weights(config, model_dir=explicit, download=False)
        == explicit / "model.safetensors"
    )
    # MODEL_PATH is a Spleeter pretrained_models folder: <MODEL_PATH>/<model_dir> only.
    monkeypatch.delenv("SPLITSTEMS_MODEL_DIR")
    monkeypatch.setenv("MODEL_PATH", str(explicit))
    with pytest.raises(ModelError, match="downloading is disabled"):
        hub.resolve_weights(config, download=False)


def test_a_conversion_that_cannot_be_written_is_one_line_and_leaves_nothing(
    checkpoint_2stems: Path, cache: Path
) -> None:
    # A file-size limit of 1 MB (as a full disk): the 75 MB weights cannot be written.
    script = f"""
import resource, signal
from splitstems import hub
from splitstems.config import load_config
from splitstems.errors import ModelError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
try:
    hub.resolve_weights(load_config("spleeter:2stems"), model_dir={str(checkpoint_2stems)!r})
except ModelError as exc:
    print(exc)
"""
    env = os.environ | {"SPLITSTEMS_CACHE": str(cache)}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()
    assert re.fullmatch(
        rf"{cache}/converted/2stems-[0-9a-f]{{16}}: cannot write the converted weights into the "
        r"cache \(File too large\); free some space or set SPLITSTEMS_CACHE to another folder",
        line,
    )
    assert list((cache / "converted").iterdir()) == []
