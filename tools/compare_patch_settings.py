"""How patch-retrieval's search was chosen: three settings on VALIDATION subjects (never test, never lesions).

    python tools/compare_patch_settings.py > Resources/patch-settings-validation.txt

Six validation subjects, one synthetic anomaly each (box or ellipsoid, 20-30 mm), the raw residual + structural map
(no healthy statistics: the same for every setting), 5 mm median filter, pooled AUROC / AUPRC, seconds per volume
on the 2-core machine. 105 stored scans here; the bundle stores 50 to stay under 20 MB.
"""

import time
from pathlib import Path

import numpy as np
import torch

from uad.data import config_key, find_subjects, load_cached, split_subjects
from uad.metrics import auprc, auroc
from uad.models import build_model, get_spec
from uad.postprocessing import median_filter
from uad.preprocessing import PreprocessConfig
from uad.synthetic import add_synthetic_anomaly

SETTINGS = [dict(search_diagonals=True, neighbours=6), dict(search_diagonals=False, neighbours=6),
            dict(search_diagonals=False, neighbours=10, patch_size=5)]


def main(data: str = "../shared/data/healthy/ixi_t1") -> None:
    torch.set_num_threads(2)
    folder = Path.home() / ".cache" / "uad" / config_key(PreprocessConfig())
    split = split_subjects([s.subject_id for s in find_subjects(data)])
    volumes, masks = map(np.stack, zip(*[load_cached(folder / f"{i}.npz") for i in split.train]))
    validation = [load_cached(folder / f"{i}.npz") for i in split.validation[:6]]
    for setting in SETTINGS:
        model = build_model(get_spec("patch-retrieval").config_cls(max_subjects=105, **setting))
        model.fit(volumes, masks)
        rng, scores, labels, started = np.random.default_rng(5), [], [], time.time()
        for image, mask in validation:
            modified, truth = add_synthetic_anomaly(image, mask, rng)
            filtered = median_filter(model._raw_prediction(modified, mask).anomaly_map, mask, (2, 2, 2), 5.0)
            scores.append(filtered[mask])
            labels.append(truth[mask])
        scores, labels = np.concatenate(scores), np.concatenate(labels)
        print(setting, "auroc", round(auroc(scores, labels), 3), "auprc", round(auprc(scores, labels), 3),
              "s/vol", round((time.time() - started) / len(validation), 1), flush=True)


if __name__ == "__main__":
    main()
