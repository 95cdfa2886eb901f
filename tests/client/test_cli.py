"""`felis datasets | create | upload | train | models | promote | predict` against a real `felis up`."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from felis_client.cli import EpochTracker, _Bar, _TrainingWatcher
from service.cli import main
from tests.conftest import ASSETS, ROOT, asset_images

TRAIN = ASSETS / "cifar-cat" / "train"


@pytest.fixture
def felis(felis_url, no_felis_config, capsys):
    """Run one command: felis("datasets") -> (exit code, stdout, stderr)."""

    def run(*argv: str) -> tuple[int, str, str]:
        code = main([argv[0], "--url", felis_url, *argv[1:]])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_create_list_upload(felis, tmp_path):
    assert felis("create", "clipets")[0] == 0
    code, out, err = felis("create", "clipets")
    assert code == 1 and "dataset_exists" in err
    code, out, err = felis("upload", "clipets", str(TRAIN))
    assert code == 0, err
    assert "32 created, 0 duplicates, 0 rejected" in out
    assert "uploading: 100%" in err  # not a terminal: plain progress lines, no bar
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image")
    code, out, _ = felis("upload", "clipets", str(junk), *map(str, asset_images("test", "cat")), "--label", "cat")
    assert code == 0
    assert "4 created, 0 duplicates, 1 rejected" in out and "not_an_image 1" in out and "junk.jpg: not_an_image" in out
    import zipfile

    made_on_a_mac = tmp_path / "mac.zip"  # the hidden members a Finder zip adds: skipped by the server, and said
    with zipfile.ZipFile(made_on_a_mac, "w") as zf:
        zf.writestr("cat/a.jpg", asset_images("test", "noncat")[0].read_bytes())
        zf.writestr("__MACOSX/cat/._a.jpg", b"\0" * 20)
        zf.writestr("cat/.DS_Store", b"x")
    for label in ("Cat", "Dog"):  # Kaggle's PetImages/Cat/, PetImages/Dog/: one label, and a note before the upload
        (tmp_path / "kaggle" / "PetImages" / label).mkdir(parents=True)
        (tmp_path / "kaggle" / "PetImages" / label / "1.jpg").write_bytes(asset_images("test", "cat")[0].read_bytes())
    code, out, err = felis("upload", "clipets", str(tmp_path / "kaggle"))
    assert code == 0 and "note: every image gets the label 'PetImages'" in err and "2 already there" in out
    code, out, _ = felis("upload", "clipets", str(made_on_a_mac))
    assert code == 0 and "1 created, 0 duplicates, 0 rejected (1 files sent, 2 hidden files ignored)" in out
    code, out, _ = felis("datasets")
    line = next(l for l in out.splitlines() if l.startswith("clipets"))
    assert "37" in line and "cat 21" in line and "noncat 16" in line


def test_a_reader_that_goes_away_is_no_traceback(felis, felis_url):
    """`felis datasets | true` (or `| head -2`): before, a BrokenPipeError traceback and an
    'Exception ignored' line; now the shell's usual 141, and nothing on stderr. --limit 0 listed
    one row; it is refused as bad input."""
    felis("create", "pipes")
    run = subprocess.run(["bash", "-c", f"set -o pipefail; {sys.executable} -m service.cli datasets --url {felis_url} | true"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 141 and run.stderr == "", run.stderr
    with pytest.raises(SystemExit) as e:
        main(["label-issues", "pipes", "--limit", "0", "--url", felis_url])
    assert e.value.code == 2


def test_bad_input_is_one_line_not_a_traceback(felis, felis_url):
    code, _, err = felis("upload", "nowhere", str(TRAIN))
    assert code == 1 and "dataset_not_found" in err and "Traceback" not in err
    code, _, err = felis("upload", "nowhere", *map(str, asset_images("test", "cat")))
    assert code == 2 and "need a label" in err
    code, _, err = felis("train", "nowhere", "--option", "novalue")
    assert code == 2 and "KEY=VALUE" in err
    assert main(["datasets", "--url", "http://127.0.0.1:9"]) == 1


def test_train_wait_models_promote_predict(felis):
    felis("create", "clitrain")
    felis("upload", "clitrain", str(TRAIN))
    code, out, err = felis("train", "clitrain", "--architecture", "simple_cnn", "--epochs", "2", "--seed", "0",
                           "--option", "batch_size=8", "--wait")
    assert code == 0, err
    assert "architecture=simple_cnn" in out and "batch_size=8" in out
    assert "succeeded: model version 1" in out
    assert "status: succeeded" in err and "epoch 2/2" in err  # plain progress lines
    code, out, err = felis("train", "clitrain", "--architecture", "simple_cnn", "--epochs", "1", "--wait")
    assert code == 0 and "succeeded: model version 2" in out, err

    code, out, _ = felis("models", "clitrain")
    rows = [l.split() for l in out.splitlines()[2:]]
    assert [r[0] for r in rows] == ["v1", "v2"] and rows[0][1] == "*"
    assert felis("promote", "clitrain", "2") == (0, "clitrain: predictions now use v2\n", "")

    images = [str(p) for p in asset_images("test", "cat") + asset_images("test", "noncat")]
    code, out, err = felis("predict", "clitrain", *images, "--json")
    assert code == 0, err
    answer = json.loads(out)
    assert answer["model_version"] == 2 and len(answer["predictions"]) == 8
    code, out, _ = felis("predict", "clitrain", images[0], "--version", "1")
    assert code == 0 and out.startswith("model version 1")
    header = out.splitlines()[1].split()
    assert header == ["image", "label", "decision", "cat", "noncat"]
    assert out.splitlines()[3].split()[0] == os.path.basename(images[0])


def test_config_file_gives_the_url(felis_url, no_felis_config, monkeypatch, tmp_path, capsys):
    config = tmp_path / "config.toml"
    config.write_text(f'url = "{felis_url}"\n')
    monkeypatch.setenv("FELIS_CONFIG", str(config))
    assert main(["datasets"]) == 0
    assert "dataset" in capsys.readouterr().out


def test_the_client_commands_do_not_import_torch(felis_url):
    code = ("import sys, service.cli; rc = service.cli.main(['datasets']); "
            "assert 'torch' not in sys.modules and 'fastapi' not in sys.modules, 'heavy import'; sys.exit(rc)")
    env = {**os.environ, "FELIS_URL": felis_url, "FELIS_CONFIG": "/nonexistent"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# --- progress output, without a server ------------------------------------------------------------------


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_on_a_terminal_and_lines_elsewhere():
    tty, plain = _Tty(), io.StringIO()
    for stream in (tty, plain):
        bar = _Bar("uploading", stream=stream)
        for done in (0, 500, 1000):
            bar.update(done, 1000)
        bar.close()
    assert "uploading" in tty.getvalue() and "\r" in tty.getvalue()  # tqdm redraws in place
    assert plain.getvalue().splitlines() == ["uploading: 0% (0 B of 1000 B)", "uploading: 50% (500 B of 1000 B)",
                                             "uploading: 100% (1000 B of 1000 B)"]


def _snapshots():
    yield {"status": "queued", "progress": {}}
    yield {"status": "running", "progress": {"phase": "loading", "done": 10, "total": 40}}
    for epoch in (1, 2, 3):
        for step in (1, 2):
            val = {"val_accuracy": 0.5 + epoch / 10} if step == 2 else {}
            yield {"status": "running", "progress": {"phase": "training", "epoch": epoch, "epochs": 3, "step": step,
                                                     "steps": 2, "loss": 1.0 / epoch, **val}}
    yield {"status": "succeeded", "progress": {"phase": "done", "epoch": 3, "epochs": 3, "loss": 1.0 / 3,
                                               "val_accuracy": 0.8}}


def test_training_watcher_draws_bars_or_prints_epochs():
    tty, plain = _Tty(), io.StringIO()
    for stream in (tty, plain):
        watcher = _TrainingWatcher(stream=stream)
        for snapshot in _snapshots():
            watcher.update(snapshot)
        watcher.close()
    assert "training 2/3" in tty.getvalue() and "loss" in tty.getvalue()
    assert "40/40" in tty.getvalue()  # the loading bar, last seen at 10/40, ends whole when training begins (before: 10/40)
    lines = plain.getvalue().splitlines()
    assert [l for l in lines if l.startswith("epoch")] == [
        "epoch 1/3: loss 1.0000, val acc 0.600", "epoch 2/3: loss 0.5000, val acc 0.700",
        "epoch 3/3: loss 0.3333, val acc 0.800"]
    assert lines[-1] == "status: succeeded" and "phase: loading (10/40)" in lines


def test_an_epoch_is_printed_when_it_ends_and_never_when_it_did_not():
    """Before: the last epoch was printed after 'phase: done' (at the close), and a training
    cancelled in epoch 3 printed 'epoch 3/5' with epoch 2's numbers, as if it had finished."""
    def run(snapshots: list[dict]) -> list[str]:
        out = io.StringIO()
        watcher = _TrainingWatcher(stream=out)
        for snapshot in snapshots:
            watcher.update(snapshot)
        watcher.close()
        return out.getvalue().splitlines()

    def training(epoch: int, step: int, epochs: int = 3, **more) -> dict:
        return {"status": "running", "progress": {"phase": "training", "epoch": epoch, "epochs": epochs, "step": step,
                                                  "steps": 2, "loss": 1.0 / epoch, **more}}

    evaluating = {"status": "running", "progress": {"phase": "evaluating", "epoch": 3, "epochs": 3, "loss": 1 / 3,
                                                    "val_accuracy": 0.8}}
    done = {"status": "succeeded", "progress": {"phase": "done", "epoch": 3, "epochs": 3, "loss": 1 / 3, "val_accuracy": 0.8}}
    lines = run([training(1, 2, val_accuracy=0.6), training(2, 2, val_accuracy=0.7), training(3, 1, val_accuracy=0.7),
                 evaluating, done])
    assert lines == ["phase: training", "status: running", "epoch 1/3: loss 1.0000, val acc 0.600",
                     "epoch 2/3: loss 0.5000, val acc 0.700", "epoch 3/3: loss 0.3333, val acc 0.800", "phase: evaluating",
                     "phase: done", "status: succeeded"]
    cancelled = {"status": "cancelled", "progress": {"phase": "training", "epoch": 3, "epochs": 5, "step": 1, "steps": 2,
                                                     "loss": 0.4, "val_accuracy": 0.7}}
    lines = run([training(1, 2, 5, val_accuracy=0.6), training(2, 2, 5, val_accuracy=0.7), training(3, 1, 5, val_accuracy=0.7),
                 cancelled])
    assert [l for l in lines if l.startswith("epoch")] == ["epoch 1/5: loss 1.0000, val acc 0.600",
                                                          "epoch 2/5: loss 0.5000, val acc 0.700"]
    assert lines[-1] == "status: cancelled"


