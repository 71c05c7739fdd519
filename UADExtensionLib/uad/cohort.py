"""``uad detect`` over a cohort: many scans, one loaded model, one summary.

The inputs are NIfTI files, folders (every ``*.nii``/``*.nii.gz`` in them, masks and segmentations skipped) or
CSV files (column ``input``, optional ``id`` and ``brain_mask``). Each case writes into ``OUT/<case id>/``
through the :class:`~uad.inference.Detector`'s staging folder, so a failed or interrupted case leaves nothing
behind. A failing case is recorded and the run goes on; ``OUT/cohort.json`` and ``OUT/cohort.csv`` (or
``cohort-shard-I-of-N.*`` for one shard of a job array) list every case that ran, and are rewritten after
each case so that even a killed job leaves an up-to-date summary.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import uad
from uad.errors import UserInputError
from uad.io import NIFTI_SUFFIXES, check_output_folder, unwritable_error

if TYPE_CHECKING:
    from uad.inference import Detector

log = logging.getLogger(__name__)

# Files in an input folder that are not scans: "<id>_brainmask.nii.gz" (the training-data convention) and friends.
SKIPPED_NAME_ENDINGS = ("_brainmask", "_mask", "_seg")
CSV_COLUMNS = ("input", "id", "brain_mask")
SUMMARY_COLUMNS = ("id", "input", "status", "error", "seconds", "segmented_volume_ml", "volume_score", "out_dir",
                   "warnings")
_UNSAFE_ID_CHARACTERS = re.compile(r"[^\w.+-]+")


@dataclass(frozen=True)
class Case:
    """One scan of a cohort; ``id`` names its output folder."""

    id: str
    input: Path
    brain_mask: Path | None = None


@dataclass
class CaseResult:
    case: Case
    status: str  # "ok" or "failed"
    seconds: float
    out_dir: Path | None = None  # None when the case failed: nothing of it was written
    error: str | None = None  # one line
    segmented_volume_ml: float | None = None
    volume_score: float | None = None
    traceback: str | None = None  # only for unexpected errors (bugs), not for bad input
    warnings: list[str] = field(default_factory=list)  # doubts about the input (report.json's warnings)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        row = {
            "id": self.case.id,
            "input": str(self.case.input.absolute()),
            "brain_mask": None if self.case.brain_mask is None else str(self.case.brain_mask.absolute()),
            "status": self.status,
            "error": self.error,
            "seconds": self.seconds,
            "segmented_volume_ml": self.segmented_volume_ml,
            "volume_score": self.volume_score,
            "out_dir": None if self.out_dir is None else str(self.out_dir),
            "warnings": list(self.warnings),
        }
        if self.traceback:
            row["traceback"] = self.traceback
        return row


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (1-based): cases ``index - 1, index - 1 + count, ...`` of the case list."""

    index: int
    count: int

    def __post_init__(self):
        if not 1 <= self.index <= self.count:
            raise UserInputError(f"--shard {self.index}/{self.count} is out of range; I/N needs 1 <= I <= N")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"2/4"`` -> ``Shard(2, 4)``; e.g. ``--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``."""
        index, separator, count = text.strip().partition("/")
        try:
            numbers = (int(index), int(count)) if separator else None
        except ValueError:
            numbers = None
        if numbers is None:
            raise UserInputError(f"--shard {text!r} is not I/N with whole numbers, e.g. --shard 2/4")
        return cls(*numbers)

    def select(self, cases: Sequence[Case]) -> list[Case]:
        return list(cases[self.index - 1::self.count])

    @property
    def summary_name(self) -> str:
        return f"cohort-shard-{self.index}-of-{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass
class CohortSummary:
    out_dir: Path
    results: list[CaseResult] = field(default_factory=list)
    planned: int = 0  # cases this run (or shard) was to process
    shard: Shard | None = None
    model: str | None = None
    device: str | None = None
    interrupted: bool = False
    seconds: float = 0.0
    options: dict = field(default_factory=dict)

    @property
    def failed(self) -> list[CaseResult]:
        return [r for r in self.results if not r.ok]

    @property
    def succeeded(self) -> list[CaseResult]:
        return [r for r in self.results if r.ok]

    @property
    def json_path(self) -> Path:
        return self.out_dir / f"{self.shard.summary_name if self.shard else 'cohort'}.json"

    @property
    def csv_path(self) -> Path:
        return self.json_path.with_suffix(".csv")

    def to_dict(self) -> dict:
        return {
            "cases_planned": self.planned,
            "cases_run": len(self.results),
            "ok": len(self.succeeded),
            "failed": len(self.failed),
            "interrupted": self.interrupted,
            "shard": None if self.shard is None else str(self.shard),
            "model": self.model,
            "device": self.device,
            "seconds": round(self.seconds, 2),
            "options": self.options,
            "uad_version": uad.__version__,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "cases": [r.to_dict() for r in self.results],
        }

    def write(self) -> None:
        """``<name>.json`` and ``<name>.csv``, each replaced atomically (a reader never sees half a file).

        A failed write (folder made read-only, disk full) stops the run with a one-line error."""
        try:
            self._write()
        except OSError as exc:
            raise unwritable_error(self.out_dir, exc) from exc

    def _write(self) -> None:
        _write_atomically(self.json_path, json.dumps(self.to_dict(), indent=2) + "\n")
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(SUMMARY_COLUMNS)
        for result in self.results:
            row = result.to_dict()
            writer.writerow([_csv_cell(row[column]) for column in SUMMARY_COLUMNS])
        _write_atomically(self.csv_path, text.getvalue())


def is_cohort(inputs: Sequence[str | os.PathLike], shard: Shard | None = None) -> bool:
    """False for the classic single run (one NIfTI path, no shard), which writes straight into ``--out``."""
    if shard is not None or len(inputs) != 1:
        return True
    path = Path(inputs[0])
    return path.is_dir() or path.suffix.lower() == ".csv"


def list_cases(inputs: Sequence[str | os.PathLike]) -> list[Case]:
    """Cases in a fixed order (folders sorted by file name, CSV rows as listed), with unique, path-safe ids."""
    cases: list[Case] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            cases += [Case(case_id_from_path(p), p) for p in list_folder(path)]
        elif path.suffix.lower() == ".csv":
            cases += read_csv(path)
        else:
            cases.append(Case(case_id_from_path(path), path))  # checked when it runs: a bad one fails alone
    if not cases:
        raise UserInputError("no cases to run; give NIfTI files, folders of them or a CSV with an input column")
    return unique_ids(cases)


def list_folder(folder: Path) -> list[Path]:
    """Every NIfTI scan directly in ``folder``, sorted; masks, segmentations and hidden files are skipped."""
    scans = sorted(
        path for path in folder.iterdir()
        if path.name.endswith(NIFTI_SUFFIXES) and not path.name.startswith(".")
        and not _strip_nifti_suffix(path.name).endswith(SKIPPED_NAME_ENDINGS) and path.is_file()
    )
    if not scans:
        raise UserInputError(f"no NIfTI scans (*.nii, *.nii.gz) in the folder {folder}; files ending in "
                             f"{', '.join(e + '.nii.gz' for e in SKIPPED_NAME_ENDINGS)} are not scans")
    return scans


def read_csv(path: Path) -> list[Case]:
    """Rows of a comma-separated file with a header: ``input`` (required), ``id``, ``brain_mask``; other columns
    are ignored. Relative paths are relative to the CSV's own folder."""
    if not path.is_file():
        raise UserInputError(f"CSV file not found: {path}; check the path")
    try:
        rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8-sig"))))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserInputError(f"cannot read the CSV {path} ({exc}); save it as UTF-8 comma-separated text") from exc
    header = [name.strip().lower() for name in rows[0]] if rows else []
    if "input" not in header:
        found = ", ".join(repr(name) for name in header) or "none"
        raise UserInputError(f"the CSV {path} has no 'input' column (columns: {found}); give a comma-separated "
                             f"header row with input and optionally id, brain_mask")
    column = {name: header.index(name) for name in CSV_COLUMNS if name in header}

    def cell(row: list[str], name: str) -> str:
        index = column.get(name)
        return row[index].strip() if index is not None and index < len(row) else ""

    cases = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(value.strip() for value in row):
            continue  # blank line
        scan = cell(row, "input")
        if not scan:
            raise UserInputError(f"the CSV {path}, line {line}, has an empty input; give a scan path in every row")
        scan_path = _relative_to(path.parent, scan)
        mask = cell(row, "brain_mask")
        cases.append(Case(_safe_id(cell(row, "id")) or case_id_from_path(scan_path), scan_path,
                          _relative_to(path.parent, mask) if mask else None))
    if not cases:
        raise UserInputError(f"the CSV {path} lists no scans; add one row per scan under its header")
    return cases


