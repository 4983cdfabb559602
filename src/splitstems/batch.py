"""Many files: expand folders and globs, skip finished work, one progress bar, a summary.

A bad file never stops the batch: each input ends as ``done``, ``skipped`` (all its
outputs exist already) or ``failed`` with the reason.
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from splitstems import audio
from splitstems.errors import AudioError, OutputError, SplitstemsError
from splitstems.separator import DEFAULT_FILENAME_FORMAT, Separator, output_paths

__all__ = ["AUDIO_EXTENSIONS", "FileResult", "BatchReport", "expand_inputs", "separate_files"]

#: File name suffixes picked up when a folder is given (any file can be named directly).
AUDIO_EXTENSIONS = frozenset(
    ".mp3 .wav .flac .ogg .oga .opus .m4a .aac .mp4 .wma .aif .aiff .aifc .webm .mkv .mka "
    ".mov .caf .ac3 .wv".split()
)


@dataclass
class FileResult:
    """What happened to one input: ``status`` is "done", "skipped" or "failed"."""

    path: Path
    status: str
    reason: str = ""
    seconds: float = 0.0  # audio seconds separated
    elapsed: float = 0.0  # wall seconds
    outputs: dict[str, Path] = field(default_factory=dict)


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
        """One line: done / skipped / failed counts, audio seconds and real-time factor."""
        audio_s = sum(r.seconds for r in self.results if r.status == "done")
        wall_s = sum(r.elapsed for r in self.results)
        speed = f", {audio_s / wall_s:.1f}x real time" if wall_s > 0 and audio_s > 0 else ""
        return (
            f"{self.count('done')} done, {self.count('skipped')} skipped, "
            f"{self.count('failed')} failed ({audio_s:.1f} s of audio in {wall_s:.1f} s{speed})"
        )


def _has_magic(text: str) -> bool:
    return any(c in text for c in "*?[")


def expand_inputs(items: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand folders (recursively, audio suffixes only) and glob patterns, keep order.

    A name that is neither an existing path nor a pattern matching something, and a
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

    for item in items:
        text = os.fspath(item)
        path = Path(text).expanduser()
        if path.is_dir():
            found = [
                p
                for p in sorted(path.rglob("*"))
                if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS
            ]
            for file in found:
                add(file)
            if not found:
                add(path)  # reported as a failure: a folder without audio
        elif not path.exists() and _has_magic(text):
            matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
            for match in matches:
                if Path(match).is_file():
                    add(Path(match))
            if not matches:
                add(path)
        else:
            add(path)
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
    overwrite: bool = False,
    progress: bool | None = None,
    on_result: Callable[[FileResult], None] | None = None,
) -> BatchReport:
    """Separate every file, skipping those whose stems all exist (unless ``overwrite``).

    One progress bar counts seconds of audio over the whole batch (``progress=None``:
    shown when stderr is a terminal). ``on_result`` is called as each file ends.
    """
    from tqdm import tqdm

    order = {path: index for index, path in enumerate(files)}
    report = BatchReport()
    claimed: dict[Path, Path] = {}  # output path → the input that writes it
    plan: list[tuple[Path, float | None]] = []
    for path in files:
        result = None
        try:
            if path.is_dir():
                raise AudioError(f"{path}: folder holds no audio files")
            targets = output_paths(
                path,
                destination,
                separator.instruments,
                codec=codec,
                filename_format=filename_format,
            )
            clash = next((claimed[t] for t in targets.values() if t in claimed), None)
            if clash is not None:
                raise OutputError(
                    f"{path}: its stems would overwrite those of {clash} in the same batch "
                    "(add {foldername} to -f, or rename one of them)"
                )
            claimed.update(dict.fromkeys(targets.values(), path))
            if not overwrite and all(t.is_file() for t in targets.values()):
                result = FileResult(path, "skipped", "outputs exist", outputs=targets)
            else:
                plan.append((path, _seconds(audio.probe(path).duration, offset, duration)))
        except SplitstemsError as exc:
            result = FileResult(path, "failed", str(exc))
        if result is not None:
            report.results.append(result)
            if on_result is not None:
                on_result(result)
    total = sum(s for _, s in plan if s) or None
    disable = None if progress is None else not progress
    with tqdm(
        total=total,
        unit="s",
        disable=disable,
        leave=False,
        dynamic_ncols=True,
        bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s audio [{elapsed}<{remaining}]",
    ) as bar:
        for index, (path, seconds) in enumerate(plan):
            bar.set_description(f"{index + 1}/{len(plan)} {path.name[:30]}")
            done_before = bar.n
            budget = seconds if seconds else float("inf")

            def advance(step: float, base: float = done_before, cap: float = budget) -> None:
                bar.update(max(0.0, min(bar.n + step, base + cap) - bar.n))

            start = time.perf_counter()
            try:
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
                result = FileResult(path, "done", seconds=seconds or 0.0, outputs=outputs)
            except SplitstemsError as exc:
                result = FileResult(path, "failed", str(exc))
            result.elapsed = time.perf_counter() - start
            if seconds:
                bar.update(max(0.0, done_before + seconds - bar.n))
            report.results.append(result)
            if on_result is not None:
                on_result(result)
    report.results.sort(key=lambda r: order[r.path])
    return report


def _seconds(total: float | None, offset: float, duration: float | None) -> float | None:
    """Seconds that will be separated from a file of ``total`` seconds, if known."""
    if total is None:
        return duration
    remaining = max(0.0, total - offset)
    return min(remaining, duration) if duration is not None else remaining
