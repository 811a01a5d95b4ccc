"""bench/stack.py: a bench stopped with SIGTERM still runs its cleanup (which stops the stack)."""

from __future__ import annotations

import signal
import subprocess
import sys

from bench.stack import ROOT

SCRIPT = """
import sys, time
from bench.stack import exit_on_sigterm
exit_on_sigterm()
try:
    print("ready", flush=True)
    time.sleep(60)
finally:
    print("stack stopped", flush=True)
"""


def test_sigterm_runs_the_bench_s_finally_blocks():
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert out.strip() == "stack stopped" and proc.returncode == 128 + signal.SIGTERM
