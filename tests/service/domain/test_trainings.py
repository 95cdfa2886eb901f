"""service.domain.trainings: a request's options are validated and resolved once, and stored resolved."""

from __future__ import annotations

import pytest

from service.domain import trainings
from service.errors import InvalidRequest


def test_request_stores_the_resolved_config(session, settings, pets):
    t = trainings.request(session, "pets", {}, settings)
    assert t.options["mode"] == "linear" and t.options["image_size"] == 288
    assert t.options["precision"] == "int8" and t.options["pooling"] == "avgmax"
    assert t.options["crop_fraction"] == 0.875 and t.options["batch_size"] == 32
    assert t.options["augmentation"] == "none"  # a linear training augments nothing (before: 'crop+flip', unused)
    assert trainings.describe(session, t)["options"] == t.options
    assert None not in (t.options[k] for k in ("mode", "image_size", "precision", "pooling", "batch_size"))


def test_finetune_and_simple_cnn_defaults_are_concrete(session, settings, pets):
    t = trainings.request(session, "pets", {"architecture": "simple_cnn"}, settings)
    assert (t.options["mode"], t.options["image_size"], t.options["epochs"], t.options["precision"]) == ("finetune", 64, 40, "fp32")
    assert t.options["learning_rate"] == 3e-3 and t.options["width"] == 32


def test_other_pretrained_weights_resolve_to_float32(session, pets, monkeypatch, tmp_path):
    from service.config import Settings

    custom = Settings(pretrained_weights=tmp_path / "weights.pth")
    assert trainings.request(session, "pets", {}, custom).options["precision"] == "fp32"
    assert trainings.request(session, "pets", {"precision": "int8"}, custom).options["precision"] == "int8"


def test_invalid_options_are_refused_with_the_field(session, settings, pets):
    with pytest.raises(InvalidRequest) as e:
        trainings.request(session, "pets", {"image_size": 4}, settings)
    assert e.value.code == "invalid_training_option" and e.value.details == {"field": "image_size"}


@pytest.mark.parametrize("options, field", [
    ({"l2": 1e308}, "l2"),  # passed "> 0", then overflowed float32 in the worker
    ({"l2": float("inf")}, "l2"),  # JSON's Infinity: echoed as null, used as inf
    ({"time_budget_s": float("nan")}, "time_budget_s"),
    ({"learning_rate": float("nan")}, "learning_rate"),
    ({"seed": 10**26}, "seed"),  # passed ">= 0", then overflowed torch.manual_seed in the worker
])
def test_options_the_worker_cannot_use_are_refused_at_the_request(session, settings, pets, options, field):
    """Every number a training takes is bounded and finite when it is requested: no 202 for a
    training that can only fail in the worker with an overflow."""
    with pytest.raises(InvalidRequest) as e:
        trainings.request(session, "pets", options, settings)
    assert e.value.code == "invalid_training_option" and e.value.details == {"field": field}, e.value


@pytest.mark.parametrize("field, value", [("epochs", 3), ("learning_rate", 0.5), ("weight_decay", 0.1), ("label_smoothing", 0.2),
                                          ("patience", 3), ("time_budget_s", 5.0), ("augmentation", "none")])
def test_a_fine_tuning_option_of_a_linear_training_is_refused_not_ignored(session, settings, pets, field, value):
    """Before: {"epochs": 3} on the default (linear) architecture answered 202, and the options,
    the version's config and `felis train --epochs 3` all said epochs 3, though a linear
    training has no epochs. The message says how to fine-tune instead."""
    with pytest.raises(InvalidRequest) as e:
        trainings.request(session, "pets", {field: value}, settings)
    assert e.value.code == "invalid_training_option" and e.value.details == {"field": field}
    assert "fine-tuning only" in e.value.message and '"mode": "finetune"' in e.value.message
    assert trainings.request(session, "pets", {field: value, "mode": "finetune"}, settings).options[field] == value
    if field != "augmentation":  # a bool or a name, never null
        assert trainings.request(session, "pets", {field: None}, settings).options["mode"] == "linear"  # null: the default


# --- the lifecycle -------------------------------------------------------------------------------

from datetime import timedelta  # noqa: E402

