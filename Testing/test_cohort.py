"""``uad detect`` over a cohort: case listing, shards, one model load, failures recorded, clean interrupts."""

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

import uad.inference
from uad.cohort import Case, Shard, is_cohort, list_cases
from uad.errors import UserInputError
from uad.inference import OUTPUT_FILES

from conftest import IXI_MASK, IXI_T1, run_cli


def touch(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")
    return folder


@pytest.fixture
def scans(tmp_path):
    """a, b_corrupt (garbage bytes) and c: the two good ones are copies of the real IXI T1, plus a brain mask."""
    folder = tmp_path / "scans"
    folder.mkdir()
    shutil.copy(IXI_T1, folder / "a.nii.gz")
    (folder / "b_corrupt.nii.gz").write_bytes(np.random.default_rng(0).bytes(4096))
    shutil.copy(IXI_T1, folder / "c.nii.gz")
    shutil.copy(IXI_MASK, folder / "a_brainmask.nii.gz")  # not a case
    return folder


@pytest.fixture
def count_model_loads(monkeypatch):
    calls = []
    real = uad.inference.load_checkpoint

    def counting(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(uad.inference, "load_checkpoint", counting)
    return calls


def partial_folders(folder):
    return [p for p in folder.rglob("*") if ".partial" in p.name]


# --- case listing and shards: no detection runs ---------------------------------------------------------------


def test_a_folder_lists_its_scans_sorted_without_masks(tmp_path):
    folder = touch(tmp_path / "in", "b.nii", "a.nii.gz", "a_brainmask.nii.gz", "x_mask.nii.gz", "x_seg.nii",
                   ".hidden.nii.gz", "notes.txt", "c.nii.gz.bak")
    (folder / "sub.nii.gz").mkdir()  # a folder, not a scan
    cases = list_cases([folder])
    assert [(c.id, c.input.name, c.brain_mask) for c in cases] == [("a", "a.nii.gz", None), ("b", "b.nii", None)]


def test_a_csv_lists_ids_paths_and_masks(tmp_path):
    touch(tmp_path / "data", "s1.nii.gz", "s1_mask.nii.gz")
    table = tmp_path / "lists" / "cohort.csv"
    table.parent.mkdir()
    table.write_text("\ufeffInput, id ,brain_mask,site\n"  # Excel's BOM, odd case and spaces in the header
                     "../data/s1.nii.gz,sub-01,../data/s1_mask.nii.gz,x\n"
                     "\n"
                     f"{tmp_path / 'data' / 's2.nii'},,,y\n"
                     "../data/s1.nii.gz,sub-01,,z\n"
                     "../data/s1.nii.gz,../../evil,,z\n")
    cases = list_cases([table])
    assert [c.id for c in cases] == ["sub-01", "s2", "sub-01-2", "_.._evil"]  # never a path
    assert cases[0].input == table.parent / "../data/s1.nii.gz" and cases[0].input.exists()
    assert cases[0].brain_mask == table.parent / "../data/s1_mask.nii.gz"
    assert cases[1].input == tmp_path / "data" / "s2.nii" and cases[1].brain_mask is None


def test_colliding_ids_are_made_unique(tmp_path):
    touch(tmp_path / "x", "scan.nii.gz")
    touch(tmp_path / "y", "scan.nii", "SCAN-2.nii.gz")
    cases = list_cases([tmp_path / "x", tmp_path / "y", tmp_path / "x" / "scan.nii.gz"])
    assert [c.id for c in cases] == ["scan", "SCAN-2", "scan-3", "scan-4"]  # case-insensitive, in list order


def test_single_input_keeps_the_classic_layout(tmp_path):
    touch(tmp_path / "in", "a.nii.gz")
    assert not is_cohort([str(IXI_T1)])
    assert not is_cohort([str(tmp_path / "missing.nii.gz")])
    assert is_cohort([str(IXI_T1)], Shard(1, 1))
    assert is_cohort([str(IXI_T1), str(IXI_T1)])
    assert is_cohort([str(tmp_path / "in")]) and is_cohort([str(tmp_path / "list.csv")])


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7, 9])
def test_shards_partition_the_cases_exactly(count):
    cases = [Case(f"case{i:02d}", IXI_T1) for i in range(7)]
    shards = [Shard(i, count).select(cases) for i in range(1, count + 1)]
    picked = [c.id for shard in shards for c in shard]
    assert sorted(picked) == [c.id for c in cases] and len(picked) == len(set(picked))
    assert all(shard == cases[i::count] for i, shard in enumerate(shards))


