"""Custom Vision's keys: ``Training-Key`` (training) or ``Prediction-Key`` (prediction) in any
letter case, or ``Ocp-Apim-Subscription-Key`` for either; never ``Authorization``.

A key is a felis API key (service.domain.keys): a ``write`` key works as a Training-Key, a
``predict`` key as a Prediction-Key. Routes declare what they require as /v1 routes do
(service.api.auth.Requirement, the marker tests/service/api/test_routes_declare_scopes.py reads),
through ``TrainingRequires`` / ``PredictionRequires``, which take the caller from these headers.
Where keys are not required (embedded mode on loopback) any key value is accepted and ignored:
the apps keep sending their old Azure keys. Failed keys count against the same per-address limit
as /v1's.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, params

from service.api.auth import Caller, authenticate, client_address, requires_of
from service.config import get_settings
from service.domain.keys import Scope
from service.errors import Unauthorized

TRAINING_KEY_HEADERS = ("training-key", "ocp-apim-subscription-key")
PREDICTION_KEY_HEADERS = ("prediction-key", "ocp-apim-subscription-key")


async def _caller(request: Request, headers: tuple[str, ...]) -> Caller:
    settings = get_settings()
    address = client_address(request, settings)
    if not settings.api_keys_required:
        return Caller(address, None)
    key = next((v.strip() for name in headers if (v := request.headers.get(name)) and v.strip()), "")
    if not key:
        raise Unauthorized(f"a key is required: send it as {headers[0].title()} (or Ocp-Apim-Subscription-Key)",
                           code="api_key_required")
    return await authenticate(request, key, address)


async def training_caller(request: Request) -> Caller:
    """The caller of a training route, by its Training-Key (solved once per request)."""
    return await _caller(request, TRAINING_KEY_HEADERS)


async def prediction_caller(request: Request) -> Caller:
    """The caller of a prediction route, by its Prediction-Key (solved once per request)."""
    return await _caller(request, PREDICTION_KEY_HEADERS)


TrainingCallerDep = Annotated[Caller, Depends(training_caller)]
PredictionCallerDep = Annotated[Caller, Depends(prediction_caller)]
CALLERS = (training_caller, prediction_caller)


def TrainingRequires(scope: Scope, *, rate_limit: str | None = None, every_dataset: bool = False) -> params.Depends:  # noqa: N802
    """What a training route lists: the Training-Key must grant ``scope`` (as auth.Requires)."""
    return requires_of(training_caller, scope, rate_limit, every_dataset)


def PredictionRequires(scope: Scope, *, rate_limit: str | None = None) -> params.Depends:  # noqa: N802
    """What a prediction route lists: the Prediction-Key must grant ``scope`` (as auth.Requires)."""
    return requires_of(prediction_caller, scope, rate_limit, False)
