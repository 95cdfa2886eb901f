"""worker.metrics: the worker's metrics server sums its forked pool processes; a taken port is not fatal."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT
from tests.utils.processes import free_port

_WORKER_SCRIPT = textwrap.dedent("""
    import os, sys, time, urllib.request
    from datetime import timedelta
    from service.store.db import init_db, session_scope
    from service.domain import datasets
    from service.store.tables import Training, utcnow
    from worker import metrics

    init_db()
    port = metrics.start_worker_metrics_server(int(sys.argv[1]), addr="127.0.0.1")
    with session_scope() as s:
        d = datasets.create(s, "w")
        s.flush()
        t = Training(dataset_id=d.id, status="queued")
        s.add(t)
        s.flush()
        tid = t.id

    class Task:
        name = "felis.train"

    pid = os.fork()
    if pid == 0:  # a pool process: runs the task, as Celery's prefork pool does
        metrics._on_task_prerun(task_id="c1", task=Task())
        with session_scope() as s:
            t = s.get(Training, tid)
            t.status, t.started_at = "succeeded", utcnow()
            t.finished_at = t.started_at + timedelta(seconds=42)
        metrics._on_task_postrun(task_id="c1", task=Task(), args=[tid], retval="succeeded")
        metrics._on_task_postrun(task_id="c2", task=Task(), args=[tid], retval="succeeded")  # never started
        os._exit(0)
    os.waitpid(pid, 0)
    print(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode())
    metrics.stop_worker_metrics()
""")


def test_worker_metrics_sum_the_pool_processes(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FELIS_", "PROMETHEUS_"))}
    env["FELIS_DATA_DIR"] = str(tmp_path / "var")
    r = subprocess.run([sys.executable, "-c", _WORKER_SCRIPT, str(free_port())], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(r.stdout) for s in f.samples}
    assert samples[("felis_trainings_total", (("outcome", "succeeded"),))] == 1
    assert samples[("felis_training_duration_seconds_count", (("outcome", "succeeded"),))] == 1
    assert samples[("felis_training_duration_seconds_sum", (("outcome", "succeeded"),))] == pytest.approx(42, abs=1)
    assert samples[("felis_trainings_running", ())] == 0
    assert ("felis_queue_depth", (("queue", "gpu"),)) in samples


def test_a_taken_port_does_not_stop_the_worker(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code = ("import os, sys; from worker import metrics; "
                f"assert metrics.start_worker_metrics_server({port}, addr='127.0.0.1') is None; "
                "assert metrics.start_worker_metrics_server(0) is None; metrics.stop_worker_metrics()")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FELIS_", "PROMETHEUS_"))}
        env["FELIS_DATA_DIR"] = str(tmp_path / "var")
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
