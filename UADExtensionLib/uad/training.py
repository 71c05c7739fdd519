"""The one training loop: healthy slices in, a calibrated, self-describing checkpoint out.

Reproducible from one command and a seed; resumable (``last.pt`` every ``checkpoint_every`` steps holds the
model, optimiser, step and random states); the checkpoint kept is the one with the best anomaly metric on
the validation subjects (synthetic anomalies), not the lowest reconstruction loss — a model that copies its
input reconstructs perfectly and detects nothing.

The same command runs data-parallel under PyTorch's launcher, ``torchrun --nproc_per_node N -m uad train ...``
(one process per GPU, or per CPU socket with gloo): each process draws its own share of every batch
(``batch_size / N``, so the global batch and the learning rate stay those of a single-process run), DDP averages
the gradients, and process 0 alone validates, writes checkpoints, fits the map statistics and calibrates.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import uad
from uad.bundle import add_to_manifest
from uad.calibration import VALIDATION_SCORE_NAMES, VALIDATION_SCORES, calibrate_model, validation_auprc
from uad.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from uad.data import find_subjects, load_cached, prepare_cohort, split_subjects
from uad.devices import resolve_device
from uad.errors import UserInputError
from uad.models import AnomalyModel, build_model, get_spec
from uad.models.slicewise import MAP_STATISTICS
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
    median_mm: float = 5.0  # the median filter stored with that threshold (it is measured on the filtered map)
    init_from: str = ""  # a checkpoint whose matching weights start this model (two-stage models)
    # Contrast augmentation: each training slice raised to a power drawn log-uniformly in this range (1, 1: off).
    # Another site's T1 differs in its tissue contrast, not only in a global scale; see _augment.
    gamma_range: tuple[float, float] = (1.0, 1.0)


# Process 0 alone validates, fits the map statistics and calibrates while the others wait in a collective; that
# can take long on a big cohort. A failed process does not leave the others waiting: torchrun stops them all.
PROCESS_GROUP_TIMEOUT = timedelta(hours=24)


@dataclass(frozen=True)
class Distributed:
    """This process's place in a ``torchrun`` job, read from the variables torchrun sets; world size 1 = alone."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    backend: str = ""

    @classmethod
    def from_environment(cls) -> Distributed:
        try:
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
            if world_size <= 1:
                return cls()
            return cls(rank=int(os.environ["RANK"]), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                       world_size=world_size,
                       local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size))))
        except (KeyError, ValueError) as exc:
            raise UserInputError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} is set but RANK/LOCAL_RANK are missing "
                                 f"or not numbers ({exc}); launch distributed training with torchrun") from exc

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(device_ids=[self.local_rank]) if self.backend == "nccl" else dist.barrier()

    def gather(self, value) -> list:
        """Every process's ``value`` (any picklable object), in rank order, on every process."""
        if not self.enabled:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values


@dataclass
class Cohort:
    """Preprocessed training and validation volumes, (N, X, Y, Z), with the split they came from."""

    train_images: np.ndarray
    train_masks: np.ndarray
    validation_images: np.ndarray
    validation_masks: np.ndarray
    subjects: dict


