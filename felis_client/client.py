"""``Client``: the felis API v1 as methods, one for each thing an app does with it (the
thumbnails, a version's ONNX graph and deleting a version are reached with plain HTTP).

Every method returns the JSON the API answers (a dict), except ``download`` and
``image_content`` (bytes), ``delete_*`` (None) and ``wait`` (the training in its final state).
An error answer raises ``FelisError(status, code, message)``.
"""

from __future__ import annotations

import json
import mimetypes
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx

from felis_client import upload as _upload
from felis_client.config import load_config
from felis_client.errors import FelisError

FINAL = ("succeeded", "failed", "cancelled")
PREDICT_BATCH = 32  # images per predict request (the server's default limit is 64)

ImageInput = str | os.PathLike | bytes | tuple[str, bytes]


class Client:
    """A felis API client. Arguments left out come from FELIS_URL / FELIS_API_KEY, then from
    ``~/.config/felis/config.toml`` (``url``, ``api_key``), then the default ``http://127.0.0.1:8000``."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None, config_path: str | os.PathLike | None = None,
                 headers: dict[str, str] | None = None):
        config = load_config(base_url, api_key, config_path)
        self.base_url, self.api_key = config.url, config.api_key
        all_headers = {"User-Agent": "felis-client/0.1", **(headers or {})}
        if self.api_key:
            all_headers["Authorization"] = f"Bearer {self.api_key}"
        self._http = httpx.Client(base_url=self.base_url, headers=all_headers, transport=transport,
                                  timeout=httpx.Timeout(timeout, connect=10.0))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.base_url!r}, api_key={'set' if self.api_key else None})"

    # --- plumbing ------------------------------------------------------------------

    def _request(self, method: str, path: str, *, ok: tuple[int, ...] = (), **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as e:
            raise FelisError(0, "timeout", f"{method} {path}: no answer from {self.base_url} in time") from e
        except httpx.HTTPError as e:
            raise FelisError(0, "connection_error", f"{method} {path}: cannot reach {self.base_url}: {e}") from e
        if response.status_code >= 400 and response.status_code not in ok:
            raise _error(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._request(method, path, **kwargs)
        return response.json() if response.content else None

    # --- health ----------------------------------------------------------------------

    def health(self) -> dict:
        return self._json("GET", "/healthz")

    def ready(self) -> dict:
        """The readiness report; raises FelisError(503, "not_ready") when a dependency is down."""
        return self._json("GET", "/readyz")

    # --- datasets --------------------------------------------------------------------

    def create_dataset(self, name: str) -> dict:
        return self._json("POST", "/v1/datasets", json={"name": name})

    def datasets(self, limit: int = 100, offset: int = 0) -> dict:
        """``{"data": [dataset, ...], "count": total}``"""
        return self._json("GET", "/v1/datasets", params={"limit": limit, "offset": offset})

    def dataset(self, name: str) -> dict:
        return self._json("GET", f"/v1/datasets/{name}")

    def delete_dataset(self, name: str) -> None:
        self._request("DELETE", f"/v1/datasets/{name}")

    # --- images ----------------------------------------------------------------------

    def upload(self, dataset: str, path: str | os.PathLike | Iterable[str | os.PathLike], label: str | None = None,
               on_progress: Callable[[int, int], None] | None = None, *, unlabeled: bool = False) -> dict:
        """Upload a folder with a folder per label, a zip, or image files (these need ``label``, or
        ``unlabeled=True``: stored without a label, the service suggests one; a folder's images too,
        not a zip's, whose folders are its labels).

        Files whose bytes the dataset holds already are not sent (``skipped``): an upload that was
        interrupted resumes where it stopped when run again. Returns the merged per-file report
        ``{"results", "skipped", "created", "duplicates", "rejected"}``, also when nothing new was
        stored (all duplicates or rejected), which the API answers with 422.
        ``on_progress(sent_bytes, total_bytes)`` is called as the bytes go out, over every request."""
        skipped: list[Path] = []

        def known(paths: list[Path]) -> set[Path]:  # what a previous, interrupted upload stored already
            found = self._known(dataset, paths)
            skipped.extend(found)
            return found

        batches = list(_upload.plan(path, label, unlabeled=unlabeled, skip=known))
        try:
            total = sum(b.size for b in batches)
            sent = 0

            def advance(n: int) -> None:
                nonlocal sent
                sent += n
                if on_progress:
                    on_progress(sent, total)

            if on_progress:
                on_progress(0, total)
            reports = [self._upload_batch(dataset, b, advance) for b in batches]
        finally:
            for b in batches:
                b.cleanup()
        return _upload.merge_reports([*reports, {"skipped": len(skipped)}])

    def _known(self, dataset: str, paths: list[Path]) -> set[Path]:
        """The files whose bytes the dataset holds already (POST .../images/known, 5,000 hashes a request)."""
        by_sha: dict[str, list[Path]] = {}
        for p in paths:
            by_sha.setdefault(_upload.sha256_of(p), []).append(p)
        shas, found = list(by_sha), set()
        for start in range(0, len(shas), 5000):
            answer = self._json("POST", f"/v1/datasets/{dataset}/images/known", json={"sha256": shas[start:start + 5000]})
            for sha in answer["known"]:
                found.update(by_sha[sha])
        return found

    def _upload_batch(self, dataset: str, batch: _upload.Batch, advance: Callable[[int], None]) -> dict:
        if batch.archive is not None:
            files = [("archive", (batch.archive.name, _upload.ProgressFile(batch.archive, advance), "application/zip"))]
            data = None
        else:
            files = [("files", (p.name, _upload.ProgressFile(p, advance), _media_type(p))) for p in batch.files]
            data = {"label": batch.label} if batch.label else None
        response = self._request("POST", f"/v1/datasets/{dataset}/images", files=files, data=data, ok=(422,),
                                 timeout=httpx.Timeout(600.0, connect=10.0))
        body = response.json()
        if response.status_code == 422 and "results" not in body:
            raise _error(response)
        return body

    def images(self, dataset: str, label: str | None = None, limit: int = 100, offset: int = 0,
               labeled: bool | None = None, cursor: str | None = None) -> dict:
        """A page, oldest first: ``{"data", "count", "next_cursor"}``; pass ``next_cursor`` back as
        ``cursor`` for the next one (every page the same cost), or see iter_images."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if cursor is not None:
            params["cursor"] = cursor
        if label is not None:
            params["label"] = label
        if labeled is not None:
            params["labeled"] = "true" if labeled else "false"
        return self._json("GET", f"/v1/datasets/{dataset}/images", params=params)

    def image(self, dataset: str, image_id: str) -> dict:
        return self._json("GET", f"/v1/datasets/{dataset}/images/{image_id}")

    def image_content(self, dataset: str, image_id: str) -> bytes:
        return self._request("GET", f"/v1/datasets/{dataset}/images/{image_id}/content").content

    def relabel(self, dataset: str, image_id: str, label: str | None) -> dict:
        """A new label (None: unlabeled again)."""
        return self._json("PATCH", f"/v1/datasets/{dataset}/images/{image_id}", json={"label": label})

    def label_images(self, dataset: str, labels: Iterable[tuple[str, str | None]] | dict[str, str | None]) -> dict:
        """Label many images at once: (image id, label or None) pairs, or a dict; 1,000 a request at
        most (more go as several). ``{"results": [...], "applied", "rejected"}``, a result per item."""
        items = list(labels.items()) if isinstance(labels, dict) else list(labels)
        out: dict[str, Any] = {"results": [], "applied": 0, "rejected": 0}
        for start in range(0, len(items), 1000):
            body = [{"image_id": i, "label": label} for i, label in items[start:start + 1000]]
            part = self._json("POST", f"/v1/datasets/{dataset}/images/labels", json=body)
            out["results"] += part["results"]
            out["applied"] += part["applied"]
            out["rejected"] += part["rejected"]
        return out

    def suggestions(self, dataset: str, order: str = "uncertain", limit: int = 100, offset: int = 0) -> dict:
        """The labels the default version suggests for the unlabeled images: ``order`` "uncertain"
        (what to label by hand first) or "certain" (what to accept); ``pending``: not suggested yet."""
        return self._json("GET", f"/v1/datasets/{dataset}/suggestions",
                          params={"order": order, "limit": limit, "offset": offset})

    def delete_image(self, dataset: str, image_id: str) -> None:
        self._request("DELETE", f"/v1/datasets/{dataset}/images/{image_id}")

    def label_issues(self, dataset: str, version: int | None = None, limit: int = 100, offset: int = 0) -> dict:
        """The images whose label the held-out predictions of a version's training contradict (the
        default version unless ``version``), most likely first: ``{"data": [{image_id, filename,
        label, current_label, suggested_label, score}], "count", "version"}``."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if version is not None:
            params["version"] = int(version)
        return self._json("GET", f"/v1/datasets/{dataset}/label-issues", params=params)

    # --- trainings -------------------------------------------------------------------

    def train(self, dataset: str, **options: Any) -> dict:
        """Queue a training; ``options`` are the training options (architecture, epochs, seed, ...)."""
        return self._json("POST", f"/v1/datasets/{dataset}/trainings", json=options)

    def iter_images(self, dataset: str, label: str | None = None, labeled: bool | None = None,
                    page_size: int = 1000) -> Iterator[dict]:
        """Every image of the dataset, a page at a time (keyset cursors: none repeated or skipped)."""
        cursor = None
        while True:
            page = self.images(dataset, label=label, labeled=labeled, limit=page_size, cursor=cursor)
            yield from page["data"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def trainings(self, dataset: str, limit: int = 50, offset: int = 0, cursor: str | None = None) -> dict:
        """Newest first: ``{"data", "count", "next_cursor"}``."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if cursor is not None:
            params["cursor"] = cursor
        return self._json("GET", f"/v1/datasets/{dataset}/trainings", params=params)

    def training(self, training_id: str) -> dict:
        return self._json("GET", f"/v1/trainings/{training_id}")

    def cancel(self, training_id: str) -> dict:
        return self._json("POST", f"/v1/trainings/{training_id}/cancel")

    def events(self, training_id: str, read_timeout: float = 60.0) -> Iterator[dict]:
        """The training as it changes, from the server-sent event stream; ends at a final status."""
        timeout = httpx.Timeout(10.0, read=read_timeout)
        try:
            with self._http.stream("GET", f"/v1/trainings/{training_id}/events", timeout=timeout,
                                   headers={"Accept": "text/event-stream"}) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _error(response)
                for data in _sse_data(response.iter_lines()):
                    yield json.loads(data)
        except httpx.TimeoutException as e:
            raise FelisError(0, "timeout", f"no event from {self.base_url} in {read_timeout}s") from e
        except httpx.HTTPError as e:
            raise FelisError(0, "connection_error", f"event stream from {self.base_url} broke: {e}") from e

    def wait(self, training_id: str, on_progress: Callable[[dict], None] | None = None,
             timeout: float | None = None, poll_interval: float = 1.0, max_reconnects: int = 60) -> dict:
        """Block until the training reaches a final status and return it. ``on_progress(training)``
        is called each time it changes. Follows the event stream; reconnects if it breaks (up to
        ``max_reconnects`` times in a row), and polls when the server has no stream. Raises
        TimeoutError after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last: dict | None = None
        streaming, failures = True, 0

        def seen(training: dict) -> bool:
            nonlocal last
            if training != last:
                last = training
                if on_progress:
                    on_progress(training)
            return training.get("status") in FINAL

        while True:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"training {training_id} is still {last and last.get('status')}")
            if streaming:
                try:
                    remaining = 60.0 if deadline is None else max(1.0, min(60.0, deadline - time.monotonic()))
                    for training in self.events(training_id, read_timeout=remaining):
                        failures = 0
                        if seen(training):
                            return training
                        if deadline is not None and time.monotonic() > deadline:
                            break
                except FelisError as e:
                    if e.status in (404, 405) and e.code != "training_not_found":
                        streaming = False  # a server without the event stream: poll instead
                        continue
                    if e.status != 0 and e.status < 500:
                        raise
                    failures += 1  # a restart or a proxy cut the stream: reconnect, for a while
                    if failures > max_reconnects:
                        raise
                time.sleep(poll_interval)
                continue
            if seen(self.training(training_id)):
                return last  # type: ignore[return-value]
            time.sleep(poll_interval)

    # --- model versions ---------------------------------------------------------------

    def models(self, dataset: str) -> dict:
        return self._json("GET", f"/v1/datasets/{dataset}/models")

    def model(self, dataset: str, version: int) -> dict:
        return self._json("GET", f"/v1/datasets/{dataset}/models/{int(version)}")

    def evaluation(self, dataset: str, version: int) -> dict:
        return self._json("GET", f"/v1/datasets/{dataset}/models/{int(version)}/evaluation")

    def promote(self, dataset: str, version: int) -> dict:
        return self._json("POST", f"/v1/datasets/{dataset}/models/{int(version)}/promote")

    def download(self, dataset: str, version: int, path: str | os.PathLike | None = None) -> bytes | Path:
        """The checkpoint's bytes, or, given ``path``, the checkpoint written there (returns the path)."""
        url = f"/v1/datasets/{dataset}/models/{int(version)}/download"
        if path is None:
            return self._request("GET", url, timeout=httpx.Timeout(600.0, connect=10.0)).content
        target = Path(path)
        if target.is_dir():
            target = target / f"{dataset}-v{int(version)}.pt"
        partial = target.with_name(target.name + ".part")
        try:
            with self._http.stream("GET", url, timeout=httpx.Timeout(600.0, connect=10.0)) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _error(response)
                with open(partial, "wb") as f:
                    for chunk in response.iter_bytes():
                        f.write(chunk)
        except httpx.HTTPError as e:
            partial.unlink(missing_ok=True)
            raise FelisError(0, "connection_error", f"download from {self.base_url} broke: {e}") from e
        partial.replace(target)
        return target

    def set_threshold(self, dataset: str, version: int, label: str, threshold: float | None = None,
                      min_precision: float | None = None) -> dict:
        """A decision threshold for ``label``: given, or the lowest reaching ``min_precision`` on
        validation. Exactly one."""
        if (threshold is None) == (min_precision is None):
            raise ValueError("give exactly one of threshold and min_precision")
        body = {"threshold": threshold} if min_precision is None else {"min_precision": min_precision}
        return self._json("PUT", f"/v1/datasets/{dataset}/models/{int(version)}/thresholds/{label}", json=body)

    def clear_threshold(self, dataset: str, version: int, label: str) -> dict:
        """Remove ``label``'s decision threshold (its decision: the likeliest label's again)."""
        return self._json("DELETE", f"/v1/datasets/{dataset}/models/{int(version)}/thresholds/{label}")

    def set_ood_threshold(self, dataset: str, version: int, threshold: float | None = None,
                          flagged_fraction: float | None = None) -> dict:
        """The open-set threshold (predictions whose ``ood_score`` passes it are ``ood``): given
        (0..2), or the one that flags ``flagged_fraction`` (0..1) of the training images. Exactly one."""
        if (threshold is None) == (flagged_fraction is None):
            raise ValueError("give exactly one of threshold and flagged_fraction")
        body = {"threshold": threshold} if flagged_fraction is None else {"flagged_fraction": flagged_fraction}
        return self._json("PUT", f"/v1/datasets/{dataset}/models/{int(version)}/ood-threshold", json=body)

    # --- predicting --------------------------------------------------------------------

    def predict(self, dataset: str, images: ImageInput | Iterable[ImageInput], version: int | None = None) -> dict:
        """Probabilities per image: paths, raw bytes, or (filename, bytes) pairs. Many images go as
        several requests, all answered by the same version; an image that cannot be read has an
        ``error`` in place of its probabilities, wherever the requests split. FelisError (422,
        the first image's code) when none of them can be read, as the service answers."""
        items = [images] if isinstance(images, (str, os.PathLike, bytes, tuple)) else list(images)
        if not items:
            raise ValueError("no images to predict")
        answer: dict[str, Any] | None = None
        predictions: list[dict[str, Any]] = []
        unreadable: FelisError | None = None
        for start in range(0, len(items), PREDICT_BATCH):
            files = [("files", _image_part(x, start + i)) for i, x in enumerate(items[start:start + PREDICT_BATCH])]
            params = {"version": version} if version is not None else None
            try:
                body = self._json("POST", f"/v1/datasets/{dataset}/predict", files=files, params=params)
            except FelisError as e:  # every image of this request unreadable: each one's reason, as in a mixed answer
                each = (e.details or {}).get("files") if e.status == 422 and isinstance(e.details, dict) else None
                if not each:
                    raise
                unreadable = unreadable or e
                predictions.extend({"filename": f["filename"], "error": {"code": f["code"], "message": f["message"]}}
                                   for f in each)
                continue
            if answer is None:
                answer, version = body, body.get("model_version")  # later requests use the same version
            predictions.extend(body["predictions"])
        if answer is None:
            assert unreadable is not None
            raise unreadable
        answer["predictions"] = predictions
        return answer


def _media_type(path: Path) -> str:
    return _upload.IMAGE_TYPES.get(path.suffix.lower()) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def _image_part(item: ImageInput, index: int) -> tuple[str, bytes, str]:
    if isinstance(item, tuple):
        name, data = item
        return name, data, _media_type(Path(name))
    if isinstance(item, bytes):
        return f"image-{index}", item, "application/octet-stream"
    path = Path(item)
    return path.name, path.read_bytes(), _media_type(path)


def _error(response: httpx.Response) -> FelisError:
    try:
        body = response.json()
    except ValueError:
        body = None
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return FelisError(response.status_code, str(err.get("code", "error")), str(err.get("message", "")),
                          err.get("details"), body)
    text = response.text.strip()[:300] or response.reason_phrase
    return FelisError(response.status_code, "http_error", text, body=body)


def _sse_data(lines: Iterable[str]) -> Iterator[str]:
    """The ``data`` of each event in a text/event-stream (comments and other fields skipped)."""
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield "\n".join(data)
