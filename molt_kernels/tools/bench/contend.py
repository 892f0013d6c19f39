"""``bench --contend N``: N busy processes beside the measurement, as on a shared machine.

Each is a Python interpreter spinning in a loop (one core's worth of load, no memory traffic to
speak of). They are started before the dense matmul rate is measured and stopped, by process id,
when the measurement ends or fails.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

SPIN = "while True: pass"
STOP_TIMEOUT_S = 10.0


@contextmanager
def busy_processes(n: int) -> Iterator[list[int]]:
    """Run ``n`` spinning processes for the duration of the block; yields their process ids."""
    if n < 0:
        raise ValueError(f"contend must be >= 0, got {n}")
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen([sys.executable, "-c", SPIN]))
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
