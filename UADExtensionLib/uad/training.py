"""The one training loop: healthy slices in, a calibrated, self-describing checkpoint out.

Reproducible from one command and a seed; resumable (``last.pt`` every ``checkpoint_every`` steps holds the
model, optimiser, step and random states); the checkpoint kept is the one with the best anomaly metric on
the validation subjects (synthetic anomalies), not the lowest reconstruction loss — a model that copies its
input reconstructs perfectly and detects nothing.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import uad
from uad.bundle import add_to_manifest
from uad.calibration import calibrate, validation_auprc
from uad.checkpoint import Checkpoint, save_checkpoint
from uad.data import find_subjects, load_cached, prepare_cohort, split_subjects
from uad.devices import resolve_device
from uad.errors import UserInputError
from uad.models import AnomalyModel, build_model, get_spec
from uad.postprocessing import PostprocessConfig
from uad.preprocessing import PreprocessConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    model: str
    data_dir: str
    out_dir: str
    cache_dir: str = str(Path.home() / ".cache" / "uad")
    seed: int = 0
    split_seed: int = 0  # fixed apart from ``seed`` so the held-out test subjects never change
    steps: int = 6000
    batch_size: int = 32
    learning_rate: float = 5e-4
    checkpoint_every: int = 250
    validate_every: int = 1000
    device: str = "auto"
    threads: int = max(1, os.cpu_count() or 1)
    skull_stripped: bool = False
    model_options: dict = field(default_factory=dict)
    fpr: float = 0.01  # calibrated default threshold: this fraction of healthy brain voxels flagged


@dataclass
class Cohort:
    """Preprocessed training and validation volumes, (N, X, Y, Z), with the split they came from."""

    train_images: np.ndarray
    train_masks: np.ndarray
    validation_images: np.ndarray
    validation_masks: np.ndarray
    subjects: dict


def load_cohort(config: TrainConfig, preprocessing: PreprocessConfig) -> Cohort:
    subjects = find_subjects(config.data_dir)
    split = split_subjects([s.subject_id for s in subjects], seed=config.split_seed)
    wanted = set(split.train) | set(split.validation)  # test subjects are never even preprocessed here
    chosen = [s for s in subjects if s.subject_id in wanted]
    with tqdm(total=len(chosen), desc="preprocessing cohort", unit="scan", file=sys.stderr) as bar:
        cached = prepare_cohort(chosen, preprocessing, config.cache_dir, skull_stripped=config.skull_stripped,
                                progress=bar.update)

    def stack(ids):
        pairs = [load_cached(cached[i]) for i in ids]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    train_images, train_masks = stack(split.train)
    validation_images, validation_masks = stack(split.validation)
    return Cohort(train_images, train_masks, validation_images, validation_masks, split.to_dict())


def _provenance(config: TrainConfig, cohort: Cohort, steps: int, seconds: float, best: dict) -> dict:
    return {
        "data": str(Path(config.data_dir).resolve()),
        "subjects": cohort.subjects,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config": asdict(config),
        "steps": steps,
        "seconds": round(seconds, 1),
        "best_validation": best,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {"uad": uad.__version__, "torch": str(torch.__version__), "python": platform.python_version()},
        "hardware": f"{platform.machine()}, {os.cpu_count()} CPU cores, device {resolve_device(config.device)}",
    }


def train(config: TrainConfig) -> Path:
    """Train (or fit) ``config.model`` and write ``out_dir/model.pt`` + ``manifest.json``; returns the path."""
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(resolve_device(config.device))

    spec = get_spec(config.model)
    unknown = set(config.model_options) - {f.name for f in fields(spec.config_cls)}
    if unknown:
        known = ", ".join(f.name for f in fields(spec.config_cls))
        raise UserInputError(f"unknown option(s) {', '.join(sorted(unknown))} for {config.model}; known: {known}")
    preprocessing = PreprocessConfig()
    model = build_model(spec.config_cls.from_dict(config.model_options)).to(device)
    cohort = load_cohort(config, preprocessing)

    if not model.trainable:
        clock = time.time()
        model.fit(cohort.train_images, cohort.train_masks)
        steps, best, loop_seconds = 0, {}, time.time() - clock
    else:
        steps, best, loop_seconds = _train_loop(model, cohort, config, device, rng, out_dir)
        # The kept weights are the best-validated ones, in a model built from this run's config: options that
        # only change scoring (e.g. ssim_weight) can be re-chosen by re-running with the same out folder.
        best_state = torch.load(out_dir / "best.pt", map_location=device, weights_only=True)
        model.load_state_dict(best_state["state_dict"])

    model.eval()
    finishing = time.time()
    with tqdm(total=1.0, desc="healthy map statistics", file=sys.stderr, bar_format="{l_bar}{bar}") as bar:
        model.fit_map_statistics(cohort.train_images, cohort.train_masks, progress=lambda f: bar.update(f - bar.n))
    if model.trainable:  # the score configurations are compared by: the final map, on validation subjects
        best["auprc_final_map"] = round(validation_auprc(model, cohort.validation_images, cohort.validation_masks,
                                                         seed=config.seed), 4)
    post = PostprocessConfig(threshold=0.0)
    calibration = calibrate(model, cohort.validation_images, cohort.validation_masks, post, config.fpr)
    checkpoint = Checkpoint(model.cpu(), preprocessing, calibration,
                            _provenance(config, cohort, steps, loop_seconds + time.time() - finishing, best))
    path = out_dir / "model.pt"
    save_checkpoint(checkpoint, path)
    add_to_manifest(path, checkpoint)
    log.info("wrote %s (threshold %.4f)", path, calibration["threshold"])
    return path


def _train_loop(model: AnomalyModel, cohort: Cohort, config: TrainConfig, device: torch.device,
                rng: np.random.Generator, out_dir: Path) -> tuple[int, dict, float]:
    """Returns (steps done, best validation score and its step, wall seconds of the loop over all runs)."""
    images, masks = brain_slices_from_volumes(cohort.train_images, cohort.train_masks)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=config.steps,
                                                          eta_min=config.learning_rate / 50)
    step, best, seconds = 0, {"auprc": -1.0, "step": 0}, 0.0
    last_path = out_dir / "last.pt"
    if last_path.exists():
        state = torch.load(last_path, map_location=device, weights_only=True)
        model.load_state_dict(state["checkpoint"]["state_dict"])
        optimiser.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["scheduler"])
        step, best, seconds = int(state["step"]), dict(state["best"]), float(state["seconds"])
        rng.bit_generator.state = json.loads(state["numpy_rng"])
        torch.set_rng_state(state["torch_rng"])
        log.info("resuming from step %d", step)
    if step >= config.steps:
        return step, best, seconds
    started = time.time() - seconds  # wall time of the loop, summed over resumed runs

    def save_state(path: Path) -> None:
        state = {
            "checkpoint": Checkpoint(model, PreprocessConfig()).to_dict(),
            "optimizer": optimiser.state_dict(),
            "scheduler": schedule.state_dict(),
            "step": step,
            "best": best,
            "seconds": time.time() - started,
            "numpy_rng": json.dumps(rng.bit_generator.state),
            "torch_rng": torch.get_rng_state(),
        }
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    model.train()
    bar = tqdm(total=config.steps, initial=step, desc=f"training {config.model}", file=sys.stderr)
    try:
        while step < config.steps:
            index = rng.integers(0, len(images), config.batch_size)
            x, m = _augment(images[index], masks[index], rng)
            output = model.loss(torch.from_numpy(x).to(device), torch.from_numpy(m).to(device))
            optimiser.zero_grad(set_to_none=True)
            output.total.backward()
            optimiser.step()
            schedule.step()
            step += 1
            bar.update(1)
            bar.set_postfix({k: f"{v:.4f}" for k, v in output.terms.items()})
            if step % config.validate_every == 0 or step == config.steps:
                model.eval()
                score = validation_auprc(model, cohort.validation_images, cohort.validation_masks, seed=config.seed)
                model.train()
                log.info("step %d: validation AUPRC %.4f", step, score)
                if score > best["auprc"]:
                    best = {"auprc": round(score, 4), "step": step}
                    torch.save(Checkpoint(model, PreprocessConfig()).to_dict(), out_dir / "best.pt")
            if step % config.checkpoint_every == 0 or step == config.steps:
                save_state(last_path)
    finally:
        bar.close()
    return step, best, time.time() - started


def brain_slices_from_volumes(volumes: np.ndarray, masks: np.ndarray, min_brain_fraction: float = 0.05):
    """(N, X, Y, Z) volumes -> (M, 1, X, Y) axial slices that contain brain."""
    slices = np.moveaxis(volumes, 3, 1).reshape(-1, 1, *volumes.shape[1:3])
    slice_masks = np.moveaxis(masks, 3, 1).reshape(-1, 1, *masks.shape[1:3])
    keep = slice_masks.mean(axis=(1, 2, 3)) >= min_brain_fraction
    return np.ascontiguousarray(slices[keep], np.float32), np.ascontiguousarray(slice_masks[keep], np.float32)


def _augment(images: np.ndarray, masks: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Left-right flips and a global intensity scale: what differs between healthy scans and sites."""
    images, masks = images.copy(), masks.copy()
    flip = rng.random(len(images)) < 0.5
    images[flip] = images[flip, :, ::-1]
    masks[flip] = masks[flip, :, ::-1]
    images *= rng.uniform(0.9, 1.1, size=(len(images), 1, 1, 1)).astype(np.float32)
    return images * masks, masks

