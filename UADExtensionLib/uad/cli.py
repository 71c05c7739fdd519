"""The ``uad`` command: each subcommand parses its flags and calls one API function.

Heavy imports (torch, ants) happen inside the handlers so ``uad --help`` and ``uad models`` stay fast.
A :class:`~uad.errors.UserInputError` becomes one line ``uad: error: ...`` and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from uad.errors import UserInputError
from uad.options import DEFAULT_MASK_SIZE_MM, DEVICE_CHOICES, MASK_MODES, MASK_SIZES_MM, PROGRESS_MODES, REFINE_METHODS

if TYPE_CHECKING:
    from uad.cohort import Case, Shard
    from uad.inference import Detector

DEMO_OUT = Path("uad-demo-output")


class _Parser(argparse.ArgumentParser):
    """argparse, but usage mistakes are one line too."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"uad: error: {message}; see '{self.prog} --help'\n")


def _set_threads() -> None:
    # Unset thread counts made CPU runs 5-10x slower here (UAD_FIELD.md 4.3): use every core explicitly.
    cores = str(os.cpu_count() or 1)
    # ITK (registration, Atropos) gets one thread: multi-threaded metric sums vary in order, so the same scan came
    # out with 9.8 ml flagged in one run and 10.8 ml in the next. The 2 mm affine registration takes about a second
    # either way; Atropos refinement costs 8 s instead of 6 s on 2 cores. Set the variable to trade that back.
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", cores)
    import torch

    torch.set_num_threads(int(cores))


def _postprocess_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("post-processing (defaults: the model's calibrated settings)")
    group.add_argument("--threshold", type=float, help="anomaly-map threshold (default: calibrated on healthy data)")
    group.add_argument("--median-mm", type=float,
                       help="3D median filter width in mm, 0 = off (default: the model's, 5 for most)")
    group.add_argument("--brain-erosion-mm", type=float, help="erode the brain mask by this much (default 4)")
    group.add_argument("--min-component-mm3", type=float, help="drop smaller connected components (default 50)")
    group.add_argument("--top-k", type=int, help="keep the K most anomalous components, 0 = all (default 10)")
    group.add_argument("--dilation-mm", type=float, help="dilate kept components by this much (default 1)")
    group.add_argument("--refine", choices=REFINE_METHODS, default="none",
                       help="refine boundaries with ANTs Atropos (5-class k-means) (default none)")


def _cmd_detect(args: argparse.Namespace) -> int:
    from uad.cohort import Shard, is_cohort, list_cases

    inputs = [args.input] if isinstance(args.input, str) else list(args.input)
    shard = Shard.parse(args.shard) if getattr(args, "shard", None) else None
    cohort = is_cohort(inputs, shard)
    cases = list_cases(inputs) if cohort else []  # bad folders and CSVs are reported before torch is imported
    _set_threads()
    from uad.inference import STAGE_WEIGHTS, DetectOptions, Detector
    from uad.progress import Progress

    options = DetectOptions(
        model=args.model, mask_size=args.mask_size, mask_mode=args.mask_mode, device=args.device,
        threshold=args.threshold,
        skull_stripped=args.skull_stripped, brain_mask=args.brain_mask, refine=args.refine,
        median_mm=args.median_mm, brain_erosion_mm=args.brain_erosion_mm,
        min_component_mm3=args.min_component_mm3, top_k=args.top_k, dilation_mm=args.dilation_mm,
    )
    if cohort:
        return _detect_cohort(Detector(options), shard.select(cases) if shard else cases, args.out, shard,
                              args.progress)
    progress = Progress(args.progress, STAGE_WEIGHTS)
    try:
        result = Detector(options).run(inputs[0], args.out, progress)
    finally:
        progress.close()
    for warning in result.warnings:
        print(f"uad: warning: {warning}", file=sys.stderr)
    if args.progress != "json":
        report = result.report
        print(f"{report['model']} on {report['device']}: {report['segmented_volume_ml']} ml flagged "
              f"(threshold {report['threshold']:.4g}) in {report['seconds']['total']:.0f} s -> {result.out_dir}")
    return 0


