"""``uad bench``: seconds per stage and peak memory of ``uad detect``, each run in a fresh process.

A fresh process per run is what a user pays (imports, model load) and makes peak memory (the child's
maximum resident set size, read by ``detect`` itself) mean one run, not the benchmark's own history.

Measured in the same run, on the same machine: the cost of the Ano-swinMAE paper's reference network (as its
own inference builds it: Swin encoder 2-2-2-2 at 224 x 224 px, 3 decoder up-stages of 2 blocks, 6 masked passes
per 1 mm slice for the 64 px mask and 30 for the 32 px mask) over as many brain slices as the benchmarked scan
has at 1 mm, and the Slicer panel's re-threshold of a 256^3 map. Runs are interleaved in rounds (every detect row
once, then the reference), so a change in the machine's load hits both sides, and the spread over rounds is
reported. Masking models are timed at both mask sizes; the issue's CPU targets are checked against the
measurements.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from uad import catalog
from uad.benchmarks_file import hardware_line, table, update_section
from uad.errors import UserInputError
from uad.io import Volume, load_volume
from uad.options import MASK_SIZES_MM

STAGES = ("load", "preprocessing", "registration", "inference", "postprocessing", "writing", "total", "process")

# The paper's reference network as its inference builds it: a Swin encoder (patch 4, dim 96, depths 2-2-2-2, heads
# 3-6-12-24, window 7) at 224 x 224 px and a decoder of 3 up-stages of 2 blocks each (26.9 M parameters, 14 Swin
# blocks), built from our own SwinMAENetwork (whose decoder mirrors the encoder's first three stages), random weights.
REFERENCE_NETWORK = {"padded_size": 224, "patch_size": 4, "dim": 96, "depths": (2, 2, 2, 2), "heads": (3, 6, 12, 24),
                     "window": 7}
REFERENCE_PASSES = {64: 6, 32: 30}  # mask side in px at 1 mm (= mm) -> masked forward passes per slice
REFERENCE_SAMPLE = {"batches": 2, "batch_size": 8}  # timed per mask size, then extrapolated to the volume

# CPU targets of issue #5.
TARGET_SINGLE_PASS_S = 30.0  # models without a mask size, end to end
TARGET_MASKING_S = {64: 60.0, 32: 120.0}  # masking models, end to end, by mask size (mm)
TARGET_PEAK_MEMORY_MB = 4096.0
TARGET_RETHRESHOLD_S = 0.3


def detect_once(input_path: Path, model: str, extra_args: list[str]) -> dict:
    """One fresh ``uad detect`` process: its report, with ``seconds["process"]`` the wall time a user waits."""
    with tempfile.TemporaryDirectory(prefix="uad-bench-") as out:
        command = [sys.executable, "-m", "uad", "detect", str(input_path), "--out", out, "--model", model,
                   "--progress", "none", *extra_args]
        started = time.perf_counter()
        completed = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if completed.returncode != 0:
            raise UserInputError(f"detect failed while benchmarking {model}: {completed.stderr.strip()}")
        report = json.loads((Path(out) / "report.json").read_text())
    report["seconds"]["process"] = wall  # interpreter start and imports included
    return report


def summarise_detect(reports: list[dict]) -> dict:
    """Median seconds per stage, the spread (min, median, max) of ``process`` and the largest peak memory.

    Also returns ``brain_slices``: the input's slices along its inferior-superior axis that hold brain (the
    non-empty slice scores of detect's report).
    """
    seconds = {stage: float(np.median([r["seconds"].get(stage, 0.0) for r in reports])) for stage in STAGES}
    process = [r["seconds"]["process"] for r in reports]
    return {"seconds": seconds, "process_spread": (min(process), float(np.median(process)), max(process)),
            "peak_memory_mb": max(r["peak_memory_mb"] or 0.0 for r in reports),
            "device": reports[0]["device"], "runs": len(reports),
            "brain_slices": sum(s is not None for s in reports[0].get("slice_scores", []))}


def time_detect(input_path: Path, model: str, runs: int, extra_args: list[str]) -> dict:
    """:func:`summarise_detect` over ``runs`` fresh ``uad detect`` processes."""
    return summarise_detect([detect_once(input_path, model, extra_args) for _ in range(runs)])


def uses_mask_size(model: str) -> bool:
    """Whether ``model`` (a bundled name or a checkpoint path) takes ``--mask-size``."""
    if model.endswith(".pt") or "/" in model:
        from uad.checkpoint import load_checkpoint

        return bool(load_checkpoint(Path(model)).model.uses_mask_size)
    return catalog.get_model_info(model).uses_mask_size


def calibrated_mask_modes(model: str) -> list[str]:
    """The mask modes other than ``sliding`` that ``model`` takes and has a calibrated threshold for."""
    from uad.checkpoint import load_checkpoint
    from uad.inference import resolve_checkpoint_path

    checkpoint = load_checkpoint(resolve_checkpoint_path(model))
    calibrated = checkpoint.calibration.get("threshold_by_mask_mode", {})
    return [mode for mode in checkpoint.model.mask_modes if mode != "sliding" and mode in calibrated]


def detect_variants(models: list[str], extra_args: list[str], devices: list[str | None]) -> list[dict]:
    """One entry per timed configuration: masking models at both mask sizes (unless the flags fix one) and in
    every calibrated mask mode (unless the flags fix one), on every device (``None``: whatever the flags or
    ``auto`` choose)."""
    variants = []
    for model in models:
        sizes = sorted(MASK_SIZES_MM, reverse=True) if uses_mask_size(model) and "--mask-size" not in extra_args \
            else [None]
        modes = ["sliding", *calibrated_mask_modes(model)] if "--mask-mode" not in extra_args else ["sliding"]
        for device in devices:
            for mode in modes:
                for size in sizes:
                    args = [*extra_args, *(["--mask-size", str(size)] if size else []),
                            *(["--mask-mode", mode] if mode != "sliding" else []),
                            *(["--device", device] if device else [])]
                    settings = [f"{size} mm"] * bool(size) + [mode] * (mode != "sliding")
                    label = f"{model} ({', '.join(settings)})" if settings else model
                    variants.append({"model": model, "mask_size": size, "mask_mode": mode, "label": label,
                                     "device": device, "args": args})
    return variants


def reference_network(device: str = "cpu", **overrides):
    """The paper's Swin-T-sized MAE (see ``REFERENCE_NETWORK``), random weights, in eval mode."""
    import torch

    from uad.models.swin_mae import SwinMAEConfig, SwinMAENetwork

    torch.manual_seed(0)
    return SwinMAENetwork(SwinMAEConfig(**{**REFERENCE_NETWORK, **overrides})).eval().to(device)


