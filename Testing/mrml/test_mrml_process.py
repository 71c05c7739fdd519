"""The backend process runner, with real child processes (tiny Python scripts speaking the protocol)."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time

import pytest

from uad.mrml.process import (
    BackendProcess,
    Progress,
    State,
    describe_progress,
    error_message,
    estimate_eta,
    parse_line,
)


def script(tmp_path, body: str) -> list[str]:
    path = tmp_path / "child.py"
    path.write_text("import json, os, signal, subprocess, sys, time\n" + textwrap.dedent(body))
    return [sys.executable, str(path)]


def progress_line(stage, fraction, message="", eta=None) -> str:
    line = {"type": "progress", "stage": stage, "fraction": fraction, "message": message, "eta_seconds": eta}
    return json.dumps(line)


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_parse_line_reads_progress_done_and_ignores_the_rest():
    assert parse_line(progress_line("inference", 0.4, "slice 3", 12.5)) == Progress("inference", 0.4, "slice 3", 12.5)
    assert parse_line(progress_line("load", 1.7)).fraction == 1.0  # clamped
    assert parse_line('{"type": "done", "out_dir": "/x", "device": "cpu"}') == {
        "type": "done",
        "out_dir": "/x",
        "device": "cpu",
    }
    for other in ("loading weights...", "{not json", "[1, 2]", '{"type": "other"}', ""):
        assert parse_line(other) is None


def test_error_message_prefers_the_backend_reason():
    lines = ["Traceback (most recent call last):", "uad: error: input is not a NIfTI file: x.png; convert it"]
    assert error_message(lines, 2) == "input is not a NIfTI file: x.png; convert it"
    assert error_message(["Traceback ...", "RuntimeError: boom", ""], 1) == (
        "the detection process failed with exit code 1: RuntimeError: boom"
    )
    assert "SIGKILL (out of memory?)" in error_message([], -9)


def test_eta_comes_from_the_backend_or_is_extrapolated():
    assert estimate_eta(Progress("inference", 0.5, eta_seconds=30.0), 100.0) == 30.0
    assert estimate_eta(Progress("inference", 0.25), 60.0) == pytest.approx(180.0)
    assert estimate_eta(Progress("load", 0.01), 5.0) is None  # too early to extrapolate
    text = describe_progress(Progress("registration", 0.4, "affine to template", 75.0), 50.0)
    assert text == "Registration: affine to template - about 1 min 15 s left"
    # Between two progress lines the ETA counts down instead of standing still.
    later = describe_progress(Progress("registration", 0.4, "affine to template", 75.0), 60.0, 10.0)
    assert later.endswith("about 1 min 05 s left")


def test_progress_lines_reach_the_callbacks_in_order(tmp_path):
    command = script(
        tmp_path,
        f"""
        print({progress_line("load", 0.05, "loading")!r}, flush=True)
        print("a log line from a library", flush=True)
        print({progress_line("inference", 0.5, "running", 20.0)!r}, flush=True)
        print("a warning on stderr", file=sys.stderr, flush=True)
        print({progress_line("writing", 1.0, "writing")!r}, flush=True)
        print(json.dumps({{"type": "done", "out_dir": "/tmp/x", "device": "cpu"}}), flush=True)
        """,
    )
    events, logs = [], []
    process = BackendProcess(command, on_progress=events.append, on_log=logs.append)
    process.start()
    assert process.wait(timeout=20) is State.SUCCEEDED
    assert [e.stage for e in events] == ["load", "inference", "writing"]
    assert events[1] == Progress("inference", 0.5, "running", 20.0)
    assert sorted(logs) == ["a log line from a library", "a warning on stderr"]
    assert process.result == {"type": "done", "out_dir": "/tmp/x", "device": "cpu"}
    assert process.returncode == 0


def test_user_error_surfaces_as_one_line(tmp_path):
    command = script(
        tmp_path,
        """
        print("uad: error: input is 4D (3 volumes): x.nii.gz; extract one 3D volume", file=sys.stderr)
        sys.exit(2)
        """,
    )
    process = BackendProcess(command)
    process.start()
    assert process.wait(timeout=20) is State.FAILED
    assert process.returncode == 2
    assert process.error_message == "input is 4D (3 volumes): x.nii.gz; extract one 3D volume"


def test_crash_reports_exit_code_and_last_line(tmp_path):
    process = BackendProcess(script(tmp_path, "raise MemoryError('cannot allocate 4 GB')\n"))
    process.start()
    assert process.wait(timeout=20) is State.FAILED
    assert process.returncode == 1
    assert process.error_message == "the detection process failed with exit code 1: MemoryError: cannot allocate 4 GB"


def test_success_without_done_line_is_a_failure(tmp_path):
    process = BackendProcess(script(tmp_path, f"print({progress_line('load', 0.1)!r})\n"))
    process.start()
    assert process.wait(timeout=20) is State.FAILED
    assert "without reporting its results" in process.error_message


def test_poll_never_blocks(tmp_path):
    process = BackendProcess(script(tmp_path, "time.sleep(5)\n"))
    process.start()
    try:
        started = time.perf_counter()
        for _ in range(20):
            assert process.poll() is State.RUNNING
        assert time.perf_counter() - started < 0.2
    finally:
        process.cancel()


@pytest.mark.parametrize("ignore_sigterm", [False, True])
def test_cancel_kills_the_process_and_its_child_within_a_second(tmp_path, ignore_sigterm):
    """PythonSlicer is a launcher that starts the real interpreter: Cancel must reach grandchildren too."""
    command = script(
        tmp_path,
        f"""
        grandchild = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
        if {ignore_sigterm}:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        else:
            grandchild = "import time; time.sleep(60)"
        child = subprocess.Popen([sys.executable, "-c", grandchild])
        print(json.dumps({{"type": "progress", "stage": "inference", "fraction": 0.2, "message": str(child.pid)}}),
              flush=True)
        time.sleep(60)
        """,
    )
    events = []
    process = BackendProcess(command, on_progress=events.append)
    process.start()
    deadline = time.monotonic() + 20
    while not events and time.monotonic() < deadline:
        process.poll()
        time.sleep(0.02)
    assert events, "the child never reported its pid"
    child_pid = int(events[0].message)
    assert alive(process.pid) and alive(child_pid)

    started = time.monotonic()
    process.cancel()
    assert process.state is State.CANCELLED
    while (alive(process.pid) or alive(child_pid)) and time.monotonic() - started < 1.0:
        time.sleep(0.02)
    assert not alive(process.pid)
    assert not alive(child_pid)
    assert time.monotonic() - started < 1.0


def test_environment_is_passed_whole_and_unbuffered(tmp_path):
    command = script(
        tmp_path,
        """
        print(json.dumps({"type": "done", "out_dir": os.environ["UAD_TEST_VALUE"],
                          "device": os.environ["PYTHONUNBUFFERED"]}), flush=True)
        """,
    )
    process = BackendProcess(command, env={**os.environ, "UAD_TEST_VALUE": "from the caller"})
    process.start()
    assert process.wait(timeout=20) is State.SUCCEEDED
    assert process.result["out_dir"] == "from the caller"
    assert process.result["device"] == "1"
    assert "UAD_TEST_VALUE" not in os.environ
