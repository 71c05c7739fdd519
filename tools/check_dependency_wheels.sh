#!/usr/bin/env bash
# Does every package the extension installs into Slicer's Python have a wheel for every platform the README
# promises, at the Python of the oldest supported Slicer (5.10: Python 3.12)? Slicer installs with pip and no
# compiler, so a package without a wheel there cannot be installed. torch is not checked: the PyTorch extension
# picks its build.
#
# Needs PyPI (it downloads one wheel per package and platform, about 300 MB in all, into a temporary folder), so
# it is not part of CI; run it before a release or after changing UADExtension/Resources/requirements.txt:
#   tools/check_dependency_wheels.sh [python-version]
set -uo pipefail
cd "$(dirname "$0")/.."
python_version="${1:-3.12}"
# One entry per platform; commas separate the wheel tags that platform accepts (pip does not widen manylinux).
platforms=(manylinux_2_28_x86_64,manylinux_2_17_x86_64,manylinux2014_x86_64 win_amd64 macosx_13_0_x86_64
           macosx_14_0_arm64)
requirements=$(grep -v '^\s*#' UADExtension/Resources/requirements.txt | grep -v '^\s*$')
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
failed=0
for platform in "${platforms[@]}"; do
  for requirement in $requirements; do
    tags=()
    for tag in ${platform//,/ }; do tags+=(--platform "$tag"); done
    if found=$(pip download --quiet --no-deps --only-binary=:all: "${tags[@]}" \
        --python-version "$python_version" --dest "$scratch" "$requirement" 2>&1); then
      echo "ok       ${platform%%,*}  py$python_version  $requirement"
    else
      echo "MISSING  ${platform%%,*}  py$python_version  $requirement: $(echo "$found" | grep -m1 'ERROR' )"
      failed=1
    fi
  done
done
exit $failed
