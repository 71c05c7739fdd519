"""Every registered model through the same cycle: build, one training step or fit, save, load, predict."""

import numpy as np
import pytest
import torch

from uad import catalog
from uad.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from uad.errors import UserInputError
from uad.models import build_model, get_spec, list_models
from uad.models.scoring import ssim_map
from uad.models.slicewise import SliceModel
from uad.preprocessing import PreprocessConfig

from .synthetic_brain import GRID, healthy_like


@pytest.mark.parametrize("name", list_models())
def test_model_cycle(name, tmp_path):
    torch.manual_seed(0)
    spec = get_spec(name)
    model = build_model(spec.config_cls())
    image, mask = healthy_like()
    if model.trainable:
        slices = torch.from_numpy(np.moveaxis(image, 2, 0)[30:34, None].copy())
        masks = torch.from_numpy(np.moveaxis(mask, 2, 0)[30:34, None].astype(np.float32).copy())
        before = [p.detach().clone() for p in model.parameters()]
        output = model.loss(slices, masks)
        output.total.backward()
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        assert torch.isfinite(output.total) and output.terms
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    else:
        model.fit(np.stack([healthy_like(s)[0] for s in range(3)]), np.stack([mask] * 3))
    model.eval()
    model.fit_map_statistics(np.stack([healthy_like(s)[0] for s in (1, 2)]), np.stack([mask] * 2))
    first = model.predict(image, mask)
    for array in (first.reconstruction, first.residual, first.anomaly_map):
        assert array.shape == GRID and array.dtype == np.float32 and np.isfinite(array).all()
        assert not array[~mask].any()  # nothing outside the brain

    path = tmp_path / "model.pt"
    sha = save_checkpoint(Checkpoint(model, PreprocessConfig(), {"threshold": 0.5}), path)
    loaded = load_checkpoint(path, expected_sha256=sha)
    assert loaded.name == name and loaded.threshold == 0.5 and loaded.preprocessing == PreprocessConfig()
    again = loaded.model.predict(image, mask)
    np.testing.assert_allclose(again.anomaly_map, first.anomaly_map, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in list_models() if issubclass(get_spec(n).model_cls, SliceModel)])
def test_slice_models_read_coronal_and_sagittal_slices_or_refuse_in_one_line(name):
    config = get_spec(name).config_cls(reading_directions=("axial", "coronal", "sagittal"),
                                       reading_weights=(1.0, 1.0, 1.0))
    if not get_spec(name).model_cls.reads_any_slice_shape:
        with pytest.raises(UserInputError, match="axial slices only"):
            build_model(config)
        with pytest.raises(UserInputError, match="axial slices only"):
            build_model(get_spec(name).config_cls(training_directions=("axial", "coronal")))
        return
    image, mask = healthy_like()
    anomaly_map = build_model(config).eval().predict(image, mask).anomaly_map
    assert anomaly_map.shape == GRID and np.isfinite(anomaly_map).all() and anomaly_map[mask].any()


def test_intensity_baseline_flags_what_differs_from_the_mean():
    model = build_model(get_spec("intensity").config_cls())
    volumes = np.stack([healthy_like(s)[0] for s in range(4)])
    image, mask = healthy_like(9)
    model.fit(volumes, np.stack([mask] * 4))
    lesion = image.copy()
    lesion[35:45, 40:50, 35:45] = 0.05
    prediction = model.predict(lesion, mask)
    inside = prediction.anomaly_map[35:45, 40:50, 35:45].mean()
    assert inside > 5 * np.median(prediction.anomaly_map[mask])


def test_healthy_map_statistics_turn_the_map_into_a_local_z_score():
    from uad.models.vqvae import VQVAEConfig

    model = build_model(VQVAEConfig(channels=(8, 16, 16))).eval()
    image, mask = healthy_like()
    raw = model.predict(image, mask).anomaly_map
    assert not model.map_statistics_fitted
    model.fit_map_statistics(np.stack([healthy_like(s)[0] for s in (1, 2, 3)]), np.stack([mask] * 3))
    normalised = model.predict(image, mask).anomaly_map
    assert model.map_statistics_fitted and normalised.min() == 0 and not np.allclose(raw, normalised)
    # states saved before fitting (mid-training) still load
    fresh = build_model(VQVAEConfig(channels=(8, 16, 16)))
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("map_")})
    assert not fresh.map_statistics_fitted


@pytest.mark.parametrize("per_scan", [True, False])
def test_per_scan_standardisation_removes_a_whole_brain_shift(per_scan):
    """Another site raising the error everywhere (here: by one healthy SD at every voxel) changes nothing per scan."""
    from uad.models.vqvae import VQVAEConfig

    model = build_model(VQVAEConfig(channels=(8, 16, 16), per_scan_standardise=per_scan)).eval()
    image, mask = healthy_like()
    model.fit_map_statistics(np.stack([healthy_like(s)[0] for s in (1, 2, 3)]), np.stack([mask] * 3))
    before = model.predict(image, mask).anomaly_map
    model.map_mean -= model.map_std
    after = model.predict(image, mask).anomaly_map
    assert np.allclose(before, after, atol=1e-3) == per_scan


def test_ssim_map_is_one_for_identical_images_and_drops_for_flattened_texture():
    x = torch.rand(2, 1, 32, 32)
    assert torch.allclose(ssim_map(x, x), torch.ones_like(x), atol=1e-4)
    flat = torch.full_like(x, float(x.mean()))
    assert ssim_map(x, flat).mean() < 0.2


@pytest.mark.parametrize("info", catalog.list_models(), ids=lambda info: info.name)
def test_bundled_description_is_the_models_own(info):
    # The manifest copies the description when a model is bundled; `uad models`, the Slicer selector and the model
    # cards read the copy, so an edited class description must not leave the bundle saying the old one.
    assert info.description == get_spec(info.name).model_cls.description
