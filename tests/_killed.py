"""A writer killed mid-write: the subprocess harness the file-safety tests share."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def kill_at_marker(script: str, path: Path, marker: Path) -> int:
    """Run ``python -c script path marker`` in a fresh process, SIGKILL it as soon as it
    creates ``marker`` (the script does so mid-write), and return its exit status.

    Fails the test with the child's stderr if the marker never appears (up to 120 s on a
    loaded machine)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(path), str(marker)], env=env, stderr=subprocess.PIPE
    )
    try:
        for _ in range(1200):
            if marker.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert marker.exists(), proc.stderr.read().decode() if proc.stderr else ""
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
        marker.unlink(missing_ok=True)
    return proc.returncode
