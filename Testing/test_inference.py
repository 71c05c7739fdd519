import numpy as np
import pytest

from uad.errors import UserInputError
from uad.inference import OUTPUT_FILES, DetectOptions, detect, superior_axis

from conftest import IXI_T1, oblique_affine


def test_python_api_detect(tmp_path):
    result = detect(IXI_T1, tmp_path / "out", DetectOptions(model="intensity", device="cpu"))
    assert sorted(p.name for p in result.out_dir.iterdir()) == sorted(OUTPUT_FILES)
    assert result.report["model"] == "intensity" and result.report["device"] == "cpu"


@pytest.mark.parametrize(
    "affine, expected",
    [
        (np.diag([1.0, 1.0, 1.0, 1.0]), (2, False)),  # RAS: k runs inferior -> superior
        (np.diag([1.0, 1.0, -1.0, 1.0]), (2, True)),  # k runs superior -> inferior
        (np.array([[0, 0, -2, 0], [2, 0, 0, 0], [0, 2, 0, 0], [0, 0, 0, 1.0]]), (1, False)),  # IXI's AIL layout
        (oblique_affine(angles_deg=(20.0, 0.0, 0.0)), (2, False)),  # tilted slab: still closest to k
    ],
)
def test_superior_axis(affine, expected):
    assert superior_axis(affine) == expected


def test_unsupported_mask_size_is_a_user_error():
    with pytest.raises(UserInputError, match="mask size 48"):
        DetectOptions(mask_size=48)
