"""Healthy cohorts: finding subjects in a folder, splitting them, and caching them on the working grid.

Preprocessing a scan takes seconds (N4 + registration), training reads each slice hundreds of times, so every
subject is preprocessed once into ``<cache>/<config-hash>/<subject>.npz`` (float16 image + brain mask) and
training streams 2D slices from memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from uad.errors import UserInputError
from uad.io import NIFTI_SUFFIXES, load_volume
from uad.preprocessing import PreprocessConfig, preprocess

log = logging.getLogger(__name__)

MASK_SUFFIXES = ("_brainmask", "_mask", "_brain_mask")


@dataclass(frozen=True)
class Subject:
    subject_id: str
    image_path: Path
    mask_path: Path | None


@dataclass(frozen=True)
class Split:
    train: tuple[str, ...]
    validation: tuple[str, ...]
    test: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"train": list(self.train), "validation": list(self.validation), "test": list(self.test)}


def _strip_nifti(name: str) -> str:
    for suffix in NIFTI_SUFFIXES[::-1]:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def find_subjects(folder: str | os.PathLike) -> list[Subject]:
    """Every NIfTI in ``folder`` that is not a mask, with ``<id>_brainmask.nii.gz`` beside it when present.

    ``IXI012-HH-1211_T1.nii.gz`` + ``IXI012-HH-1211_brainmask.nii.gz`` give subject ``IXI012-HH-1211``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserInputError(f"data folder not found: {folder}; give a folder of healthy .nii.gz volumes")
    files = sorted(p for p in folder.iterdir() if p.name.endswith(NIFTI_SUFFIXES))
    masks = {_strip_nifti(p.name): p for p in files if any(_strip_nifti(p.name).endswith(s) for s in MASK_SUFFIXES)}
    subjects = []
    for path in files:
        stem = _strip_nifti(path.name)
        if stem in masks:
            continue
        subject_id = stem[: -len("_T1")] if stem.endswith("_T1") else stem
        mask = next((masks[c] for c in (subject_id + s for s in MASK_SUFFIXES) if c in masks), None)
        mask = mask or next((masks[c] for c in (stem + s for s in MASK_SUFFIXES) if c in masks), None)
        subjects.append(Subject(subject_id, path, mask))
    if not subjects:
        raise UserInputError(f"no .nii/.nii.gz volumes in {folder}; give a folder of healthy scans")
    return subjects


def split_subjects(subject_ids: list[str], seed: int = 0, validation_fraction: float = 0.1,
                   test_fraction: float = 0.2) -> Split:
    """A reproducible subject-level split; the same ids and seed always give the same split."""
    ids = sorted(subject_ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    n_test = int(round(test_fraction * len(ids)))
    n_val = max(1, int(round(validation_fraction * len(ids)))) if len(ids) > 2 else 0
    test = tuple(sorted(ids[i] for i in order[:n_test]))
    validation = tuple(sorted(ids[i] for i in order[n_test:n_test + n_val]))
    train = tuple(sorted(ids[i] for i in order[n_test + n_val:]))
    return Split(train, validation, test)


def config_key(config: PreprocessConfig) -> str:
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def _prepare_one(subject: Subject, config: PreprocessConfig, target: Path, skull_stripped: bool) -> Path:
    if target.exists():
        return target
    volume = load_volume(subject.image_path)
    mask = load_volume(subject.mask_path, what="brain mask") if subject.mask_path else None
    prep = preprocess(volume, config, brain_mask=mask, skull_stripped=skull_stripped)
    try:
        tmp = target.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, image=prep.image.astype(np.float16), mask=prep.brain_mask.astype(np.uint8))
        os.replace(tmp, target)  # atomic: an interrupted run leaves no half-written cache entry
    finally:
        prep.close()
    return target


def prepare_cohort(subjects: list[Subject], config: PreprocessConfig, cache_dir: str | os.PathLike,
                   skull_stripped: bool = False, workers: int = 1, progress=None) -> dict[str, Path]:
    """Preprocess every subject once (cached); returns subject id -> cached .npz path.

    ``progress(n)`` is called as subjects become available (cached ones at once), e.g. ``tqdm.update``.
    """
    folder = Path(cache_dir) / config_key(config)
    folder.mkdir(parents=True, exist_ok=True)
    targets = {s.subject_id: folder / f"{s.subject_id}.npz" for s in subjects}
    todo = [s for s in subjects if not targets[s.subject_id].exists()]
    if progress and len(todo) < len(subjects):
        progress(len(subjects) - len(todo))  # already cached
    if todo and workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            futures = [pool.submit(_prepare_one, s, config, targets[s.subject_id], skull_stripped) for s in todo]
            for future in futures:
                future.result()
                if progress:
                    progress(1)
    else:
        for subject in todo:
            _prepare_one(subject, config, targets[subject.subject_id], skull_stripped)
            if progress:
                progress(1)
    return targets


def load_cached(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as arrays:
        return arrays["image"].astype(np.float32), arrays["mask"].astype(bool)