from sqlalchemy import update  # noqa: E402
from sqlalchemy.exc import OperationalError  # noqa: E402

from service.domain import versions  # noqa: E402
from service.domain.trainings import LostOwnership, Status  # noqa: E402
from service.store.tables import Training, utcnow  # noqa: E402


def _queued(session, settings, **options) -> str:
    t = trainings.request(session, "pets", options, settings)
    session.commit()
    return t.id


def _row(session, training_id: str) -> Training:
    session.expire_all()
    return session.get(Training, training_id)


def _age(session, training_id: str, seconds: float, column=Training.heartbeat_at) -> None:
    """Move a training's clock back, as if its worker had gone silent that long ago."""
    session.execute(update(Training).where(Training.id == training_id).values({column: utcnow() - timedelta(seconds=seconds)}))
    session.commit()


def _down(_id: str) -> None:
    raise ConnectionError("broker down")


def test_a_training_whose_message_was_never_sent_is_sent_by_the_sweep(session, settings, pets):
    """The broker down at the request, or the API dead between its commit and its send: the row is
    queued with no confirmed message, and the sweep delivers it (the old sweep looked only at running)."""
    lost = _queued(session, settings)  # the API died before sending
    down = _queued(session, settings)
    assert trainings.send(down, _down) is False
    assert _row(session, down).status == Status.QUEUED and _row(session, down).enqueued_at is None
    sent: list[str] = []
    assert trainings.sweep(settings, sent.append, unsent_grace_s=60)["sent"] == 0  # the API's own send may be on its way
    for t in (lost, down):
        _age(session, t, 120, Training.created_at)
    assert trainings.sweep(settings, _down)["sent"] == 0  # broker still down: tried again next sweep
    assert trainings.sweep(settings, sent.append)["sent"] == 2 and sorted(sent) == sorted([lost, down])
    assert _row(session, lost).enqueued_at is not None
    assert trainings.sweep(settings, sent.append)["sent"] == 0  # confirmed: not sent again...
    _age(session, lost, settings.training_redeliver_after_seconds + 1, Training.enqueued_at)
    assert trainings.sweep(settings, sent.append)["sent"] == 1 and sent[-1] == lost  # ...unless never claimed for long


def test_a_sent_message_the_broker_lost_is_sent_again_once_the_queue_is_seen_empty(session, settings, pets):
    """A Redis restart without its data: the training was sent, its message is gone, no worker will
    ever claim it. Before, it waited training_redeliver_after_seconds (30 minutes). Now a sweep that
    finds the broker's queue empty sends what was sent training_lost_after_seconds ago and is unclaimed;
    a queue that still holds messages (a long queue on purpose) or cannot be read changes nothing."""
    t = _queued(session, settings)
    assert trainings.send(t, lambda _id: None)
    _age(session, t, settings.training_lost_after_seconds + 1, Training.enqueued_at)
    sent: list[str] = []

    def unreadable() -> bool:
        raise ConnectionError("broker down")

    for queue_empty in (None, lambda: False, unreadable):
        assert trainings.sweep(settings, sent.append, queue_empty=queue_empty)["sent"] == 0
    assert trainings.sweep(settings, sent.append, queue_empty=lambda: True)["sent"] == 1 and sent == [t]
    assert trainings.sweep(settings, sent.append, queue_empty=lambda: True)["sent"] == 0  # just sent: not again at once
    fresh = _queued(session, settings)
    assert trainings.send(fresh, lambda _id: None)
    assert trainings.sweep(settings, sent.append, queue_empty=lambda: True)["sent"] == 0  # sent a moment ago: on its way
    token = trainings.claim(t, "w1", settings.training_lease_seconds)
    _age(session, fresh, settings.training_lost_after_seconds + 1, Training.enqueued_at)
    assert token and trainings.sweep(settings, sent.append, queue_empty=lambda: True)["sent"] == 1 and sent[-1] == fresh


def test_claims_are_exclusive_and_a_duplicate_message_is_harmless(session, settings, pets):
    t = _queued(session, settings)
    token = trainings.claim(t, "w1", settings.training_lease_seconds)
    assert token and trainings.claim(t, "w2", settings.training_lease_seconds) is None
    row = _row(session, t)
    assert (row.status, row.worker, row.attempts, row.claim_token) == (Status.RUNNING, "w1", 1, token)