def time_reference(n_slices: int, passes: dict[int, int] | None = None, batch_size: int = 8, batches: int = 2,
                   device: str = "cpu", threads: int | None = None, network=None) -> dict[int, dict]:
    """Seconds per volume of the reference: ``n_slices`` x passes masked forward passes of the reference network.

    Per mask size (px), ``batches`` batches of ``batch_size`` slices are timed after one warm-up batch (under
    ``torch.inference_mode``, with ``threads`` CPU threads if given) and extrapolated linearly: the network is
    dense, so a pass costs the same whatever it masks. Returns mask px -> passes, seconds per slice-pass and
    seconds per volume.
    """
    import torch

    from uad.models.swin_mae import mask_pattern

    passes = passes or REFERENCE_PASSES
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        network = network or reference_network(device)
        size = network.patch_size * network.position.shape[1]
        images = torch.rand(batch_size, 1, size, size, generator=torch.Generator().manual_seed(0)).to(device)
        results = {}
        with torch.inference_mode():
            for index, (mask_px, n_passes) in enumerate(passes.items()):
                pixel_mask = mask_pattern(size, size, mask_px, 0, device=torch.device(device))
                pixel_mask = pixel_mask.expand(batch_size, 1, size, size)
                if index == 0:
                    network(images, pixel_mask)  # warm-up: allocations, kernel selection
                _synchronise(device)
                started = time.perf_counter()
                for _ in range(batches):
                    network(images, pixel_mask)
                _synchronise(device)
                per_pass = (time.perf_counter() - started) / (batches * batch_size)
                results[mask_px] = {"passes": n_passes, "seconds_per_slice_pass": per_pass,
                                    "seconds": per_pass * n_passes * n_slices, "slices": n_slices}
        return results
    finally:
        torch.set_num_threads(previous_threads)


