"""Move a preprocessed training cohort to a machine that has neither the raw scans nor antspyx (a GPU box).

``pack``: the cached working-grid volumes of the training and validation subjects (never the test split) into
one compact file: images quantised to 8 bits (1/170 of the brain's 99th percentile, far below scan noise),
masks bit-packed; about 25 MB for 120 subjects instead of 55 MB of float16.
``unpack``: the cache entries back (float16 image + mask, the layout ``uad.data`` reads) and, for every subject
id of the original folder, empty placeholder NIfTI names, so that ``uad train --data PLACEHOLDERS`` finds the
same subject list, draws the same split and reads every scan from the cache without preprocessing anything.

    python tools/cache_transfer.py pack ../shared/data/healthy/ixi_t1 ~/.cache/uad pack.npz
    python tools/cache_transfer.py unpack pack.npz PLACEHOLDER_DATA_DIR CACHE_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from uad.data import config_key, find_subjects, load_cached, split_subjects
from uad.preprocessing import PreprocessConfig

LEVELS = 170.0  # 8-bit steps per normalised unit (max_intensity 1.5 -> 255)


def pack(data_dir: str, cache_dir: str, out: str) -> None:
    subjects = find_subjects(data_dir)
    split = split_subjects([s.subject_id for s in subjects])
    folder = Path(cache_dir) / config_key(PreprocessConfig())
    arrays = {"all_ids": np.array([s.subject_id for s in subjects]),
              "file_names": np.array([s.image_path.name for s in subjects] +
                                     [s.mask_path.name for s in subjects if s.mask_path])}
    for subject_id in (*split.train, *split.validation):
        image, mask = load_cached(folder / f"{subject_id}.npz")
        arrays[f"image/{subject_id}"] = np.round(np.clip(image, 0, 255 / LEVELS) * LEVELS).astype(np.uint8)
        arrays[f"mask/{subject_id}"] = np.packbits(mask)
    arrays["shape"] = np.array(image.shape)
    np.savez_compressed(out, **arrays)


def unpack(packed: str, data_dir: str, cache_dir: str) -> None:
    folder = Path(cache_dir) / config_key(PreprocessConfig())
    folder.mkdir(parents=True, exist_ok=True)
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    with np.load(packed) as arrays:
        shape = tuple(arrays["shape"])
        for name in arrays["file_names"]:
            (Path(data_dir) / str(name)).touch()
        for key in arrays.files:
            if key.startswith("image/"):
                subject_id = key.split("/", 1)[1]
                image = (arrays[key].astype(np.float32) / LEVELS).astype(np.float16)
                mask = np.unpackbits(arrays[f"mask/{subject_id}"])[: int(np.prod(shape))].reshape(shape)
                # uncompressed: quick to write and read on the training machine
                np.savez(folder / f"{subject_id}.npz", image=image, mask=mask.astype(np.uint8))


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    {"pack": pack, "unpack": unpack}[command](*arguments)
