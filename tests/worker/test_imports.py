"""The worker process stays off the web stack: importing its tasks loads no FastAPI, Starlette or uvicorn.

(The API side's opposite rule, no torch, is checked statically by .importlinter / tests/test_layers.py
and on a running API process by tests/e2e/test_walkthrough.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WEB = ("fastapi", "starlette", "uvicorn")


def test_importing_the_worker_tasks_loads_no_web_framework(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FELIS_")}
    env["FELIS_DATA_DIR"] = str(tmp_path / "var")
    code = ("import sys, worker.tasks; "
            f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {WEB!r}); "
            "assert not loaded, f'worker.tasks imported {loaded}'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
