"""Run the backend (``uad detect ... --progress json``) in its own process, without Qt.

Why a process and not a thread: inference holds the GIL and a lot of memory, a crash must not take Slicer down,
and Cancel has to stop torch/ANTs mid-computation, which only killing the process can do. The child gets its own
process group (session), so Cancel kills the launcher *and* everything it started (``PythonSlicer`` is a
launcher that spawns the real interpreter).

Reader threads only parse lines and put events on a queue; callbacks run in whichever thread calls
:meth:`BackendProcess.poll` (in Slicer: a ``QTimer`` on the GUI thread), so they may touch widgets and the scene.
"""

from __future__ import annotations

import collections
import enum
import json
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

ERROR_PREFIX = "uad: error:"
STAGE_TITLES = {
    "load": "Loading",
    "preprocessing": "Preprocessing",
    "registration": "Registration",
    "inference": "Inference",
    "postprocessing": "Post-processing",
    "writing": "Writing results",
}
# Lines kept from stderr: enough for the last traceback, bounded so a chatty child cannot fill memory.
_STDERR_TAIL_LINES = 200


@dataclass(frozen=True)
class Progress:
    """One ``{"type": "progress", ...}`` line of ``uad detect --progress json``."""

    stage: str
    fraction: float
    message: str = ""
    eta_seconds: float | None = None


class State(enum.Enum):
    NOT_STARTED = "not started"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


def parse_line(line: str) -> Progress | dict | None:
    """A :class:`Progress`, the ``done`` object as a dict, or None for anything else (a log line)."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    if obj.get("type") == "progress":
        eta = obj.get("eta_seconds")
        return Progress(
            stage=str(obj.get("stage", "")),
            fraction=min(max(float(obj.get("fraction", 0.0)), 0.0), 1.0),
            message=str(obj.get("message", "")),
            eta_seconds=None if eta is None else max(float(eta), 0.0),
        )
    if obj.get("type") == "done":
        return obj
    return None


def estimate_eta(progress: Progress, elapsed_seconds: float) -> float | None:
    """The backend's ETA when it gives one, else a linear extrapolation once there is enough progress to trust."""
    if progress.eta_seconds is not None:
        return progress.eta_seconds
    if progress.fraction < 0.02 or elapsed_seconds <= 0:
        return None
    return elapsed_seconds * (1.0 - progress.fraction) / progress.fraction


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def describe_progress(progress: Progress, elapsed_seconds: float, seconds_since_progress: float = 0.0) -> str:
    """The status line under the progress bar, e.g. ``Inference: slice 40/96 - about 1 min 05 s left``.

    ``seconds_since_progress`` counts the ETA down between two progress lines, so it does not stand still.
    """
    title = STAGE_TITLES.get(progress.stage, progress.stage.capitalize() or "Working")
    text = f"{title}: {progress.message}" if progress.message else title
    eta = estimate_eta(progress, elapsed_seconds - seconds_since_progress)
    if eta is not None:
        text += f" - about {format_duration(max(eta - seconds_since_progress, 1.0))} left"
    return text


def error_message(stderr_lines: Sequence[str], returncode: int | None) -> str:
    """The one line to show the user: the backend's ``uad: error:`` reason if it gave one, else what we know."""
    for line in reversed(stderr_lines):
        if line.startswith(ERROR_PREFIX):
            return line[len(ERROR_PREFIX) :].strip()
    last = next((line.strip() for line in reversed(stderr_lines) if line.strip()), "")
    detail = f": {last}" if last else ""
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        # SIGKILL from outside is nearly always the kernel's out-of-memory killer.
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"the detection process was stopped by {name}{hint}{detail}"
    return f"the detection process failed with exit code {returncode}{detail}"


