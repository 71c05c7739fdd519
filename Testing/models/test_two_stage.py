"""The two-stage models: VQ-VAE + transformer healing, MAE + classifier scoring, and starting from stage 1."""

import numpy as np
import pytest
import torch

from uad.bundle import add_to_manifest
from uad.checkpoint import Checkpoint, save_checkpoint
from uad.errors import UserInputError
from uad.models import build_model
from uad.models.mae_classifier import MAEClassifierConfig
from uad.models.swin_mae import SwinMAEConfig
from uad.models.vqvae import VQVAEConfig
from uad.models.vqvae_transformer import VQVAETransformerConfig
from uad.preprocessing import PreprocessConfig
from uad.training import _initialise_from

from .synthetic_brain import healthy_like

SMALL_VQVAE = {"channels": (8, 16, 16, 16)}


def slices(count: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    image, mask = healthy_like()
    return (torch.from_numpy(np.moveaxis(image, 2, 0)[30:30 + count, None].copy()),
            torch.from_numpy(np.moveaxis(mask, 2, 0)[30:30 + count, None].astype(np.float32).copy()))


@pytest.mark.parametrize("threshold, replaced_all", [(0.0, False), (1.01, True)])
def test_healing_replaces_exactly_the_unlikely_codes(threshold, replaced_all):
    torch.manual_seed(0)
    model = build_model(VQVAETransformerConfig(**SMALL_VQVAE, resample_below=threshold)).eval()
    images, masks = slices()
    with torch.inference_mode():
        codes = model.network.index_quantize(images)
        healed, replaced = model.heal(codes)
        reconstruction, weight = model.reconstruct_with_weight(images, masks)
    assert replaced.all() if replaced_all else not replaced.any()
    if not replaced_all:  # nothing healed: the plain VQ-VAE output, and the map weight is the floor everywhere
        assert torch.equal(healed, codes)
        assert torch.allclose(reconstruction, model.network.decode_samples(codes) * masks)
        assert torch.allclose(weight, torch.full_like(weight, model.config.unhealed_weight))


def test_stage_one_stays_frozen_while_the_transformer_learns():
    torch.manual_seed(0)
    model = build_model(VQVAETransformerConfig(**SMALL_VQVAE)).train()
    frozen = {k: v.clone() for k, v in model.network.state_dict().items()}
    output = model.loss(*slices())
    output.total.backward()
    torch.optim.Adam(model.parameters(), lr=1e-2).step()
    assert all(torch.equal(frozen[k], v) for k, v in model.network.state_dict().items())  # codebook EMA too
    assert any(p.grad is not None for p in model.transformer.parameters())


def test_initialise_from_copies_stage_one_and_records_it(tmp_path):
    base = build_model(VQVAEConfig(**SMALL_VQVAE))
    base.map_std.fill_(2.0)
    path = tmp_path / "vqvae.pt"
    sha = save_checkpoint(checkpoint := Checkpoint(base, PreprocessConfig()), path)
    add_to_manifest(path, checkpoint)
    model = build_model(VQVAETransformerConfig(**SMALL_VQVAE))
    record = _initialise_from(model, str(path))
    assert not model.map_statistics_fitted  # healing changes the map: its statistics are fitted afresh
    assert record["sha256"] == sha and record["model"] == "vqvae"
    assert all(torch.equal(v, model.network.state_dict()[k]) for k, v in base.network.state_dict().items())
    with pytest.raises(UserInputError, match="does not fit"):
        _initialise_from(build_model(VQVAETransformerConfig(channels=(16, 32, 64, 64))), str(path))


def test_pseudo_abnormal_boxes_only_dim_the_reconstruction():
    torch.manual_seed(0)
    model = build_model(MAEClassifierConfig())
    images, masks = slices(8)
    pseudo = model.pseudo_abnormal(images, masks)
    assert (pseudo <= images + 1e-7).all() and (pseudo >= 0).all()
    assert all((pseudo[i] < images[i]).any() for i in range(len(images)))  # every slice got a visible box


def test_the_map_reading_classifier_learns_from_synthetic_anomalies_as_stage_one_maps_them():
    """classifier_input="anomaly-map": training pairs are (the classifier's map, the anomaly's truth) per slice,
    made by predict itself; the slice scores come from that map, so training and inference read the same thing."""
    torch.manual_seed(0)
    model = build_model(MAEClassifierConfig(classifier_input="anomaly-map", anomalies_per_volume=1)).eval()
    image, mask = healthy_like()
    model.map_mean.zero_()
    model.map_std.fill_(0.05)  # "fitted", so the map is z-scored as a trained stage 1's
    inputs, slice_masks = model.training_slices(image[None], mask[None])
    assert inputs.shape[1] == 2 and len(inputs) == len(slice_masks) and model.training is False
    assert set(np.unique(inputs[:, 1])) == {0.0, 1.0}  # the truth channel marks the painted anomaly
    assert 0 < (inputs[:, 1].max(axis=(1, 2)) > 0).sum() < len(inputs)  # some slices hold it, some do not
    assert inputs[:, 0].min() >= 0 and inputs[:, 0].max() <= 2  # z-scores clipped to 0..20, divided by 10
    output = model.loss(torch.from_numpy(inputs[:8]), torch.from_numpy(slice_masks[:8]))
    assert output.total.item() > 0 and 0 <= output.terms["accuracy"] <= 1
    scores = model.predict(image, mask).slice_scores
    assert scores.shape == (image.shape[2],) and ((scores >= 0) & (scores <= 1)).all()
    assert (scores[mask.sum(axis=(0, 1)) == 0] == 0).all() and scores.max() > 0
    with pytest.raises(UserInputError, match="classifier_input is one of"):
        MAEClassifierConfig(classifier_input="map")
    with pytest.raises(UserInputError, match="anomalies_per_volume is at least 1"):
        MAEClassifierConfig(classifier_input="anomaly-map", anomalies_per_volume=0)


def test_the_classifier_scores_every_slice():
    torch.manual_seed(0)
    model = build_model(MAEClassifierConfig()).eval()
    image, mask = healthy_like()
    prediction = model.predict(image, mask)
    scores = prediction.slice_scores
    assert scores.shape == (image.shape[2],) and ((scores >= 0) & (scores <= 1)).all()
    assert (scores[mask.sum(axis=(0, 1)) == 0] == 0).all()  # no brain, nothing to score


def test_the_classifier_learns_from_reconstructions_made_once_as_from_those_made_at_each_step():
    """Stage 1 is frozen, so training_slices' stored reconstructions must give the loss it would compute itself."""
    model = build_model(MAEClassifierConfig()).eval()
    image, mask = healthy_like()
    inputs, slice_masks = model.training_slices(image[None], mask[None], batch_size=16)  # several batches: seams
    images, masks = torch.from_numpy(inputs[:, :1].copy()), torch.from_numpy(slice_masks)
    assert inputs.shape[1] == 2 and len(inputs) > 16
    losses = []
    for batch in (images, torch.from_numpy(inputs)):
        torch.manual_seed(0)  # the same pseudo-abnormal boxes both times
        losses.append(model.loss(batch, masks).total.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert model.training is False  # training_slices leaves the mode as it found it


def test_mae_classifier_starts_from_a_swin_mae_with_the_same_options(tmp_path):
    base = build_model(SwinMAEConfig())
    base.map_mean.fill_(0.5)
    base.map_std.fill_(2.0)  # "fitted": the pixel map of mae-classifier is exactly this one
    path = tmp_path / "swin-mae.pt"
    save_checkpoint(checkpoint := Checkpoint(base, PreprocessConfig()), path)
    add_to_manifest(path, checkpoint)
    model = build_model(MAEClassifierConfig())
    _initialise_from(model, str(path))
    assert all(torch.equal(v, model.network.state_dict()[k]) for k, v in base.network.state_dict().items())
    assert not any(p.requires_grad for p in model.network.parameters())
    assert model.map_statistics_fitted and torch.equal(model.map_std, base.map_std)
    model.fit_map_statistics(*(np.zeros((1, 80, 96, 80), np.float32),) * 2)  # kept, not refitted
    assert torch.equal(model.map_mean, base.map_mean)


@pytest.mark.parametrize("threshold", [1e-3, 5e-3, 2e-2])
def test_batched_healing_equals_position_by_position_healing(threshold):
    """Pinaya's healing is sequential; the batched version must replace exactly the same codes with the same ones."""
    torch.manual_seed(0)
    model = build_model(VQVAETransformerConfig(**SMALL_VQVAE, resample_below=threshold)).eval()
    codes = torch.randint(0, model.config.num_embeddings, (8, *model.code_shape))
    expected, expected_replaced = codes.flatten(1).clone(), torch.zeros(8, codes[0].numel(), dtype=torch.bool)
    with torch.inference_mode():
        for position in range(expected.shape[1]):
            probabilities = model.transformer(expected)[:, position].softmax(dim=-1)
            unlikely = probabilities.gather(1, expected[:, position:position + 1])[:, 0] < threshold
            expected[:, position] = torch.where(unlikely, probabilities.argmax(dim=-1), expected[:, position])
            expected_replaced[:, position] = unlikely
        healed, replaced = model.heal(codes)
    assert torch.equal(healed, expected.view_as(codes)) and torch.equal(replaced, expected_replaced.view_as(codes))
    assert replaced.any()  # the comparison means something
