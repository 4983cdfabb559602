"""Model registry, cache, download and local model folders: where weights come from.

Every model lookup of the library goes through :func:`resolve_weights`, which returns the
path of a ``model.safetensors`` for a :class:`~splitstems.config.ModelConfig`. Weights are
found, in this order, in

1. an explicit ``model_dir`` (else ``$SPLITSTEMS_MODEL_DIR``): converted files
   (``<dir>/<model_dir>/model.safetensors`` or ``<dir>/model.safetensors``) or Spleeter's
   ``pretrained_models`` layout (``<dir>/<model_dir>/model.index`` + data, or
   ``<dir>/model.index``), the latter converted once into the cache;
2. when neither is given, Spleeter's own ``$MODEL_PATH`` (its ``pretrained_models``
   folder): ``$MODEL_PATH/<model_dir>`` in either layout, so a Spleeter set-up works as is;
3. for a config read from a JSON file: ``model.safetensors`` next to it, or its
   ``model_dir`` (relative to the JSON's folder, then the working directory) in either
   layout;
4. the cache, ``cache_dir()/<model_dir>/model.safetensors``;
5. a download of the released archive (sha256-checked, converted, cached).

What the cache holds is verified before use: each entry keeps the sha256 of its weights
(``checksum.json``, see :mod:`splitstems.weights`), and an entry found damaged (changed
since it was recorded, truncated, NaN or infinite values) is rebuilt, with a warning,
from its source (the local checkpoint again, or a new download). A converted entry
without a record is converted again too (its checkpoint is at hand, and nothing else
tells a good file from one damaged where it cannot be seen: zeros written over
weights); a downloaded or hand-placed entry without one is checked whole and finite and
recorded as found (it may have no other source here: offline, or placed by hand as
:func:`resolve_weights`' error suggests). Conversions are keyed by the checkpoint
files' real paths (symlinks and relative paths resolved), their sizes and mtimes.

Environment: ``SPLITSTEMS_CACHE`` (cache folder), ``SPLITSTEMS_MODEL_DIR`` (local models),
``MODEL_PATH`` (Spleeter's, used when ``SPLITSTEMS_MODEL_DIR`` is unset),
``SPLITSTEMS_DOWNLOAD_URL`` (base URL of a mirror of the release assets).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from splitstems import weights as _weights
from splitstems.config import RELEASED_MODELS, ModelConfig, checkpoint_name, load_config
from splitstems.errors import (
    CheckpointError,
    ConfigError,
    DownloadError,
    ModelError,
    OutputError,
)

__all__ = [
    "DEFAULT_DOWNLOAD_URL",
    "REGISTRY",
    "Release",
    "ModelInfo",
    "cache_dir",
    "download_url",
    "download_checkpoint",
    "resolve_weights",
    "list_models",
]

log = logging.getLogger(__name__)

#: Where Deezer publishes the pretrained checkpoints (GitHub release assets).
DEFAULT_DOWNLOAD_URL = "https://github.com/deezer/spleeter/releases/download/v1.4.0"
_WEIGHTS = "model.safetensors"
_CONFIG = "config.json"
_INDEX = "model.index"
_CHUNK = 1 << 20
_TIMEOUT_S = 60.0
#: Bump when the converted format changes, so cached conversions are redone.
_CONVERTER_VERSION = "1"


@dataclass(frozen=True)
class Release:
    """One released checkpoint archive: ``<base URL>/<name>.tar.gz`` and its checksum."""

    name: str
    sha256: str
    size: int | None = None

    @property
    def filename(self) -> str:
        """The archive's file name (``2stems.tar.gz``)."""
        return f"{self.name}.tar.gz"


