"""Write Resources/MODEL_CARDS.md from the bundled checkpoints' own provenance (nothing typed by hand).

    python tools/write_model_cards.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from uad import catalog
from uad.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "Resources" / "MODEL_CARDS.md"
RESULTS = OUT.with_name("evaluation-results.json")
GPU_RUNS = OUT.with_name("gpu-training-runs.json")  # every run of tools/train_on_gpu.py, bundled or not
# Training-free models have no validation curve; their settings were chosen on validation cases by these tools.
SETTINGS_CHOSEN = {
    "patch-retrieval": "`tools/compare_patch_settings.py` (the search: Resources/patch-settings-validation.txt) and "
                       "`tools/compare_patch_scales.py` (the coarse search: Resources/patch-scales-validation.txt)",
    "fusion": "`tools/choose_fusion_weights.py` (Resources/fusion-weights-validation.txt)",
}


def _how_trained(training: dict, config: dict) -> str:
    steps = training.get("steps", 0)
    return f"{steps} steps of batch {config.get('batch_size', '?')}" if steps else "closed-form fit (no steps)"


def _selection(best: dict) -> str:
    if not best:
        return "none needed (closed-form fit)"
    if "slice_auroc" in best:  # a slice classifier on a frozen first stage's map (selection_score)
        text = (f"weights from step {best['step']}, the best validation slice AUROC of its classifier "
                f"({best['slice_auroc']}; axial slices of the validation subjects with synthetic anomalies, checked "
                "every validate-every steps)")
        name = "slice AUROC"
    else:
        text = (f"weights from step {best['step']}, the best validation AUPRC of the raw map ({best['auprc']}; "
                "pooled voxel AUPRC on synthetic anomalies in the validation subjects, checked every validate-every "
                "steps)")
        name = "AUPRC"
    if "auprc_final_map" in best:
        text += f"; the final map (after healthy map statistics) scores {best['auprc_final_map']} on the same data"
    if best.get("curve"):
        text += f"; validation {name} by step: " + _curve(best["curve"])
    return text


def _training_lines(name: str, training: dict, config: dict) -> list[str]:
    """How the weights were trained and chosen; for a run of 0 steps (only the map statistics and threshold fitted
    with new options, e.g. mirror_averaging), the run whose weights it kept."""
    base = training.get("initialised_from", {})
    when = (f"{training.get('seconds', 0) / 60:.1f} min wall time on {training.get('hardware', '?')}; finished "
            f"{training.get('date', '?')}")
    if training.get("steps") or base.get("model") != name:
        return [f"- Training: {_how_trained(training, config)}, {when}.",
                f"- Checkpoint selection: {_selection(training.get('best_validation') or {})}."]
    rescored = []  # earlier 0-step runs between this one and the run that trained the weights
    while not base.get("steps") and base.get("initialised_from", {}).get("model") == name:
        rescored.append(base)
        base = base["initialised_from"]
    via = "".join(f", rescored by `{run['command']}` (SHA-256 `{run['sha256'][:12]}...`)" for run in reversed(rescored))
    final = (training.get("best_validation") or {}).get("auprc_final_map", "?")
    if not base.get("steps"):  # a 0-step base made before checkpoints kept their weights' origin
        return [f"- Training: none in this run (`--steps 0`, {when}): the weights of the earlier bundled `{name}` "
                f"(SHA-256 `{base['sha256'][:12]}...`), itself a 0-step run, `{base['command']}`, with their map "
                "statistics and threshold fitted again for this config. That file did not record the run that "
                "trained the weights: tools/reproduce_bundled.sh names it.",
                f"- With this config the final map scores {final} on the validation subjects."]
    # The validation anomalies are drawn with the run's seed: a rescoring with another seed scores other ones.
    base_seed = re.search(r"--seed (\d+)", base["command"])
    own_seed = training.get("config", {}).get("seed")
    data = "on the same data"
    if base_seed and int(base_seed.group(1)) != own_seed:
        data = f"on the validation anomalies of seed {own_seed}, that run's figures on those of seed {base_seed[1]}"
    origin = Path(base.get("path", "?"))
    bundled = origin.parts[-4:] == ("uad", "resources", "weights", f"{name}.pt")
    shown = origin.relative_to(ROOT) if origin.is_relative_to(ROOT) else origin
    weights = f"the earlier bundled `{name}`" if bundled else f"`{shown}`"
    return [f"- Training: none in this run (`--steps 0`, {when}): the weights of {weights} "
            f"(SHA-256 `{base['sha256'][:12]}...`), {base.get('steps', '?')} steps of `{base['command']}`{via}, "
            "with their map statistics and threshold fitted again for this config.",
            f"- Checkpoint selection (that run's): {_selection(base.get('best_validation') or {})}. With this "
            f"config the final map scores {final} {data}. A score recorded by an older run may not be "
            "reproduced by today's code: compare figures measured together."]


def _curve(curve: list) -> str:
    return ", ".join(f"{step}: {score:.3f}" for step, score in curve)


def _gpu_runs(name: str, bundled_command: str, base_command: str = "") -> list[str]:
    """The GPU runs of this model (tools/train_on_gpu.py), with their curves: whether more training would help."""
    runs = json.loads(GPU_RUNS.read_text()) if GPU_RUNS.exists() else {}
    lines = []
    for run, r in runs.items():
        if r["model"] != name:
            continue
        bundled = (" (the bundled weights)" if bundled_command == r["command"] else
                   " (the start of the bundled weights' fine-tuning)" if base_command == r["command"] else "")
        lines.append(f"  - `{run}`{bundled}, {r['lease']}, one NVIDIA H200: `{r['command']}`; best raw-map "
                     f"validation AUPRC {r['auprc']} at step {r['step']}, "
                     + (f"stopped {r['stopped']}" if "stopped" in r else f"final map {r.get('auprc_final_map')}")
                     + f"; curve (step: AUPRC) {_curve(r['curve'])}.")
    if lines:
        lines.insert(0, "- Trained on a GPU (validation AUPRC of the raw map every few hundred steps; the final map "
                        "after healthy statistics at the end):")
    return lines


def card(info: catalog.ModelInfo) -> str:
    checkpoint = load_checkpoint(info.path)
    training, calibration = checkpoint.training, checkpoint.calibration
    subjects = training.get("subjects", {})
    config = training.get("config", {})
    lines = [
        f"## {info.name}",
        "",
        info.description,
        "",
        f"- File: `uad/resources/weights/{info.file}`, SHA-256 `{info.sha256}`, {info.parameters:,} parameters.",
        f"- Model config: `{json.dumps(checkpoint.model.config.to_dict())}`.",
        f"- Data: `{Path(training.get('data', '?')).name}` (IXI healthy T1, 2 mm), {len(subjects.get('train', []))} "
        f"training and {len(subjects.get('validation', []))} validation subjects (split seed "
        f"{config.get('split_seed', 0)}); the {len(subjects.get('test', []))} test subjects were never used.",
        f"- Command: `{training.get('command', '?')}` (seed {config.get('seed', '?')}).",
        *_training_lines(info.name, training, config),
        f"- Threshold: {calibration.get('threshold', float('nan')):.4g} = {calibration.get('method', '?')}, "
        f"at {calibration.get('fpr', 0):.0%} FPR over {calibration.get('n_volumes', '?')} healthy validation volumes.",
    ]
    base = training.get("initialised_from", {})
    if base.get("model") == info.name and training.get("steps"):  # a fine-tune: every weight trained further
        lines.append(f"- Fine-tuned from the earlier bundled `{base['model']}` (SHA-256 `{base['sha256'][:12]}...`), "
                     f"itself from `{base['command']}`.")
    elif base and base.get("model") != info.name:  # a second stage (0 steps of the same model: said above)
        lines.append(f"- First stage: the bundled `{base['model']}` (SHA-256 `{base['sha256'][:12]}...`, frozen), "
                     f"itself from `{base['command']}`.")
    lines += _gpu_runs(info.name, training.get("command", ""), base.get("command", ""))
    if info.name in SETTINGS_CHOSEN:
        lines.append(f"- Settings chosen on validation subjects by {SETTINGS_CHOSEN[info.name]}.")
    if "threshold_by_mask_size_mm" in calibration:
        sizes = ", ".join(f"{mm} mm: {t:.4g}" for mm, t in calibration["threshold_by_mask_size_mm"].items())
        lines.append(f"- Threshold per mask size (same calibration): {sizes}.")
    lines.append(_figures(info.name))
    return "\n".join(lines)


def _figures(name: str) -> str:
    """The held-out figures ``uad evaluate`` wrote for this model (Resources/evaluation-results.json)."""
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    rows = [(label, r) for label, r in results.items() if label == name or label.startswith(f"{name} (")]
    if not rows:
        return "- Figures: not evaluated yet (run `uad evaluate`)."
    parts = []
    for label, r in rows:
        synthetic, stroke = r["synthetic"], r.get("stroke") or {}
        if "same_as_stage_one" in synthetic:
            parts.append(f"{label}: pixel map as `{synthetic['same_as_stage_one']}`; stroke shapes slice AUROC "
                         f"{stroke['slice_auroc']:.3f} (its classifier)")
            continue
        parts.append(f"{label}: synthetic AUROC {synthetic['auroc_pooled']:.3f} / AUPRC {synthetic['auprc_pooled']:.3f}"
                     f", healthy SSIM {synthetic['ssim_ixi']:.3f}"
                     + (f", stroke shapes AUPRC {stroke['auprc']:.3f}, slice AUROC {stroke['slice_auroc']:.3f}"
                        if stroke else ""))
    return "- Held-out figures (from BENCHMARKS.md): " + "; ".join(parts) + "."


def main() -> None:
    default = catalog.load_manifest().get("default")
    cards = [card(info) for info in catalog.list_models()]
    OUT.write_text("# Model cards\n\nGenerated by `python tools/write_model_cards.py` from the checkpoints. "
                   f"Default model: `{default}`.\n\n" + "\n\n".join(cards) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