def load_cohort(config: TrainConfig, preprocessing: PreprocessConfig, ddp: Distributed | None = None) -> Cohort:
    """Under torchrun every process preprocesses its share of the scans into the cache, then all read them all."""
    ddp = ddp or Distributed()
    subjects = find_subjects(config.data_dir)
    split = split_subjects([s.subject_id for s in subjects], seed=config.split_seed)
    wanted = set(split.train) | set(split.validation)  # test subjects are never even preprocessed here
    chosen = [s for s in subjects if s.subject_id in wanted]
    mine = chosen[ddp.rank::ddp.world_size]
    desc = f"preprocessing cohort (this process's share of {len(chosen)})" if ddp.enabled else "preprocessing cohort"
    with tqdm(total=len(mine), desc=desc, unit="scan", file=sys.stderr, disable=not ddp.is_main) as bar:
        cached = prepare_cohort(mine, preprocessing, config.cache_dir, skull_stripped=config.skull_stripped,
                                progress=bar.update)
    if ddp.enabled:
        ddp.barrier()
        if ddp.local_rank == 0:  # a no-op on a shared cache; else this node's cache lacks the other nodes' shares
            prepare_cohort(chosen, preprocessing, config.cache_dir, skull_stripped=config.skull_stripped)
        ddp.barrier()
        cached = prepare_cohort(chosen, preprocessing, config.cache_dir, skull_stripped=config.skull_stripped)

    def stack(ids):
        pairs = [load_cached(cached[i]) for i in ids]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    train_images, train_masks = stack(split.train)
    validation_images, validation_masks = stack(split.validation)
    return Cohort(train_images, train_masks, validation_images, validation_masks, split.to_dict())


def _command(ddp: Distributed) -> str:
    program = Path(sys.argv[0]).name
    program = "uad" if program == "__main__.py" else program  # python -m uad, as torchrun -m uad runs it
    if ddp.enabled:
        nodes = ddp.world_size // max(ddp.local_world_size, 1)
        launcher = ["torchrun", *(["--nnodes", str(nodes)] if nodes > 1 else []),
                    "--nproc_per_node", str(ddp.local_world_size), *(["-m"] if program == "uad" else [])]
        return " ".join([*launcher, program, *sys.argv[1:]])
    return " ".join([program, *sys.argv[1:]])


def _provenance(config: TrainConfig, cohort: Cohort, steps: int, seconds: float, best: dict,
                ddp: Distributed | None = None) -> dict:
    ddp = ddp or Distributed()
    processes = f", {ddp.world_size} processes" if ddp.enabled else ""
    return {
        "data": str(Path(config.data_dir).resolve()),
        "subjects": cohort.subjects,
        "command": _command(ddp),
        "config": asdict(config),
        "world_size": ddp.world_size,  # processes of a torchrun job; config.batch_size is the global batch
        "steps": steps,
        "seconds": round(seconds, 1),
        "best_validation": best,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {"uad": uad.__version__, "torch": str(torch.__version__), "python": platform.python_version()},
        "hardware": f"{platform.machine()}, {os.cpu_count()} CPU cores, device {resolve_device(config.device)}"
                    f"{processes}",
    }


def train(config: TrainConfig) -> Path:
    """Train (or fit) ``config.model`` and write ``out_dir/model.pt`` + ``manifest.json``; returns the path.

    Launched by ``torchrun`` (WORLD_SIZE > 1 in the environment), every process runs this: ``config.batch_size``
    is then the global batch, split evenly over the processes; only process 0 writes anything, and the others
    return (the same path) once it has written model.pt.
    """
    ddp = Distributed.from_environment()
    if config.batch_size % ddp.world_size:
        raise UserInputError(f"--batch-size {config.batch_size} is the global batch and must split evenly over the "
                             f"{ddp.world_size} processes; give a multiple of {ddp.world_size}")
    low, high = config.gamma_range
    if not 0 < low <= high:
        raise UserInputError(f"--gamma-range {low:g} {high:g} must be two positive powers, the lower first; "
                             "e.g. --gamma-range 0.7 1.4 (1 1: no contrast augmentation)")
    spec = get_spec(config.model)
    unknown = set(config.model_options) - {f.name for f in fields(spec.config_cls)}
    if unknown:
        known = ", ".join(f.name for f in fields(spec.config_cls))
        raise UserInputError(f"unknown option(s) {', '.join(sorted(unknown))} for {config.model}; known: {known}")
    device = torch.device(resolve_device(config.device))
    if ddp.enabled:
        ddp = _start_process_group(ddp, device)
        device = torch.device("cuda", ddp.local_rank) if device.type == "cuda" else device
    try:
        path = _train(config, spec, device, ddp)
        ddp.barrier()  # the other processes wait here until process 0 has written model.pt
    finally:
        if ddp.enabled:
            dist.destroy_process_group()
    return path