#: Checkpoint name → release archive (sha256 from the release's ``checksum.json``).
REGISTRY: dict[str, Release] = {
    "2stems": Release(
        "2stems", "f3a90b39dd2874269e8b05a48a86745df897b848c61f3958efc80a39152bd692", 73_109_797
    ),
    "4stems": Release("4stems", "3adb4a50ad4eb18c7c4d65fcf4cf2367a07d48408a5eb7d03cd20067429dfaa8"),
    "5stems": Release("5stems", "25a1e87eb5f75cc72a4d2d5467a0a50ac75f05611f877c278793742513cc7218"),
}


@dataclass(frozen=True)
class ModelInfo:
    """A released model and whether its weights are on this machine (no download needed)."""

    name: str
    available: bool
    location: Path | None = None


# --------------------------------------------------------------------------- locations


def cache_dir() -> Path:
    """Return the model cache folder: ``$SPLITSTEMS_CACHE`` or the user cache dir."""
    env = os.environ.get("SPLITSTEMS_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("splitstems"))


def download_url(name: str) -> str:
    """Return the archive URL of a checkpoint (``$SPLITSTEMS_DOWNLOAD_URL`` overrides the base)."""
    base = os.environ.get("SPLITSTEMS_DOWNLOAD_URL") or DEFAULT_DOWNLOAD_URL
    return f"{base.rstrip('/')}/{_release(name).filename}"


def _release(name: str) -> Release:
    try:
        key = checkpoint_name(name)
    except ConfigError:
        key = name
    release = REGISTRY.get(key)
    if release is None:
        raise ModelError(
            f"{name}: no released checkpoint to download (known: {', '.join(REGISTRY)})"
        )
    return release


def _env_model_dir() -> Path | None:
    env = os.environ.get("SPLITSTEMS_MODEL_DIR")
    return Path(env).expanduser() if env else None


def _spleeter_model_path() -> Path | None:
    """Spleeter's ``$MODEL_PATH`` (its ``pretrained_models`` folder), if set."""
    env = os.environ.get("MODEL_PATH")
    return Path(env).expanduser() if env else None


def _unwritable(root: Path, exc: OSError) -> ModelError:
    cause = exc.strerror or str(exc) or type(exc).__name__
    return ModelError(
        f"{root}: cannot write to the model cache ({cause}); set SPLITSTEMS_CACHE to a "
        "writable folder, or convert the checkpoint once with `splitstems convert CHECKPOINT "
        "-o DIR` and pass --model-dir DIR"
    )


def _cannot_cache(final: Path, exc: OSError | OutputError) -> ModelError:
    error = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
    cause = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return ModelError(
        f"{final}: cannot write the converted weights into the cache ({cause}); free some "
        "space or set SPLITSTEMS_CACHE to another folder"
    )


@contextmanager
def _locked(name: str) -> Iterator[None]:
    """Hold the cache's file lock ``name`` (a concurrent process waits for it).

    Raises:
        ModelError: the cache folder cannot be written.
    """
    from filelock import FileLock

    root = cache_dir()
    locks = root / ".locks"
    try:
        locks.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(locks / f"{name}.lock"))
        lock.acquire()
    except OSError as exc:
        raise _unwritable(root, exc) from None
    try:
        yield
    finally:
        lock.release()


