import numpy as np
import pytest

from models.calibrate import cross_fitted_temperature, fit_temperature, log_loss, softmax


def _synthetic(t_true: float, n: int = 4000, seed: int = 0):
    """Logits whose calibrated temperature is t_true: labels drawn from softmax(z / t_true)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, (n, 3))
    p = softmax(z, t_true)
    y = np.array([rng.choice(3, p=row) for row in p])
    return z, y


@pytest.mark.parametrize("t_true", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_the_true_temperature(t_true):
    z, y = _synthetic(t_true)
    t = fit_temperature(z, y)
    assert t == pytest.approx(t_true, rel=0.1)
    assert log_loss(z, y, t) <= log_loss(z, y, 1.0) + 1e-9


def test_cross_fitted_temperature_helps_overconfident_logits():
    z, y = _synthetic(3.0, n=600)
    t, probs = cross_fitted_temperature(z, y)
    assert t == pytest.approx(3.0, rel=0.25)
    assert probs.shape == z.shape and np.allclose(probs.sum(1), 1)


def test_cross_fitted_temperature_refuses_to_collapse():
    # a nearly perfect model with one error: fitting T would push it towards 0 (overconfident)
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 150)
    z = np.where(np.eye(2)[y] > 0, 4.0, -4.0) + rng.normal(0, 0.5, (150, 2))
    z[0] = z[0, ::-1]
    t, probs = cross_fitted_temperature(z, y)
    if t != 1.0:  # when it does scale, the cross-fitted log-loss must have improved
        assert -np.log(probs[np.arange(150), y]).mean() < log_loss(z, y)
    else:
        np.testing.assert_allclose(probs, softmax(z))


def test_softmax_rows_sum_to_one():
    p = softmax(np.array([[1000.0, 0.0], [-5.0, 5.0]]), 2.0)
    assert np.allclose(p.sum(1), 1) and p[0, 0] == pytest.approx(1.0)
