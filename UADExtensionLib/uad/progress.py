"""Progress for long work: a bar on a terminal, JSON lines for the Slicer module, or nothing.

Stages carry weights (their typical share of the run time), so one overall fraction and an ETA can be given
while each stage reports only its own fraction.
"""

from __future__ import annotations

import json
import sys
import time

from tqdm import tqdm


class Progress:
    def __init__(self, mode: str, stages: dict[str, float], stream=None):
        total = sum(stages.values())
        self.mode = mode
        self.stream = stream or (sys.stdout if mode == "json" else sys.stderr)
        self.weights = {name: weight / total for name, weight in stages.items()}
        self.offsets, running = {}, 0.0
        for name, weight in self.weights.items():
            self.offsets[name] = running
            running += weight
        self.started = time.monotonic()
        self.stage = self.first_stage = next(iter(stages))
        self.bar = None  # created at the first stage after "load", so an unreadable input prints only its error

    def update(self, stage: str, fraction: float = 0.0, message: str = "") -> None:
        self.stage = stage
        overall = min(1.0, self.offsets[stage] + self.weights[stage] * min(max(fraction, 0.0), 1.0))
        elapsed = time.monotonic() - self.started
        eta = elapsed * (1 - overall) / overall if overall > 0.02 else None
        if self.mode == "json":
            line = {"type": "progress", "stage": stage, "fraction": round(overall, 4), "message": message or stage,
                    "eta_seconds": None if eta is None else round(eta, 1)}
            print(json.dumps(line), file=self.stream, flush=True)
        elif self.mode == "bar" and (self.bar is not None or stage != self.first_stage):
            if self.bar is None:
                self.bar = tqdm(total=1000, file=self.stream, bar_format="{l_bar}{bar}| {elapsed}<{remaining}")
            self.bar.set_description(stage)
            self.bar.n = int(overall * 1000)
            self.bar.refresh()

    def stage_callback(self, stage: str):
        """A ``fraction -> None`` callable for code that reports progress within one stage."""
        return lambda fraction: self.update(stage, fraction)

    def done(self, **fields) -> None:
        if self.mode == "json":
            print(json.dumps({"type": "done", **fields}), file=self.stream, flush=True)
        elif self.bar is not None:
            self.bar.n = 1000
            self.bar.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
