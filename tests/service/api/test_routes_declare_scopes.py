"""Every route of the app declares what it requires (service.api.auth.Requires), where it is
declared: the scope, the rate limit, what it counts, and the dataset checks of a limited key.
Nothing is derived from a URL, so a route that forgets its declaration fails here."""

from __future__ import annotations

import pytest
from fastapi.routing import iter_route_contexts

from service.api import auth, metrics
from service.api.auth import Requirement
from service.api.routes import oip
from service.domain.keys import Scope

# no scope: probes, the console shell (its page asks for a key, then calls the API) and the docs
OPEN = {"/healthz", "/readyz", "/", "/console/{path}", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}

P, R, W, A = Scope.PREDICT, Scope.READ, Scope.WRITE, Scope.ADMIN
CONTRACT: dict[tuple[str, str], Scope] = {
    ("POST", "/v1/datasets/{name}/predict"): P,
    ("GET", "/v1/datasets"): P,
    ("GET", "/v1/datasets/{name}"): P,
    ("GET", "/v1/datasets/{name}/models"): P,
    ("GET", "/v1/datasets/{name}/models/{version}"): P,
    ("GET", "/v1/datasets/{name}/images"): R,
    ("GET", "/v1/datasets/{name}/images/{image_id}"): R,
    ("GET", "/v1/datasets/{name}/images/{image_id}/content"): R,
    ("GET", "/v1/datasets/{name}/images/{image_id}/thumbnail"): R,
    ("GET", "/v1/datasets/{name}/label-issues"): R,
    ("GET", "/v1/datasets/{name}/suggestions"): R,
    ("POST", "/v1/datasets/{name}/images/labels"): W,
    ("POST", "/v1/datasets/{name}/images/known"): R,
    ("GET", "/v1/datasets/{name}/images/near-duplicates"): R,
    ("GET", "/v1/datasets/{name}/models/{version}/evaluation"): R,
    ("GET", "/v1/datasets/{name}/models/{version}/download"): R,
    ("GET", "/v1/datasets/{name}/trainings"): R,
    ("GET", "/v1/trainings/{training_id}"): R,
    ("GET", "/v1/trainings/{training_id}/events"): R,
    ("POST", "/v1/datasets"): W,
    ("DELETE", "/v1/datasets/{name}"): W,
    ("POST", "/v1/datasets/{name}/images"): W,
    ("PATCH", "/v1/datasets/{name}/images/{image_id}"): W,
    ("DELETE", "/v1/datasets/{name}/images/{image_id}"): W,
    ("POST", "/v1/datasets/{name}/trainings"): W,
    ("POST", "/v1/trainings/{training_id}/cancel"): W,
    ("POST", "/v1/datasets/{name}/models/{version}/promote"): W,
    ("PUT", "/v1/datasets/{name}/models/{version}/thresholds/{label}"): W,
    ("DELETE", "/v1/datasets/{name}/models/{version}/thresholds/{label}"): W,
    ("PUT", "/v1/datasets/{name}/models/{version}/ood-threshold"): W,
    ("DELETE", "/v1/datasets/{name}/models/{version}"): W,
    ("POST", "/v1/keys"): A,
    ("GET", "/v1/keys"): A,
    ("DELETE", "/v1/keys/{key_id}"): A,
    ("GET", "/metrics"): A,  # on the API port (there is no separate metrics port)
}
RATE_LIMITED = {("POST", "/v1/datasets/{name}/predict"): "predict", ("POST", "/v1/datasets/{name}/images"): "upload"}
COUNTED = {("POST", "/v1/datasets/{name}/predict"): metrics.count_predictions,
           ("POST", "/v1/datasets/{name}/images"): metrics.count_uploads}
EVERY_DATASET = {("POST", "/v1/datasets"), ("POST", "/v1/keys"), ("GET", "/v1/keys"), ("DELETE", "/v1/keys/{key_id}"),
                 ("GET", "/metrics")}

# Custom Vision's API (service/api/customvision): the same Requirement, declared with its own key headers
# (TrainingRequires, PredictionRequires); its signed image URLs need no key (the signature is the permission)
_CVT, _CVP = "/customvision/{api_version}/training", "/customvision/{api_version}/prediction/{projectId}"
_CV_ITERATION = f"{_CVT}/projects/{{projectId}}/iterations/{{iterationId}}"
OPEN |= {"/customvision/content/images/{image_id}/{kind}"}
CONTRACT.update({
    ("GET", f"{_CVT}/domains"): R, ("GET", f"{_CVT}/domains/{{domainId}}"): R,
    ("POST", f"{_CVT}/projects"): W, ("GET", f"{_CVT}/projects"): R,
    ("GET", f"{_CVT}/projects/{{projectId}}"): R, ("DELETE", f"{_CVT}/projects/{{projectId}}"): W,
    ("POST", f"{_CVT}/projects/{{projectId}}/tags"): W, ("GET", f"{_CVT}/projects/{{projectId}}/tags"): R,
    ("GET", f"{_CVT}/projects/{{projectId}}/tags/{{tagId}}"): R,
    ("POST", f"{_CVT}/projects/{{projectId}}/images/files"): W, ("POST", f"{_CVT}/projects/{{projectId}}/images"): W,
    ("GET", f"{_CVT}/projects/{{projectId}}/images/tagged"): R,
    ("GET", f"{_CVT}/projects/{{projectId}}/images/tagged/count"): R,
    ("POST", f"{_CVT}/projects/{{projectId}}/train"): W, ("GET", f"{_CVT}/projects/{{projectId}}/iterations"): R,
    ("GET", _CV_ITERATION): R, ("DELETE", _CV_ITERATION): W, ("GET", f"{_CV_ITERATION}/performance"): R,
    ("POST", f"{_CV_ITERATION}/publish"): W, ("DELETE", f"{_CV_ITERATION}/publish"): W,
    ("POST", f"{_CVP}/classify/iterations/{{publishedName}}/image"): P,
    ("POST", f"{_CVP}/classify/iterations/{{publishedName}}/image/nostore"): P,
    ("POST", f"{_CVP}/classify/iterations/{{publishedName}}/url"): P,
    ("POST", f"{_CVP}/classify/iterations/{{publishedName}}/url/nostore"): P,
})
RATE_LIMITED.update({("POST", f"{_CVP}/classify/iterations/{{publishedName}}/{path}"): "predict"
                     for path in ("image", "image/nostore", "url", "url/nostore")})