def test_epoch_tracker_recovers_a_missed_end_of_epoch():
    tracker = EpochTracker()
    tracker.update({"phase": "training", "epoch": 1, "step": 1, "steps": 4, "loss": 0.9})
    # the look at epoch 1's end was missed; epoch 2's state still carries epoch 1's val_accuracy
    (closed,) = tracker.update({"phase": "training", "epoch": 2, "step": 1, "steps": 4, "loss": 0.7,
                                "val_accuracy": 0.61})
    assert closed["epoch"] == 1 and closed["val_accuracy"] == 0.61
    assert tracker.update({"phase": "training", "epoch": 2, "step": 4, "steps": 4, "val_accuracy": 0.7}) == []
    assert tracker.flush()["val_accuracy"] == 0.7


def test_label_issues_lists_and_fixes(felis, felis_url, tmp_path):
    """Two dogs uploaded as cats among 20 + 20 kaggle_ photos: a default training flags them, and
    --fix relabels what it lists."""
    from felis_client import Client
    from tests.conftest import DATASETS

    photos = DATASETS / "photos" / "train"
    if not photos.is_dir():
        pytest.skip("no photos")
    cats, dogs = sorted((photos / "cat").glob("kaggle_*"))[:20], sorted((photos / "noncat").glob("kaggle_*"))[:22]
    felis("create", "clinoisy")
    assert felis("upload", "clinoisy", *map(str, cats + dogs[20:]), "--label", "cat")[0] == 0
    assert felis("upload", "clinoisy", *map(str, dogs[:20]), "--label", "dog")[0] == 0
    code, out, err = felis("train", "clinoisy", "--option", "label_issues=\"keep\"", "--wait")
    assert code == 0, err
    code, out, err = felis("label-issues", "clinoisy")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["image", "filename", "label", "now", "suggested", "score"]
    wrong = {p.name for p in dogs[20:]}
    rows = [l.split() for l in lines[2:-1]]
    assert wrong & {r[1] for r in rows}, out
    assert all(r[2] == r[3] != r[4] for r in rows)  # label then == label now != suggested
    assert lines[-1].endswith("likely label errors of v1")
    code, out, err = felis("label-issues", "clinoisy", "--fix")
    assert code == 0 and f"relabelled {len(rows)}" in out, out + err
    with Client(felis_url) as c:
        assert all(c.image("clinoisy", r[0])["label"] == r[4] for r in rows)
    code, out, err = felis("label-issues", "clinoisy", "--version", "7")
    assert code == 1 and "version_not_found" in err