def _start_process_group(ddp: Distributed, device: torch.device) -> Distributed:
    """NCCL between GPUs (one per process, by local rank), gloo between CPU processes."""
    if device.type == "cuda":
        if ddp.local_rank >= torch.cuda.device_count():
            raise UserInputError(f"process {ddp.local_rank} of this node has no GPU of its own "
                                 f"({torch.cuda.device_count()} visible); start at most that many per node "
                                 "(torchrun --nproc_per_node)")
        torch.cuda.set_device(ddp.local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=PROCESS_GROUP_TIMEOUT)
    log.info("process %d of %d (%s)", ddp.rank, ddp.world_size, backend)
    return Distributed(ddp.rank, ddp.local_rank, ddp.world_size, ddp.local_world_size, backend)


def _train(config: TrainConfig, spec, device: torch.device, ddp: Distributed) -> Path:
    post = PostprocessConfig(threshold=0.0, median_mm=config.median_mm)  # a bad value fails now, not after training
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)  # the same initial weights in every process (DDP also copies process 0's)
    rng = np.random.default_rng(config.seed + ddp.rank)  # but each process draws its own batches
    out_dir = Path(config.out_dir)
    path = out_dir / "model.pt"

    preprocessing = PreprocessConfig()
    model = build_model(spec.config_cls.from_dict(config.model_options))  # a bad option fails before --out exists
    base = _initialise_from(model, config.init_from) if config.init_from else None
    if model.trainable and config.steps <= 0 and (base or {}).get("model") != config.model:
        held = f" ({config.init_from} holds a {base['model']}: the rest would stay untrained)" if base else ""
        raise UserInputError(f"--steps {config.steps} trains nothing: give a positive number of steps, or --init-from "
                             f"a trained {config.model} to fit only its map statistics and threshold{held}")
    out_dir.mkdir(parents=True, exist_ok=True)
    if ddp.rank:
        torch.manual_seed(config.seed + ddp.rank)  # and its own random masks, noise, ... in the loss
    model = model.to(device)
    cohort = load_cohort(config, preprocessing, ddp)

    if not model.trainable:
        if not ddp.is_main:
            return path  # a closed-form fit has nothing to share out: process 0 does it
        clock = time.time()
        model.fit(cohort.train_images, cohort.train_masks)
        steps, best, loop_seconds = 0, {}, time.time() - clock
    elif config.steps <= 0:
        # The --init-from weights as they are, scored with this run's options (e.g. mirror_averaging): only the map
        # statistics and the threshold below are fitted again.
        if not ddp.is_main:
            return path
        steps, best, loop_seconds = 0, {}, 0.0
    else:
        steps, best, loop_seconds = _train_loop(model, cohort, config, device, rng, out_dir, ddp)
        if not ddp.is_main:
            return path
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
    calibration = calibrate_model(model, cohort.validation_images, cohort.validation_masks, post, config.fpr,
                                  preprocessing)
    provenance = _provenance(config, cohort, steps, loop_seconds + time.time() - finishing, best, ddp)
    if base:
        provenance["initialised_from"] = base
    checkpoint = Checkpoint(model.cpu(), preprocessing, calibration, provenance)
    save_checkpoint(checkpoint, path)
    add_to_manifest(path, checkpoint)
    log.info("wrote %s (threshold %.4f)", path, calibration["threshold"])
    return path


