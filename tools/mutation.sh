#!/usr/bin/env bash
# Mutation score (mutmut) of the modules where a one-line bug changes a user's result; see Testing/MUTATION.md.
#
#   pip install -e "./UADExtensionLib[test,mutation]"
#   tools/mutation.sh                      # every module below, one after the other
#   tools/mutation.sh postprocessing cli   # only these
#
# Each module runs in its own folder under .mutation/<module> (a copy of the package as src/uad and of Testing/),
# with only that module mutated and only its fast tests run per mutant (mutmut runs, for each mutant, the tests
# that executed the mutated function). Results: .mutation/<module>/results.txt; survivors' diffs with
# `cd .mutation/<module> && mutmut show NAME`. Runs at low priority on one core (MUTATION_CHILDREN to change).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
# The project's environment when there is one (README: .venv), else whatever python is on the PATH.
python=${PYTHON:-$( [ -x "$root/.venv/bin/python" ] && echo "$root/.venv/bin/python" || command -v python3 )}

# module -> the fast tests that exercise it (no registration, no full detect run)
declare -A TESTS=(
  [postprocessing]="Testing/test_postprocessing.py --deselect=Testing/test_postprocessing.py::test_segment_filtered_is_fast_on_a_sparse_256_cubed_map"
  [calibration]="Testing/test_calibration.py"
  [checkpoint]="Testing/test_checkpoint.py Testing/test_inference.py::test_each_mask_size_gets_its_own_calibrated_threshold Testing/test_inference.py::test_iterative_mask_mode_uses_its_own_threshold_and_sliding_keeps_the_old_keys"
  [devices]="Testing/test_devices.py"
  [inference]="Testing/test_inference_geometry.py Testing/test_inference.py::test_superior_axis Testing/test_inference.py::test_unsupported_mask_size_is_a_user_error"
  [cli]="Testing/test_cli_options.py"
)
# Functions of a module that the score covers (a glob on mutmut's mutant names); empty = the whole module.
# inference: its geometry and slice scores; the detect pipeline around them is covered by the end-to-end tests.
# cli: option handling; the handlers that run detect/train/evaluate are covered by the end-to-end tests.
# calibration: recalibrate_checkpoint registers real scans (test_training.py runs it through `uad calibrate`).
declare -A FUNCTIONS=(
  [calibration]="filtered_map calibrate calibrate_model validation_auprc"
  [inference]="superior_axis _scores x_resolve_checkpoint_path xǁDetectOptionsǁ__post_init__"
  [cli]="build_parser _postprocess_flags xǁ_Parserǁerror main _cmd_models _default_train_threads"
)
modules=("$@")
[ ${#modules[@]} -eq 0 ] && modules=(postprocessing calibration checkpoint devices inference cli)

for module in "${modules[@]}"; do
  work="$root/.mutation/$module"
  rm -rf "$work" && mkdir -p "$work/src"
  cp -r UADExtensionLib/uad "$work/src/" && cp -r Testing UADExtension pytest.ini "$work/"
  find "$work" -name __pycache__ -prune -exec rm -rf {} +
  cat > "$work/setup.cfg" <<EOF
[mutmut]
source_paths = src/uad
only_mutate = src/uad/$module.py
also_copy =
    Testing
    UADExtension
    pytest.ini
pytest_add_cli_args_test_selection =
$(for t in ${TESTS[$module]}; do echo "    $t"; done)
pytest_add_cli_args = -p no:cacheprovider
EOF
  names=()
  for f in ${FUNCTIONS[$module]:-}; do
    case "$f" in x*) names+=("uad.$module.${f}__mutmut_*") ;; *) names+=("uad.$module.x_${f}__mutmut_*") ;; esac
  done
  started=$(date +%s)
  (cd "$work" && nice -n 10 "$python" -m mutmut run --max-children "${MUTATION_CHILDREN:-1}" "${names[@]}" > run.log 2>&1) || true
  (cd "$work" && "$python" -m mutmut results --all true > results.txt 2>&1) || true
  seconds=$(( $(date +%s) - started ))
  killed=$(grep -c ": killed" "$work/results.txt" || true)
  total=$(grep -c ": " "$work/results.txt" || true)
  echo "$module: $killed of $total mutants killed in ${seconds} s (details: .mutation/$module/results.txt)"
done