def case_id_from_path(path: Path) -> str:
    return _safe_id(_strip_nifti_suffix(path.name)) or "case"


def unique_ids(cases: Sequence[Case]) -> list[Case]:
    """Colliding ids get ``-2``, ``-3``, ... in list order (compared case-insensitively, as macOS folders are)."""
    seen: set[str] = set()
    unique = []
    for case in cases:
        candidate, number = case.id, 2
        while candidate.lower() in seen:
            candidate, number = f"{case.id}-{number}", number + 1
        seen.add(candidate.lower())
        unique.append(case if candidate == case.id else replace(case, id=candidate))
    return unique


def run_cohort(detector: Detector, cases: Sequence[Case], out_dir: str | os.PathLike, *,
               shard: Shard | None = None, progress_mode: str = "none") -> CohortSummary:
    """Run ``detector`` on each case into ``out_dir/<id>``; failures are recorded, not raised.

    Ctrl-C (or SIGTERM, as a batch scheduler sends at its time limit) stops after cleaning up the running case;
    the summary then lists the finished cases and says ``interrupted``. Bad arguments (unloadable model,
    unwritable ``out_dir``) raise :class:`UserInputError` before any case runs.
    """
    from tqdm import tqdm

    from uad.inference import STAGE_WEIGHTS
    from uad.progress import Progress

    out_dir = Path(out_dir)
    check_output_folder(out_dir)  # before the model is loaded or any case runs
    summary = CohortSummary(out_dir, planned=len(cases), shard=shard, device=detector.device)
    if cases:
        summary.model = detector.checkpoint.name  # loaded once, here, for every case
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        check_output_folder(out_dir)
    except OSError as exc:
        raise unwritable_error(out_dir, exc) from exc

    base_options = detector.options
    summary.options = asdict(base_options)
    bar = None
    if progress_mode == "bar" and len(cases) > 1:
        bar = tqdm(total=len(cases), unit="case", file=sys.stderr, dynamic_ncols=True)
    stage_mode = "none" if bar is not None else progress_mode
    started = time.perf_counter()
    summary.write()
    try:
        with _sigterm_interrupts():
            for number, case in enumerate(cases, start=1):
                if bar is not None:
                    bar.set_description(case.id)
                detector.options = replace(base_options, brain_mask=str(case.brain_mask) if case.brain_mask
                                           else base_options.brain_mask)
                stream = None
                if stage_mode == "json":
                    stream = _TaggedStream(sys.stdout, {"case": case.id, "case_number": number,
                                                        "cases": len(cases)})
                progress = Progress(stage_mode, STAGE_WEIGHTS, stream)
                try:
                    result = _run_case(detector, case, out_dir / case.id, progress)
                finally:
                    progress.close()
                summary.results.append(result)
                summary.seconds = time.perf_counter() - started
                summary.write()
                if not result.ok:
                    log.info("case %s failed: %s", case.id, result.error)
                    if stage_mode == "json":
                        print(json.dumps({"type": "failed", "case": case.id, "error": result.error}), flush=True)
                if bar is not None:
                    bar.set_postfix(failed=len(summary.failed), refresh=False)
                    bar.update()
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        detector.options = base_options
        if bar is not None:
            bar.close()
    summary.seconds = time.perf_counter() - started
    summary.write()
    if progress_mode == "json":
        print(json.dumps({"type": "cohort", "summary": str(summary.json_path), "cases": summary.planned,
                          "ok": len(summary.succeeded), "failed": len(summary.failed),
                          "interrupted": summary.interrupted}), flush=True)
    return summary


