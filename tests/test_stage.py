"""A stage stops on SIGINT and SIGTERM even when it was started with SIGINT ignored."""

import signal
import subprocess
import sys
import time

import pytest

SCRIPT = """
import sys, time
from pipeline.core import stage
def main(argv):
    try:
        print("ready", flush=True)
        time.sleep(60)
    finally:
        print("cleaned up", flush=True)
stage.run(main)
"""


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM)])
def test_stage_stops_and_cleans_up_on_a_signal(sig, code):
    def ignore_sigint():  # what a background job of a non-interactive shell inherits
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    p = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=ignore_sigint)
    assert p.stdout.readline().strip() == "ready"
    t0 = time.perf_counter()
    p.send_signal(sig)
    out, err = p.communicate(timeout=30)
    assert p.returncode == code and time.perf_counter() - t0 < 30
    assert "cleaned up" in out
    if sig == signal.SIGINT:
        assert err.strip().startswith("interrupted:")


@pytest.mark.parametrize("err, says", [
    (OSError(28, "No space left on device", "cache/qdg/.gradients-parts/part-00003.npz"), "no space left on the device"),
    (PermissionError(13, "Permission denied", "cache/corpus/tokens.parquet"), "cannot write cache/corpus/tokens.parquet"),
    (OSError(30, "Read-only file system", "cache/losses"), "make cache/ writable"),
])
def test_the_machines_refusals_are_one_line(err, says, capsys):
    """A read-only cache/ or a full disk ends a stage with one line naming the path, not a traceback."""
    from pipeline.core import stage

    def main(argv):
        raise err

    with pytest.raises(SystemExit) as e:
        stage.run(main, [])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0]
