"""The command line's option handling, without running a model: every flag parses to what the handler uses, the
defaults are the documented ones, usage mistakes are one line, and `uad models` prints every bundled model.
(Fast: the mutation run of cli.py executes these; the end-to-end tests prove each detect flag takes effect.)"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from uad import catalog
from uad.cli import _default_train_threads, build_parser, main

from conftest import run_cli


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


def test_detect_flags_parse_to_numbers_and_choices():
    args = parse("detect", "a.nii.gz", "b.nii.gz", "--out", "o", "--model", "vqvae", "--mask-size", "32",
                 "--device", "cpu", "--brain-mask", "m.nii.gz", "--progress", "json", "--skull-stripped",
                 "--threshold", "1.25", "--median-mm", "3", "--brain-erosion-mm", "2.5", "--min-component-mm3", "80",
                 "--top-k", "4", "--dilation-mm", "0", "--refine", "atropos", "--shard", "2/3")
    assert args.input == ["a.nii.gz", "b.nii.gz"] and args.out == "o" and args.model == "vqvae"
    assert args.mask_size == 32 and args.device == "cpu" and args.brain_mask == "m.nii.gz"
    assert args.progress == "json" and args.skull_stripped is True and args.shard == "2/3"
    assert (args.threshold, args.median_mm, args.brain_erosion_mm, args.min_component_mm3, args.top_k,
            args.dilation_mm, args.refine) == (1.25, 3.0, 2.5, 80.0, 4, 0.0, "atropos")
    assert isinstance(args.top_k, int) and isinstance(args.threshold, float) and isinstance(args.median_mm, float)


def test_detect_defaults_leave_post_processing_to_the_model():
    args = parse("detect", "a.nii.gz", "--out", "o")
    assert args.model is None and args.mask_size is None and args.device == "auto" and args.progress == "bar"
    assert args.refine == "none" and args.brain_mask is None and args.skull_stripped is None and args.shard is None
    assert [args.threshold, args.median_mm, args.brain_erosion_mm, args.min_component_mm3, args.top_k,
            args.dilation_mm] == [None] * 6
    assert args.verbose is False and args.handler.__name__ == "_cmd_detect"


def test_demo_takes_the_detect_flags_but_no_input():
    args = parse("demo", "--threshold", "2", "--top-k", "1", "--device", "cpu")
    assert args.out == "uad-demo-output" and args.threshold == 2.0 and args.top_k == 1 and args.device == "cpu"
    assert args.handler.__name__ == "_cmd_demo"


def test_other_commands_defaults():
    train = parse("train", "--model", "vqvae", "--data", "d", "--out", "r")
    assert (train.seed, train.steps, train.batch_size, train.lr, train.checkpoint_every, train.validate_every,
            train.device, train.fpr, train.option, train.init_from, train.threads, train.skull_stripped) == (
        0, 6000, 32, 5e-4, 250, 1000, "auto", 0.01, None, "", 0, False)
    assert train.cache.endswith(".cache/uad")
    calibrate = parse("calibrate", "--model", "m.pt", "--data", "d")
    assert calibrate.fpr == 0.01 and calibrate.skull_stripped is False and calibrate.cache.endswith(".cache/uad")
    evaluate = parse("evaluate", "--data", "d", "--models", "intensity", "vqvae")
    assert evaluate.models == ["intensity", "vqvae"] and evaluate.mask_sizes == [32, 64] and evaluate.seed == 0
    assert (evaluate.out, evaluate.figure, evaluate.results) == (
        "BENCHMARKS.md", "Resources/model-comparison.png", "Resources/evaluation-results.json")
    bench = parse("bench", "--input", "s.nii.gz", "--models", "rae", "--detect-args", "--threshold", "3")
    assert bench.runs == 3 and bench.out == "BENCHMARKS.md" and bench.detect_args == ["--threshold", "3"]
    assert parse("models").json is False and parse("models", "--json").json is True
    for command, handler in [(train, "_cmd_train"), (calibrate, "_cmd_calibrate"), (evaluate, "_cmd_evaluate"),
                             (bench, "_cmd_bench"), (parse("models"), "_cmd_models")]:
        assert command.handler.__name__ == handler


@pytest.mark.parametrize("argv, message", [
    (["detect", "a.nii.gz"], "the following arguments are required: --out"),
    (["detect", "a.nii.gz", "--out", "o", "--top-k", "2.5"], "argument --top-k: invalid int value: '2.5'"),
    (["detect", "a.nii.gz", "--out", "o", "--refine", "magic"], "argument --refine: invalid choice: 'magic'"),
    (["detect", "a.nii.gz", "--out", "o", "--threshold", "high"], "argument --threshold: invalid float value"),
    (["evaluate", "--data", "d", "--models", "x", "--mask-sizes", "48"], "argument --mask-sizes: invalid choice"),
    ([], "the following arguments are required: command"),
])
def test_usage_mistakes_are_one_line_with_exit_code_2(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("uad: error: ") and message in err and err.count("\n") == 1
    assert err.rstrip().endswith("--help'")


def test_user_errors_from_a_handler_are_one_line_with_exit_code_2(capsys, tmp_path):
    code, _, err = run_cli(capsys, "calibrate", "--model", str(tmp_path / "nope.pt"), "--data", str(tmp_path))
    assert code == 2 and err == f"uad: error: checkpoint not found: {tmp_path / 'nope.pt'}; check the path or run " \
                                "'uad models'\n"


def test_models_text_lists_every_bundled_model_once_with_its_threshold(capsys):
    code, out, _ = run_cli(capsys, "models")
    assert code == 0
    models = catalog.list_models()
    default = catalog.default_model_name()
    assert out.count("(default)") == 1 and f"{default} (default)\n" in out
    for model in models:
        assert f"\n  {model.description}\n" in out
        assert f"threshold {model.threshold:.4g}, mask size {'yes' if model.uses_mask_size else 'n/a'}, " \
               f"sha256 {model.sha256}" in out
        assert f"family {model.family}, modality {model.modality}, " in out
        assert f"{model.parameters:,} parameters" in out
    assert out.count("sha256 ") == len(models)
    assert "grid 80x96x80 @ 2.0 mm" in out
    for model in models:
        if model.name != default:
            assert f"{model.name}\n  {model.description}\n" in out
    assert out.endswith("(training provenance of each model: uad models --provenance)\n")


def test_models_json_lists_every_model_and_marks_only_the_default(capsys):
    import json

    code, out, _ = run_cli(capsys, "models", "--json")
    listed = json.loads(out)
    assert code == 0 and [m["name"] for m in listed] == [m.name for m in catalog.list_models()]
    assert [m["name"] for m in listed if m["default"] is True] == [catalog.default_model_name()]
    assert out.startswith('[\n  {\n    "')  # indented by two, for reading as well as parsing


@pytest.mark.parametrize("cores, processes, expected", [(8, None, 8), (8, "4", 2), (2, "4", 1), (None, None, 1),
                                                        (6, "", 6)])
def test_training_threads_share_the_cores_among_a_nodes_processes(monkeypatch, cores, processes, expected):
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    if processes is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", processes)
    threads = _default_train_threads()
    assert threads == expected and isinstance(threads, int)  # torch.set_num_threads takes an int


def test_main_returns_the_handlers_exit_code(capsys):
    assert main(["models", "--json"]) == 0
    capsys.readouterr()


def test_ctrl_c_in_a_handler_is_one_line_and_exit_code_130(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("uad.cli._cmd_models", interrupted)
    code, out, err = run_cli(capsys, "models")
    assert code == 130 and out == ""
    assert err == "uad: interrupted; nothing was written to the output folder\n"


HELP_REFERENCE = Path(__file__).with_name("data") / "cli_help_reference.json"


def _help_of(parser: argparse.ArgumentParser) -> dict:
    """What `uad ... --help` tells a user, as data (argparse's layout varies between Python versions, this does not)."""
    entry = {"prog": parser.prog, "description": parser.description, "groups": {}}
    for group in parser._action_groups:
        options = [{"flags": action.option_strings or [action.dest], "dest": action.dest, "help": action.help,
                    "action": type(action).__name__, "required": action.required, "nargs": action.nargs,
                    "type": getattr(action.type, "__name__", action.type),
                    "metavar": action.metavar, "choices": list(action.choices) if action.choices else None,
                    "default": action.default if isinstance(action.default, (int, float, str, type(None))) else
                    repr(action.default)}
                   for action in group._group_actions if not isinstance(action, argparse._SubParsersAction)]
        entry["groups"][group.title] = options
    commands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if commands:
        summaries = {choice.dest: choice.help for choice in commands[0]._choices_actions}
        entry["commands"] = {name: {"summary": summaries.get(name), **_help_of(sub)}
                             for name, sub in commands[0].choices.items()}
    return entry


def test_every_commands_help_and_flags_are_the_reviewed_ones(monkeypatch):
    # The help of every command and flag is what users read before they run anything, and whether a flag is
    # required, what type it parses to and where it lands is what they get: a change must be a reviewed one. After
    # an intended change: UAD_UPDATE_HELP_REFERENCE=1 pytest this test, and review the diff of
    # Testing/data/cli_help_reference.json.
    monkeypatch.setenv("HOME", "/home/user")  # defaults under the home folder (the cache) print the same everywhere
    current = json.loads(json.dumps(_help_of(build_parser()), default=str))
    if os.environ.get("UAD_UPDATE_HELP_REFERENCE"):
        HELP_REFERENCE.write_text(json.dumps(current, indent=1, ensure_ascii=False) + "\n")
    assert current == json.loads(HELP_REFERENCE.read_text())
