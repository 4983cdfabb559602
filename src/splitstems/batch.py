"""Many files: expand folders and globs, one progress bar, a summary, resumable runs.

A bad file never stops the batch: each input ends as ``done``, ``skipped`` (``resume``
found its stems complete and made with the same settings) or ``failed`` with the reason.

Every input whose stems are written gets a record, a small hidden JSON file beside its
first stem (``out/song/.vocals.wav.splitstems.json`` with the default layout): the
input's identity (resolved path, size, modification time), the settings (the model's
sha256 fingerprint, codec, bitrate, bit depth, offset, duration, filename format, Wiener
filter options, shifts, overlap, mask extension, precision), the stems' length and
sizes. The first stem's path is unique to its input whatever the filename format, so
records of different inputs never collide. A run deletes an input's record before it
writes anything, so a run stopped half way leaves stems without a record, and
``resume`` redoes them.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import string
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitstems import __version__, audio
from splitstems.errors import AudioError, OutputError, SplitstemsError
from splitstems.files import atomic_write
from splitstems.separator import DEFAULT_FILENAME_FORMAT, Separator, StemFiles, output_paths

__all__ = [
    "AUDIO_EXTENSIONS",
    "RECORD_SUFFIX",
    "FileResult",
    "BatchReport",
    "expand_inputs",
    "record_path",
    "run_settings",
    "separate_files",
]

#: File name suffixes picked up when a folder is given (any file can be named directly).
AUDIO_EXTENSIONS = frozenset(
    ".mp3 .wav .flac .ogg .oga .opus .m4a .aac .mp4 .wma .aif .aiff .aifc .webm .mkv .mka "
    ".mov .caf .ac3 .wv".split()
)
#: The record of an input's stems is ``.<first stem's file name><RECORD_SUFFIX>``.
RECORD_SUFFIX = ".splitstems.json"
#: Codecs whose stems decode to exactly the samples written; the others (encoder
#: frames and padding) may differ by up to ``_LOSSY_SLACK`` samples.
_LOSSLESS = frozenset({"wav", "flac"})
_LOSSY_SLACK = 4096
_DECODE_CHUNK = 1 << 20


@dataclass
class FileResult:
    """What happened to one input: ``status`` is "done", "skipped" or "failed".

    ``redone`` says why earlier stems of a ``resume`` run were not kept (e.g. "settings
    differ (duration 2 -> none)"); ``redone_kind`` is its short form for the summary.
    """

    path: Path
    status: str
    reason: str = ""
    seconds: float = 0.0  # audio seconds separated
    elapsed: float = 0.0  # wall seconds
    outputs: dict[str, Path] = field(default_factory=dict)
    redone: str = ""
    redone_kind: str = ""


@dataclass
class BatchReport:
    """The results of a batch, in input order."""

    results: list[FileResult] = field(default_factory=list)

    def count(self, status: str) -> int:
        """Return how many inputs ended with ``status``."""
        return sum(r.status == status for r in self.results)

    @property
    def failed(self) -> list[FileResult]:
        """The inputs that failed."""
        return [r for r in self.results if r.status == "failed"]

    def summary(self) -> str:
        """One line: done (and why redone) / skipped / failed, audio seconds and speed."""
        audio_s = sum(r.seconds for r in self.results if r.status == "done")
        wall_s = sum(r.elapsed for r in self.results)
        speed = f", {audio_s / wall_s:.1f}x real time" if wall_s > 0 and audio_s > 0 else ""
        redone = Counter(r.redone_kind for r in self.results if r.status == "done" and r.redone)
        why = ""
        if redone:
            kinds = ", ".join(f"{n} {kind}" for kind, n in redone.items())
            why = f" ({sum(redone.values())} redone: {kinds})"
        return (
            f"{self.count('done')} done{why}, {self.count('skipped')} skipped, "
            f"{self.count('failed')} failed ({audio_s:.1f} s of audio in {wall_s:.1f} s{speed})"
        )


def _has_magic(text: str) -> bool:
    return any(c in text for c in "*?[")


def expand_inputs(items: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand folders (recursively, audio suffixes only) and glob patterns, keep order.

    A folder a pattern matches is expanded as if it had been given directly. A name
    that is neither an existing path nor a pattern matching something, and a
    folder without audio files, are kept as they are, so that the batch reports them
    rather than silently dropping them.
    """
    out: list[Path] = []
    seen: set[Path] = set()

    def add(path: Path) -> None:
        key = path.absolute()
        if key not in seen:
            seen.add(key)
            out.append(path)

    def add_path(path: Path) -> None:
        if not path.is_dir():
            add(path)
            return
        found = [
            p
            for p in sorted(path.rglob("*"))
            if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS
        ]
        for file in found:
            add(file)
        if not found:
            add(path)  # reported as a failure: a folder without audio

    for item in items:
        text = os.fspath(item)
        path = Path(text).expanduser()
        if not path.exists() and _has_magic(text):
            matches = [Path(m) for m in sorted(glob.glob(os.path.expanduser(text), recursive=True))]
            for match in matches or [path]:
                add_path(match)
        else:
            add_path(path)
    return out


def separate_files(
    separator: Separator,
    files: Sequence[Path],
    destination: str | os.PathLike[str],
    *,
    codec: str = "wav",
    bitrate: str = "128k",
    bit_depth: int | str = 16,
    offset: float = 0.0,
    duration: float | None = None,
    filename_format: str = DEFAULT_FILENAME_FORMAT,
    resume: bool = False,
    progress: bool | None = None,
    on_result: Callable[[FileResult], None] | None = None,
) -> BatchReport:
    """Separate every file, overwriting earlier stems (as Spleeter), or resume.

    With ``resume``, an input is skipped only when its record (see the module's notes)
    shows the same input and settings and every stem exists, has the recorded size and
    decodes to the recorded length; otherwise it is redone and :attr:`FileResult.redone`
    says why. One progress bar counts seconds of audio over the whole batch
    (``progress=None``: shown when stderr is a terminal). ``on_result`` is called as
    each file ends.

    Each input is probed before it claims its output paths, so an input that cannot be
    read fails on its own. When the stems of two inputs would land on the same paths,
    the first one readable keeps them and the other fails once the first is done (or
    skipped), with a hint that fits the pair ({foldername} in ``filename_format`` only
    where their folders' names differ); should the first fail, the other is separated
    in its place.
    """
    from tqdm import tqdm

    order = {path: index for index, path in enumerate(files)}
    report = BatchReport()
    claimed: dict[Path, Path] = {}  # output path → the input that writes it
    settled: set[Path] = set()  # inputs whose stems stay (done or skipped): claims for good
    waiting: dict[Path, list[Path]] = {}  # input → the inputs whose stems clash with its
    plan: list[_Planned] = []
    root = Path(destination).resolve()

    @functools.cache
    def settings() -> dict[str, Any]:  # once per batch, when first needed
        return run_settings(
            separator,
            codec=codec,
            bitrate=bitrate,
            bit_depth=bit_depth,
            offset=offset,
            duration=duration,
            filename_format=filename_format,
        )

    def finish(result: FileResult) -> None:
        report.results.append(result)
        if on_result is not None:
            on_result(result)

    def clash_error(path: Path, other: Path) -> OutputError:
        return OutputError(
            f"{path}: its stems would overwrite those of {other} in the same batch "
            f"({_clash_hint(path, other, filename_format)})"
        )

    def consider(path: Path) -> _Planned | None:
        """Plan one input; None when it waits for another input that claimed its stems.

        The input is probed before it claims its output paths, so one that cannot be
        read fails on its own; one whose stems clash with an earlier input's waits for
        it, and is planned again should that input fail.
        """
        result = None
        try:
            if path.is_dir():
                raise AudioError(f"{path}: folder holds no audio files")
            if _has_magic(str(path)) and not os.path.lexists(path):
                raise AudioError(f"{path}: no file matches this pattern")
            targets = output_paths(
                path,
                destination,
                separator.instruments,
                codec=codec,
                filename_format=filename_format,
            )
            info = audio.probe(path)
            clash = next((claimed[t] for t in targets.values() if t in claimed), None)
            if clash is not None:
                if clash in settled:
                    raise clash_error(path, clash)
                waiting.setdefault(clash, []).append(path)
                return None
            identity = _identity(path)
            redo = None
            if resume:
                redo = _earlier_run(
                    targets,
                    identity,
                    settings(),
                    root=root,
                    sample_rate=separator.sample_rate,
                    n_channels=separator.config.n_channels,
                )
            claimed.update(dict.fromkeys(targets.values(), path))
            if redo is _KEEP:
                settled.add(path)
                result = FileResult(
                    path, "skipped", "stems complete, same settings", outputs=targets
                )
            else:
                seconds = _seconds(info.duration, offset, duration)
                return _Planned(path, seconds, targets, identity, redo)
        except SplitstemsError as exc:
            result = FileResult(path, "failed", str(exc))
        finish(result)
        return None

    for path in files:
        if (planned := consider(path)) is not None:
            plan.append(planned)
    total = sum(item.seconds for item in plan if item.seconds) or None
    disable = None if progress is None else not progress
    with tqdm(
        total=total,
        unit="s",
        disable=disable,
        leave=False,
        dynamic_ncols=True,
        bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s audio [{elapsed}<{remaining}]",
    ) as bar:
        index = 0
        while index < len(plan):  # inputs waiting for a failed one join the plan
            item = plan[index]
            index += 1
            path, seconds = item.path, item.seconds
            bar.set_description(f"{index}/{len(plan)} {path.name[:30]}")
            done_before = bar.n
            budget = seconds if seconds else float("inf")

            def advance(step: float, base: float = done_before, cap: float = budget) -> None:
                bar.update(max(0.0, min(bar.n + step, base + cap) - bar.n))

            start = time.perf_counter()
            try:
                record = record_path(item.targets)
                _forget(record)  # stopped half way, the stems must not look finished
                outputs = separator.separate_to_file(
                    path,
                    destination,
                    offset=offset,
                    duration=duration,
                    codec=codec,
                    bitrate=bitrate,
                    bit_depth=bit_depth,
                    filename_format=filename_format,
                    on_progress=advance,
                )
                _write_record(record, item.identity, settings(), outputs, separator)
                result = FileResult(path, "done", seconds=seconds or 0.0, outputs=outputs)
                if item.redo is not None:
                    result.redone_kind, result.redone = item.redo
            except SplitstemsError as exc:
                result = FileResult(path, "failed", str(exc))
            result.elapsed = time.perf_counter() - start
            if seconds:
                bar.update(max(0.0, done_before + seconds - bar.n))
            finish(result)
            others = waiting.pop(path, [])
            if result.status != "failed":
                settled.add(path)
                for other in others:
                    finish(FileResult(other, "failed", str(clash_error(other, path))))
                continue
            for target in item.targets.values():  # its stems are free for the next
                claimed.pop(target, None)
            for other in others:
                if (planned := consider(other)) is not None:
                    plan.append(planned)
                    if planned.seconds:
                        bar.total = (bar.total or 0) + planned.seconds
                        bar.refresh()
    report.results.sort(key=lambda r: order[r.path])
    return report


@dataclass
class _Planned:
    """An input to separate: its expected seconds, stems, identity and why it is redone."""

    path: Path
    seconds: float | None
    targets: dict[str, Path]
    identity: dict[str, Any]
    redo: tuple[str, str] | None


#: :func:`_earlier_run`'s answer when the earlier stems can be kept.
_KEEP = ("keep", "")


def record_path(outputs: Mapping[str, Path]) -> Path:
    """Return where the record of an input's stems is kept: beside its first stem.

    ``out/song/vocals.wav`` → ``out/song/.vocals.wav.splitstems.json``.
    """
    first = Path(next(iter(outputs.values())))
    return first.with_name(f".{first.name}{RECORD_SUFFIX}")


def run_settings(
    separator: Separator,
    *,
    codec: str,
    bitrate: str,
    bit_depth: int | str,
    offset: float,
    duration: float | None,
    filename_format: str,
) -> dict[str, Any]:
    """Return every setting that changes the stems of a file (what a resume compares).

    The bitrate only counts for lossy codecs, the bit depth only for lossless ones, and
    the Wiener filter's options only with the filter.
    """
    engine = separator.engine
    lossless = codec.lower() in _LOSSLESS
    return {
        "model_sha256": separator.fingerprint(),
        "codec": codec.lower(),
        "bitrate": None if lossless else str(bitrate),
        "bit_depth": str(bit_depth) if lossless else None,
        "offset": float(offset),
        "duration": None if duration is None else float(duration),
        "filename_format": filename_format,
        "mwf": engine.mwf,
        "mwf_iterations": engine.mwf_iterations if engine.mwf else None,
        "mwf_exponent": engine.mwf_exponent if engine.mwf else None,
        "shifts": engine.shifts,
        "overlap": engine.overlap_frames / separator.config.T,
        "mask_extension": engine.mask_extension,
        "precision": str(engine.dtype).removeprefix("torch."),
        **({"latency": engine.latency} if hasattr(engine, "latency") else {}),
    }


def _identity(path: Path) -> dict[str, Any]:
    """Return the input as a resume recognises it: resolved path, size, mtime."""
    try:
        stat = path.stat()
    except OSError as exc:
        raise AudioError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _forget(record: Path) -> None:
    try:
        record.unlink(missing_ok=True)
    except OSError as exc:
        if not os.path.lexists(record):
            # nothing to forget (its folder is a file, or on a read-only file system):
            # the stems' own writer then says what is wrong with the place, not this
            return
        raise OutputError(f"{record}: cannot remove ({exc.strerror or exc})") from None


def _write_record(
    record: Path,
    identity: dict[str, Any],
    settings: dict[str, Any],
    outputs: StemFiles,
    separator: Separator,
) -> None:
    """Write the record of ``outputs`` (whole or not at all)."""
    data = {
        "splitstems": __version__,
        "model": separator.config.name,
        "input": identity,
        "settings": settings,
        "sample_rate": outputs.sample_rate,
        "n_samples": outputs.n_samples,
        "stems": {
            name: {"file": os.path.relpath(path, record.parent), "bytes": path.stat().st_size}
            for name, path in outputs.items()
        },
    }
    try:
        atomic_write(record, json.dumps(data, indent=2) + "\n")
    except OSError as exc:
        raise OutputError(f"{record}: cannot write ({exc.strerror or exc})") from None


def _earlier_run(
    targets: dict[str, Path],
    identity: dict[str, Any],
    settings: dict[str, Any],
    *,
    root: Path,
    sample_rate: int,
    n_channels: int,
) -> tuple[str, str] | None:
    """Judge the stems an earlier run left for one input.

    Returns :data:`_KEEP` when they can be kept, None when there are none (a first run),
    else ``(kind, why)``: a short kind for the summary and the reason for the file's line.
    """
    record = record_path(targets)

    def shown(path: Path) -> str:
        return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)

    try:
        earlier = json.loads(record.read_text())
    except FileNotFoundError:
        present = [p for p in targets.values() if p.exists()]
        if not present:
            return None
        return "no record", f"no record of how {shown(present[0])} was made"
    except (OSError, ValueError) as exc:
        return "record unreadable", f"{shown(record)} is unreadable ({exc})"
    try:
        old_input, old_settings = dict(earlier["input"]), dict(earlier["settings"])
        expected = int(earlier["n_samples"])
        rate = int(earlier["sample_rate"])
        stems = dict(earlier["stems"])
    except (KeyError, TypeError, ValueError):
        return "record unreadable", f"{shown(record)} is not a splitstems record"
    if old_input.get("path") != identity["path"]:
        return "input changed", f"made from another input ({old_input.get('path')})"
    if old_input.get("size") != identity["size"]:
        return "input changed", (
            f"the input changed since (size {old_input.get('size')} -> {identity['size']} bytes)"
        )
    if old_input != identity:
        return "input changed", "the input was modified since"
    if old_settings != settings:
        changes = [
            f"{key} {_show_setting(old_settings.get(key))} -> {_show_setting(settings.get(key))}"
            for key in sorted({*old_settings, *settings})
            if old_settings.get(key) != settings.get(key)
        ]
        return "settings differ", f"settings differ ({', '.join(changes)})"
    if rate != sample_rate:
        return "settings differ", f"settings differ (sample rate {rate} -> {sample_rate})"
    slack = 0 if settings["codec"] in _LOSSLESS else _LOSSY_SLACK
    for target in targets.values():
        if not target.is_file():
            return "stem missing", f"{shown(target)} is missing"
    for name, target in targets.items():
        try:
            n = _decoded_samples(target, sample_rate, n_channels)
        except SplitstemsError as exc:
            problem = str(exc).removeprefix(f"{target}: ")
            return "stem damaged", f"{shown(target)} is damaged ({problem})"
        if abs(n - expected) > slack:
            return "stem incomplete", (
                f"{shown(target)} decodes to {n / rate:.2f} s of {expected / rate:.2f} s"
            )
        size, written = target.stat().st_size, stems.get(name)
        if not isinstance(written, dict) or size != written.get("bytes"):
            written_size = written.get("bytes") if isinstance(written, dict) else None
            return "stem changed", (
                f"{shown(target)} changed since it was written ({size} bytes, not {written_size})"
            )
    return _KEEP