def test_shard_summaries_never_share_a_name():
    names = {Shard.parse(f"{i}/{n}").summary_name for n in range(1, 6) for i in range(1, n + 1)}
    assert len(names) == 15 and "cohort" not in names
    assert Shard.parse(" 2/4 ") == Shard(2, 4) and Shard.parse("2/4").summary_name == "cohort-shard-2-of-4"


@pytest.mark.parametrize("text", ["0/4", "5/4", "1/0", "-1/2", "2", "a/b", "1/2/3", "", "1.5/2"])
def test_bad_shards_are_rejected(text):
    with pytest.raises(UserInputError, match="--shard"):
        Shard.parse(text)


@pytest.mark.parametrize("shard", ["0/2", "3/2", "x", "2/0", "1/"])
def test_bad_shard_exits_2_with_one_line(capsys, tmp_path, scans, shard):
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "detect", str(scans), "--out", str(out), "--shard", shard,
                                "--model", "intensity")
    assert code == 2 and err.startswith("uad: error: --shard") and err.count("\n") == 1 and stdout == ""
    assert not out.exists()


def test_bad_cohort_arguments_exit_2(capsys, tmp_path):
    empty = touch(tmp_path / "empty", "only_brainmask.nii.gz", "notes.txt")
    no_input = tmp_path / "no_input.csv"
    no_input.write_text("id,path\ns1,a.nii.gz\n")
    header_only = tmp_path / "header_only.csv"
    header_only.write_text("input,id\n\n")
    empty_cell = tmp_path / "empty_cell.csv"
    empty_cell.write_text("input,id\na.nii.gz,a\n,b\n")
    for inputs, message in [
        ([empty], "no NIfTI scans"),
        ([no_input], "no 'input' column (columns: 'id', 'path')"),
        ([header_only], "lists no scans"),
        ([empty_cell], "line 3, has an empty input"),
        ([tmp_path / "missing.csv"], "CSV file not found"),
        ([IXI_T1, empty], "no NIfTI scans"),
    ]:
        out = tmp_path / "out"
        code, _, err = run_cli(capsys, "detect", *map(str, inputs), "--out", str(out), "--model", "intensity")
        assert code == 2 and err.startswith("uad: error:") and message in err and err.count("\n") == 1, err
        assert not out.exists()


# --- real cohorts on the real IXI scan with the fast intensity model -------------------------------------------


def test_a_corrupt_scan_mid_batch_is_recorded_and_the_run_goes_on(capsys, tmp_path, scans, count_model_loads):
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "detect", str(scans), "--out", str(out), "--model", "intensity",
                                "--progress", "json")
    assert code == 1
    assert len(count_model_loads) == 1  # one model load for the whole cohort

    assert sorted(p.name for p in out.iterdir()) == ["a", "c", "cohort.csv", "cohort.json"]
    for case in ("a", "c"):
        assert sorted(p.name for p in (out / case).iterdir()) == sorted(OUTPUT_FILES)
        assert json.loads((out / case / "report.json").read_text())["input"] == str(scans / f"{case}.nii.gz")
    assert partial_folders(out) == []

    summary = json.loads((out / "cohort.json").read_text())
    assert (summary["cases_planned"], summary["ok"], summary["failed"]) == (3, 2, 1)
    assert summary["model"] == "intensity" and summary["shard"] is None and summary["interrupted"] is False
    rows = {row["id"]: row for row in summary["cases"]}
    assert [row["id"] for row in summary["cases"]] == ["a", "b_corrupt", "c"]
    bad = rows["b_corrupt"]
    assert bad["status"] == "failed" and "not gzip-compressed" in bad["error"] and "\n" not in bad["error"]
    assert bad["out_dir"] is None and bad["segmented_volume_ml"] is None and bad["input"].endswith("b_corrupt.nii.gz")
    for case in ("a", "c"):
        row = rows[case]
        assert row["status"] == "ok" and row["error"] is None and row["out_dir"] == str(out / case)
        report = json.loads((out / case / "report.json").read_text())
        assert row["segmented_volume_ml"] == report["segmented_volume_ml"] and row["seconds"] > 0

    with open(out / "cohort.csv", newline="") as stream:
        table = list(csv.DictReader(stream))
    assert [(r["id"], r["status"]) for r in table] == [("a", "ok"), ("b_corrupt", "failed"), ("c", "ok")]
    assert table[1]["error"] == bad["error"] and table[0]["out_dir"] == str(out / "a")

    lines = err.strip().splitlines()
    assert lines[0].startswith("uad: case b_corrupt failed: input is named .nii.gz but is not gzip-compressed")
    assert lines[-1] == f"uad: 1 of 3 cases failed; see {out / 'cohort.json'}" and len(lines) == 2

    events = [json.loads(line) for line in stdout.splitlines()]
    progress = [e for e in events if e["type"] == "progress"]
    assert {e["case"] for e in progress} == {"a", "b_corrupt", "c"}
    assert set(progress[0]) == {"type", "stage", "fraction", "message", "eta_seconds", "case", "case_number", "cases"}
    assert [e["case"] for e in events if e["type"] == "done"] == ["a", "c"]
    assert [e for e in events if e["type"] == "done"][0]["out_dir"] == str(out / "a")
    assert [e["case"] for e in events if e["type"] == "failed"] == ["b_corrupt"]
    assert events[-1] == {"type": "cohort", "summary": str(out / "cohort.json"), "cases": 3, "ok": 2, "failed": 1,
                          "interrupted": False}