@contextmanager
def _staging(folder: Path, name: str) -> Iterator[Path]:
    """Yield a temp folder beside the cache entry ``folder/name``; remove it afterwards.

    Call it holding the entry's lock: folders a killed process left for the same entry
    (ours by name, and no live process can own them while we hold the lock) go first.

    Raises:
        ModelError: the cache folder cannot be written.
    """
    stale = re.compile(rf"\.{re.escape(name)}-[a-z0-9_]{{8}}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for path in folder.iterdir():
            if stale.fullmatch(path.name) and path.is_dir() and not path.is_symlink():
                log.info("removing %s, left by an interrupted run", path)
                shutil.rmtree(path, ignore_errors=True)
        tmp = tempfile.TemporaryDirectory(prefix=f".{name}-", dir=folder)
    except OSError as exc:
        raise _unwritable(cache_dir(), exc) from None
    with tmp as path:
        yield Path(path)


def _damage(entry: Path, *, rebuildable: bool = False) -> str | None:
    """Why the cache entry ``entry`` cannot be used: None if it can, "" if it is absent.

    ``rebuildable``: its source is at hand, so an entry without a record is not trusted
    (:data:`splitstems.weights.NO_RECORD`).
    """
    weights = entry / _WEIGHTS
    if not os.path.lexists(weights):
        return ""
    return _weights.verify(weights, require_record=rebuildable)


def _convert_into(
    final: Path, work: Path, checkpoint: Path, config: ModelConfig, *, source: str
) -> None:
    """Convert ``checkpoint`` in the staging folder ``work``, record its checksum, install it.

    The one rebuild sequence of a cache entry (downloaded or local checkpoint): nothing
    reaches ``final`` unless the whole conversion and its record succeeded.

    Raises:
        ModelError: the cache folder cannot be written.
        CheckpointError: the checkpoint is corrupt.
    """
    from splitstems.convert import convert_checkpoint

    staging = work / "converted"
    try:
        convert_checkpoint(checkpoint, staging, config, source=source)
        _weights.write_record(staging / _WEIGHTS)
        _install(staging, final, trash=work / "old")
    except (OSError, OutputError) as exc:
        raise _cannot_cache(final, exc) from None


def _offline_hint(name: str) -> str:
    return (
        f"offline? unpack {name}.tar.gz from the Spleeter release into <dir>/{name}/ "
        f"(Spleeter's pretrained_models layout, with {_INDEX}) and pass --model-dir <dir> "
        "or set SPLITSTEMS_MODEL_DIR=<dir>"
    )


# --------------------------------------------------------------------------- download


def download_checkpoint(name: str, *, progress: bool = True) -> Path:
    """Download, verify, convert and cache a released checkpoint; return its weights path.

    ``name`` is a checkpoint or model name (``2stems``, ``spleeter:2stems-16kHz``). The
    archive's full sha256 is checked before it is opened; the result lands atomically in
    ``cache_dir()/<name>/`` (``model.safetensors`` + ``config.json``). A file lock makes a
    concurrent caller wait and then reuse the result. Returns at once if already cached.

    Raises:
        DownloadError: the download failed, its checksum is wrong or the archive is unsafe
            or holds no checkpoint.
        CheckpointError: the checkpoint inside is corrupt.
    """
    release = _release(name)
    root = cache_dir()
    final = root / release.name
    if _damage(final) is None:
        return final / _WEIGHTS
    url = download_url(release.name)
    with _locked(release.name):
        damage = _damage(final)
        if damage is None:  # another process finished while we waited
            return final / _WEIGHTS
        if damage:
            log.warning(
                "%s: damaged cache entry (%s); downloading it again", final / _WEIGHTS, damage
            )
        with _staging(root, release.name) as work:
            archive = work / release.filename
            digest = _fetch(url, archive, release=release, progress=progress)
            if digest != release.sha256:
                archive.unlink(missing_ok=True)
                raise DownloadError(
                    f"{url}: sha256 mismatch (expected {release.sha256}, got {digest}); the "
                    "download is corrupt or the server sent another file"
                )
            extracted = work / "extracted"
            _safe_extract(archive, extracted, source=url)
            archive.unlink()
            checkpoint = _find_checkpoint(extracted, release.name, source=url)
            config = load_config(f"spleeter:{release.name}")
            _convert_into(final, work, checkpoint, config, source=f"{url} sha256:{digest}")
    log.info("%s: cached in %s", release.name, final)
    return final / _WEIGHTS


def _fetch(url: str, dest: Path, *, release: Release, progress: bool) -> str:
    """Stream ``url`` into ``dest``; return the sha256 hex digest of what was received."""
    from tqdm import tqdm

    sha = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:  # noqa: S310
            length = response.headers.get("Content-Length") if response.headers else None
            total = int(length) if length and length.isdigit() else release.size
            isatty = getattr(sys.stderr, "isatty", None)
            show = progress and callable(isatty) and bool(isatty())
            with (
                open(dest, "wb") as out,
                tqdm(
                    total=total,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=f"Downloading {release.name}",
                    disable=not show,
                ) as bar,
            ):
                while chunk := response.read(_CHUNK):
                    sha.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code} {exc.reason}"
        raise DownloadError(_download_failed(release.name, url, reason)) from None
    except urllib.error.URLError as exc:
        raise DownloadError(_download_failed(release.name, url, str(exc.reason))) from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        reason = str(exc) or type(exc).__name__
        raise DownloadError(_download_failed(release.name, url, reason)) from None
    return sha.hexdigest()


