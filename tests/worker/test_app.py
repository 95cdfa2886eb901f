"""worker.app: delivery guarantees and routing, for both brokers."""

from __future__ import annotations

from service.config import Settings
from service.store.queue import GPU_QUEUE, TRAIN_TASK
from worker.app import make_celery


def test_embedded_broker_is_files_under_the_data_dir(tmp_path):
    app = make_celery(Settings(data_dir=tmp_path))
    opts = app.conf.broker_transport_options
    assert app.conf.broker_url == "filesystem://"
    assert opts["data_folder_in"] == opts["data_folder_out"] == str(tmp_path / "broker" / "queue")
    assert (tmp_path / "broker" / "queue").is_dir() and (tmp_path / "broker" / "control").is_dir()


def test_redis_visibility_timeout_outlasts_the_longest_training(tmp_path):
    s = Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:6379/0", training_time_limit=7200)
    app = make_celery(s)
    assert app.conf.broker_transport_options["visibility_timeout"] > 7200


def test_long_jobs_are_acked_late_one_at_a_time_on_the_gpu_queue(tmp_path):
    app = make_celery(Settings(data_dir=tmp_path))
    assert app.conf.task_acks_late is True
    assert app.conf.task_reject_on_worker_lost is True
    assert app.conf.worker_prefetch_multiplier == 1
    assert app.conf.task_routes[TRAIN_TASK] == {"queue": GPU_QUEUE}
    assert [q.name for q in app.conf.task_queues] == [GPU_QUEUE]
    assert app.conf.task_soft_time_limit < app.conf.task_time_limit


def test_the_train_task_is_registered_with_late_acks(tmp_path):
    from worker.app import celery_app
    from worker.tasks import train  # noqa: F401  (registers with the module's app)

    task = celery_app.tasks[TRAIN_TASK]
    assert task.acks_late and task.reject_on_worker_lost