def _show_setting(value: Any) -> str:
    """Return a setting as the summary shows it: none, 2, 0.5, wav."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _decoded_samples(path: Path, sample_rate: int, n_channels: int) -> int:
    """Return how many samples ``path`` decodes to at ``sample_rate``."""
    chunks = audio.stream(
        path, chunk_samples=_DECODE_CHUNK, sample_rate=sample_rate, n_channels=n_channels
    )
    return sum(chunk.shape[0] for chunk in chunks)


def _format_keys(filename_format: str) -> set[str]:
    """Return the keys a filename format uses (``{filename}``, ``{foldername}`` ...)."""
    try:
        return {field for _, field, _, _ in string.Formatter().parse(filename_format) if field}
    except ValueError:
        return set()


def _clash_hint(path: Path, other: Path, filename_format: str) -> str:
    """Say what would keep the stems of two inputs apart (for a clash's message)."""
    mine, theirs = path.resolve(), other.resolve()
    if mine == theirs:
        return "the same file, given twice"
    keys = _format_keys(filename_format)
    adds = []
    if mine.stem != theirs.stem and "filename" not in keys:
        adds.append("add {filename} to -f")
    if mine.parent.name != theirs.parent.name and "foldername" not in keys:
        adds.append("add {foldername} to -f")
    if adds:
        return f"{', or '.join(adds)}, or rename one of them"
    if mine.parent == theirs.parent:
        why = "both are in the same folder"
    elif mine.parent.name == theirs.parent.name:
        why = f"both folders are named {mine.parent.name}"
    else:
        why = "-f gives both the same paths"
    return f"{why}: rename one of them, or separate them in two runs with different -o"


def _seconds(total: float | None, offset: float, duration: float | None) -> float | None:
    """Seconds that will be separated from a file of ``total`` seconds, if known."""
    if total is None:
        return duration
    remaining = max(0.0, total - offset)
    return min(remaining, duration) if duration is not None else remaining
