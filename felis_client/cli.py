"""``felis datasets | create | upload | train | models | promote | predict``: the API from a terminal.

These commands only talk HTTP (felis_client): they import neither torch nor the service, so they
run anywhere the small client is installed. The server's ``felis`` command adds them to its own
(``add_client_commands``); ``pip install ./felis_client`` alone gives them as ``felis-client``
(``main``). Server and key: ``--url`` / ``--api-key``, else FELIS_URL / FELIS_API_KEY, else
``~/.config/felis/config.toml``.

Progress bars are tqdm's (one small pure-Python dependency, no others) and are drawn only on a
terminal; when stderr is not a TTY (CI logs, pipes) progress is written as plain lines instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO


def add_client_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add the client commands to the ``felis`` parser's subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("server")
    group.add_argument("--url", default=None, help="the felis API (default: $FELIS_URL, the config file, "
                                                   "http://127.0.0.1:8000)")
    group.add_argument("--api-key", default=None, help="API key (default: $FELIS_API_KEY, the config file)")

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = subparsers.add_parser(name, parents=[common], help=help, description=help)
        # the command's own name ("felis" or "felis-client") for the hints and error lines
        p.set_defaults(func=_guarded(func), cli_prog=p.prog.rpartition(" ")[0] or "felis")
        return p

    add("datasets", _datasets, "list datasets with their label counts")
    p = add("create", _create, "create a dataset")
    p.add_argument("dataset")

    p = add("upload", _upload, "upload a folder with a folder per label, a zip, or image files")
    p.add_argument("dataset")
    p.add_argument("paths", nargs="+", metavar="PATH", help="a folder, a .zip, or image files")
    p.add_argument("--label", default=None, help="the label of the image files (or of every image in a folder)")
    p.add_argument("--unlabeled", action="store_true", help="store the images without a label (the service suggests one)")
    p.add_argument("--show", type=int, default=20, metavar="N", help="list at most N rejected files (default 20)")

    p = add("train", _train, "start a training (and follow it with --wait)")
    p.add_argument("dataset")
    p.add_argument("--architecture", default=None, help="e.g. efficientnet_lite0, simple_cnn")
    p.add_argument("--epochs", type=int, default=None, help="passes over the images when fine-tuning (simple_cnn, or -o mode=finetune)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="any other training option; VALUE is read as JSON when it parses (repeatable)")
    p.add_argument("--wait", action="store_true", help="follow the training with a progress bar until it ends")

    p = add("models", _models, "list a dataset's model versions with their metrics")
    p.add_argument("dataset")

    p = add("promote", _promote, "make a version the one predictions use by default")
    p.add_argument("dataset")
    p.add_argument("version", type=int)

    p = add("label-issues", _label_issues, "list the images a version's training says are probably mislabelled")
    p.add_argument("dataset")
    p.add_argument("--version", type=int, default=None, help="a model version (default: the dataset's default)")
    p.add_argument("--limit", type=_positive, default=50, metavar="N", help="show at most N (default 50)")
    p.add_argument("--fix", action="store_true", help="relabel every listed image with its suggested label")

    p = add("suggestions", _suggestions, "list the labels the default version suggests for unlabeled images")
    p.add_argument("dataset")
    p.add_argument("--order", choices=("uncertain", "certain"), default="uncertain",
                   help="uncertain (default): what to label by hand first; certain: what to accept")
    p.add_argument("--limit", type=_positive, default=50, metavar="N", help="show at most N (default 50)")
    p.add_argument("--accept", action="store_true", help="label every listed image with its suggestion")

    p = add("import-customvision", _import_customvision,
            "copy an Azure Custom Vision project's tagged images into a dataset (needs felis-client[customvision])")
    p.add_argument("--endpoint", required=True, help="the Custom Vision resource, e.g. https://NAME.cognitiveservices.azure.com/")
    p.add_argument("--training-key", required=True, help="its training key")
    p.add_argument("--project", required=True, help="the project's name or id")
    p.add_argument("--dataset", default=None, help="the felis dataset (default: a slug of the project's name; created if missing)")

    p = add("predict", _predict, "classify images")
    p.add_argument("dataset")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--version", type=int, default=None, help="a model version (default: the dataset's default)")
    p.add_argument("--json", action="store_true", help="print the API's JSON answer")


# --- commands ----------------------------------------------------------------------------------


def _datasets(args: argparse.Namespace) -> int:
    with _client(args) as felis:
        rows, offset = [], 0
        while True:
            page = felis.datasets(limit=1000, offset=offset)
            rows += page["data"]
            offset += len(page["data"])
            if not page["data"] or offset >= page["count"]:
                break
    if not rows:
        print(f"no datasets yet: {_prog(args)} create NAME")
        return 0
    _table(["dataset", "images", "labels", "default model", "created"],
           [[d["name"], d.get("image_count", 0),
             ", ".join(f"{k} {v}" for k, v in (d.get("label_counts") or {}).items()) or "-",
             f"v{d['default_version']}" if d.get("default_version") else "-",
             str(d.get("created_at", ""))[:19].replace("T", " ")] for d in rows])
    return 0


def _create(args: argparse.Namespace) -> int:
    with _client(args) as felis:
        d = felis.create_dataset(args.dataset)
    print(f"created dataset {d['name']}")
    return 0


def _upload(args: argparse.Namespace) -> int:
    source: Any = args.paths[0] if len(args.paths) == 1 else args.paths
    if isinstance(source, str) and Path(source).is_dir() and not args.label and not args.unlabeled:
        from felis_client.upload import one_label_hint

        hint = one_label_hint(Path(source))
        if hint:
            print(f"note: {hint}", file=sys.stderr, flush=True)
    bar = _Bar("uploading", unit="B")
    with _client(args) as felis:
        try:
            report = felis.upload(args.dataset, source, label=args.label, on_progress=bar.update, unlabeled=args.unlabeled)
        finally:
            bar.close()
    skipped = f"{report['skipped']} already there, " if report.get("skipped") else ""
    ignored = f", {report['ignored']} hidden files ignored" if report.get("ignored") else ""
    print(f"{skipped}{report['created']} created, {report['duplicates']} duplicates, {report['rejected']} rejected "
          f"({len(report['results'])} files sent{ignored})")
    rejected = [r for r in report["results"] if r["status"] == "rejected"]
    if rejected:
        reasons = Counter(r.get("reason") or "unknown" for r in rejected)
        print("rejected: " + ", ".join(f"{reason} {n}" for reason, n in reasons.most_common()))
        for r in rejected[: args.show]:
            print(f"  {r['filename']}: {r.get('reason')}")
        if len(rejected) > args.show:
            print(f"  ... and {len(rejected) - args.show} more")
    return 0 if report["created"] or report["duplicates"] or report.get("skipped") else 1


def _train(args: argparse.Namespace) -> int:
    options: dict[str, Any] = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option takes KEY=VALUE, not {item!r}")
        options[key.strip()] = _parse_value(value)
    for key in ("architecture", "epochs", "seed"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    with _client(args) as felis:
        training = felis.train(args.dataset, **options)
        print(f"training {training['id']} {training['status']} ({_options_text(options)})")
        if not args.wait:
            print(f"follow it: {_prog(args)} train ... --wait, or GET /v1/trainings/{training['id']}")
            return 0
        watcher = _TrainingWatcher()
        try:
            final = felis.wait(training["id"], on_progress=watcher.update)
        except KeyboardInterrupt:
            watcher.close()
            print(f"\nstopped watching; the training goes on (cancel: POST /v1/trainings/{training['id']}/cancel)")
            return 130
        watcher.close()
        if final["status"] == "succeeded":
            version = final.get("model_version")
            metrics = _metrics_text(felis.model(args.dataset, version).get("metrics") or {}) if version else ""
            print(f"succeeded: model version {version}" + (f" ({metrics})" if metrics else ""))
            return 0
    err = final.get("error") or {}
    print(f"{final['status']}: {err.get('code', '')} {err.get('message', '')}".rstrip(), file=sys.stderr)
    return 1


def _models(args: argparse.Namespace) -> int:
    with _client(args) as felis:
        rows = felis.models(args.dataset)["data"]
    if not rows:
        print(f"no model versions yet: {_prog(args)} train {args.dataset} --wait")
        return 0
    keys = _metric_columns(rows)
    _table(["version", "default", "architecture", *keys, "labels", "created"],
           [[f"v{m['version']}", "*" if m.get("default") else "", m.get("architecture", ""),
             *[_fmt((m.get("metrics") or {}).get(k)) for k in keys], ", ".join(m.get("labels") or []),
             str(m.get("created_at", ""))[:19].replace("T", " ")] for m in rows])
    return 0


def _label_issues(args: argparse.Namespace) -> int:
    with _client(args) as felis:
        page = felis.label_issues(args.dataset, version=args.version, limit=max(1, min(args.limit, 1000)))
        rows = page["data"]
        if not rows:
            print(f"{args.dataset}: v{page['version']} found no likely label errors")
            return 0
        _table(["image", "filename", "label", "now", "suggested", "score"],
               [[r["image_id"], r["filename"], r["label"], r["current_label"], r["suggested_label"], _fmt(r["score"])] for r in rows])
        print(f"{len(rows)} of {page['count']} likely label errors of v{page['version']}")
        if args.fix:
            todo = [r for r in rows if r["current_label"] != r["suggested_label"]]
            for r in todo:
                felis.relabel(args.dataset, r["image_id"], r["suggested_label"])
            print(f"relabelled {len(todo)}; train again to use them: {_prog(args)} train {args.dataset} --wait")
    return 0


def _suggestions(args: argparse.Namespace) -> int:
    with _client(args) as felis:
        page = felis.suggestions(args.dataset, order=args.order, limit=max(1, min(args.limit, 1000)))
        rows = page["data"]
        note = f" ({page['pending']} not suggested yet)" if page["pending"] else ""
        if not rows and not page["pending"]:  # every unlabeled image is either suggested or pending: there are none
            print(f"{args.dataset}: no unlabeled images (upload some with --unlabeled for v{page['version']} to suggest labels)")
            return 0
        if not rows:
            print(f"{args.dataset}: no unlabeled image has a suggestion from v{page['version']} yet{note}")
            return 0
        _table(["image", "filename", "suggested", "probability", "ood"],
               [[r["image_id"], r["filename"], r["suggested_label"], _fmt(r["probability"]), "ood" if r["ood"] else ""]
                for r in rows])
        print(f"{len(rows)} of {page['count']} suggestions of v{page['version']}{note}")
        if args.accept:
            done = felis.label_images(args.dataset, [(r["image_id"], r["suggested_label"]) for r in rows])
            print(f"accepted {done['applied']}" + (f", {done['rejected']} rejected" if done["rejected"] else ""))
    return 0 if not args.accept or not done["rejected"] else 1


def _import_customvision(args: argparse.Namespace) -> int:
    from felis_client.customvision_import import import_project

    with _client(args) as felis:
        done = import_project(felis, endpoint=args.endpoint, training_key=args.training_key, project=args.project,
                              dataset=args.dataset)
    upload = done["upload"]
    print(f"{done['dataset']}: {done['listed']} tagged images listed, {done['downloaded']} downloaded, "
          f"{upload.get('created', 0)} created, {upload.get('skipped', 0)} already there, "
          f"{upload.get('duplicates', 0)} duplicates, {upload.get('rejected', 0)} rejected")
    print("labels: " + ", ".join(f"{tag} -> {label}" for tag, label in done["labels"].items()))
    if done["failed"]:
        print(f"{len(done['failed'])} could not be copied (no tag, no URL, over 6 MB or unreachable): "
              + ", ".join(done["failed"][:10]) + (" ..." if len(done["failed"]) > 10 else ""))
    return 0 if not done["failed"] else 1


def _promote(args: argparse.Namespace) -> int:
    with _client(args) as felis:
        m = felis.promote(args.dataset, args.version)
    print(f"{args.dataset}: predictions now use v{m['version']}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    with _client(args) as felis:
        answer = felis.predict(args.dataset, args.images, version=args.version)
    if args.json:
        json.dump(answer, sys.stdout, indent=2)
        print()
        return 0
    labels = sorted({k for p in answer["predictions"] for k in (p.get("probabilities") or {})})
    rows = []
    for p in answer["predictions"]:
        if "error" in p:
            rows.append([p["filename"], "error", p["error"].get("code", ""), *[""] * len(labels)])
            continue
        probs = p["probabilities"]
        rows.append([p["filename"], p["label"], p.get("decision") or ("ood" if p.get("ood") else "-"), *[f"{probs.get(k, 0):.3f}" for k in labels]])
    print(f"model version {answer['model_version']}")
    _table(["image", "label", "decision", *labels], rows)
    return 0


# --- helpers -----------------------------------------------------------------------------------


def _prog(args: argparse.Namespace) -> str:
    return getattr(args, "cli_prog", None) or "felis"


def _client(args: argparse.Namespace):
    from felis_client import Client

    return Client(base_url=args.url, api_key=args.api_key)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _options_text(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"


def _metric_columns(rows: list[dict]) -> list[str]:
    preferred = ["accuracy", "macro_f1", "roc_auc", "ece", "loss"]
    present = {k for m in rows for k, v in (m.get("metrics") or {}).items() if isinstance(v, (int, float))}
    return [k for k in preferred if k in present] or sorted(present)[:4]


def _metrics_text(metrics: dict) -> str:
    keys = _metric_columns([{"metrics": metrics}])
    return ", ".join(f"{k} {_fmt(metrics[k])}" for k in keys)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], out: TextIO | None = None) -> None:
    out = out or sys.stdout
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, r in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=out)


def _interactive(stream: TextIO) -> bool:
    return hasattr(stream, "isatty") and stream.isatty()


def _screen(stream: TextIO) -> dict[str, int]:
    """tqdm's ncols and nrows. Some pseudo-terminals report 0 x 0, and tqdm hides every bar
    below the last row, so a size of 0 becomes 100 x 24."""
    try:
        size = os.get_terminal_size(stream.fileno())
        return {"ncols": size.columns or 100, "nrows": size.lines or 24}
    except (AttributeError, OSError, ValueError):
        return {"ncols": 100, "nrows": 24}


class _Bar:
    """Bytes sent: a tqdm bar on a terminal, a line per 10% otherwise."""

    def __init__(self, desc: str, unit: str = "B", stream: TextIO | None = None):
        self.desc, self.unit, self.stream = desc, unit, stream or sys.stderr
        self._bar = None
        self._last_decile = -1

    def update(self, done: int, total: int) -> None:
        if _interactive(self.stream):
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=self.desc, unit=self.unit, unit_scale=True, unit_divisor=1024,
                                 file=self.stream, **_screen(self.stream))
            self._bar.update(done - self._bar.n)
            return
        decile = 10 if not total else min(10, done * 10 // total)
        if decile != self._last_decile:
            self._last_decile = decile
            print(f"{self.desc}: {decile * 10}% ({_human(done)} of {_human(total)})", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class _TrainingWatcher:
    """A training's progress: a tqdm bar per phase on a terminal, plain lines otherwise
    (one per phase change and one per finished epoch)."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.tty = _interactive(self.stream)
        self._bar = None
        self._bar_key: tuple | None = None
        self._status: str | None = None
        self._phase: str | None = None
        self._epochs = EpochTracker()

    def update(self, training: dict) -> None:
        progress = training.get("progress") or {}
        status = training.get("status")
        if self.tty:
            if status not in ("succeeded", "failed", "cancelled"):  # the last bar stays as it was
                self._draw(progress)
        else:
            self._plain(progress)
        if status != self._status:
            self._status = status
            if status in ("failed", "cancelled"):
                self._epochs.discard()
            if status in ("succeeded", "failed", "cancelled"):
                self.close()
            self._line(f"status: {status}")

    def _draw(self, p: dict) -> None:
        from tqdm import tqdm

        phase = p.get("phase") or "waiting"
        epoch, epochs = p.get("epoch"), p.get("epochs")
        steps = p.get("steps") or p.get("total")
        done = p.get("step") if p.get("steps") else p.get("done")
        key = (phase, epoch, steps)
        if key != self._bar_key:
            if self._bar is not None and self._bar.total:  # its phase (or epoch) is over: drawn whole, not at the
                self._bar.update(self._bar.total - self._bar.n)  # last look (progress is written twice a second)
            self.close()
            self._bar_key = key
            desc = f"{phase} {epoch}/{epochs}" if epoch and epochs else phase
            self._bar = tqdm(total=steps or None, desc=desc, file=self.stream, **_screen(self.stream), leave=True,
                             bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]" if steps else
                             "{desc}: {elapsed}{postfix}")
        bar = self._bar
        if steps and done is not None:
            bar.update(max(0, int(done) - bar.n))
        postfix = _progress_fields(p)
        if postfix:
            bar.set_postfix_str(postfix, refresh=False)
        bar.refresh()

    def _plain(self, p: dict) -> None:
        phase = p.get("phase") or "waiting"
        for epoch in self._epochs.update(p):
            self._line(f"epoch {epoch.get('epoch')}/{epoch.get('epochs', '?')}: {_progress_fields(epoch)}")
        if phase != self._phase:
            self._phase = phase
            fields = f" ({p['done']}/{p['total']})" if p.get("total") and not p.get("steps") and phase != "done" else ""
            self._line(f"phase: {phase}{fields}")

    def _finish_epoch(self) -> None:
        epoch = self._epochs.flush()
        if epoch:
            self._line(f"epoch {epoch.get('epoch')}/{epoch.get('epochs', '?')}: {_progress_fields(epoch)}")

    def _line(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if not self.tty:
            self._finish_epoch()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._bar_key = None


class EpochTracker:
    """Which epochs have ended, from a stream of progress snapshots (some may be missed).

    Progress is one merged state: while epoch e+1 runs, ``val_accuracy`` still holds epoch e's
    value. So the first look at epoch e+1 closes epoch e (with that carried value, in case the
    look at e's very end was missed), and the last look at the final epoch closes it."""

    def __init__(self) -> None:
        self.current: dict | None = None
        self.closed: int | None = None

    def update(self, p: dict) -> list[dict]:
        epoch = p.get("epoch")
        if epoch is None:
            return []
        finished = []
        if self.current is not None and p.get("phase") != self.current.get("phase"):
            # the epochs are over (evaluating, saving, done: the state still carries the last
            # epoch's numbers): the last one ran to its end
            done = dict(self.current)
            if epoch == done.get("epoch") and p.get("val_accuracy") is not None:
                done["val_accuracy"] = p["val_accuracy"]
            self.closed, self.current = done.get("epoch"), None
            return [done]
        if self.current is not None and epoch != self.current.get("epoch"):
            done = dict(self.current)
            mid_next = (epoch == done.get("epoch", 0) + 1 and p.get("phase") == done.get("phase")
                        and p.get("steps") and (p.get("step") or 0) < p["steps"])
            if mid_next and p.get("val_accuracy") is not None:
                done["val_accuracy"] = p["val_accuracy"]
            finished.append(done)
            self.closed, self.current = done.get("epoch"), None
        if self.closed is None or epoch > self.closed:
            self.current = dict(p)
        return finished

    def flush(self) -> dict | None:
        done, self.current = self.current, None
        if done is not None:
            self.closed = done.get("epoch")
        return done

    def discard(self) -> None:
        """The training ended in its current epoch (cancelled, failed): that epoch never finished."""
        self.current = None


def _progress_fields(p: dict) -> str:
    parts = []
    if p.get("loss") is not None:
        parts.append(f"loss {p['loss']:.4f}")
    if p.get("val_accuracy") is not None:
        parts.append(f"val acc {p['val_accuracy']:.3f}")
    return ", ".join(parts)


def _positive(text: str) -> int:
    """An argparse type: a whole number of at least 1 (--limit 0 listed one row)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


BROKEN_PIPE = 141  # the shell's status of a command whose reader went away (128 + SIGPIPE), as head leaves cat's


def _guarded(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """API and input errors as one line on stderr and an exit code, not a traceback."""

    def run(args: argparse.Namespace) -> int:
        from felis_client import FelisError

        try:
            code = command(args)
            sys.stdout.flush()  # here, where a reader that went away is caught, not at the interpreter's exit
            return code
        except BrokenPipeError:  # `felis predict ... | head -2`: the reader has what it wanted
            devnull = os.open(os.devnull, os.O_WRONLY)  # Python's own recipe: no second error at exit's flush
            os.dup2(devnull, sys.stdout.fileno())
            return BROKEN_PIPE
        except FelisError as e:
            print(f"{_prog(args)} {args.command}: {e}", file=sys.stderr)
            return 1
        except (FileNotFoundError, ValueError) as e:
            print(f"{_prog(args)} {args.command}: {e}", file=sys.stderr)
            return 2

    return run


# --- felis-client --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="felis-client",
                                     description="felis-client: talk to a felis server over HTTP (no torch needed)")
    sub = parser.add_subparsers(dest="command", required=True)
    add_client_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``felis-client`` console script: the client commands without the server installed."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
