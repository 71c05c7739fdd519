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
    saved.write_bytes(saved.read_bytes() + b"tampered")
    with pytest.raises(UserInputError, match="fails its SHA-256 check"):
        load_checkpoint(saved)


def test_an_unlisted_file_is_refused(saved):
    (saved.parent / "manifest.json").write_text(json.dumps({"default": None, "models": []}))
    with pytest.raises(UserInputError, match="not listed"):
        load_checkpoint(saved)


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
