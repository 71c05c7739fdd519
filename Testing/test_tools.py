"""The choosing tools' own logic (tools/): which weightings a grid holds, and the paired score over subjects."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
_itk_threads = os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")

from choose_fusion_weights import periventricular_white_matter, weightings  # noqa: E402
from compare_fusion_weights import score  # noqa: E402
from compare_fusion_weights import scored_cases as fused_and_scored  # noqa: E402

# The chooser pins registration to one thread for itself; the rest of the suite keeps its own setting.
if _itk_threads is None:
    os.environ.pop("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", None)


KINDS = ("synthetic", "stroke", "small stroke", "many small", "ms-like")  # the validation's kinds of lesion case


def grid(**values) -> SimpleNamespace:
    return SimpleNamespace(**({"grid": [], "anchors": [], "anchor_grid": []} | values))


def test_a_grid_without_anchors_holds_only_its_single_weights():
    found = weightings(grid(grid=[1.0, 0.5]))
    assert [label for label, _ in found] == ["1.00", "0.50"]
    assert all(np.isfinite(weighting["weights"]).all() for _, weighting in found)


def test_anchor_grids_give_every_combination_with_finite_weights():
    found = weightings(grid(grid=[0.5], anchors=[0.2, 0.8], anchor_grid=["0.6,0.7", "1.0"]))
    assert [label for label, _ in found] == ["0.50", "0.60@0.2 1.00@0.8", "0.70@0.2 1.00@0.8"]
    assert found[1][1]["anchor_weights"] == ((0.6, 0.4), (1.0, 0.0))
    assert all(np.isfinite(weighting["weights"]).all() for _, weighting in found)


def scored_cases(subject_quality: dict[int, float]) -> list[tuple]:
    """One case of each kind per subject, (kind, subject, Dice, scores, labels): a subject's quality is its Dice and
    how far its lesion voxels score above the rest."""
    rng = np.random.default_rng(0)
    cases = []
    for subject, quality in subject_quality.items():
        labels = np.zeros(200, bool)
        labels[:20] = True
        for kind in KINDS:
            scores = rng.normal(size=200) + quality * labels
            cases.append((kind, subject, quality / 4, scores, labels))
    return cases


def test_score_follows_the_subjects_drawn():
    cases = scored_cases({0: 0.5, 1: 3.0})
    weak, strong, both = score(cases, [0]), score(cases, [1]), score(cases, [0, 1])
    assert weak < both < strong
    assert score(cases, [1, 1]) == pytest.approx(strong)  # a subject drawn twice pools twice the same voxels


def test_the_candidate_fuses_its_own_dae():
    """--candidate-dae: each case holds the bundled pair's maps and the candidate's; each side fuses its own pair."""
    rng = np.random.default_rng(0)
    shape, image, brain = (24, 24, 24), np.full((24, 24, 24), 0.8, np.float32), np.ones((24, 24, 24), bool)
    truth = np.zeros(shape, bool)
    truth[8:16, 8:16, 8:16] = True
    retrieval = rng.normal(size=shape).astype(np.float32)
    blind_dae, seeing_dae = rng.normal(size=shape).astype(np.float32), truth * 10.0  # at 0.8 the dae weighs 1
    cases = [("healthy", 0, [[retrieval, retrieval], [retrieval, retrieval]], None, brain, image)]
    cases += [(kind, 0, [[blind_dae, retrieval], [seeing_dae, retrieval]], truth, brain, image) for kind in KINDS]
    anchors, weights = (0.2, 0.5, 0.8), (0.7, 0.3, 1.0)
    incumbent = fused_and_scored(cases, anchors, weights, 0.01, members=0)
    candidate = fused_and_scored(cases, anchors, weights, 0.01, members=1)
    assert score(candidate, [0]) > 0.9 > 0.2 > score(incumbent, [0])


def test_ms_like_lesions_are_centred_around_the_ventricles_not_the_sulci():
    """The MS-like validation kind's centres: white matter within 10 mm of a deep CSF space; a sulcus (CSF near the
    brain's edge) is no ventricle."""
    shape = (60, 60, 60)
    brain = np.zeros(shape, bool)
    brain[5:55, 5:55, 5:55] = True
    wm, gm = brain.astype(np.float32), np.zeros(shape, np.float32)
    wm[28:32, 28:32, 28:32] = 0  # a ventricle in the middle
    wm[5:8, 20:24, 20:40] = 0  # a sulcus at the edge
    centres = periventricular_white_matter(wm, gm, brain, spacing_mm=2.0)
    index = np.argwhere(centres)
    nearest = np.clip(index, 28, 31)  # the ventricle voxel nearest to each centre
    assert centres.any() and np.all(np.linalg.norm(index - nearest, axis=1) * 2.0 <= 10.0)
    assert not centres[:14].any()  # nothing beside the sulcus, which lies 40 mm from the ventricle
    assert not centres[28:32, 28:32, 28:32].any()  # white matter only


def test_thin_csf_is_a_sheet_of_csf_not_a_cavity():
    from locate_false_positives import healthy_csf_frequency, thin_csf

    image, brain = np.ones((20, 20, 20), np.float32), np.ones((20, 20, 20), bool)
    image[2:18, 2:18, 5] = 0.1  # a 2-mm sheet, like a sulcus or a cistern
    image[8:14, 8:14, 10:16] = 0.1  # a 12-mm cavity
    thin = thin_csf(image, brain)
    assert thin[:, :, 5].sum() == 16 * 16
    assert not thin[8:14, 8:14, 10:16].any()

    other = image.copy()
    other[2:18, 2:18, 5] = 1.0  # the second brain has no sheet
    frequency = healthy_csf_frequency(np.stack([image, other]), np.stack([brain, brain]))
    assert frequency[10, 10, 5] == 0.5 and frequency[10, 10, 12] == 1.0 and frequency[0, 0, 0] == 0.0
