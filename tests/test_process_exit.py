"""A finished `orchestrator` command exits with its own code even when a native library would abort in
the interpreter's teardown (pyarrow's thread pools did, in CI), and still joins its threads and runs
its atexit handlers (orchestrator/process_exit.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import cli_env

# A command run through the CLI's entry point (or through `main` alone), in a process that holds what a
# real run can hold at its end: a non-daemon thread still finishing a write, an atexit handler, and an
# object whose teardown aborts the process as a native pool torn down under a live worker does.
_PROBE = """
import atexit, os, sys, threading, time
from pathlib import Path
out = Path(sys.argv[1])
how = sys.argv[2]
sys.argv = ["orchestrator", *sys.argv[3:]]

class AbortsAtTeardown:
    def __del__(self):
        os.write(2, b"teardown reached\\n")
        os.abort()

pool = AbortsAtTeardown()

def upload():
    time.sleep(1.5)  # outlives the quicker commands: only a join lets it finish
    (out / "thread").write_text("done")

threading.Thread(target=upload).start()
atexit.register(lambda: (out / "atexit").write_text("ran"))
from orchestrator import cli
if how == "entry":
    cli.entry()
else:
    cli.main()
"""


def _probe(tmp_path: Path, how: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path), how, *args], cwd=tmp_path, env=cli_env(),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("args", "code"), [(("--help",), 0), (("run", "missing.yaml"), 2)],
                         ids=["finished", "refused"])
def test_a_command_exits_with_its_code_past_a_teardown_that_would_abort(tmp_path, args, code):
    """Breaks if the entry point lets the interpreter tear down (the abort then ends the process with
    SIGABRT), cuts a running thread short, skips atexit handlers, or loses the command's exit code."""
    res = _probe(tmp_path, "entry", *args)
    assert res.returncode == code, res.stderr
    assert "teardown reached" not in res.stderr
    assert (tmp_path / "thread").read_text() == "done"
    assert (tmp_path / "atexit").read_text() == "ran"


def test_without_the_entry_point_the_same_teardown_aborts(tmp_path):
    """The probe's abort is real: through `main` and the interpreter's own exit, the process dies
    with SIGABRT after its work, as `data pack` did in CI. Without this, the test above proves nothing."""
    res = _probe(tmp_path, "main", "--help")
    assert res.returncode == -6, res.stderr
    assert "teardown reached" in res.stderr
    assert (tmp_path / "atexit").read_text() == "ran"


def test_ctrl_c_while_a_thread_finishes_exits_130_without_a_traceback(tmp_path):
    """Breaks if a Ctrl-C during the exit's join of a still-running thread prints a traceback
    instead of the one-line interrupted message and exit code 130."""
    import signal
    import time

    # The probe marks the moment its exit starts joining the thread (a wrapper around the join it
    # calls), so the Ctrl-C lands there however slowly this machine runs the command before it.
    # Ctrl-C as a terminal delivers it: a test run started in the background (CI's runner, `cmd &`)
    # hands its children SIGINT ignored, and Python then installs no handler of its own.
    joining = ("import signal\n"
               "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
               "_join = threading._shutdown\n"
               "def _marked():\n"
               "    (out / 'joining').write_text('')\n"
               "    _join()\n"
               "threading._shutdown = _marked\n"
               "from orchestrator import cli")
    probe = _PROBE.replace("time.sleep(1.5)", "time.sleep(120)").replace("from orchestrator import cli", joining, 1)
    proc = subprocess.Popen([sys.executable, "-c", probe, str(tmp_path), "entry", "--help"], cwd=tmp_path,
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 100
        while not (tmp_path / "joining").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "joining").exists(), "the probe never reached its exit's join"
        time.sleep(0.2)  # from the mark into the join itself
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted while finishing" in stderr
    assert not (tmp_path / "thread").exists()