def _initialise_from(model: AnomalyModel, path: str) -> dict:
    """Copy the weights ``model`` shares with a trained checkpoint (first stage of a two-stage model).

    Returns what the provenance records: the base checkpoint's name, SHA-256, its own training command and
    checkpoint selection (a run of 0 steps keeps the base's weights: its validation curve is theirs).
    """
    base = load_checkpoint(Path(path))
    own = model.state_dict()
    copied = {k for k in own if model.keeps_stage_one_map or k not in MAP_STATISTICS}
    shared = {k: v for k, v in base.model.state_dict().items() if k in copied}
    mismatched = [k for k, v in shared.items() if v.shape != own[k].shape]
    if not shared or mismatched:
        raise UserInputError(f"{path} ({base.name}) does not fit a {model.config.name} model with these options "
                             f"({len(shared)} shared weights, {len(mismatched)} of other shapes); give the checkpoint "
                             "of its first stage trained with the same options")
    model.load_state_dict(shared, strict=False)
    record = {"model": base.name, "path": str(Path(path).resolve()), "sha256": base.sha256,
              "command": base.training.get("command", ""), "steps": base.training.get("steps", 0),
              "best_validation": base.training.get("best_validation") or {}}
    if not record["steps"] and "initialised_from" in base.training:
        # The base trained nothing either: keep where its weights came from, so the file still names their training.
        record["initialised_from"] = base.training["initialised_from"]
    return record


class _LossStep(nn.Module):
    """``model.loss`` as a module's forward, so DistributedDataParallel sees the training step go through it."""

    def __init__(self, model: AnomalyModel):
        super().__init__()
        self.model = model
        self.terms: dict[str, float] = {}

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        output = self.model.loss(images, masks)
        self.terms = output.terms
        return output.total


def _train_loop(model: AnomalyModel, cohort: Cohort, config: TrainConfig, device: torch.device,
                rng: np.random.Generator, out_dir: Path,
                ddp: Distributed | None = None) -> tuple[int, dict, float]:
    """Returns (steps done, best validation score and its step, wall seconds of the loop over all runs).

    Under torchrun every process runs this with its own ``rng``; each draws ``batch_size / world_size`` slices
    per step, and only process 0's return value means anything.
    """
    ddp = ddp or Distributed()
    batch_size = config.batch_size // ddp.world_size
    directions = model.config.training_directions
    slices = {d: model.training_slices(cohort.train_images, cohort.train_masks, d) for d in directions}
    validation_score = VALIDATION_SCORES[model.selection_score]
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=config.steps,
                                                          eta_min=config.learning_rate / 50)
    # best also keeps the whole validation curve (step, score), so a model card can show whether more would help
    step, best, seconds = 0, {model.selection_score: -1.0, "step": 0, "curve": []}, 0.0
    last_path = out_dir / "last.pt"
    if last_path.exists():
        state = torch.load(last_path, map_location=device, weights_only=True)
        model.load_state_dict(state["checkpoint"]["state_dict"])
        optimiser.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["scheduler"])
        step, best, seconds = int(state["step"]), {"curve": [], **state["best"]}, float(state["seconds"])
        _restore_random_states(state, rng, ddp, config.seed + step)
        log.info("resuming from step %d", step)
    steps = ddp.gather(step)
    if len(set(steps)) > 1:
        raise UserInputError(f"the processes found different last.pt files in {out_dir} (steps {steps}); --out must "
                             "be a folder every node sees, e.g. on a shared file system")
    if step >= config.steps:
        return step, best, seconds
    started = time.time() - seconds  # wall time of the loop, summed over resumed runs

    def save_state(path: Path) -> None:
        random_states = ddp.gather({"numpy_rng": json.dumps(rng.bit_generator.state),
                                    "torch_rng": torch.get_rng_state()})
        if not ddp.is_main:
            return
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
        if ddp.enabled:
            state["rank_rngs"] = random_states  # every process's, so a resumed job draws what it would have
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    loss_step = _LossStep(model)
    # Frozen first stages (requires_grad=False) are ignored by DDP; every trainable weight is used in every loss.
    forward = DistributedDataParallel(loss_step, device_ids=[device.index] if device.type == "cuda" else None) \
        if ddp.enabled else loss_step
    model.train()
    bar = tqdm(total=config.steps, initial=step, desc=f"training {config.model}", file=sys.stderr,
               disable=not ddp.is_main)
    try:
        while step < config.steps:
            # One direction per batch (its slices share a shape); no draw for one direction, so runs of the default
            # axial training repeat the batches they drew before this option existed.
            direction = directions[rng.integers(len(directions))] if len(directions) > 1 else directions[0]
            images, masks = slices[direction]
            index = rng.integers(0, len(images), batch_size)
            x, m = _augment(images[index], masks[index], rng, mirror=direction != "sagittal",
                            gamma_range=config.gamma_range)
            # Mixed precision on GPUs (bfloat16 keeps float32's range: no loss scaling); CPUs train in float32.
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                total = forward(torch.from_numpy(x).to(device), torch.from_numpy(m).to(device))
            optimiser.zero_grad(set_to_none=True)
            total.backward()  # under DDP: gradients averaged over the processes here
            optimiser.step()
            schedule.step()
            step += 1
            bar.update(1)
            bar.set_postfix({k: f"{v:.4f}" for k, v in loss_step.terms.items()})
            if ddp.is_main and (step % config.validate_every == 0 or step == config.steps):
                model.eval()
                score = validation_score(model, cohort.validation_images, cohort.validation_masks, seed=config.seed)
                model.train()
                log.info("step %d: validation %s %.4f", step, VALIDATION_SCORE_NAMES[model.selection_score], score)
                best["curve"] = [*best["curve"], [step, round(score, 4)]]
                if score > best[model.selection_score]:
                    best = {**best, model.selection_score: round(score, 4), "step": step}
                    torch.save(Checkpoint(model, PreprocessConfig()).to_dict(), out_dir / "best.pt")
            if step % config.checkpoint_every == 0 or step == config.steps:
                save_state(last_path)
    finally:
        bar.close()
    return step, best, time.time() - started


