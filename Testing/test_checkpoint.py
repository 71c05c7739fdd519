import json

import pytest

from uad.bundle import add_to_manifest
from uad.catalog import list_models
from uad.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from uad.errors import UserInputError
from uad.models import build_model, get_spec
from uad.preprocessing import PreprocessConfig


@pytest.fixture
def saved(tmp_path):
    checkpoint = Checkpoint(build_model(get_spec("intensity").config_cls()), PreprocessConfig(), {"threshold": 3.0},
                            {"command": "uad train --model intensity", "subjects": {"train": ["a"]}})
    path = tmp_path / "model.pt"
    save_checkpoint(checkpoint, path)
    add_to_manifest(path, checkpoint)
    return path


def test_checkpoint_carries_everything_needed_to_reproduce(saved):
    loaded = load_checkpoint(saved)
    assert loaded.threshold == 3.0
    assert loaded.training["command"] == "uad train --model intensity"
    assert loaded.preprocessing.working_grid.shape == (80, 96, 80)
    [entry] = list_models(saved.parent / "manifest.json")
    assert entry.name == "intensity" and entry.sha256 == loaded.sha256 and entry.threshold == 3.0


def test_a_modified_file_fails_the_sha256_check(saved):
    listed = load_checkpoint(saved).sha256
    saved.write_bytes(saved.read_bytes() + b"tampered")
    from uad.checkpoint import file_sha256

    with pytest.raises(UserInputError) as error:
        load_checkpoint(saved)
    assert str(error.value) == (f"checkpoint model.pt fails its SHA-256 check (file {file_sha256(saved)[:12]}..., "
                                f"manifest {listed[:12]}...); the file is corrupt or was replaced: reinstall or "
                                "retrain it")


def test_an_unlisted_file_is_refused(saved):
    (saved.parent / "manifest.json").write_text(json.dumps({"default": None, "models": []}))
    with pytest.raises(UserInputError) as error:
        load_checkpoint(saved)
    assert str(error.value) == (f"checkpoint model.pt is not listed in {saved.parent / 'manifest.json'}; keep the "
                                "manifest.json that 'uad train' wrote beside it (it holds the SHA-256 every load "
                                "verifies)")


def test_pickled_code_cannot_run(tmp_path):
    import torch

    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pwned')",))

    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "x": Evil()}, path)
    from uad.checkpoint import file_sha256

    with pytest.raises(Exception, match="Weights only load failed|Unsupported"):
        load_checkpoint(path, expected_sha256=file_sha256(path))


def test_a_missing_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserInputError) as error:
        load_checkpoint(tmp_path / "nope.pt")
    assert str(error.value) == f"checkpoint not found: {tmp_path / 'nope.pt'}; check the path or run 'uad models'"


def test_an_unknown_format_version_is_refused(tmp_path):
    import torch

    from uad.checkpoint import file_sha256

    path = tmp_path / "future.pt"
    torch.save({"format_version": 99, "model": {"name": "intensity"}}, path)
    with pytest.raises(UserInputError) as error:
        load_checkpoint(path, expected_sha256=file_sha256(path))
    assert str(error.value) == "checkpoint format 99 is not supported by this uad version"


def test_an_explicit_sha256_is_checked_instead_of_the_manifest(saved):
    with pytest.raises(UserInputError, match="fails its SHA-256 check"):
        load_checkpoint(saved, expected_sha256="0" * 64)
    assert load_checkpoint(saved, expected_sha256=load_checkpoint(saved).sha256).threshold == 3.0


def test_calibrated_postprocessing_per_mask_size_only_for_masking_models(saved):
    loaded = load_checkpoint(saved)  # intensity: no masks, a stray per-size table is ignored
    loaded.calibration = {"postprocessing": {"threshold": 2.0, "top_k": 4}, "threshold_by_mask_size_mm": {"32": 9.0}}
    assert loaded.calibrated_postprocessing(32).threshold == 2.0 and loaded.calibrated_postprocessing(32).top_k == 4
    loaded.calibration = {}
    assert loaded.calibrated_postprocessing().threshold == 0.0


def test_a_loaded_checkpoint_predicts_like_the_saved_one(saved):
    import numpy as np

    from uad.checkpoint import checkpoint_from_dict

    loaded = load_checkpoint(saved)
    again = checkpoint_from_dict(loaded.to_dict())
    for key, value in loaded.model.state_dict().items():
        assert (again.model.state_dict()[key] == value).all()
    assert not again.model.training and loaded.version == "1"
    image = np.random.default_rng(0).random(loaded.preprocessing.working_grid.shape).astype(np.float32)
    mask = np.ones(image.shape, bool)
    np.testing.assert_array_equal(again.model.predict(image, mask).anomaly_map,
                                  loaded.model.predict(image, mask).anomaly_map)


def test_pickled_code_cannot_run_even_when_the_environment_asks_torch_for_unsafe_loads(tmp_path, monkeypatch):
    """Some tools set TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD; it changes torch.load's default, never an explicit choice."""
    import torch

    from uad.checkpoint import file_sha256

    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pwned')",))

    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "x": Evil()}, path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(Exception, match="Weights only load failed|Unsupported"):
        load_checkpoint(path, expected_sha256=file_sha256(path))


def test_the_model_version_survives_a_save_and_defaults_to_1(saved):
    from uad.checkpoint import checkpoint_from_dict

    loaded = load_checkpoint(saved)
    loaded.version = "2"
    save_checkpoint(loaded, saved)
    add_to_manifest(saved, loaded)
    assert load_checkpoint(saved).version == "2"
    data = loaded.to_dict()
    del data["model"]["version"]  # a file written before versions were recorded
    assert checkpoint_from_dict(data).version == "1"


def test_a_checkpoint_without_calibration_or_training_loads_with_empty_ones(saved):
    from uad.checkpoint import checkpoint_from_dict

    data = load_checkpoint(saved).to_dict()
    del data["calibration"], data["training"]
    bare = checkpoint_from_dict(data)
    assert bare.calibration == {} and bare.training == {} and bare.threshold is None and bare.sha256 == ""
    assert bare.calibrated_postprocessing().threshold == 0.0


def test_a_masking_model_without_per_size_thresholds_uses_its_one_threshold():
    from uad.models.swin_mae import SwinMAEConfig

    calibration = {"threshold": 2.0, "postprocessing": {"threshold": 2.0, "median_mm": 3.0},
                   "threshold_by_mask_mode": {"iterative": {"threshold": 2.4}}}
    checkpoint = Checkpoint(build_model(SwinMAEConfig()), PreprocessConfig(), calibration)
    assert checkpoint.calibrated_postprocessing(32).threshold == 2.0
    assert checkpoint.calibrated_postprocessing(32, "iterative").threshold == 2.4
    assert checkpoint.calibrated_postprocessing(64, "iterative").median_mm == 3.0
