"""``uad bench``: seconds per stage and peak memory of ``uad detect``, each run in a fresh process.

A fresh process per run is what a user pays (imports, model load) and makes peak memory (the child's
maximum resident set size, read by ``detect`` itself) mean one run, not the benchmark's own history.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from uad import catalog
from uad.benchmarks_file import hardware_line, table, update_section
from uad.errors import UserInputError
from uad.io import load_volume

STAGES = ("load", "preprocessing", "registration", "inference", "postprocessing", "writing", "total", "process")


def time_detect(input_path: Path, model: str, runs: int, extra_args: list[str]) -> dict:
    """Median seconds per stage and the largest peak memory over ``runs`` fresh ``uad detect`` processes."""
    reports = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="uad-bench-") as out:
            command = [sys.executable, "-m", "uad", "detect", str(input_path), "--out", out, "--model", model,
                       "--progress", "none", *extra_args]
            started = time.perf_counter()
            completed = subprocess.run(command, capture_output=True, text=True)
            wall = time.perf_counter() - started
            if completed.returncode != 0:
                raise UserInputError(f"detect failed while benchmarking {model}: {completed.stderr.strip()}")
            report = json.loads((Path(out) / "report.json").read_text())
            report["seconds"]["process"] = wall  # what the user waits: interpreter start and imports included
            reports.append(report)
    seconds = {stage: float(np.median([r["seconds"].get(stage, 0.0) for r in reports])) for stage in STAGES}
    return {"seconds": seconds, "peak_memory_mb": max(r["peak_memory_mb"] for r in reports),
            "device": reports[0]["device"], "runs": runs}


def bench(input_path: Path, models: list[str], runs: int, out: str, extra_args: list[str]) -> dict:
    volume = load_volume(input_path)  # fail early, with the one-line error, on a bad input
    results = {model: time_detect(input_path, model, runs, extra_args) for model in models}
    shape = "×".join(map(str, volume.shape))
    spacing = "×".join(f"{s:.2f}" for s in volume.spacing)
    rows = [[model, r["device"], *[f"{r['seconds'][s]:.1f}" for s in STAGES], f"{r['peak_memory_mb']:.0f}"]
            for model, r in results.items()]
    markdown = "\n".join([
        "## `uad detect` time and memory",
        "",
        f"Command: `uad bench --input {input_path} --models {' '.join(models)} --runs {runs}`"
        + (f" (detect flags: `{' '.join(extra_args)}`)" if extra_args else "") + ".",
        f"Hardware and date: {hardware_line()}.",
        f"Input: {input_path.name}, {shape} voxels of {spacing} mm (full head). Each run is a fresh process; "
        f"seconds are the median over {runs} run(s), peak memory the largest resident set size. `total` is the "
        "pipeline inside detect; `process` is the whole command as a user waits for it (Python start-up and "
        "imports of torch, monai and antspyx included).",
        "",
        table(["model", "device", *[f"{s} (s)" for s in STAGES], "peak memory (MB)"], rows),
        "",
        "Target (issue #2): end to end ≤ 60 s and peak memory ≤ 4 GB on this 2-core CPU.",
    ])
    update_section(out, "detect-timing", markdown)
    _record_expected_seconds(results)
    return results


def _record_expected_seconds(results: dict) -> None:
    """Measured CPU time -> the manifest's ``expected_seconds_cpu``, which the Slicer panel shows."""
    models = {m.name: m for m in catalog.list_models()}
    measured = {name: r["seconds"]["process"] for name, r in results.items() if name in models and r["device"] == "cpu"}
    if measured:
        updated = [replace(m, expected_seconds_cpu=round(measured[m.name], 1)) if m.name in measured else m
                   for m in models.values()]
        catalog.write_manifest(updated, default=catalog.load_manifest()["default"])