def _restore_random_states(state: dict, rng: np.random.Generator, ddp: Distributed, fallback_seed: int) -> None:
    """Process 0 (or a single process) continues its saved streams; the others theirs, if the job had as many."""
    if ddp.is_main:
        saved = {"numpy_rng": state["numpy_rng"], "torch_rng": state["torch_rng"]}
    elif len(state.get("rank_rngs", [])) == ddp.world_size:
        saved = state["rank_rngs"][ddp.rank]
    else:  # resumed with more processes than the job that wrote last.pt: fresh, distinct streams
        log.warning("last.pt holds no random state for process %d; it draws fresh batches", ddp.rank)
        rng.bit_generator.state = np.random.default_rng([fallback_seed, ddp.rank]).bit_generator.state
        torch.manual_seed(int(rng.integers(2**62)))
        return
    rng.bit_generator.state = json.loads(saved["numpy_rng"])
    torch.set_rng_state(saved["torch_rng"])


def _augment(images: np.ndarray, masks: np.ndarray, rng: np.random.Generator, mirror: bool = True,
             gamma_range: tuple[float, float] = (1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """Left-right flips (``mirror``: the slices' first axis is left-right, i.e. not sagittal ones), a global
    intensity scale and, with a ``gamma_range``, a power of the intensities that changes the contrast between CSF,
    grey and white matter: what differs between healthy scans and sites."""
    images, masks = images.copy(), masks.copy()
    flip = (rng.random(len(images)) < 0.5) & mirror  # drawn either way: the random stream does not depend on it
    images[flip] = images[flip, :, ::-1]
    masks[flip] = masks[flip, :, ::-1]
    if tuple(gamma_range) != (1.0, 1.0):  # no draw when off: runs without it repeat the batches they drew before
        low, high = np.log(gamma_range)
        gammas = np.exp(rng.uniform(low, high, size=(len(images), 1, 1, 1))).astype(np.float32)
        images = np.power(np.clip(images, 0, None), gammas)
    images *= rng.uniform(0.9, 1.1, size=(len(images), 1, 1, 1)).astype(np.float32)
    return images * masks, masks
