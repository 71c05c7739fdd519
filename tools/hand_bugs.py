"""The thirteen one-line bugs of issue 13, each applied alone, with the tests that must now fail.

    python tools/hand_bugs.py            # all of them (about 10 min on 2 cores)
    python tools/hand_bugs.py 3 12       # only bugs 3 and 12

Each bug is an exact text replacement in one file; the file is restored afterwards (also on Ctrl-C). A bug is
"killed" when its tests fail with it applied; the script also checks that the same tests pass on the clean code.
Results are listed in Testing/MUTATION.md.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UAD = "UADExtensionLib/uad"
E2E = "Testing/test_end_to_end.py"

# (what a user gets, file, original text, buggy text, tests that must fail)
BUGS = [
    ("--threshold ignored", f"{UAD}/cli.py", "threshold=args.threshold,", "threshold=None,",
     [f"{E2E}::test_every_postprocessing_flag_takes_effect"]),
    ("threshold dropped inside Detector", f"{UAD}/inference.py", 'for key in ("threshold", "median_mm",',
     'for key in ("median_mm",', [f"{E2E}::test_every_postprocessing_flag_takes_effect"]),
    ("> became >= at the threshold", f"{UAD}/postprocessing.py", "(filtered_map > config.threshold)",
     "(filtered_map >= config.threshold)",
     ["Testing/test_postprocessing.py::test_threshold_flags_only_values_strictly_above_it"]),
    ("calibration on the un-eroded brain", f"{UAD}/calibration.py",
     "values.append(smoothed[erode_brain_mask(mask, spacing, post.brain_erosion_mm)])",
     "values.append(smoothed[mask.astype(bool)])", ["Testing/test_calibration.py"]),
    ("slice scores along voxel axis 0", f"{UAD}/inference.py", "axis, reversed_order = superior_axis(affine)",
     "axis, reversed_order = 0, superior_axis(affine)[1]",
     [f"{E2E}::test_slice_scores_peak_at_the_lesion_slice",
      f"{E2E}::test_slice_scores_are_the_99th_percentile_inside_the_eroded_brain"]),
    ("reversed scans not flipped back", f"{UAD}/inference.py", "    if reversed_order:\n", "    if False:\n",
     [f"{E2E}::test_slice_scores_peak_at_the_lesion_slice[superior-first]"]),
    ("slice-score region not eroded", f"{UAD}/inference.py",
     "scoring_region = erode_brain_mask(brain, spacing, self.postprocessing.brain_erosion_mm)",
     "scoring_region = brain", [f"{E2E}::test_slice_scores_are_the_99th_percentile_inside_the_eroded_brain[ixi]"]),
    ("--mask-size ignored (always 64)", f"{UAD}/inference.py", "mask_size_px(self.options.mask_size)",
     "mask_size_px(64)", [f"{E2E}::test_mask_size_has_its_own_threshold_and_its_own_map"]),
    ("--device cuda without a GPU accepted", f"{UAD}/devices.py",
     'if requested == "cuda" and not torch.cuda.is_available():', "if False:",
     [f"{E2E}::test_device_cuda_without_a_gpu_is_refused", "Testing/test_devices.py"]),
    ("the Atropos checkbox ignored", "UADExtension/UADExtension.py",
     'refine="atropos" if p.atroposRefinement else "none",', 'refine="none",',
     ["Testing/test_slicer_module_glue.py::test_the_panels_controls_become_the_backends_settings"]),
    ("SHA-256 check skipped", f"{UAD}/checkpoint.py", "if actual != expected_sha256:", "if False:",
     ["Testing/test_checkpoint.py::test_a_modified_file_fails_the_sha256_check"]),
    ("inverse transform not inverted", f"{UAD}/preprocessing.py", "whichtoinvert=[True] * len(self.transforms),",
     "whichtoinvert=[False] * len(self.transforms),",
     ["Testing/test_preprocessing.py::test_marker_lands_where_it_should_both_ways"]),
    ("erosion dropped in segmentation", f"{UAD}/postprocessing.py",
     "inside = _all_true_at(box_brain.ravel(), candidates, _flat_offsets(erosion, box_shape))",
     "inside = np.ones(candidates.size, bool)",
     ["Testing/test_postprocessing.py::test_erosion_removes_a_blob_at_the_brain_edge"]),
]


def run_tests(tests: list[str]) -> bool:
    """True when the tests pass."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True).returncode == 0


def main(selected: list[int]) -> int:
    survivors = []
    for number, (what, file, original, buggy, tests) in enumerate(BUGS, start=1):
        if selected and number not in selected:
            continue
        path = ROOT / file
        clean = path.read_text()
        if clean.count(original) != 1:
            print(f"{number:2d} {what}: the original text is no longer unique in {file}; update this script")
            survivors.append(number)
            continue
        try:
            path.write_text(clean.replace(original, buggy))
            killed = not run_tests(tests)
        finally:
            path.write_text(clean)
        passes_clean = run_tests(tests)
        verdict = f"{'killed' if killed else 'SURVIVED'}; clean code {'passes' if passes_clean else 'FAILS'}"
        print(f"{number:2d} {what}: {verdict}", flush=True)
        if not (killed and passes_clean):
            survivors.append(number)
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main([int(a) for a in sys.argv[1:]]))
