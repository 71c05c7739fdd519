"""The tools' own logic (tools/): which weightings a grid holds, the paired score over subjects, model cards."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from uad.metrics import auprc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
_itk_threads = os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")

from choose_fusion_weights import periventricular_white_matter, weightings  # noqa: E402
from compare_fusion_weights import PooledCases, anchored_config, verdict  # noqa: E402
from compare_fusion_weights import scored_cases as fused_and_scored  # noqa: E402
from write_model_cards import _selection as checkpoint_selection  # noqa: E402

# The chooser pins registration to one thread for itself; the rest of the suite keeps its own setting.
if _itk_threads is None:
    os.environ.pop("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", None)


KINDS = ("synthetic", "stroke", "small stroke", "many small", "ms-like")  # the validation's kinds of lesion case


def grid(**values) -> SimpleNamespace:
    return SimpleNamespace(**({"members": ["dae", "patch-retrieval"], "splits": [], "grid": [], "anchors": [],
                                "anchor_grid": []} | values))


def test_a_grid_without_anchors_holds_only_its_single_weights():
    found = weightings(grid(grid=[1.0, 0.5]))
    assert [label for label, _ in found] == ["1.00", "0.50"]
    assert all(np.isfinite(weighting["weights"]).all() for _, weighting in found)


def test_anchor_grids_give_every_combination_with_finite_weights():
    found = weightings(grid(grid=[0.5], anchors=[0.2, 0.8], anchor_grid=["0.6,0.7", "1.0"]))
    assert [label for label, _ in found] == ["0.50", "0.60@0.2 1.00@0.8", "0.70@0.2 1.00@0.8"]
    assert found[1][1]["anchor_weights"] == ((0.6, 0.4), (1.0, 0.0))
    assert all(np.isfinite(weighting["weights"]).all() for _, weighting in found)


def test_three_members_share_what_the_first_leaves_by_each_split():
    found = weightings(grid(members=["dae", "patch-retrieval", "rae"], splits=["0.5,0.5", "0.75,0.25"],
                            anchors=[0.2, 0.8], anchor_grid=["0.6", "1.0"]))
    assert [label for label, _ in found] == ["0.60@0.2 1.00@0.8 rest 0.5,0.5", "0.60@0.2 1.00@0.8 rest 0.75,0.25"]
    assert found[0][1]["anchor_weights"] == ((0.6, 0.2, 0.2), (1.0, 0.0, 0.0))
    assert found[1][1]["anchor_weights"] == ((0.6, 0.3, 0.1), (1.0, 0.0, 0.0))
    assert found[0][1]["weights"] == (0.8, 0.1, 0.1)  # the anchors' mean, shared the same way


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
    pooled = PooledCases(scored_cases({0: 0.5, 1: 3.0}))
    weak, strong, both = pooled.score([0]), pooled.score([1]), pooled.score([0, 1])
    assert weak < both < strong
    assert pooled.score([1, 1]) == pytest.approx(strong)  # a subject drawn twice pools twice the same voxels


def test_a_draw_scores_as_its_subjects_cases_repeated():
    """The weighted pooling gives exactly the AUPRC and mean Dice of the drawn subjects' cases, repeats included,
    with tied scores across subjects."""
    rng = np.random.default_rng(1)
    cases = []
    for subject in range(4):
        labels = rng.random(300) < 0.1
        scores = np.round(rng.normal(size=300) + labels, 1)  # rounded: many ties
        cases += [(kind, subject, rng.random(), scores + index, labels) for index, kind in enumerate(KINDS[:2])]
    drawn = [2, 0, 2, 3]
    expected = {}
    for kind in KINDS[:2]:
        chosen = [case for subject in drawn for case in cases if case[1] == subject and case[0] == kind]
        scores, labels = (np.concatenate([c[field] for c in chosen]) for field in (3, 4))
        expected[f"auprc {kind}"] = auprc(scores, labels)
        expected[f"dice {kind}"] = float(np.mean([c[2] for c in chosen]))
    assert PooledCases(cases).kind_scores(drawn) == pytest.approx(expected, abs=1e-12)


def test_a_candidate_that_trades_one_kind_of_lesion_for_another_is_not_taken():
    assert verdict(0.002, {"auprc stroke": -0.005, "dice ms-like": 0.1}) == "replace the incumbent"
    assert verdict(-0.001, {"dice ms-like": 0.1}) == "keep the incumbent"
    kept = verdict(0.002, {"auprc stroke": -0.03, "dice ms-like": 0.1})
    assert kept.startswith("keep the incumbent") and "auprc stroke" in kept and "ms-like" not in kept


def test_each_side_fuses_its_own_members():
    """--candidate-members: each case holds the incumbent's maps and the candidate's; each side fuses its own."""
    rng = np.random.default_rng(0)
    shape, image, brain = (24, 24, 24), np.full((24, 24, 24), 0.8, np.float32), np.ones((24, 24, 24), bool)
    truth = np.zeros(shape, bool)
    truth[8:16, 8:16, 8:16] = True
    retrieval = rng.normal(size=shape).astype(np.float32)
    blind, seeing = rng.normal(size=shape).astype(np.float32), truth * 10.0
    cases = [("healthy", 0, [[retrieval, retrieval], [retrieval, retrieval, retrieval]], None, brain, image)]
    cases += [(kind, 0, [[blind, retrieval], [blind, retrieval, seeing]], truth, brain, image) for kind in KINDS]
    anchors = (0.2, 0.5, 0.8)
    incumbent = fused_and_scored(cases, anchored_config(["dae", "patch-retrieval"], anchors, [0.7, 0.3, 0.0], None),
                                 0.01, side=0)
    # At 0.8 the first member weighs 0 and the third member, which sees the lesion, takes 0.9 of the rest.
    three = anchored_config(["dae", "patch-retrieval", "rae"], anchors, [0.7, 0.3, 0.0], "0.1,0.9")
    assert three.anchor_weights[2] == (0.0, 0.1, 0.9)
    candidate = fused_and_scored(cases, three, 0.01, side=1)
    assert PooledCases(candidate).score([0]) > 0.9 > 0.2 > PooledCases(incumbent).score([0])


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


def test_a_model_card_names_the_score_its_checkpoint_was_chosen_by():
    pixel = checkpoint_selection({"auprc": 0.29, "step": 1500, "curve": [[500, 0.2], [1500, 0.29]]})
    slices = checkpoint_selection({"slice_auroc": 0.83, "step": 1000, "curve": [[500, 0.8], [1000, 0.83]]})
    assert "validation AUPRC of the raw map (0.29" in pixel and "validation AUPRC by step: 500: 0.200" in pixel
    assert "validation slice AUROC of its classifier (0.83" in slices and "AUPRC" not in slices
    assert "validation slice AUROC by step: 500: 0.800, 1000: 0.830" in slices