def test_a_csv_cohort_with_its_own_ids_and_brain_masks(capsys, tmp_path, count_model_loads):
    table = tmp_path / "cohort.csv"
    table.write_text(f"id,input,brain_mask\nwith-mask,{IXI_T1},{IXI_MASK}\nwithout-mask,{IXI_T1},\n")
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "detect", str(table), "--out", str(out), "--model", "intensity")
    assert code == 0, err
    assert len(count_model_loads) == 1
    assert "2 of 2 cases done" in stdout and "2/2" in err  # the bar over cases, on stderr
    assert sorted(p.name for p in out.iterdir()) == ["cohort.csv", "cohort.json", "with-mask", "without-mask"]
    given = np.asanyarray(nib.load(str(IXI_MASK)).dataobj) > 0
    used = {case: np.asanyarray(nib.load(str(out / case / "brain_mask.nii.gz")).dataobj) > 0
            for case in ("with-mask", "without-mask")}
    np.testing.assert_array_equal(used["with-mask"], given)
    assert (used["without-mask"] != given).any()  # the template mask, not the one given for the other case
    summary = json.loads((out / "cohort.json").read_text())
    assert [(r["id"], r["status"], r["brain_mask"]) for r in summary["cases"]] == [
        ("with-mask", "ok", str(IXI_MASK)), ("without-mask", "ok", None)]


def test_a_shard_runs_only_its_cases_into_its_own_summary(capsys, tmp_path, scans):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "detect", str(scans), "--out", str(out), "--model", "intensity",
                           "--progress", "none", "--shard", "2/2")
    assert code == 1  # shard 2 of 2 is the corrupt one alone: cases[1::2] of a, b_corrupt, c
    assert sorted(p.name for p in out.iterdir()) == ["cohort-shard-2-of-2.csv", "cohort-shard-2-of-2.json"]
    summary = json.loads((out / "cohort-shard-2-of-2.json").read_text())
    assert summary["shard"] == "2/2" and [(r["id"], r["status"]) for r in summary["cases"]] == [
        ("b_corrupt", "failed")]
    assert err.strip().splitlines()[-1] == f"uad: 1 of 1 cases failed; see {out / 'cohort-shard-2-of-2.json'}"

    code, stdout, err = run_cli(capsys, "detect", str(scans), "--out", str(out), "--progress", "none",
                                "--shard", "4/4")
    assert code == 0 and "no cases to run (shard 4/4)" in stdout  # more array tasks than cases is not an error
    assert json.loads((out / "cohort-shard-4-of-4.json").read_text())["cases"] == []


def test_ctrl_c_keeps_finished_cases_and_leaves_no_half_written_case(capsys, tmp_path, scans, monkeypatch):
    (scans / "b_corrupt.nii.gz").unlink()
    saves = []
    niftis_per_case = sum(name.endswith(".nii.gz") for name in OUTPUT_FILES)
    real_save = uad.inference.save_volume

    def save_then_interrupt(*args, **kwargs):
        saves.append(args[1])
        if len(saves) == niftis_per_case + 2:  # the second NIfTI of the second case
            raise KeyboardInterrupt
        return real_save(*args, **kwargs)

    monkeypatch.setattr(uad.inference, "save_volume", save_then_interrupt)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "detect", str(scans), "--out", str(out), "--model", "intensity",
                           "--progress", "none")
    assert code == 130 and "interrupted after 1 of 2 cases" in err
    assert saves[-1].parent.name.startswith(".c.partial-")  # the interrupt came while writing case c
    assert sorted(p.name for p in out.iterdir()) == ["a", "cohort.csv", "cohort.json"]  # c left nothing behind
    assert sorted(p.name for p in (out / "a").iterdir()) == sorted(OUTPUT_FILES)
    summary = json.loads((out / "cohort.json").read_text())
    assert summary["interrupted"] is True and summary["cases_planned"] == 2
    assert [(r["id"], r["status"]) for r in summary["cases"]] == [("a", "ok")]