def test_upload_unlabeled_then_accept_suggestions(felis, felis_url):
    import time

    from felis_client import Client

    felis("create", "cliunl")
    assert felis("upload", "cliunl", str(TRAIN))[0] == 0
    code, _, err = felis("upload", "cliunl", *map(str, asset_images("test", "cat")))
    assert code == 2 and "--unlabeled" in err
    code, out, err = felis("train", "cliunl", "--option", "image_size=64", "--option", "cv_folds=2", "--wait")
    assert code == 0, err
    code, out, err = felis("upload", "cliunl", *map(str, asset_images("test", "cat")), "--unlabeled")
    assert code == 0 and "4 created" in out, err
    with Client(felis_url) as c:
        deadline = time.monotonic() + 120
        while c.suggestions("cliunl")["pending"]:
            assert time.monotonic() < deadline
            time.sleep(0.5)
    code, out, err = felis("suggestions", "cliunl", "--order", "certain", "--limit", "3", "--accept")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["image", "filename", "suggested", "probability", "ood"]
    assert "3 of 4 suggestions of v1" in out and "accepted 3" in out
    with Client(felis_url) as c:
        assert c.dataset("cliunl")["unlabeled_count"] == 1
    assert felis("suggestions", "cliunl", "--accept")[0] == 0
    code, out, _ = felis("suggestions", "cliunl")  # before: 'no unlabeled image has a suggestion from v1', as if some waited
    assert code == 0 and out.strip() == "cliunl: no unlabeled images (upload some with --unlabeled for v1 to suggest labels)"
