"""Add one lease of tools/train_on_gpu.py to Resources/gpu-training-runs.json (the model cards read it).

    python tools/record_gpu_runs.py LOGS_DIR "2026-11-30 lease 3"

LOGS_DIR is the unpacked logs.tar.gz of the lease. Each run's train.log starts with its exact command and its
timing probe, and logs every validation; summary.json adds the final map's AUPRC of the runs that finished. A run
stopped at the lease's deadline is recorded too (its curve up to there, no final map), so a reader sees it.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

RUNS_FILE = Path(__file__).resolve().parents[1] / "Resources" / "gpu-training-runs.json"
VALIDATION = re.compile(r"step (\d+): validation AUPRC ([0-9.]+)")


def read_run(log: Path, finished: dict | None) -> dict:
    text = log.read_text(errors="replace")
    command, probe = text.splitlines()[:2]
    curve = [[int(step), float(score)] for step, score in VALIDATION.findall(text.replace("\r", "\n"))]
    best_step, best = max(curve, key=lambda point: point[1])
    return {"command": command, "probe": json.loads(probe.removeprefix("# probe: ")),
            "model": command.split("--model ")[1].split()[0], "auprc": best, "step": best_step, "curve": curve,
            "auprc_final_map": (finished or {}).get("auprc_final_map"),
            **({} if finished else {"stopped": "at the lease's deadline, before its last checkpoint was saved"})}


def main(logs_dir: str, lease: str) -> None:
    logs = Path(logs_dir)
    summary = json.loads((logs / "summary.json").read_text())
    runs = json.loads(RUNS_FILE.read_text()) if RUNS_FILE.exists() else {}
    for log in sorted(logs.glob("*/train.log")):
        runs[log.parent.name] = {"lease": lease, **read_run(log, summary.get(log.parent.name))}
    RUNS_FILE.write_text(json.dumps(runs, indent=1) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