class BackendProcess:
    """One run of a command that speaks the ``--progress json`` protocol.

    ``start()`` returns at once; call ``poll()`` regularly (it never blocks) or ``wait()``. Callbacks:
    ``on_progress(Progress)`` and ``on_log(str)`` (every non-protocol line of stdout and stderr).
    """

    def __init__(
        self,
        command: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        on_log: Callable[[str], None] | None = None,
    ):
        self.command = [str(part) for part in command]
        self.env = dict(os.environ if env is None else env)
        # The protocol is line based: without this the child's stdout is block-buffered when it is a pipe.
        self.env["PYTHONUNBUFFERED"] = "1"
        self.cwd = cwd
        self.on_progress = on_progress
        self.on_log = on_log

        self.state = State.NOT_STARTED
        self.returncode: int | None = None
        self.result: dict | None = None
        self.last_progress: Progress | None = None
        self.last_progress_time = 0.0  # time.monotonic() when last_progress arrived (delivered by poll)
        self.error_message = ""
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL_LINES)
        self.start_time = 0.0

        self._popen: subprocess.Popen | None = None
        self._events: queue.Queue = queue.Queue()
        self._readers: list[threading.Thread] = []
        self._cancel_requested = False

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    @property
    def elapsed_seconds(self) -> float:
        return time.monotonic() - self.start_time if self.start_time else 0.0

    @property
    def seconds_since_progress(self) -> float:
        return time.monotonic() - self.last_progress_time if self.last_progress_time else 0.0

    @property
    def finished(self) -> bool:
        return self.state in (State.SUCCEEDED, State.FAILED, State.CANCELLED)

    def start(self) -> None:
        if self.state is not State.NOT_STARTED:
            raise RuntimeError("a BackendProcess can only be started once")
        kwargs: dict = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
        else:
            kwargs["start_new_session"] = True  # own process group: killpg reaches every descendant
        self.start_time = time.monotonic()
        self._popen = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
            cwd=self.cwd,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            **kwargs,
        )
        self.state = State.RUNNING
        self._readers = [
            threading.Thread(target=self._read_stdout, name="uad-stdout", daemon=True),
            threading.Thread(target=self._read_stderr, name="uad-stderr", daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_stdout(self) -> None:
        for line in self._popen.stdout:
            parsed = parse_line(line)
            if isinstance(parsed, Progress):
                self._events.put(("progress", parsed))
            elif isinstance(parsed, dict):
                self._events.put(("done", parsed))
            elif line.strip():
                self._events.put(("log", line.rstrip("\n")))
        self._popen.stdout.close()

    def _read_stderr(self) -> None:
        for line in self._popen.stderr:
            line = line.rstrip("\n")
            self.stderr_tail.append(line)
            if line.strip():
                self._events.put(("log", line))
        self._popen.stderr.close()

    def poll(self) -> State:
        """Deliver queued events to the callbacks and update :attr:`state`; never blocks."""
        if self.state is not State.RUNNING:
            return self.state
        exited = self._popen.poll() is not None
        # Only once the readers have seen EOF is every line of the child in the queue.
        readers_done = exited and not any(reader.is_alive() for reader in self._readers)
        self._drain_events()
        if readers_done:
            self._finish()
        return self.state

    def _drain_events(self) -> None:
        while True:
            try:
                kind, payload = self._events.get_nowait()
            except queue.Empty:
                return
            if kind == "progress":
                self.last_progress = payload
                self.last_progress_time = time.monotonic()
                if self.on_progress:
                    self.on_progress(payload)
            elif kind == "done":
                self.result = payload
            elif self.on_log:
                self.on_log(payload)

    def _finish(self) -> None:
        self.returncode = self._popen.returncode
        if self._cancel_requested:
            self.state = State.CANCELLED
        elif self.returncode == 0 and self.result is not None:
            self.state = State.SUCCEEDED
        elif self.returncode == 0:
            self.state = State.FAILED
            self.error_message = "the detection process ended without reporting its results"
        else:
            self.state = State.FAILED
            self.error_message = error_message(list(self.stderr_tail), self.returncode)

    def wait(self, timeout: float | None = None, poll_interval: float = 0.05) -> State:
        """Poll until the process has finished (or ``timeout`` seconds have passed); returns the state."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is State.RUNNING:
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(poll_interval)
        return self.state

    def cancel(self, grace_seconds: float = 0.5) -> None:
        """Stop the process and all its descendants: SIGTERM to the group, SIGKILL after ``grace_seconds``."""
        if self.state is not State.RUNNING:
            return
        self._cancel_requested = True
        _kill_process_tree(self._popen, grace_seconds)
        for reader in self._readers:
            reader.join(timeout=1.0)
        self.poll()


def _kill_process_tree(popen: subprocess.Popen, grace_seconds: float) -> None:
    if os.name == "nt":
        # taskkill /T walks the child tree, which a process group alone does not give on Windows.
        subprocess.run(
            ["taskkill", "/F", "/T", "/PID", str(popen.pid)],
            capture_output=True,
            creationflags=subprocess.CREATE_NO_WINDOW,
        )
        popen.wait()
        return
    group = popen.pid  # the child is a session leader, so its pid is the group id
    if not _signal_group(group, signal.SIGTERM):
        popen.kill()  # no group (should not happen): at least stop the direct child
        popen.wait()
        return
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline:
        if popen.poll() is not None and not _signal_group(group, 0):
            break
        time.sleep(0.02)
    else:
        _signal_group(group, signal.SIGKILL)
    popen.wait()
    # A descendant that ignored SIGTERM may outlive the leader; the group id stays valid while it lives.
    _signal_group(group, signal.SIGKILL)


def _signal_group(group: int, sig: int) -> bool:
    """Send ``sig`` to the process group; False when no process of the group is left."""
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        # Only possible once the group id has been reused by another user's process: ours are all gone.
        return False
    return True