def _synchronise(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_rethreshold(shape: tuple[int, int, int] = (256, 256, 256), runs: int = 5,
                     flagged_fractions: tuple[float, ...] = (0.01, 0.05), seed: int = 0) -> list[dict]:
    """Median seconds of the Slicer panel's re-threshold on a synthetic map of ``shape`` (1 mm voxels).

    The panel's slider path (``uad.mrml.logic``) calls :func:`uad.postprocessing.segment_filtered` on the cached,
    already median-filtered map with the default post-processing; here the map is smooth Gaussian noise (sigma
    2 voxels, unit spread) inside an ellipsoid brain of about 1.5 l, 0 outside, and the threshold flags the given
    fraction of the brain (0.01: the calibrated operating point).
    """
    from scipy import ndimage

    from uad.postprocessing import PostprocessConfig, segment_filtered

    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma=2.0)
    smooth /= smooth.std()
    centre, radii = (np.array(shape) - 1) / 2, np.array(shape) * np.array([0.27, 0.33, 0.25])
    axes = np.ogrid[tuple(slice(0, n) for n in shape)]
    brain = sum(((a - c) / r) ** 2 for a, c, r in zip(axes, centre, radii)) <= 1
    filtered = np.where(brain, smooth, 0).astype(np.float32)
    results = []
    for fraction in flagged_fractions:
        config = PostprocessConfig(threshold=float(np.quantile(filtered[brain], 1 - fraction)))
        seconds = []
        for _ in range(runs):
            started = time.perf_counter()
            segmentation = segment_filtered(filtered, brain, (1.0, 1.0, 1.0), config)
            seconds.append(time.perf_counter() - started)
        results.append({"flagged_fraction": fraction, "seconds": float(np.median(seconds)), "runs": runs,
                        "shape": shape, "brain_voxels": int(brain.sum()), "segmented_voxels": int(segmentation.sum())})
    return results


def superior_spacing(volume: Volume) -> float:
    """Slice thickness (mm) along the voxel axis closest to inferior-superior, as detect's slice scores use."""
    directions = volume.affine[:3, :3] / volume.spacing
    return float(volume.spacing[int(np.argmax(np.abs(directions[2])))])


def slices_at_1mm(volume: Volume, brain_slices: int) -> int:
    """Input slices with brain along the inferior-superior axis -> 1 mm axial slices over the same extent."""
    return max(1, int(round(brain_slices * superior_spacing(volume))))


def bench(input_path: Path, models: list[str], runs: int, out: str, extra_args: list[str]) -> dict:
    """Time detect (every model, mask size and device), the reference and the re-threshold; write BENCHMARKS.md.

    ``runs`` rounds, each running every detect configuration once and then the reference, so that the machine's
    load is shared by both sides; the spread over rounds is reported. Returns label -> detect timing
    (:func:`summarise_detect` plus model, mask_size, device and target fields).
    """
    import torch

    volume = load_volume(input_path)  # fail early, with the one-line error, on a bad input
    gpu = torch.cuda.is_available()
    devices = [None] if "--device" in extra_args else ["cpu", *(["cuda"] if gpu else [])]
    variants = detect_variants(models, extra_args, devices)  # unknown models fail here, before any timing
    keys = [v["label"] if v["device"] in (None, "cpu") else f"{v['label']} [{v['device']}]" for v in variants]
    reports: dict[str, list[dict]] = {key: [] for key in keys}
    reference_rounds: dict[str, list[dict]] = {"cpu": [], **({"cuda": []} if gpu else {})}
    threads = os.cpu_count() or 1  # what uad detect uses (uad.cli._set_threads)
    n_slices = brain_slices = 0
    for _ in range(runs):
        for key, variant in zip(keys, variants):
            reports[key].append(detect_once(input_path, variant["model"], variant["args"]))
        if not n_slices:
            brain_slices = summarise_detect(reports[keys[0]])["brain_slices"]
            n_slices = slices_at_1mm(volume, brain_slices)
        for device, rounds in reference_rounds.items():
            rounds.append(time_reference(n_slices, device=device, threads=threads if device == "cpu" else None,
                                         **REFERENCE_SAMPLE))
    results = {}
    for key, variant in zip(keys, variants):
        results[key] = {**summarise_detect(reports[key]),
                        **{k: variant[k] for k in ("model", "mask_size", "mask_mode", "label")}}
        results[key]["target"] = _detect_target(results[key])
    reference = {device: merge_reference_rounds(rounds) for device, rounds in reference_rounds.items()}
    rethreshold = time_rethreshold()

    update_section(out, "detect-timing", _markdown(input_path, volume, models, runs, extra_args, results,
                                                   brain_slices, n_slices, reference, rethreshold, gpu))
    _record_expected_seconds(results)
    return results


def merge_reference_rounds(rounds: list[dict[int, dict]]) -> dict[int, dict]:
    """Per mask size: the median seconds per slice-pass over rounds (and per volume), and its (min, median, max)."""
    merged = {}
    for mask_px, first in rounds[0].items():
        per_pass = [r[mask_px]["seconds_per_slice_pass"] for r in rounds]
        median = float(np.median(per_pass))
        merged[mask_px] = {**first, "seconds_per_slice_pass": median,
                           "seconds": median * first["passes"] * first["slices"],
                           "spread": (min(per_pass), median, max(per_pass))}
    return merged


