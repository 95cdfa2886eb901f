"""The ``felis`` command: run the service (``up``, ``api``, ``worker``) and talk to it."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from service.store.queue import GPU_QUEUE


def _api(args: argparse.Namespace) -> int:
    import uvicorn

    from service.config import bind_refusal, get_settings
    from service.logs import configure_logging

    settings = get_settings()
    host = args.host or settings.host
    refusal = bind_refusal(settings, host)
    if refusal:
        print(f"felis api: {refusal}", file=sys.stderr)
        return 2
    configure_logging(settings)
    uvicorn.run("service.api.app:create_app", factory=True, host=host,
                port=args.port or settings.port, workers=args.workers, log_level=settings.log_level.lower(),
                proxy_headers=bool(settings.trusted_proxies), timeout_graceful_shutdown=10,
                forwarded_allow_ips=",".join(settings.trusted_proxies) or None,  # X-Forwarded-* from these only
                log_config=None)  # uvicorn's lines go through felis's handler (JSON, request ids)
    return 0


def _check_schema_once_reachable(who: str = "felis worker", say_every: float = 30.0) -> None:
    """init_db, tried again every few seconds while the database does not answer: a worker (or
    `felis up`) that starts, or whose container restarts, during an outage waits for it, saying
    so in one line, instead of exiting with a traceback and lengthening its orchestrator's
    restart back-off. Stopping it (SIGTERM, Ctrl-C) still stops."""
    from sqlalchemy.exc import OperationalError

    from service.store.db import init_db

    delay, said = 0.5, None  # said: when it last said it waits
    while True:
        try:
            init_db()
            if said is not None:
                print(f"{who}: the metadata store answers", file=sys.stderr, flush=True)
            return
        except OperationalError as e:
            now = time.monotonic()
            if said is None or now - said >= say_every:
                reason = str(getattr(e, "orig", None) or e).splitlines()[0]
                print(f"{who}: waiting for the metadata store ({reason})", file=sys.stderr, flush=True)
                said = now
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


def _worker(args: argparse.Namespace) -> int:
    from service.config import get_settings

    settings = get_settings()
    if settings.device.startswith("cuda:"):
        # one worker per GPU: pin this process (and its children) to its device
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", settings.device.split(":", 1)[1])
    from service.errors import SchemaOutdated

    try:  # Celery only logs what worker_process_init raises: wait for the database, or refuse, here
        _check_schema_once_reachable()
    except SchemaOutdated as e:
        print(f"felis worker: {e.message}", file=sys.stderr)
        return 1
    from worker.app import celery_app

    argv = ["worker", "--queues", args.queues, "--concurrency", str(args.concurrency),
            "--loglevel", settings.log_level, "--prefetch-multiplier", "1", "-E"]
    if args.hostname:
        argv += ["--hostname", args.hostname]
    celery_app.worker_main(argv)
    return 0


CHILD_RESTARTS = 5  # `felis up` starts a new worker (or API) when its own exits, up to this many times...
CHILD_RESTART_WINDOW_S = 600.0  # ... each, within this many seconds; then it stops
API_SETTLED_S = 30.0  # an API that exits (not killed) sooner than this after its start is not started again


def _up(args: argparse.Namespace) -> int:
    """Embedded mode: the API and one worker as two child processes, each started again when it
    exits (the worker's watchdog ends a wedged one; the OOM killer picks the biggest process);
    Ctrl-C stops both."""
    from service.config import bind_refusal, get_settings
    from service.errors import SchemaOutdated

    settings = get_settings()
    refusal = bind_refusal(settings, settings.host)
    if refusal:
        print(f"felis up: {refusal}", file=sys.stderr)
        return 2
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        _check_schema_once_reachable("felis up")  # a database configured but not up yet: wait for it
    except SchemaOutdated as e:
        print(f"felis up: {e.message}", file=sys.stderr)
        return 1
    exe = [sys.executable, "-m", "service.cli"]
    port = str(args.port or settings.port)

    commands = {"the worker": exe + ["worker", "--queues", GPU_QUEUE, "--concurrency", "1"], "the API": exe + ["api", "--port", port]}
    procs = {name: subprocess.Popen(command) for name, command in commands.items()}
    starts = {name: [time.monotonic()] for name in commands}
    print(f"felis: embedded mode, data in {settings.data_dir}, API on http://{settings.host}:{port}", flush=True)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    code = 0
    while not stopping:
        for name, p in procs.items():
            if p.poll() is None or stopping:
                continue
            recent = [t for t in starts[name] if time.monotonic() - t < CHILD_RESTART_WINDOW_S]
            # an API that fails at its start (the port taken) fails again: only one killed or
            # that had been serving is started anew; any worker is (its watchdog exits with 75)
            worth = name == "the worker" or p.returncode < 0 or time.monotonic() - starts[name][-1] > API_SETTLED_S
            if worth and len(recent) < CHILD_RESTARTS:
                print(f"felis: {name} exited with {p.returncode}; starting a new one", file=sys.stderr, flush=True)
                procs[name] = subprocess.Popen(commands[name])
                starts[name] = recent + [time.monotonic()]
            else:
                print(f"felis: {name} exited with {p.returncode}; stopping", file=sys.stderr)
                code, stopping = p.returncode or 1, True
        time.sleep(0.2)
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    for p in procs.values():
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
    return code


def _keys(args: argparse.Namespace) -> int:
    """Operator commands on API keys, straight against the metadata store (also the way to the
    first key of a deployment: a one-shot container running `felis keys create --scope admin`)."""
    import json

    from pydantic_core import to_jsonable_python  # times as the API writes them (ISO 8601, Z)

    from service.domain import keys
    from service.errors import FelisError
    from service.store.db import init_db, session_scope

    init_db()
    try:
        with session_scope() as session:
            if args.keys_command == "create":
                row, key = keys.create(session, args.scope, name=args.name or "", dataset_names=args.dataset)
                print(json.dumps({**keys.describe_one(session, row), "key": key}, default=to_jsonable_python))
                print("store the key now: it is not shown again", file=sys.stderr)
            elif args.keys_command == "revoke":
                keys.revoke(session, args.id)
                print(json.dumps({"id": args.id, "revoked": True}))
            else:
                print(json.dumps(keys.list_keys(session), default=to_jsonable_python, indent=2))
    except FelisError as e:
        print(f"felis keys: {e.message} ({e.code})", file=sys.stderr)
        return 1
    return 0


def _migrate(args: argparse.Namespace) -> int:
    """Bring the database to this code's schema (production: a deployment step before the API and
    workers start); ``--check`` only says whether it is there (exit 1 if not)."""
    from service.config import get_settings
    from service.errors import SchemaOutdated
    from service.logs import configure_logging
    from service.store import migrate
    from service.store.db import get_engine

    configure_logging(get_settings())
    engine = get_engine()
    head = migrate.head_revision()
    print(f"database: {engine.url.render_as_string(hide_password=True)}", flush=True)
    try:
        if args.check:
            migrate.check_schema(engine)
            print(f"revision: {head} (head)")
            return 0
        print(f"before: {migrate.describe(engine)}", flush=True)
        _, after = migrate.upgrade(engine)
    except SchemaOutdated as e:
        print(f"felis migrate: {e.message}", file=sys.stderr)
        return 1
    print(f"after: {after}" + (" (head)" if after == head else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="felis", description="felis: train and serve image classifiers")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="embedded mode: API + worker, no external services")
    up.add_argument("--port", type=int, default=None)
    up.set_defaults(func=_up)

    api = sub.add_parser("api", help="run the HTTP API")
    api.add_argument("--host", default=None)
    api.add_argument("--port", type=int, default=None)
    api.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    api.set_defaults(func=_api)

    worker = sub.add_parser("worker", help="run a training worker")
    worker.add_argument("--queues", default=GPU_QUEUE)
    worker.add_argument("--concurrency", type=int, default=1)
    worker.add_argument("--hostname", default=None, help="Celery node name (default: celery@host)")
    worker.set_defaults(func=_worker)

    keys = sub.add_parser("keys", help="create, list and revoke API keys (operator)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="print a new key (shown once)")
    create.add_argument("--scope", action="append", choices=["predict", "read", "write", "admin"], required=True,
                        help="predict (predict, datasets' and models' metadata) < read (also images, evaluations, "
                             "downloads, trainings) < write (also upload, relabel, train, promote, delete) < admin "
                             "(also keys, /metrics); each includes the ones before")
    create.add_argument("--name", default="", help="a note: who or what uses the key")
    create.add_argument("--dataset", action="append", default=None, metavar="NAME",
                        help="repeatable: limit the key to these datasets (default: every dataset)")
    revoke = keys_sub.add_parser("revoke")
    revoke.add_argument("id")
    keys_sub.add_parser("list")
    keys.set_defaults(func=_keys)

    migrate = sub.add_parser("migrate", help="upgrade the database schema to this version's (operator)")
    migrate.add_argument("--check", action="store_true",
                         help="change nothing: exit 1 unless the schema is this version's")
    migrate.set_defaults(func=_migrate)
    from felis_client.cli import add_client_commands  # HTTP only: no torch, no FastAPI
    add_client_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
