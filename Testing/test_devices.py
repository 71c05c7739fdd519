"""The device asked for is the device used, or a one-line error: never a silent swap."""

import pytest
import torch

from uad.devices import resolve_device
from uad.errors import UserInputError


def test_cuda_without_a_gpu_is_an_error_and_auto_falls_to_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = "--device cuda was asked for but no CUDA GPU is usable here; use --device cpu or auto"
    with pytest.raises(UserInputError, match=f"^{message}$"):
        resolve_device("cuda")
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"


def test_with_a_gpu_cuda_and_auto_use_it_and_cpu_stays_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("cuda") == "cuda" and resolve_device("auto") == "cuda" and resolve_device("cpu") == "cpu"


def test_an_unknown_device_is_named_in_the_error():
    with pytest.raises(UserInputError, match="^unknown device 'tpu'; choose one of: auto, cpu, cuda$"):
        resolve_device("tpu")