def test_a_run_that_lost_its_claim_writes_nothing(session, settings, pets):
    """Two runs of one training: the first worker went silent past its lease, a second took over.
    The first can no longer beat, report progress, record a version or a final state."""
    t = _queued(session, settings)
    first = trainings.claim(t, "w1", settings.training_lease_seconds)
    _age(session, t, settings.training_lease_seconds + 5)
    second = trainings.claim(t, "w2", settings.training_lease_seconds)
    assert second and second != first and _row(session, t).attempts == 2
    assert trainings.heartbeat(t, first) is False and trainings.heartbeat(t, second) is True
    with pytest.raises(LostOwnership):
        trainings.report_progress(t, first, {"phase": "features"})
    with pytest.raises(LostOwnership):
        trainings.cancel_requested(t, first)
    assert trainings.fail(t, "training_error", "boom", token=first) is False
    kwargs = dict(architecture="simple_cnn", labels=["cat", "noncat"], metrics={}, evaluation={}, config={},
                  snapshot={}, checkpoint_key="k", onnx_key=None)
    with pytest.raises(LostOwnership):
        versions.create(t, first, **kwargs)
    assert versions.list_for(session, pets) == [] and _row(session, t).status == Status.RUNNING
    assert versions.create(t, second, **kwargs).version == 1
    row = _row(session, t)
    assert (row.status, row.model_version) == (Status.SUCCEEDED, 1)
    assert versions.create(t, second, **kwargs).version == 1  # a redelivered task finds its version


def test_cancel_of_a_running_training_whose_worker_died_ends_cancelled(session, settings, pets):
    """Before: the sweep queued it again and the claim refused it (cancel requested): queued for good."""
    t = _queued(session, settings)
    trainings.claim(t, "w1", settings.training_lease_seconds)
    trainings.cancel(session, t)
    _age(session, t, settings.training_lease_seconds + 5)
    assert trainings.sweep(settings, _down)["cancelled"] == 1
    row = _row(session, t)
    assert row.status == Status.CANCELLED and row.error["code"] == "cancelled" and row.finished_at


def test_the_sweep_requeues_a_dead_workers_training_then_fails_it_with_a_reason(session, settings, pets):
    t = _queued(session, settings)
    for attempt in range(1, trainings.MAX_ATTEMPTS + 1):
        assert trainings.claim(t, f"w{attempt}", settings.training_lease_seconds)
        _age(session, t, settings.training_lease_seconds + 5)
        counts = trainings.sweep(settings, lambda _id: None)
        if attempt < trainings.MAX_ATTEMPTS:
            assert counts["requeued"] == 1 and _row(session, t).status == Status.QUEUED
            assert _row(session, t).claim_token is None and counts["sent"] == 1  # its message goes out again
    row = _row(session, t)
    assert row.status == Status.FAILED and row.error["code"] == "worker_lost"


def test_a_queued_training_is_cancelled_at_once(session, settings, pets):
    t = _queued(session, settings)
    trainings.cancel(session, t)
    assert _row(session, t).status == Status.CANCELLED
    assert trainings.claim(t, "w1", settings.training_lease_seconds) is None


def test_a_cancel_says_what_it_stopped_and_a_running_training_shows_it_was_asked(session, settings, pets):
    """Before: an extracting training's cancel read 'cancelled before it started' (its features were
    being computed), and a running one answered status running with nothing showing the cancel."""
    queued, extracting, running = (_queued(session, settings) for _ in range(3))
    session.execute(update(Training).where(Training.id == extracting).values(status=Status.EXTRACTING))
    session.commit()
    trainings.claim(running, "w1", settings.training_lease_seconds)
    messages = {t: trainings.describe(session, trainings.cancel(session, t)) for t in (queued, extracting, running)}
    assert messages[queued]["error"]["message"] == "cancelled before it started"
    assert messages[extracting]["error"]["message"] == "cancelled while its features were computed"
    assert messages[running]["status"] == "running" and messages[running]["cancel_requested"] is True
    assert messages[queued]["cancel_requested"] is True and _row(session, extracting).status == Status.CANCELLED


