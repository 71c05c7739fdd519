"""``uad check-inputs``: the input check's false-alarm rate on every healthy scan, and its verdict on lesion cases.

Each scan is checked as ``uad detect`` would check it with default flags (skull stripping auto-detected). The raw
measures are cached per file (``--cache``), so changing :data:`uad.input_check.LIMITS` and re-running is quick.
The section ``input-check`` of BENCHMARKS.md is replaced whole.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from uad import benchmarks_file
from uad.errors import UserInputError
from uad.input_check import LIMITS, InputCheck, SkullStripping, judge

log = logging.getLogger(__name__)

SECTION = "input-check"


@dataclass(frozen=True)
class Scan:
    group: str  # "IXI", "MASS", "native head", "lesion"
    path: Path
    stripped: bool  # what the data's README says

    @property
    def name(self) -> str:
        """The file name without .nii/.nii.gz; a lesion case's folder comes first (its files are all "T1")."""
        stem = self.path.name.removesuffix(".gz").removesuffix(".nii")
        return f"{self.path.parent.name}/{stem}" if self.group == "lesion" else stem


def find_scans(data_dir: Path) -> list[Scan]:
    """Every healthy T1 of the shared data folder, and the lesion cases' T1 (or post-contrast T1 where there is no
    plain one)."""
    healthy = data_dir / "healthy"
    if not healthy.is_dir():
        raise UserInputError(f"no healthy/ folder in {data_dir}; give the shared data folder (../shared/data)")
    scans = [Scan("IXI", p, False) for p in sorted((healthy / "ixi_t1").glob("*_T1.nii.gz"))]
    scans += [Scan("MASS", p, True) for p in sorted((healthy / "mass_t1").glob("*_T1.nii.gz"))]
    scans += [Scan("native head", p, False) for p in sorted((healthy / "native_head").glob("*.nii.gz"))]
    for case in sorted(p for p in (data_dir / "lesion").glob("*/*") if p.is_dir()):
        t1 = case / "T1.nii.gz" if (case / "T1.nii.gz").exists() else case / "T1POST.nii.gz"
        if t1.exists():
            scans.append(Scan("lesion", t1, True))
    return scans


def _cached_values(scan: Scan, cache_dir: Path) -> tuple[dict, dict]:
    """(raw measures, skull-stripping decision as a dict), measured once per file version."""
    from uad.input_check import decide_skull_stripping, measure_values
    from uad.io import load_volume
    from uad.preprocessing import PreprocessConfig, preprocess

    stat = scan.path.stat()
    key = f"{scan.group}-{scan.name}-{stat.st_size}-{int(stat.st_mtime)}".replace(" ", "_").replace("/", "_")
    cached = cache_dir / f"{key}.json"
    if cached.exists():
        stored = json.loads(cached.read_text())
        return stored["values"], stored["skull_stripping"]
    volume = load_volume(scan.path)
    stripping = decide_skull_stripping(volume, None)
    prep = preprocess(volume, PreprocessConfig(), skull_stripped=stripping.skull_stripped)
    try:
        values = measure_values(volume, prep)
    finally:
        prep.close()
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps({"values": values, "skull_stripping": asdict(stripping)}))
    return values, asdict(stripping)


def run(data_dir: str | os.PathLike, out: str | os.PathLike, cache_dir: str | os.PathLike) -> dict:
    """Check every scan, write the BENCHMARKS.md section, return the per-scan results."""
    from tqdm import tqdm

    scans = find_scans(Path(data_dir))
    cache = Path(cache_dir) / "input-check"
    results = {}
    for scan in tqdm(scans, desc="input check", unit="scan"):
        values, stripping = _cached_values(scan, cache)
        check = judge(values, SkullStripping(**stripping))
        results[f"{scan.group}/{scan.name}"] = (scan, values, check)
    benchmarks_file.update_section(out, SECTION, render(results))
    return results


def render(results: dict[str, tuple[Scan, dict, InputCheck]]) -> str:
    groups = list(dict.fromkeys(scan.group for scan, _, _ in results.values()))
    rows = []
    for group in groups:
        members = [(scan, check) for scan, _, check in results.values() if scan.group == group]
        refused = sum(not c.passed for _, c in members)
        warned = sum(c.passed and bool(c.warnings) for _, c in members)
        stripping_right = sum(c.skull_stripping.skull_stripped == s.stripped for s, c in members)
        rows.append([group, len(members), refused, warned, f"{(refused + warned) / len(members):.1%}",
                     f"{stripping_right}/{len(members)}"])
    summary = benchmarks_file.table(
        ["scans", "n", "refused", "warned", "false-alarm rate (refused or warned)", "skull stripping detected right"],
        rows)

    measure_rows = []
    for key, limit in LIMITS.items():
        healthy = [values[key] for scan, values, _ in results.values() if scan.group != "lesion" and key in values]
        lesion = [values[key] for scan, values, _ in results.values() if scan.group == "lesion" and key in values]
        if not healthy:
            continue
        margins = [limit.margin(v) for v in healthy]
        measure_rows.append([key, _limit_text(limit.warn_low, limit.warn_high, limit.unit),
                             _limit_text(limit.refuse_low, limit.refuse_high, limit.unit),
                             f"{min(healthy):.4g} – {max(healthy):.4g}", f"{min(margins):.3g}",
                             f"{min(lesion):.4g} – {max(lesion):.4g}" if lesion else "–"])
    measures = benchmarks_file.table(
        ["measure", "warn outside", "refuse outside", "healthy scans (min – max)", "smallest healthy margin",
         "lesion cases"], measure_rows)

    flagged = [f"- {name}: {'REFUSED: ' + c.refusal if not c.passed else '; '.join(c.warnings)}"
               for name, (_, _, c) in results.items() if not c.passed or c.warnings]
    return "\n".join([
        "## Input check (false alarms on healthy scans)",
        "",
        "`uad check-inputs --data ../shared/data` (every healthy scan of the shared data folder, checked as "
        "`uad detect` checks its input with default flags: skull stripping auto-detected; lesion cases: the T1, or "
        "the post-contrast T1 where there is no plain one). A false alarm is a healthy scan that is refused or gets "
        "a warning. Limits are in `uad/input_check.py` (`LIMITS`); the margin is the distance of the closest "
        "healthy scan to a warning limit (to the refusal limit for a measure that only refuses). Lesion cases may "
        "warn (a tumour or post-contrast enhancement changes the contrast) but must not be refused. The limits "
        "were chosen on these same healthy scans, so the false-alarm rate is in-sample: the margins say how "
        "close the nearest healthy scan came.",
        "",
        benchmarks_file.hardware_line(),
        "",
        summary,
        "",
        measures,
        "",
        "Scans with a warning or a refusal:" if flagged else "No scan got a warning or a refusal.",
        *flagged,
    ])


def _limit_text(low: float | None, high: float | None, unit: str) -> str:
    if low is None and high is None:
        return "–"
    if low is None:
        return f"> {high:g}{unit}"
    if high is None:
        return f"< {low:g}{unit}"
    return f"< {low:g} or > {high:g}{unit}"