def _detect_cohort(detector: Detector, cases: list[Case], out: str, shard: Shard | None, progress: str) -> int:
    """Exit code 0 if every case succeeded, 1 if some failed, 130 if interrupted (finished cases are kept)."""
    from uad.cohort import run_cohort

    summary = run_cohort(detector, cases, out, shard=shard, progress_mode=progress)
    for result in summary.results:
        for warning in result.warnings:
            print(f"uad: case {result.case.id}: warning: {warning}", file=sys.stderr)
    for result in summary.failed:
        print(f"uad: case {result.case.id} failed: {result.error}", file=sys.stderr)
    if summary.interrupted:
        print(f"uad: interrupted after {len(summary.results)} of {summary.planned} cases; finished cases are kept, "
              f"see {summary.json_path}", file=sys.stderr)
        return 130
    if progress != "json":
        where = f" (shard {shard})" if shard else ""
        print(f"{summary.model} on {summary.device}: {len(summary.succeeded)} of {summary.planned} cases done{where} "
              f"in {summary.seconds:.0f} s -> {summary.json_path}" if summary.planned
              else f"no cases to run{where} -> {summary.json_path}")
    if summary.failed:
        print(f"uad: {len(summary.failed)} of {summary.planned} cases failed; see {summary.json_path}",
              file=sys.stderr)
        return 1
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from uad import catalog

    models = catalog.list_models()
    default = catalog.load_manifest().get("default")
    if args.json:
        print(json.dumps([{**m.to_dict(), "default": m.name == default} for m in models], indent=2))
        return 0
    for m in models:
        grid = m.working_grid
        grid_text = f"{'x'.join(map(str, grid.get('shape', [])))} @ {grid.get('spacing', '?')} mm" if grid else "-"
        print(f"{m.name}{' (default)' if m.name == default else ''}\n"
              f"  {m.description}\n"
              f"  family {m.family}, modality {m.modality}, grid {grid_text}, {m.parameters:,} parameters\n"
              f"  threshold {m.threshold:.4g}, mask size {'yes' if m.uses_mask_size else 'n/a'}, "
              f"sha256 {m.sha256}")
        if args.provenance:
            print(_provenance_text(m.path))
    if not args.provenance:
        print("(training provenance of each model: uad models --provenance)")
    return 0


def _provenance_text(path: Path) -> str:
    """How a checkpoint was trained and calibrated, from the checkpoint itself (torch is imported here)."""
    from uad.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(path)
    training, calibration = checkpoint.training, checkpoint.calibration
    subjects = training.get("subjects") or {}
    counts = ", ".join(f"{len(ids)} {split}" for split, ids in subjects.items()) if isinstance(subjects, dict) else ""
    versions = ", ".join(f"{k} {v}" for k, v in (training.get("versions") or {}).items())
    lines = [
        f"  trained on {training.get('data', '?')} ({counts or 'subjects not recorded'}), "
        f"{training.get('steps', '?')} steps in {training.get('seconds', '?')} s on {training.get('hardware', '?')}, "
        f"{training.get('date', '?')}",
        f"  command: {training.get('command', '?')}",
        f"  calibrated on {calibration.get('n_volumes', '?')} healthy validation volumes at "
        f"{calibration.get('fpr', '?')} voxel false-positive rate ({calibration.get('method', '?')})",
    ]
    if versions:
        lines.append(f"  versions: {versions}")
    return "\n".join(lines)


def _cmd_train(args: argparse.Namespace) -> int:
    _set_threads()
    from uad.training import TrainConfig, train

    options = {}
    for item in args.option or []:
        key, separator, value = item.partition("=")
        if not separator:
            raise UserInputError(f"--option {item!r} is not KEY=VALUE; e.g. --option 'channels=[16,32,64,64]'")
        try:
            options[key] = json.loads(value)  # numbers, lists, true/false
        except json.JSONDecodeError:
            options[key] = value  # a plain string
    config = TrainConfig(
        model=args.model, data_dir=args.data, out_dir=args.out, cache_dir=args.cache, seed=args.seed,
        steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, checkpoint_every=args.checkpoint_every,
        validate_every=args.validate_every, device=args.device, skull_stripped=args.skull_stripped,
        model_options=options, fpr=args.fpr, median_mm=args.median_mm,
        threads=args.threads or _default_train_threads(), init_from=args.init_from,
        gamma_range=tuple(args.gamma_range),
    )
    path = train(config)
    if os.environ.get("RANK", "0") == "0":  # under torchrun: once, not once per process
        print(f"trained {args.model}: {path}")
    return 0


