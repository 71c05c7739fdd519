"""Train every network of the bundle at once on one lent GPU box, within a fixed wall-clock budget.

The box has no antspyx, no raw scans and ~10 minutes a command, so (see tools/reproduce_bundled.sh):
1. here: ``python tools/cache_transfer.py pack ../shared/data/healthy/ixi_t1 ~/.cache/uad .gpu/pack.npz``;
2. there: ``python3 tools/train_on_gpu.py .gpu/pack.npz OUT_DIR`` unpacks the cohort, times one training step
   and one validation of every run *while all of them run side by side* (as they will), turns the budget
   into a fixed number of steps per run, and launches plain ``uad train`` commands with those steps, first
   stages and then the two-stage models on top. Each checkpoint records its own exact command, so a run is
   reproducible with ``uad train`` alone; only the step counts came from this timing.
3. It copies each finished ``model.pt`` (for the DAE, the variant with the best validation AUPRC of its final
   map) and one archive of every run's log and provenance to OUT_DIR.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

# Placeholders with the same subject names (every scan is read from the cache); overridable to try it out here.
DATA = os.environ.get("UAD_PLACEHOLDER_DATA", "../shared/data/healthy/ixi_t1")
CACHE = os.environ.get("UAD_TRAIN_CACHE", "/tmp/uad-cache")
RUNS_DIR = Path(os.environ.get("UAD_RUNS_DIR", "/tmp/runs"))
THREADS = 2  # 16 CPU cores over ~8 processes
DEVICE = os.environ.get("UAD_TRAIN_DEVICE", "cuda")  # cpu only to try this script out on a tiny budget


@dataclass(frozen=True)
class Run:
    name: str
    model: str
    loop_seconds: float  # budget of the training loop, validations included
    batch_size: int = 32
    lr: float = 5e-4
    options: tuple[str, ...] = ()
    init_from: str = ""  # run name of the first stage, or a checkpoint path (*.pt) to go on from
    validations: int = 8  # validation points: the curve in the model card


STAGE_ONE = [
    Run("vqvae", "vqvae", 170, batch_size=64, options=("channels=[16,32,64,64]",)),
    Run("swin-mae", "swin-mae", 170, batch_size=32),
    Run("rae", "rae", 300, batch_size=64),
    # The DAE's validation AUPRC peaks early (EVALUATION.md): a shorter run, validated more often, three noise
    # settings (the paper's 1/8 grid with std 0.2; stronger; coarser and stronger, closer to 20-30 mm lesions).
    Run("dae-8-0.2", "dae", 200, validations=12, options=("noise_grid_divisor=8", "noise_std=0.2")),
    Run("dae-8-0.4", "dae", 200, validations=12, options=("noise_grid_divisor=8", "noise_std=0.4")),
    Run("dae-16-0.4", "dae", 200, validations=12, options=("noise_grid_divisor=16", "noise_std=0.4")),
]
STAGE_TWO = [
    Run("vqvae-transformer", "vqvae-transformer", 110, batch_size=64, init_from="vqvae"),
    Run("mae-classifier", "mae-classifier", 110, batch_size=32, init_from="swin-mae"),
]

# A second, shorter lease: the DAE only (its first curve was still rising), longer, wider, finer noise.
DAE_MORE = [
    Run("dae-8-0.2-long", "dae", 170, validations=10, options=("noise_grid_divisor=8", "noise_std=0.2")),
    Run("dae-8-0.2-wide", "dae", 170, validations=10,
        options=("noise_grid_divisor=8", "noise_std=0.2", "channels=[48,96,192,384]")),
    Run("dae-4-0.2", "dae", 170, validations=10, options=("noise_grid_divisor=4", "noise_std=0.2")),
]
# A third lease: dae-4-0.2's curve (the bundled one) was still rising, so it goes on from the bundled weights at
# a lower rate and again from scratch for longer; a stronger and a finer noise beside it (MS lesions are 3-10 mm,
# smaller than grid-1/4 blobs); and a VQ-VAE with an 8x bottleneck, the one change that can lift its healthy SSIM.
BUNDLED_DAE = "UADExtensionLib/uad/resources/weights/dae.pt"
DAE_THIRD = [
    Run("dae-4-0.2-cont", "dae", 380, lr=2e-4, validations=10, init_from=BUNDLED_DAE,
        options=("noise_grid_divisor=4", "noise_std=0.2")),
    Run("dae-4-0.2-long", "dae", 380, validations=10, options=("noise_grid_divisor=4", "noise_std=0.2")),
    Run("dae-4-0.3", "dae", 380, validations=10, options=("noise_grid_divisor=4", "noise_std=0.3")),
    Run("dae-2-0.2", "dae", 380, validations=10, options=("noise_grid_divisor=2", "noise_std=0.2")),
    Run("vqvae-8x", "vqvae", 380, batch_size=64, options=("channels=[32,64,128]", "num_embeddings=512")),
]
PLANS = {"all": (STAGE_ONE, STAGE_TWO), "dae": (DAE_MORE, []), "dae3": (DAE_THIRD, [])}

PROBE = """
import json, sys, time, numpy as np, torch
from uad.data import load_cached
from uad.calibration import validation_auprc
from uad.models import build_model, get_spec
from uad.models.slicewise import brain_slices_from_volumes
from uad.training import _augment
model_name, options, batch, cache, device = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:6]
torch.set_num_threads(2)
spec = get_spec(model_name)
model = build_model(spec.config_cls.from_dict(options)).to(device)
paths = sorted(__import__('pathlib').Path(cache).glob('*/*.npz'))
vols = [load_cached(p) for p in paths[:15]]
images, masks = brain_slices_from_volumes(np.stack([v[0] for v in vols]), np.stack([v[1] for v in vols]))
opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
rng = np.random.default_rng(0)
def step():
    i = rng.integers(0, len(images), batch)
    x, m = _augment(images[i], masks[i], rng)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == 'cuda'):
        loss = model.loss(torch.from_numpy(x).to(device), torch.from_numpy(m).to(device)).total
    opt.zero_grad(); loss.backward(); opt.step()
sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
for _ in range(10): step()
sync(); t = time.time()
for _ in range(40): step()
sync(); step_s = (time.time() - t) / 40
model.eval(); t = time.time()
validation_auprc(model, np.stack([v[0] for v in vols]), np.stack([v[1] for v in vols]))
print(json.dumps({"step_s": step_s, "validation_s": time.time() - t}))
"""


def options_dict(run: Run) -> dict:
    return {key: json.loads(value) for key, value in (o.split("=", 1) for o in run.options)}


def probe(runs: list[Run]) -> dict[str, dict]:
    """Seconds per step and per validation of every run, all measured at once (the GPU and CPUs are shared)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    processes = {run.name: subprocess.Popen(
        [sys.executable, "-c", PROBE, run.model, json.dumps(options_dict(run)), str(run.batch_size), CACHE, DEVICE],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for run in runs}
    timings = {}
    for name, process in processes.items():
        out, err = process.communicate()
        timings[name] = json.loads(out.strip().splitlines()[-1]) if process.returncode == 0 else \
            {"step_s": 0.1, "validation_s": 30.0, "error": err[-500:]}
    return timings


def command(run: Run, steps: int, validate_every: int) -> list[str]:
    args = ["uad", "--verbose", "train", "--model", run.model, "--data", DATA, "--out", str(RUNS_DIR / run.name),
            "--cache", CACHE, "--seed", "0", "--steps", str(steps), "--batch-size", str(run.batch_size),
            "--lr", str(run.lr), "--validate-every", str(validate_every), "--checkpoint-every", str(validate_every),
            "--threads", str(THREADS), "--device", DEVICE]
    for option in run.options:
        args += ["--option", option]
    if run.init_from:
        base = run.init_from if run.init_from.endswith(".pt") else str(RUNS_DIR / run.init_from / "model.pt")
        args += ["--init-from", base]
    return args


def launch(run: Run, timing: dict) -> subprocess.Popen:
    usable = run.loop_seconds - run.validations * timing["validation_s"]
    steps = max(run.validations * 10, int(usable / timing["step_s"]) // run.validations * run.validations)
    args = command(run, steps, steps // run.validations)
    (RUNS_DIR / run.name).mkdir(parents=True, exist_ok=True)
    log = open(RUNS_DIR / run.name / "train.log", "w")
    log.write(" ".join(args) + f"\n# probe: {json.dumps(timing)}\n")
    log.flush()
    # python -m uad: the provenance records it as "uad train ..." (the package is on PYTHONPATH, not installed)
    return subprocess.Popen([sys.executable, "-m", *args[0:1], *args[1:]], stdout=log, stderr=subprocess.STDOUT)


def main(packed: str, out_dir: str, deadline_seconds: float = 480.0) -> None:
    started = time.time()
    subprocess.run([sys.executable, str(Path(__file__).with_name("cache_transfer.py")), "unpack", packed, DATA, CACHE],
                   check=True)
    stage_one, stage_two = PLANS[os.environ.get("UAD_GPU_PLAN", "all")]
    timings = probe(stage_one + stage_two)
    print("probe", json.dumps(timings, indent=1), flush=True)
    running = {run.name: launch(run, timings[run.name]) for run in stage_one}
    waiting = list(stage_two)
    while (running or waiting) and time.time() - started < deadline_seconds:
        for name, process in list(running.items()):
            if process.poll() is not None:
                print(f"{time.time() - started:.0f}s {name} exited {process.returncode}", flush=True)
                del running[name]
        for run in list(waiting):
            if run.init_from not in running:
                waiting.remove(run)
                if (RUNS_DIR / run.init_from / "model.pt").exists():
                    running[run.name] = launch(run, timings[run.name])
        time.sleep(2)
    for name, process in running.items():  # out of time: what has not finished comes back as logs only
        print(f"{name} stopped at the deadline", flush=True)
        process.kill()
    collect(Path(out_dir))


def collect(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    finished = {p.parent.name: p for p in RUNS_DIR.glob("*/model.pt")}
    dae = {name: path for name, path in finished.items() if name.startswith("dae-")}
    import torch  # here, not at the top: the driver itself runs before any torch process is needed

    summary = {name: torch.load(path, map_location="cpu", weights_only=True)["training"]["best_validation"]
               for name, path in finished.items()}
    if dae:
        chosen = max(dae, key=lambda n: summary[n].get("auprc_final_map", -1))
        summary["dae_chosen"] = chosen
        finished = {**{n: p for n, p in finished.items() if n not in dae}, "dae": dae[chosen]}
    for name, path in finished.items():
        (out_dir / f"{name}.pt").write_bytes(path.read_bytes())
    (RUNS_DIR / "summary.json").write_text(json.dumps(summary, indent=1))
    with tarfile.open(out_dir / "logs.tar.gz", "w:gz") as archive:
        for path in [RUNS_DIR / "summary.json", *RUNS_DIR.glob("*/train.log"), *RUNS_DIR.glob("*/manifest.json")]:
            archive.add(path, arcname=str(path.relative_to(RUNS_DIR)))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3], *(float(a) for a in sys.argv[3:4]))