def test_retrying_rides_out_a_connection_loss_then_gives_up():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("UPDATE trainings", {}, ConnectionError("server closed the connection"))
        return "ok"

    assert trainings.retrying(flaky, seconds=10, what="test") == "ok" and len(calls) == 3

    def down():
        raise OperationalError("UPDATE trainings", {}, ConnectionError("connection refused"))

    with pytest.raises(OperationalError):
        trainings.retrying(down, seconds=0.5, what="test")


def test_retrying_tries_once_more_at_the_end_of_its_window():
    """Before: it gave up as soon as its next back-off would pass the window, up to 5 s early,
    so a 57 s PostgreSQL restart failed a training that FELIS_DB_RETRY_SECONDS=60 should ride
    out. A database back 0.9 s into a 1 s window is now reached (the back-offs: 0.2, 0.4, then
    what is left)."""
    import time

    start = time.monotonic()

    def back_after_0_9_s():
        if time.monotonic() - start < 0.9:
            raise OperationalError("UPDATE trainings", {}, ConnectionError("connection refused"))
        return "ok"

    assert trainings.retrying(back_after_0_9_s, seconds=1.0, what="test") == "ok"


def test_a_lease_shorter_than_the_retry_window_is_refused_at_start():
    from service.config import Settings

    with pytest.raises(ValueError, match="FELIS_TRAINING_LEASE_SECONDS"):
        Settings(training_lease_seconds=60, db_retry_seconds=60)
    assert Settings(training_lease_seconds=90, db_retry_seconds=60).training_lease_seconds == 90


def test_no_status_word_is_spelled_outside_the_owner_module():
    """The Python code names training states only through trainings.Status (the HTTP clients in
    felis_client and bench speak the API's words and are not part of this rule)."""
    import re

    from tests.conftest import ROOT

    words = re.compile(r"""["'](queued|running|succeeded|failed|cancelled)["']""")
    offenders = [f"{path.relative_to(ROOT)}:{n}" for folder in ("service", "worker") for path in (ROOT / folder).rglob("*.py")
                 if path.name != "trainings.py" for n, line in enumerate(path.read_text().splitlines(), 1)
                 if words.search(line)]
    assert offenders == []


def test_a_training_whose_worker_went_silent_shows_it_and_is_queued_without_that_worker(session, settings, pets):
    """Before: for a lease after its worker died the training showed that worker and frozen
    progress, with nothing to tell it stale; once queued again it still named the dead worker
    and its old progress. It now shows its worker's last heartbeat, and queued again, no worker."""
    t = _queued(session, settings)
    token = trainings.claim(t, "w2@dead", settings.training_lease_seconds)
    trainings.report_progress(t, token, {"phase": "features", "done": 224, "total": 1200})
    shown = trainings.describe(session, _row(session, t))
    assert shown["worker"] == "w2@dead" and shown["heartbeat_at"] is not None
    _age(session, t, settings.training_lease_seconds + 5)
    assert trainings.sweep(settings, lambda _t: None)["requeued"] == 1
    shown = trainings.describe(session, _row(session, t))
    assert (shown["status"], shown["worker"], shown["progress"]["phase"]) == ("queued", None, "queued"), shown


def test_a_run_that_lost_the_database_gives_its_training_back_or_ends_a_cancel(session, settings, pets):
    """release: queued again with the attempt not counted; a training asked to stop meanwhile
    is cancelled instead (queued with cancel_requested, no worker would ever claim it)."""
    t = _queued(session, settings)
    token = trainings.claim(t, "w1", settings.training_lease_seconds)
    assert trainings.release(t, token) == Status.QUEUED
    row = _row(session, t)
    assert (row.status, row.attempts, row.worker, row.claim_token) == (Status.QUEUED, 0, None, None)
    token = trainings.claim(t, "w1", settings.training_lease_seconds)
    assert trainings.release(t, "another run's token") is None
    trainings.cancel(session, t)
    assert trainings.release(t, token) == Status.CANCELLED and _row(session, t).status == Status.CANCELLED