def _run_case(detector: Detector, case: Case, case_dir: Path, progress) -> CaseResult:
    started = time.perf_counter()
    try:
        result = detector.run(case.input, case_dir, progress)
    except UserInputError as exc:
        return CaseResult(case, "failed", _elapsed(started), error=_one_line(str(exc)))
    except Exception as exc:  # a bug or a library failure on this scan: record it, keep the run going
        log.debug("case %s failed", case.id, exc_info=True)
        return CaseResult(case, "failed", _elapsed(started), error=_one_line(f"{type(exc).__name__}: {exc}"),
                          traceback=traceback.format_exc())
    report = result.report
    return CaseResult(case, "ok", _elapsed(started), out_dir=result.out_dir.absolute(),
                      segmented_volume_ml=report.get("segmented_volume_ml"), volume_score=report.get("volume_score"),
                      warnings=result.warnings)


class _TaggedStream:
    """Adds the case's fields to each JSON line :class:`~uad.progress.Progress` prints, so its format stays
    defined in one place: ``{"type": "progress", ..., "case": "sub-01", "case_number": 3, "cases": 10}``."""

    def __init__(self, stream, fields: dict):
        self.stream, self.fields = stream, fields

    def write(self, text: str) -> int:
        if text.startswith("{"):
            try:
                text = json.dumps({**json.loads(text), **self.fields})
            except (json.JSONDecodeError, TypeError):
                pass
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM acts as Ctrl-C, so the running case is cleaned up and the summary written (main thread only)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    partial.replace(path)


def _csv_cell(value) -> str:
    if value is None:
        return ""
    return " | ".join(value) if isinstance(value, list) else str(value)


def _strip_nifti_suffix(name: str) -> str:
    for suffix in sorted(NIFTI_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _safe_id(text: str) -> str:
    """A folder name: path separators and other unsafe characters become ``_``; no leading dot (hidden)."""
    return _UNSAFE_ID_CHARACTERS.sub("_", text.strip()).lstrip(".")


def _relative_to(folder: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else folder / path


def _elapsed(started: float) -> float:
    return round(time.perf_counter() - started, 2)


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "unknown error"
