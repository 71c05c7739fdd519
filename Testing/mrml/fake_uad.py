"""Stands in for ``python -m uad`` in the logic tests: the same ``detect`` flags and JSON progress protocol,
synthetic outputs on the input's grid, no model. ``FAKE_UAD_MODE`` picks the behaviour:
``ok`` (default), ``error`` (a user error, exit 2), ``crash`` (a traceback, exit 1), ``hang`` (sleeps, with a
child process, until killed).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
from synthetic_outputs import write_out_dir


def progress(stage: str, fraction: float, message: str) -> None:
    line = {"type": "progress", "stage": stage, "fraction": fraction, "message": message, "eta_seconds": None}
    print(json.dumps(line), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(prog="uad")
    parser.add_argument("command", choices=["detect"])
    parser.add_argument("input")
    parser.add_argument("--out", required=True)
    parser.add_argument("--model")
    parser.add_argument("--mask-size", type=int, choices=(32, 64))
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--skull-stripped", action="store_true")
    parser.add_argument("--threshold", type=float)
    parser.add_argument("--median-mm", type=float, default=3.0)
    parser.add_argument("--min-component-mm3", type=float, default=20.0)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--refine", choices=("none", "atropos"), default="none")
    parser.add_argument("--progress", choices=("bar", "json", "none"))
    args = parser.parse_args()
    mode = os.environ.get("FAKE_UAD_MODE", "ok")

    progress("load", 0.0, f"loading {Path(args.input).name}")
    if mode == "error":
        print("uad: error: input is empty (every voxel is zero); export it again", file=sys.stderr)
        return 2
    if mode == "crash":
        raise RuntimeError("CUDA out of memory")
    if mode == "hang":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        progress("inference", 0.3, f"child {child.pid}")
        time.sleep(60)
        return 0

    image = nib.load(args.input)
    progress("inference", 0.5, "running fake-model on cpu")
    write_out_dir(
        args.out,
        image.shape,
        image.affine,
        threshold=args.threshold,
        median_mm=args.median_mm,
        min_component_mm3=args.min_component_mm3,
        top_k=args.top_k,
        report_extra={"argv": sys.argv[1:]},
    )
    progress("writing", 1.0, "writing outputs")
    print(json.dumps({"type": "done", "out_dir": args.out, "device": "cpu"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