def _detect_target(result: dict) -> dict | None:
    """The issue's CPU target for this row and whether the measurement meets it (None for GPU rows)."""
    if result["device"] != "cpu":
        return None
    seconds = TARGET_SINGLE_PASS_S if result["mask_size"] is None else TARGET_MASKING_S.get(result["mask_size"])
    if seconds is None:
        return None
    time_met = result["seconds"]["process"] <= seconds
    memory_met = result["peak_memory_mb"] <= TARGET_PEAK_MEMORY_MB
    return {"seconds": seconds, "peak_memory_mb": TARGET_PEAK_MEMORY_MB, "time_met": time_met,
            "memory_met": memory_met, "met": time_met and memory_met}


def _target_cells(target: dict | None) -> list[str]:
    if target is None:
        return ["– (CPU targets)", "–"]
    missed = [what for what, met in (("time", target["time_met"]), ("memory", target["memory_met"])) if not met]
    return [f"≤ {target['seconds']:.0f} s, ≤ {target['peak_memory_mb'] / 1024:.0f} GB",
            "yes" if not missed else f"**no** ({', '.join(missed)})"]


def _markdown(input_path: Path, volume: Volume, models: list[str], runs: int, extra_args: list[str], results: dict,
              brain_slices: int, n_slices: int, reference: dict, rethreshold: list[dict], gpu: bool) -> str:
    import torch

    shape = "×".join(map(str, volume.shape))
    spacing = "×".join(f"{s:.2f}" for s in volume.spacing)
    rows = [[r["label"], r["device"], *[f"{r['seconds'][s]:.1f}" for s in STAGES], _spread(r["process_spread"], 1),
             f"{r['peak_memory_mb']:.0f}", *_target_cells(r["target"])] for r in results.values()]

    reference_rows = []
    for device, timings in reference.items():
        for mask_px, ref in timings.items():
            first = [f"{mask_px} mm ({mask_px} px at 1 mm)", device, ref["passes"],
                     _spread(ref.get("spread", (ref["seconds_per_slice_pass"],) * 3), 3), f"{ref['seconds']:.0f}"]
            ours = [r for r in results.values() if r["mask_size"] == mask_px and r["device"] == device]
            # every mask mode of ours makes the same 4 passes per slice: each row is compared
            for r in ours:
                inference, process = r["seconds"]["inference"], r["seconds"]["process"]
                reference_rows.append([*first, r["label"], f"{inference:.1f}", f"{process:.1f}",
                                       f"{ref['seconds'] / inference:.0f}×" if inference > 0 else "–",
                                       f"{ref['seconds'] / process:.1f}×" if process > 0 else "–"])
            if not ours:
                reference_rows.append([*first, "–", "–", "–", "–", "–"])
    rethreshold_rows = [[f"{t['flagged_fraction']:.0%}", t["segmented_voxels"], f"{t['seconds']:.3f}",
                         "yes" if t["seconds"] <= TARGET_RETHRESHOLD_S else "**no**"] for t in rethreshold]

    masked = [r for r in results.values() if r["target"] is not None]
    verdicts = ", ".join(f"{r['label']} {'met' if r['target']['met'] else 'missed'}" for r in masked)
    rethreshold_met = all(t["seconds"] <= TARGET_RETHRESHOLD_S for t in rethreshold)
    gpu_text = (f"GPU: {torch.cuda.get_device_name(0)}; the `cuda` rows run detect with `--device cuda`."
                if gpu else "GPU: no GPU present on this machine, so CPU rows only.")
    return "\n".join([
        "## `uad detect` time and memory",
        "",
        f"Command: `uad bench --input {input_path} --models {' '.join(models)} --runs {runs}`"
        + (f" (detect flags: `{' '.join(extra_args)}`)" if extra_args else "") + ".",
        f"Hardware and date: {hardware_line()}.",
        f"Input: {input_path.name}, {shape} voxels of {spacing} mm (full head). Each run is a fresh process; "
        f"seconds are the median over {runs} run(s) (`process` also as min / median / max: the machine's load "
        "shows in that spread), peak memory the largest resident set size. Runs are interleaved in rounds: each "
        "round runs every row once, then the reference below, so a load change hits both. `total` is the "
        "pipeline inside detect; `process` is the whole command as a user waits for it (Python start-up and "
        "imports of torch, monai and antspyx included). Masking models run at both mask sizes (`--mask-size`) "
        "and in every mask mode they are calibrated for (`--mask-mode`; both modes make 4 passes per slice). "
        + gpu_text,
        "",
        table(["model", "device", *[f"{s} (s)" for s in STAGES], "process min / median / max (s)",
               "peak memory (MB)", "CPU target", "met"], rows),
        "",
        f"CPU targets (issue #5), end to end (`process`) on this machine: single-pass models ≤ "
        f"{TARGET_SINGLE_PASS_S:.0f} s, masking models ≤ {TARGET_MASKING_S[64]:.0f} s at 64 mm and ≤ "
        f"{TARGET_MASKING_S[32]:.0f} s at 32 mm; peak memory ≤ {TARGET_PEAK_MEMORY_MB / 1024:.0f} GB; re-threshold "
        f"≤ {TARGET_RETHRESHOLD_S} s. " + (f"Measured: {verdicts}; " if verdicts else "")
        + f"re-threshold {'met' if rethreshold_met else 'missed'}.",
        "",
        "### Reference cost: the Ano-swinMAE paper's configuration",
        "",
        f"The paper's network as its own inference builds it, at its own resolution, timed in this run: a Swin "
        f"masked autoencoder at 224 × 224 px (patch 4, dim 96, encoder depths 2-2-2-2, heads 3-6-12-24, window 7, "
        f"and a decoder of 3 up-stages of 2 blocks each: {_reference_size()}; our `SwinMAENetwork` with random "
        f"weights), {REFERENCE_PASSES[64]} masked forward passes per slice for "
        f"the 64 px mask and {REFERENCE_PASSES[32]} for the 32 px mask, over the {n_slices} axial 1 mm slices with "
        f"brain of this input (the {brain_slices} input slices with brain in detect's mask along the "
        f"inferior-superior axis, × their {superior_spacing(volume):.2f} mm thickness). {REFERENCE_SAMPLE['batches']} "
        f"batches of {REFERENCE_SAMPLE['batch_size']} slices per mask size were timed under `torch.inference_mode` "
        f"with detect's thread setting (all cores) once per round ({runs} round(s), interleaved with the detect "
        "runs; the per-volume cost uses the median) and extrapolated linearly; preprocessing and post-processing are "
        "not included. Ours: the `inference` stage and the whole command of the row above with the same mask size.",
        "",
        table(["mask", "device", "passes per slice", "reference s per slice-pass (min / median / max)",
               "reference (s per volume)",
               "ours", "ours: inference (s)", "ours: end to end (s)", "speed-up (inference)",
               "reference ÷ our end to end"], reference_rows),
        "",
        "### Re-threshold (the Slicer panel's slider)",
        "",
        f"`uad.postprocessing.segment_filtered` (what `uad.mrml.logic` calls when the threshold slider moves) on a "
        f"cached, median-filtered 256³ float32 map: smooth Gaussian noise in an ellipsoid brain of "
        f"{rethreshold[0]['brain_voxels'] / 1e6:.2f} M voxels (1 mm), default post-processing, the threshold set to "
        f"flag the given fraction of the brain; median of {rethreshold[0]['runs']} runs in this process.",
        "",
        table(["flagged before components", "segmented voxels", "seconds",
               f"≤ {TARGET_RETHRESHOLD_S} s"], rethreshold_rows),
    ])


def _spread(values: tuple[float, float, float], digits: int) -> str:
    return " / ".join(f"{v:.{digits}f}" for v in values)


def _reference_size() -> str:
    """Parameters and Swin blocks of the reference network, counted from the network itself."""
    from uad.models.swin_mae import SwinBlock

    network = reference_network()
    parameters = sum(p.numel() for p in network.parameters())
    blocks = sum(isinstance(m, SwinBlock) for m in network.modules())
    return f"{parameters / 1e6:.1f} M parameters, {blocks} Swin blocks"


def _record_expected_seconds(results: dict) -> None:
    """Measured CPU time -> the manifest's ``expected_seconds_cpu``, which the Slicer panel shows (masking
    models: at the default 64 mm mask)."""
    models = {m.name: m for m in catalog.list_models()}
    measured = {r["model"]: r["seconds"]["process"] for r in results.values()
                if r["model"] in models and r["device"] == "cpu" and r["mask_size"] in (None, 64)
                and r.get("mask_mode", "sliding") == "sliding"}
    if measured:
        updated = [replace(m, expected_seconds_cpu=round(measured[m.name], 1)) if m.name in measured else m
                   for m in models.values()]
        catalog.write_manifest(updated, default=catalog.load_manifest()["default"])