RATE_LIMITED.update({("POST", f"{_CVT}/projects/{{projectId}}/images/files"): "upload",
                     ("POST", f"{_CVT}/projects/{{projectId}}/images"): "upload"})
EVERY_DATASET.add(("POST", f"{_CVT}/projects"))

# The Open Inference Protocol (service/api/routes/oip.py): /v1 predict's declarations on every /v2
# route that takes a key; its two health probes need none
_V2 = "/v2/models/{name}"
_OIP = [("GET", "/v2"), ("GET", _V2), ("GET", f"{_V2}/versions/{{version}}"), ("GET", f"{_V2}/ready"),
        ("GET", f"{_V2}/versions/{{version}}/ready")]
_OIP_INFER = [("POST", f"{_V2}/infer"), ("POST", f"{_V2}/versions/{{version}}/infer")]
OPEN |= {"/v2/health/live", "/v2/health/ready"}
CONTRACT.update(dict.fromkeys(_OIP + _OIP_INFER, P))
RATE_LIMITED.update(dict.fromkeys(_OIP + _OIP_INFER, "predict"))
COUNTED.update(dict.fromkeys(_OIP_INFER, oip.count_inferences))


def _calls(dependant) -> list:
    """Every dependency callable of a route, sub-dependencies included, in the order FastAPI solves them."""
    out = []
    for sub in dependant.dependencies:
        out.extend(_calls(sub))
        out.append(sub.call)
    return out


@pytest.fixture
def routes(felis_env) -> dict[tuple[str, str], list]:
    """(method, path template) -> the route's dependency callables, for every route of the app."""
    from service.api.app import create_app

    out: dict[tuple[str, str], list] = {}
    for route in iter_route_contexts(create_app().routes):
        dependant = getattr(route, "dependant", None)
        for method in sorted(route.methods or {"GET"}):
            if method != "HEAD":
                out[(method, route.path_format)] = _calls(dependant) if dependant else []
    return out


def _requirements(calls: list) -> list[Requirement]:
    return [c.requirement for c in calls if isinstance(getattr(c, "requirement", None), Requirement)]


def test_every_route_declares_a_scope(routes):
    missing = sorted(f"{m} {p}" for (m, p), calls in routes.items() if p not in OPEN and not _requirements(calls))
    assert not missing, f"routes without a declared scope (add dependencies=[Requires(Scope....)]): {missing}"
    declared_open = sorted(f"{m} {p}" for (m, p), calls in routes.items() if p in OPEN and _requirements(calls))
    assert not declared_open


def test_each_route_requires_the_scope_of_the_contract(routes):
    declared = {route: max((r.scope for r in _requirements(calls)), key=list(Scope).index)
                for route, calls in routes.items() if route[1] not in OPEN}
    assert declared == CONTRACT


def test_rate_limits_and_counters_are_declared_on_their_routes(routes):
    limits = {route: r.rate_limit for route, calls in routes.items() for r in _requirements(calls) if r.rate_limit}
    assert limits == RATE_LIMITED
    counted = {route: c.counter for route, calls in routes.items() for c in calls if hasattr(c, "counter")}
    assert counted == COUNTED
    every = {route for route, calls in routes.items() if any(r.every_dataset for r in _requirements(calls))}
    assert every == EVERY_DATASET


def test_routes_of_a_dataset_or_training_check_a_limited_key(routes):
    dataset_check, training_check = auth.InDataset.dependency, auth.InTraining.dependency
    for (method, path), calls in routes.items():
        if "{name}" in path:
            assert dataset_check in calls, f"{method} {path} has {{name}} but no InDataset"
        if "{training_id}" in path:
            assert training_check in calls, f"{method} {path} has {{training_id}} but no InTraining"


def test_the_caller_is_checked_once_however_many_declarations(routes):
    """Each declaration depends on auth.current_caller (Custom Vision's: on the caller of its key
    headers); FastAPI solves it once per request."""
    from service.api.customvision.auth import CALLERS

    for route, calls in routes.items():
        if route[1] not in OPEN:
            assert {auth.current_caller, *CALLERS} & set(calls), route


def test_the_predict_route_declares_nothing_that_needs_a_thread(routes):
    """FastAPI runs a plain `def` dependency in its thread pool: one hop per request, which the
    predict path cannot afford (a key, when sent, costs the one hop of its check)."""
    import inspect

    def is_async(call) -> bool:
        return inspect.iscoroutinefunction(call) or inspect.iscoroutinefunction(getattr(call, "__call__", None))

    for route in [("POST", "/v1/datasets/{name}/predict"), *_OIP_INFER]:
        sync = [c for c in routes[route] if not is_async(c)]
        assert not sync, route