def _download_failed(name: str, url: str, reason: str) -> str:
    return f"could not download {name} from {url} ({reason}); {_offline_hint(name)}"


def _safe_extract(archive: Path, dest: Path, *, source: str) -> None:
    """Extract a tar archive, refusing absolute paths, ``..``, links and special files."""
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                path = PurePosixPath(member.name)
                if (
                    path.is_absolute()
                    or member.name.startswith(("/", "\\"))
                    or ".." in path.parts
                    or ":" in (path.parts[0] if path.parts else "")
                ):
                    raise DownloadError(f"{source}: refusing unsafe archive member {member.name!r}")
                if not (member.isfile() or member.isdir()):
                    raise DownloadError(
                        f"{source}: refusing archive member {member.name!r} "
                        "(links and special files are not allowed)"
                    )
                target = (root / member.name).resolve()
                if target != root and root not in target.parents:
                    raise DownloadError(f"{source}: archive member {member.name!r} escapes")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(root, members=members, filter="data")
            else:  # pragma: no cover - Python < 3.11.4, members checked above
                tar.extractall(root, members=members)  # noqa: S202
    except tarfile.TarError as exc:
        raise DownloadError(f"{source}: not a valid .tar.gz archive ({exc})") from None


def _find_checkpoint(folder: Path, name: str, *, source: str) -> Path:
    """Return the checkpoint folder inside an extracted archive (root or ``<name>/``)."""
    for candidate in (folder, folder / name):
        if (candidate / _INDEX).is_file() or (candidate / "checkpoint").is_file():
            return candidate
    indexes = sorted(folder.rglob("*.index"))
    if len(indexes) == 1:
        return indexes[0]
    raise DownloadError(
        f"{source}: the archive holds no single TensorFlow checkpoint "
        f"({len(indexes)} .index files found)"
    )


def _install(staging: Path, final: Path, *, trash: Path) -> None:
    """Move the folder ``staging`` to ``final`` in one rename.

    A damaged entry already at ``final`` is first moved to ``trash`` (in the staging
    area, removed with it): a reader sees the old entry or the new one, never a mix.
    """
    if os.path.lexists(final):
        os.replace(final, trash)
    os.replace(staging, final)


# --------------------------------------------------------------------------- lookup


def _tf_prefix(folder: Path) -> Path | None:
    """Return the checkpoint prefix of a TF checkpoint in ``folder``, or None."""
    if not folder.is_dir():
        return None
    if not ((folder / _INDEX).is_file() or (folder / "checkpoint").is_file()):
        return None
    from splitstems.convert import _checkpoint_prefix

    try:
        prefix = _checkpoint_prefix(folder)
    except CheckpointError:
        return None
    return prefix if Path(f"{prefix}.index").is_file() else None


def _fits(folder: Path, config: ModelConfig) -> bool:
    """Return False when ``folder/config.json`` names other instruments than ``config``."""
    path = folder / _CONFIG
    if not path.is_file():
        return True
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        instruments = data.get("instrument_list")
    except (OSError, ValueError, AttributeError):
        return True
    return instruments is None or list(instruments) == list(config.instruments)