def _default_train_threads() -> int:
    """All cores, shared out between the processes torchrun starts on this node."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, (os.cpu_count() or 1) // max(processes, 1))


def _cmd_calibrate(args: argparse.Namespace) -> int:
    _set_threads()
    from uad.calibration import recalibrate_checkpoint

    threshold = recalibrate_checkpoint(Path(args.model), args.data, args.cache, fpr=args.fpr,
                                       skull_stripped=args.skull_stripped)
    print(f"calibrated {args.model}: threshold {threshold:.4g} at {args.fpr:.2%} healthy voxel FPR")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    _set_threads()
    from uad.evaluation import EvaluationConfig, evaluate

    results = evaluate(EvaluationConfig(data_dir=args.data, models=tuple(args.models), cache_dir=args.cache,
                                        out=args.out, seed=args.seed, figure=args.figure, results_json=args.results,
                                        mask_sizes_mm=tuple(args.mask_sizes)))
    for name, r in results.items():
        synthetic = r["synthetic"]
        if "same_as_stage_one" in synthetic:
            print(f"{name}: pixel map as {synthetic['same_as_stage_one']}; slice AUROC (stroke shapes) "
                  f"{r['stroke']['slice_auroc']:.3f}")
            continue
        print(f"{name}: SSIM {synthetic['ssim_ixi']:.3f}, AUROC {synthetic['auroc_pooled']:.3f}, "
              f"AUPRC {synthetic['auprc_pooled']:.3f}")
    print(f"written to {args.out}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    _set_threads()  # the in-process reference timing uses detect's thread setting
    from uad.benchmark import bench

    results = bench(Path(args.input), args.models, args.runs, args.out, args.detect_args or [])
    for name, r in results.items():
        target = r.get("target")
        verdict = "" if target is None else f"; CPU target {'met' if target['met'] else 'missed'}"
        print(f"{name} on {r['device']}: {r['seconds']['process']:.1f} s for the whole command "
              f"({r['seconds']['total']:.1f} s pipeline), peak {r['peak_memory_mb']:.0f} MB{verdict}")
    print(f"written to {args.out} (with the reference cost and the re-threshold timing)")
    return 0


def _cmd_check_inputs(args: argparse.Namespace) -> int:
    _set_threads()
    from uad.input_check_benchmark import run

    results = run(args.data, args.out, args.cache)
    healthy = [check for (scan, _, check) in results.values() if scan.group != "lesion"]
    alarms = sum(not c.passed or bool(c.warnings) for c in healthy)
    refused_lesions = sum(not c.passed for (scan, _, c) in results.values() if scan.group == "lesion")
    print(f"input check: {alarms} of {len(healthy)} healthy scans refused or warned; {refused_lesions} lesion cases "
          f"refused; written to {args.out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from uad import resources

    args.input = [str(resources.sample_scan())]
    args.out = str(args.out)
    args.shard = None
    args.skull_stripped = None  # detected (the sample, from MSLUB, is skull-stripped)
    _cmd_detect(args)
    print(f"Open in 3D Slicer or any NIfTI viewer: {resources.sample_scan()} with {args.out}/anomaly_map.nii.gz "
          f"as overlay and {args.out}/segmentation.nii.gz as label; quick look: {args.out}/overview.png; "
          f"expert lesion mask for comparison: {resources.sample_lesion_mask()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="uad", description="Unsupervised anomaly detection in brain MRI.")
    parser.add_argument("--verbose", action="store_true", help="log what happens")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def detect_flags(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--model", help="bundled model name (see 'uad models') or a checkpoint .pt path")
        sub.add_argument("--mask-size", type=int, choices=MASK_SIZES_MM,
                         help=f"mask side in mm, for masking models only (default {DEFAULT_MASK_SIZE_MM})")
        sub.add_argument("--mask-mode", choices=MASK_MODES, default="sliding",
                         help="masking models: Ano-swinMAE's sliding mask (4 passes), or iterative refinement "
                              "(2 checkerboard passes, then 2 re-masking only the patches that still differ)")
        sub.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
        sub.add_argument("--brain-mask", help="brain mask NIfTI on the input's grid (skips the template mask)")
        sub.add_argument("--progress", choices=PROGRESS_MODES, default="bar",
                         help="terminal bar, JSON lines on stdout (for the Slicer module), or nothing")
        _postprocess_flags(sub)

    detect = commands.add_parser(
        "detect", help="find anomalies in one scan or a cohort",
        description="One T1 NIfTI writes its outputs into --out. Several inputs, a folder or a CSV run as a "
                    "cohort: the model is loaded once, each case writes into OUT/<case id>/, a failing case is "
                    "recorded and the run goes on, and OUT/cohort.json + cohort.csv list every case "
                    "(exit code 1 when some failed).")
    detect.add_argument("input", nargs="+",
                        help="T1 NIfTI (.nii/.nii.gz), full head or skull-stripped; or several; or a folder of them "
                             "(*_brainmask/*_mask/*_seg files skipped); or a CSV with columns input[,id,brain_mask] "
                             "(relative paths are relative to the CSV)")
    detect.add_argument("--out", required=True, help="output folder (for a cohort: one subfolder per case)")
    detect.add_argument("--shard", metavar="I/N",
                        help="run only cases I, I+N, I+2N, ... (1-based) of the case list, e.g. "
                             "--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT; writes cohort-shard-I-of-N.json")
    stripping = detect.add_mutually_exclusive_group()
    stripping.add_argument("--skull-stripped", action="store_true", default=None,
                           help="the input has no skull (default: detected from the image; see report.json)")
    stripping.add_argument("--full-head", dest="skull_stripped", action="store_false",
                           help="the input is a full head, skull included (default: detected from the image)")
    detect_flags(detect)
    detect.set_defaults(handler=_cmd_detect)

    models = commands.add_parser("models", help="list the bundled models")
    models.add_argument("--json", action="store_true")
    models.add_argument("--provenance", action="store_true",
                        help="also show how each model was trained and calibrated (reads every checkpoint)")
    models.set_defaults(handler=_cmd_models)

    train = commands.add_parser(
        "train", help="train a model on a folder of healthy scans",
        description="Train a model on a folder of healthy scans. Data-parallel on several GPUs or nodes: launch the "
                    "same command with PyTorch's launcher, e.g. 'torchrun --nproc_per_node 4 -m uad train ...' "
                    "(NCCL on GPUs, gloo on CPUs); --batch-size stays the global batch, each process draws "
                    "batch-size / processes slices per step, and process 0 alone validates and writes the run folder.")
    train.add_argument("--model", required=True, help="model type, e.g. vqvae or intensity")
    train.add_argument("--data", required=True, help="folder of healthy NIfTI volumes (+ <id>_brainmask.nii.gz)")
    train.add_argument("--out", required=True, help="run folder: checkpoints, model.pt, manifest.json")
    train.add_argument("--cache", default=str(Path.home() / ".cache" / "uad"), help="preprocessed-scan cache")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--steps", type=int, default=6000,
                       help="training steps; 0 with --init-from keeps those weights and fits only the map statistics "
                            "and threshold, for options that change scoring (e.g. mirror_averaging)")
    train.add_argument("--batch-size", type=int, default=32,
                       help="slices per step, in total: under torchrun split evenly over the processes (default 32)")
    train.add_argument("--lr", type=float, default=5e-4)
    train.add_argument("--checkpoint-every", type=int, default=250, help="steps between resumable checkpoints")
    train.add_argument("--validate-every", type=int, default=1000, help="steps between validation scores")
    train.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    train.add_argument("--skull-stripped", action="store_true", help="the training scans have no skull")
    train.add_argument("--fpr", type=float, default=0.01, help="healthy voxel false-positive rate for the threshold")
    train.add_argument("--median-mm", type=float, default=5.0,
                       help="median filter (mm, 0 = off) the threshold is calibrated on and segmentation then uses; "
                            "off for a model that smooths its own map (default 5)")
    train.add_argument("--option", action="append", metavar="KEY=VALUE", help="model config override, repeatable")
    train.add_argument("--init-from", default="", metavar="CHECKPOINT",
                       help="first-stage weights: a vqvae for vqvae-transformer, a swin-mae for mae-classifier")
    train.add_argument("--gamma-range", type=float, nargs=2, default=(1.0, 1.0), metavar=("LOW", "HIGH"),
                       help="contrast augmentation: each training slice's intensities raised to a power drawn in "
                            "this range, e.g. 0.7 1.4 (default 1 1: off)")
    train.add_argument("--threads", type=int, default=0,
                       help="CPU threads per process (default: all cores, divided among torchrun's processes)")
    train.set_defaults(handler=_cmd_train)

    calibrate = commands.add_parser("calibrate", help="set a checkpoint's threshold from healthy scans")
    calibrate.add_argument("--model", required=True, help="checkpoint .pt (manifest.json beside it is updated)")
    calibrate.add_argument("--data", required=True, help="folder of HEALTHY scans (never lesion cases)")
    calibrate.add_argument("--cache", default=str(Path.home() / ".cache" / "uad"))
    calibrate.add_argument("--fpr", type=float, default=0.01)
    calibrate.add_argument("--skull-stripped", action="store_true")
    calibrate.set_defaults(handler=_cmd_calibrate)

    evaluate = commands.add_parser("evaluate", help="held-out benchmarks -> BENCHMARKS.md")
    evaluate.add_argument("--data", required=True, help="the shared data folder (healthy/ixi_t1, healthy/mass_t1)")
    evaluate.add_argument("--models", nargs="+", required=True, help="bundled model names or checkpoint paths")
    evaluate.add_argument("--cache", default=str(Path.home() / ".cache" / "uad"))
    evaluate.add_argument("--out", default="BENCHMARKS.md")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--figure", default="Resources/model-comparison.png", help="Figure-2-style picture")
    evaluate.add_argument("--mask-sizes", nargs="+", type=int, choices=MASK_SIZES_MM, default=list(MASK_SIZES_MM),
                          help="mask sizes (mm) at which masking models are evaluated, each a row")
    evaluate.add_argument("--results", default="Resources/evaluation-results.json", help="the figures as JSON")
    evaluate.set_defaults(handler=_cmd_evaluate)

    bench = commands.add_parser(
        "bench", help="time uad detect per stage (fresh process per run)",
        description="Time uad detect per stage and its peak memory, each run a fresh process; masking models at "
                    "both mask sizes (64 and 32 mm), and on the GPU too when there is one. In the same run: the "
                    "Ano-swinMAE paper's reference cost (Swin-T MAE at 224 px, 6/30 masked passes per 1 mm brain "
                    "slice, sampled and extrapolated) and the Slicer panel's re-threshold of a 256^3 map; the "
                    "issue's CPU targets are checked. Writes the detect-timing section of --out.")
    bench.add_argument("--input", required=True, help="a full-head T1 NIfTI")
    bench.add_argument("--models", nargs="+", required=True, help="bundled model names or checkpoint paths")
    bench.add_argument("--runs", type=int, default=3)
    bench.add_argument("--out", default="BENCHMARKS.md")
    bench.add_argument("--detect-args", nargs=argparse.REMAINDER, help="extra flags passed to uad detect")
    bench.set_defaults(handler=_cmd_bench)

    check_inputs = commands.add_parser(
        "check-inputs", help="the input check's false-alarm rate on healthy scans -> BENCHMARKS.md",
        description="Run the input check of 'uad detect' on every healthy scan (and the lesion cases) of the shared "
                    "data folder and write its false-alarm rate to the input-check section of --out.")
    check_inputs.add_argument("--data", required=True, help="the shared data folder (healthy/, lesion/)")
    check_inputs.add_argument("--out", default="BENCHMARKS.md")
    check_inputs.add_argument("--cache", default=str(Path.home() / ".cache" / "uad"),
                              help="measures are cached here per file")
    check_inputs.set_defaults(handler=_cmd_check_inputs)

    demo = commands.add_parser("demo", help="run detect on the bundled sample scan")
    demo.add_argument("--out", default=str(DEMO_OUT))
    detect_flags(demo)
    demo.set_defaults(handler=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.handler(args)
    except UserInputError as exc:
        print(f"uad: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("uad: interrupted; nothing was written to the output folder", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
