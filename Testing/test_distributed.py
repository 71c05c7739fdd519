"""``uad train`` under PyTorch's own launcher (torchrun): DDP over gloo on this CPU, two processes."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from uad.checkpoint import load_checkpoint

from conftest import IXI_MASK, IXI_T1

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]


@pytest.fixture
def healthy(tmp_path):
    """The real IXI test scan under three subject ids: the split gives one train and one validation subject."""
    folder = tmp_path / "healthy"
    folder.mkdir()
    for subject in ("sub-a", "sub-b", "sub-c"):
        shutil.copy(IXI_T1, folder / f"{subject}_T1.nii.gz")
        shutil.copy(IXI_MASK, folder / f"{subject}_brainmask.nii.gz")
    return folder


def _torchrun_train(data, out, cache, steps: int) -> subprocess.CompletedProcess:
    command = [*TORCHRUN, "-m", "uad", "train", "--model", "vqvae", "--data", str(data), "--out", str(out),
               "--cache", str(cache), "--steps", str(steps), "--batch-size", "4", "--validate-every", "2",
               "--checkpoint-every", "2", "--option", "channels=[8,16,16]", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def test_torchrun_trains_writes_once_and_resumes(healthy, tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    first = _torchrun_train(healthy, out, cache, steps=2)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("trained vqvae") == 1  # process 0 reports; process 1 exits quietly
    checkpoint = load_checkpoint(out / "model.pt")
    assert checkpoint.training["world_size"] == 2 and checkpoint.training["steps"] == 2
    assert checkpoint.training["config"]["batch_size"] == 4  # the global batch: 2 slices per process
    assert checkpoint.training["command"].startswith("torchrun --nproc_per_node 2 -m uad train")
    assert checkpoint.threshold > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [m["file"] for m in manifest["models"]] == ["model.pt"]
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt", "manifest.json", "model.pt"]
    assert len(list(cache.rglob("*.npz"))) == 2  # train + validation subject, each preprocessed once

    state = torch.load(out / "last.pt", weights_only=True)
    assert state["step"] == 2 and len(state["rank_rngs"]) == 2
    assert state["rank_rngs"][0]["numpy_rng"] != state["rank_rngs"][1]["numpy_rng"]

    # The same command with more steps resumes every process from last.pt.
    second = _torchrun_train(healthy, out, cache, steps=4)
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = load_checkpoint(out / "model.pt")
    assert resumed.training["steps"] == 4 and resumed.training["world_size"] == 2
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, folder: str) -> None:
    """One process of a 2-process gloo group running the real training loop on a synthetic cohort."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    import torch.distributed as dist

    from uad import training
    from uad.models import build_model, get_spec

    ddp = training.Distributed.from_environment()
    device = torch.device("cpu")
    ddp = training._start_process_group(ddp, device)
    try:
        seen = []
        augment = training._augment

        def recording(images, masks, rng, **options):
            seen.append(images.reshape(len(images), -1).sum(axis=1))
            return augment(images, masks, rng, **options)

        training._augment = recording
        config = training.TrainConfig(model="vqvae", data_dir=folder, out_dir=folder, steps=2, batch_size=4,
                                      checkpoint_every=100, validate_every=100, threads=1,
                                      model_options={"channels": [8, 16, 16]})
        torch.manual_seed(0)
        model = build_model(get_spec("vqvae").config_cls.from_dict(config.model_options))
        rng = np.random.default_rng(config.seed + ddp.rank)
        shape = model.config.grid_shape
        volumes = np.random.default_rng(1).random((2, *shape), dtype=np.float32)  # the same cohort everywhere
        masks = np.ones_like(volumes)
        cohort = training.Cohort(volumes, masks, volumes[:1], masks[:1], {})
        out_dir = Path(folder) / f"out{rank}"  # a folder per process shows which ones write
        out_dir.mkdir()
        training._train_loop(model, cohort, config, device, rng, out_dir, ddp)
        weights = torch.cat([p.detach().flatten() for p in model.parameters()]).numpy()
        np.savez(os.path.join(folder, f"rank{rank}.npz"), batches=np.stack(seen), weights=weights)
    finally:
        dist.destroy_process_group()


def test_each_process_draws_its_own_batches_and_weights_stay_in_sync(tmp_path):
    mp.spawn(_rank_main, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in (0, 1)]
    assert ranks[0]["batches"].shape == (2, 2)  # 2 steps of batch_size / world_size = 2 slices
    assert not np.allclose(ranks[0]["batches"], ranks[1]["batches"])
    np.testing.assert_array_equal(ranks[0]["weights"], ranks[1]["weights"])  # DDP averaged the same gradients
    assert (tmp_path / "out0" / "last.pt").exists() and not any((tmp_path / "out1").iterdir())