def _safe_name(name: str) -> str:
    """Return a cache folder name for a config's ``model_dir`` (which may be a path)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name) or "model"


def _candidates(
    config: ModelConfig, model_dir: str | os.PathLike[str] | None
) -> list[tuple[Path, bool]]:
    """(folder, TF checkpoints allowed) to search before the cache, in order."""
    folders: list[tuple[Path, bool]] = []
    root = Path(model_dir).expanduser() if model_dir is not None else _env_model_dir()
    if root is not None:
        if not root.is_dir():
            log.warning("model folder %s does not exist", root)
        folders += [(root / config.model_dir, True), (root, True)]
    else:
        spleeter = _spleeter_model_path()  # Spleeter's layout only: MODEL_PATH/<model_dir>
        if spleeter is not None:
            folders.append((spleeter / config.model_dir, True))
    if not config.name.startswith("spleeter:"):
        config_folder = Path(config.name).expanduser().parent
        # Next to a JSON config: converted files only; then its model_dir, either layout.
        folders += [
            (config_folder, False),
            (config_folder / config.model_dir, True),
            (Path(config.model_dir), True),
        ]
    seen: set[tuple[Path, bool]] = set()
    unique = []
    for folder, tf_ok in folders:
        key = (folder.resolve(), tf_ok)
        if key not in seen:
            seen.add(key)
            unique.append((folder, tf_ok))
    return unique


def _find_local(
    config: ModelConfig, model_dir: str | os.PathLike[str] | None, *, tried: list[str]
) -> Path | None:
    """Return local weights (``model.safetensors``) or a TF checkpoint prefix, or None.

    A ``model.safetensors`` that is not a plain file (a folder, say) is returned too: it
    is what the user pointed at, and loading it says what is wrong with it.
    """
    for folder, tf_ok in _candidates(config, model_dir):
        tried.append(str(folder))
        weights = folder / _WEIGHTS
        if os.path.lexists(weights) and _fits(folder, config):
            return weights
        prefix = _tf_prefix(folder) if tf_ok else None
        if prefix is not None:
            return prefix
    return None


def _cache_entry(config: ModelConfig) -> Path:
    """Return the cache folder of ``config``'s downloaded (or hand-placed) weights."""
    return cache_dir() / _safe_name(config.model_dir)


def _base_config(config: ModelConfig) -> ModelConfig:
    """Return the config stored with converted weights (the base of ``-16kHz`` names)."""
    if config.name.startswith("spleeter:") and config.model_dir in REGISTRY:
        base = load_config(f"spleeter:{config.model_dir}")
        if base.instruments == config.instruments:
            return base
    return config


