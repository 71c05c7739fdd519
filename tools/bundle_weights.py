"""Copy trained runs into the package (uad/resources/weights) and list them in its manifest.

    python tools/bundle_weights.py runs/vqvae runs/intensity --default vqvae

Each run folder holds the model.pt written by `uad train`; it is copied to <model name>.pt unchanged (its
SHA-256 stays valid) and must stay well under 20 MB.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from uad import catalog, resources
from uad.bundle import add_to_manifest
from uad.checkpoint import load_checkpoint

MAX_BYTES = 20 * 1024 * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--default", help="the model 'uad detect' uses when none is named")
    args = parser.parse_args()
    for run in args.runs:
        checkpoint = load_checkpoint(run / "model.pt")  # verified against the run's own manifest
        if (run / "model.pt").stat().st_size > MAX_BYTES:
            raise SystemExit(f"{run}/model.pt is over 20 MB; train a smaller model")
        target = resources.WEIGHTS_DIR / f"{checkpoint.name}.pt"
        shutil.copyfile(run / "model.pt", target)
        add_to_manifest(target, checkpoint, default=args.default)
    for model in catalog.list_models():
        print(f"{model.name}: {model.file} sha256 {model.sha256[:12]}... threshold {model.threshold:.4g}")


if __name__ == "__main__":
    main()