def _convert_cached(prefix: Path, config: ModelConfig) -> Path:
    """Convert a TF checkpoint once into the cache; return the converted weights.

    The entry is keyed by the real path (symlinks resolved), size and mtime of each
    checkpoint file, so the same files reached by other paths share one conversion and
    changed files are converted again. A damaged entry is converted again, with a warning.
    """
    index = Path(f"{prefix}.index").absolute()
    parts = [_CONVERTER_VERSION, config.model_dir, ",".join(config.instruments)]
    data_files = sorted(index.parent.glob(f"{index.stem}.data-*"))
    for path in [index, *data_files]:
        stat = path.stat()
        parts.append(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    name = f"{_safe_name(config.model_dir)}-{key}"
    final = cache_dir() / "converted" / name
    first = _damage(final, rebuildable=True)
    if first is None:
        return final / _WEIGHTS
    try:
        with _locked(f"convert-{name}"):
            damage = _damage(final, rebuildable=True)
            if damage is None:  # another process converted it while we waited
                return final / _WEIGHTS
            if damage == _weights.NO_RECORD:
                log.warning(
                    "%s: %s, so it cannot be verified; converting %s again",
                    final / _WEIGHTS,
                    damage,
                    index,
                )
            elif damage:
                log.warning(
                    "%s: damaged cache entry (%s); converting %s again",
                    final / _WEIGHTS,
                    damage,
                    index,
                )
            else:
                log.info("converting %s into %s", index, final)
            with _staging(final.parent, name) as work:
                _convert_into(final, work, prefix, _base_config(config), source=str(index))
    except ModelError as exc:
        if first != _weights.NO_RECORD or isinstance(exc, CheckpointError):
            raise
        # A read-only cache: whole, finite weights that cannot be rebuilt are used.
        log.warning(
            "%s: %s, and it cannot be converted again (%s); using it as found (whole, finite)",
            final / _WEIGHTS,
            first,
            exc,
        )
    return final / _WEIGHTS


def resolve_weights(
    config: ModelConfig,
    *,
    model_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    progress: bool = True,
) -> Path:
    """Return the path of a ``model.safetensors`` holding ``config``'s weights.

    Looks in ``model_dir`` (else ``$SPLITSTEMS_MODEL_DIR``, else Spleeter's
    ``$MODEL_PATH``), next to a JSON config, in the cache, then downloads the released
    checkpoint if ``download`` (see the module docstring for the exact order). TF
    checkpoints found locally are converted once into the cache; re-runs reuse the
    conversion until the checkpoint files change. What comes from the cache is verified
    against its recorded sha256, and a damaged entry is rebuilt (warning logged); a
    ``model.safetensors`` in a folder of the user's is returned as found, and
    :func:`splitstems.weights.load` says what is wrong with it, if anything.

    Raises:
        ModelError: no weights found and downloading is disabled or impossible
            (:class:`~splitstems.errors.DownloadError` when the download itself failed),
            a damaged cache entry that cannot be rebuilt, or a cache that cannot be
            written.
        CheckpointError: a local checkpoint is corrupt or does not fit the model.
    """
    tried: list[str] = []
    found = _find_local(config, model_dir, tried=tried)
    if found is not None:
        if found.name == _WEIGHTS:
            return found
        return _convert_cached(found, config)
    cached = _cache_entry(config)
    tried.append(str(cached))
    damage = _damage(cached)
    if damage is None:
        return cached / _WEIGHTS
    if download and config.model_dir in REGISTRY:
        return download_checkpoint(config.model_dir, progress=progress)
    why = "downloading is disabled" if download is False else "it is not a released model"
    if damage:
        raise ModelError(
            f"{cached / _WEIGHTS}: {damage}; the cached weights are damaged and cannot be "
            f"fetched again ({why}): delete {cached} and put good weights there, or pass "
            "--model-dir"
        )
    raise ModelError(
        f"no weights for {config.name} ({why}); looked in: {', '.join(tried)}. Put "
        f"{_WEIGHTS} and {_CONFIG} in {cache_dir() / config.model_dir}, or set "
        f"SPLITSTEMS_MODEL_DIR (or pass model_dir) to a folder holding "
        f"{config.model_dir}/{_INDEX} and {config.model_dir}/model.data-00000-of-00001 "
        "(Spleeter's pretrained_models layout)"
    )


def list_models(*, model_dir: str | os.PathLike[str] | None = None) -> list[ModelInfo]:
    """List the released models (``spleeter:<name>``) and whether their weights are local.

    Nothing is downloaded, converted or verified; ``model_dir`` is searched like in
    :func:`resolve_weights` (default ``$SPLITSTEMS_MODEL_DIR``, then ``$MODEL_PATH``),
    then the cache.
    """
    out = []
    for name in RELEASED_MODELS:
        config = load_config(f"spleeter:{name}")
        found = _find_local(config, model_dir, tried=[])
        if found is None and (_cache_entry(config) / _WEIGHTS).is_file():
            found = _cache_entry(config) / _WEIGHTS
        out.append(ModelInfo(config.name, found is not None, found))
    return out
