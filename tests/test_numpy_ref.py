"""minimoe.numpy_ref: softmax and gates by hand and against torch (TopKRouter), every hand-written
backward against central finite differences and torch autograd, a toy regression trained by
gradient descent, and input validation."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from minimoe.numpy_ref import (
    gate,
    gate_backward,
    init_mixture,
    mixture_backward,
    mixture_forward,
    mse_loss,
    softmax,
    softmax_backward,
    top_k,
)
from minimoe.routing import TopKRouter

PROPERTY = settings(max_examples=100)
CONVENTIONS = [(None, True), (1, True), (2, True), (1, False), (2, False)]  # (k, renormalize)


def numerical_grad(f, a, eps=1e-6):
    """Central differences of the scalar f() w.r.t. the float64 array `a`, perturbed in place."""
    grad = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        old = a[i]
        a[i] = old + eps
        plus = f()
        a[i] = old - eps
        minus = f()
        a[i] = old
        grad[i] = (plus - minus) / (2 * eps)
    return grad


def assert_grad_close(analytic, numeric, rtol=1e-6):
    """Relative to the gradient's scale, so entries near zero are not held to rtol on their own."""
    scale = max(np.abs(numeric).max(), 1e-12)
    np.testing.assert_allclose(analytic, numeric, rtol=rtol, atol=rtol * scale)


def separated_logits(rng, N, E):
    """Logits whose sorted values in each row are >= 0.5 apart: eps-perturbations keep the top-k."""
    return np.stack([rng.permutation(E) * 0.7 + rng.uniform(-0.1, 0.1, E) for _ in range(N)])


def dense(routing, num_experts):
    """Routing -> dense gates [T, E] (zeros outside the chosen experts)."""
    gates = torch.zeros(routing.expert_idx.shape[0], num_experts)
    return gates.scatter(1, routing.expert_idx, routing.weights).numpy()


# ---------------------------------------------------------------------------------------------
# softmax, top_k
# ---------------------------------------------------------------------------------------------

def test_softmax_rows_sum_to_one_and_shift_invariant():
    logits = np.random.default_rng(0).normal(size=(5, 7)) * 3
    p = softmax(logits)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-15)
    np.testing.assert_allclose(softmax(logits + np.arange(5)[:, None] * 10.0), p, rtol=1e-12)
    np.testing.assert_allclose(softmax(logits.T, axis=0), p.T, rtol=1e-15)


def test_softmax_matches_torch():
    logits = np.random.default_rng(1).normal(size=(4, 6))
    expected = torch.softmax(torch.from_numpy(logits), dim=-1).numpy()
    np.testing.assert_allclose(softmax(logits), expected, rtol=1e-12)


def test_softmax_is_stable_for_huge_logits():
    p = softmax(np.array([[1000.0, 1000.0, 999.0], [-1000.0, -1000.0, -1001.0]]))
    e = np.exp(-1.0)
    np.testing.assert_allclose(p, [[1 / (2 + e), 1 / (2 + e), e / (2 + e)]] * 2, rtol=1e-15)


def test_top_k_best_first_ties_to_lower_index():
    scores = np.array([[0.1, 0.9, 0.5, 0.7], [2.0, 3.0, 3.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(top_k(scores, 2), [[1, 3], [1, 2], [0, 1]])
    np.testing.assert_array_equal(top_k(scores, 4)[0], [1, 3, 2, 0])


# ---------------------------------------------------------------------------------------------
# gate: hand-computed, conventions, against TopKRouter, properties
# ---------------------------------------------------------------------------------------------

# softmax([ln 1, ln 2, ln 5]) = [1, 2, 5] / 8 and softmax([ln 3, ln 1, ln 4]) = [3, 1, 4] / 8
HAND_LOGITS = np.log([[1.0, 2.0, 5.0], [3.0, 1.0, 4.0]])


@pytest.mark.parametrize(("k", "renormalize", "expected"), [
    (None, True, [[1 / 8, 2 / 8, 5 / 8], [3 / 8, 1 / 8, 4 / 8]]),
    (2, True, [[0, 2 / 7, 5 / 7], [3 / 7, 0, 4 / 7]]),      # Mixtral: softmax over the kept two
    (2, False, [[0, 2 / 8, 5 / 8], [3 / 8, 0, 4 / 8]]),     # Switch-style: kept full-softmax probs
    (1, True, [[0, 0, 1], [0, 0, 1]]),
    (1, False, [[0, 0, 5 / 8], [0, 0, 4 / 8]]),
    (3, True, [[1 / 8, 2 / 8, 5 / 8], [3 / 8, 1 / 8, 4 / 8]]),
])
def test_gate_hand_computed(k, renormalize, expected):
    np.testing.assert_allclose(gate(HAND_LOGITS, k, renormalize), expected, rtol=1e-14, atol=0)


def test_gate_conventions():
    logits = np.random.default_rng(2).normal(size=(6, 5))
    mask = np.zeros_like(logits, dtype=bool)
    np.put_along_axis(mask, top_k(logits, 2), True, axis=1)
    kept_only = np.where(mask, np.exp(logits), 0.0)
    np.testing.assert_allclose(gate(logits, 2), kept_only / kept_only.sum(-1, keepdims=True), rtol=1e-14)
    np.testing.assert_allclose(gate(logits, 2, renormalize=False), softmax(logits) * mask, rtol=1e-15)
    top1 = gate(logits, 1)
    assert np.all(top1.max(-1) == 1.0) and np.all(top1.sum(-1) == 1.0)  # exactly, not approximately
    np.testing.assert_allclose(gate(logits, 5), gate(logits), rtol=1e-14)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("normalize", [True, False])
def test_gate_matches_topk_router(k, normalize):
    E = 5
    logits = np.random.default_rng(3).normal(size=(8, E)).astype(np.float32)
    router = TopKRouter(E, E, k=k, normalize=normalize).eval()
    with torch.no_grad():
        router.proj.weight.copy_(torch.eye(E))
        routing = router(torch.from_numpy(logits))
    np.testing.assert_allclose(gate(logits, k, normalize), dense(routing, E), rtol=1e-6, atol=1e-7)


@st.composite
def logits_and_k(draw):
    N, E = draw(st.integers(1, 6)), draw(st.integers(1, 8))
    logits = draw(arrays(np.float64, (N, E), elements=st.floats(-20, 20)))
    return logits, draw(st.integers(1, E))


@PROPERTY
@given(logits_and_k())
def test_gate_properties(case):
    logits, k = case
    renormalized, raw = gate(logits, k), gate(logits, k, renormalize=False)
    np.testing.assert_allclose(renormalized.sum(-1), 1.0, rtol=1e-12)
    assert np.all((renormalized > 0).sum(-1) == k)
    assert np.all((raw > 0) == (renormalized > 0))
    chosen = np.take_along_axis(renormalized, top_k(logits, k), axis=1)
    assert np.all(chosen > 0)
    assert np.all(np.diff(chosen, axis=1) <= 0)  # best first
    assert np.all(raw.sum(-1) <= 1 + 1e-12)
    # Mixtral's renormalisation = softmax -> top-k -> divide by the kept sum
    np.testing.assert_allclose(renormalized, raw / raw.sum(-1, keepdims=True), rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# backward: finite differences and torch autograd
# ---------------------------------------------------------------------------------------------

def test_softmax_backward_finite_differences():
    rng = np.random.default_rng(4)
    logits, weights = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    numeric = numerical_grad(lambda: np.sum(softmax(logits) * weights), logits)
    assert_grad_close(softmax_backward(softmax(logits), weights), numeric)
    np.testing.assert_allclose(softmax_backward(softmax(logits.T, 0), weights.T, axis=0),
                               softmax_backward(softmax(logits), weights).T, rtol=1e-15)


@pytest.mark.parametrize(("k", "renormalize"), [(None, True), (2, True), (2, False)])
def test_gate_backward_finite_differences(k, renormalize):
    rng = np.random.default_rng(5)
    logits, weights = separated_logits(rng, 4, 5), rng.normal(size=(4, 5))
    numeric = numerical_grad(lambda: np.sum(gate(logits, k, renormalize) * weights), logits)
    analytic = gate_backward(logits, gate(logits, k, renormalize), weights, k, renormalize)
    assert_grad_close(analytic, numeric)
    if renormalize and k is not None:  # dropped logits get no gradient at all
        assert np.all(analytic[gate(logits, k) == 0] == 0)
    if not renormalize:  # ...but do through the full softmax's normaliser
        assert np.all(analytic[gate(logits, k, renormalize) == 0] != 0)


def mixture_problem(seed=6, N=5, d=3, E=4, o=2):
    rng = np.random.default_rng(seed)
    params = init_mixture(d, E, o, rng)
    params["W_gate"] = rng.normal(size=(d, E))  # a gate far from uniform
    params["b_gate"], params["b"] = rng.normal(size=E), rng.normal(size=(E, o))
    x, target = rng.normal(size=(N, d)), rng.normal(size=(N, o))
    gaps = np.diff(np.sort(x @ params["W_gate"] + params["b_gate"], axis=1), axis=1)
    assert gaps.min() > 1e-3, "near-tied logits: the top-k would flip under eps"
    return params, x, target


@pytest.mark.parametrize(("k", "renormalize"), CONVENTIONS)
def test_mixture_backward_finite_differences(k, renormalize):
    params, x, target = mixture_problem()

    def loss():
        return mse_loss(mixture_forward(params, x, k, renormalize)[0], target)[0]

    y, cache = mixture_forward(params, x, k, renormalize)
    grads = mixture_backward(params, cache, mse_loss(y, target)[1])
    for name, value in [*params.items(), ("x", x)]:
        assert grads[name].shape == value.shape
        assert_grad_close(grads[name], numerical_grad(loss, value))
    if k == 1 and renormalize:  # every gate is exactly 1: the gate cannot learn
        assert np.all(grads["W_gate"] == 0) and np.all(grads["b_gate"] == 0)
    else:
        assert np.abs(grads["W_gate"]).min() > 0


def torch_mixture_loss(p, x, target, k, renormalize):
    """The same computation in torch, written independently of numpy_ref."""
    logits = x @ p["W_gate"] + p["b_gate"]
    if k is None:
        gates = logits.softmax(-1)
    else:
        mask = torch.zeros_like(logits, dtype=torch.bool).scatter(1, logits.topk(k).indices, True)
        gates = (logits.masked_fill(~mask, -torch.inf).softmax(-1) if renormalize
                 else logits.softmax(-1) * mask)
    y = torch.einsum("ne,neo->no", gates, torch.einsum("nd,edo->neo", x, p["W"]) + p["b"])
    return ((y - target) ** 2).mean()


@pytest.mark.parametrize(("k", "renormalize"), CONVENTIONS)
def test_mixture_backward_matches_torch_autograd(k, renormalize):
    params, x, target = mixture_problem(seed=7, N=16, d=4, E=6, o=3)
    y, cache = mixture_forward(params, x, k, renormalize)
    loss, grad_y = mse_loss(y, target)
    grads = mixture_backward(params, cache, grad_y)

    tp = {name: torch.tensor(value, requires_grad=True) for name, value in [*params.items(), ("x", x)]}
    t_loss = torch_mixture_loss(tp, tp["x"], torch.from_numpy(target), k, renormalize)
    t_loss.backward()
    assert loss == pytest.approx(t_loss.item(), rel=1e-12)
    for name, value in tp.items():
        np.testing.assert_allclose(grads[name], value.grad.numpy(), rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# forward values and a trained toy regression
# ---------------------------------------------------------------------------------------------

def test_mixture_forward_hand_computed():
    params = {"W_gate": np.zeros((1, 2)), "b_gate": np.array([0.0, np.log(3.0)]),
              "W": np.array([[[2.0]], [[-1.0]]]), "b": np.array([[1.0], [0.0]])}
    x = np.array([[1.0], [2.0]])  # experts: 2x + 1 and -x; gates 1/4, 3/4
    y, _ = mixture_forward(params, x)
    np.testing.assert_allclose(y, [[0.75 - 0.75], [1.25 - 1.5]], rtol=1e-15, atol=1e-15)
    y1, _ = mixture_forward(params, x, k=1)  # top-1 renormalised: exactly the second expert
    np.testing.assert_array_equal(y1, [[-1.0], [-2.0]])
    y1_switch, _ = mixture_forward(params, x, k=1, renormalize=False)
    np.testing.assert_allclose(y1_switch, [[-0.75], [-1.5]], rtol=1e-15)


def test_mse_loss_hand_computed():
    loss, grad = mse_loss(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[1.0, 0.0], [3.0, 5.0]]))
    assert loss == 5 / 4
    np.testing.assert_array_equal(grad, [[0.0, 1.0], [0.0, -0.5]])


def test_soft_mixture_fits_three_regimes():
    """y is piecewise linear in x with kinks at -1 and 1: one line cannot fit it, 3 experts can."""
    x = np.linspace(-3, 3, 120)[:, None]
    target = np.where(x < -1, 2 * x + 2, np.where(x < 1, -x - 1, 1.5 * x - 3.5))
    design = np.hstack([x, np.ones_like(x)])
    line = design @ np.linalg.lstsq(design, target, rcond=None)[0]
    line_mse = np.mean((line - target) ** 2)
    assert line_mse == pytest.approx(0.658, abs=1e-3)

    params = init_mixture(1, 3, 1, rng=0)
    for _ in range(300):
        y, cache = mixture_forward(params, x)
        mse, grad_y = mse_loss(y, target)
        for name, grad in mixture_backward(params, cache, grad_y).items():
            if name != "x":
                params[name] -= 0.2 * grad
    # measured: 0.0066 for seed 0 (0.0066-0.0069 for seeds 0-3)
    assert mse < 0.01 and mse < line_mse / 50


# ---------------------------------------------------------------------------------------------
# input validation
# ---------------------------------------------------------------------------------------------

def test_bad_k():
    scores = np.zeros((2, 3))
    for k in (0, 4, -1):
        with pytest.raises(ValueError, match=rf"k must be in \[1, E=3\], got k={k}"):
            top_k(scores, k)
        with pytest.raises(ValueError, match=r"k must be in \[1, E=3\]"):
            gate(scores, k)
    for k in (1.5, True, "2"):
        with pytest.raises(TypeError, match="k must be an int"):
            gate(scores, k)
    with pytest.raises(ValueError, match=r"k must be in \[1, E=3\]"):
        gate_backward(scores, scores, scores, k=4, renormalize=False)


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"logits must have shape \[N, E\], got shape \(3,\)"):
        gate(np.zeros(3))
    with pytest.raises(ValueError, match=r"scores must have shape \[N, E\]"):
        top_k(np.zeros((1, 2, 3)), 1)
    with pytest.raises(ValueError, match=r"grad_probs must have shape \[2, 3\], got shape \(3, 2\)"):
        softmax_backward(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"grad_gates must have shape \[2, 3\], got shape \(2, 4\)"):
        gate_backward(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"gates must have shape \[2, 3\]"):
        gate_backward(np.zeros((2, 3)), np.zeros(3), np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"target must have shape \[4, 1\], got shape \(4,\)"):
        mse_loss(np.zeros((4, 1)), np.zeros(4))


def test_bad_mixture_inputs():
    params = init_mixture(4, 3, 2, rng=0)
    with pytest.raises(ValueError, match=r"x must have shape \[N, 4\], got shape \(5, 3\)"):
        mixture_forward(params, np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"k must be in \[1, E=3\], got k=5"):
        mixture_forward(params, np.zeros((5, 4)), k=5)
    with pytest.raises(ValueError, match=r"params\['W_gate'\] must have shape \[4, 3\]"):
        mixture_forward({**params, "W_gate": np.zeros((4, 2))}, np.zeros((5, 4)))
    with pytest.raises(ValueError, match=r"params\['b'\] must have shape \[3, 2\]"):
        mixture_forward({**params, "b": np.zeros(3)}, np.zeros((5, 4)))
    with pytest.raises(ValueError, match=r"params is missing \['b_gate'\]"):
        mixture_forward({k: v for k, v in params.items() if k != "b_gate"}, np.zeros((5, 4)))
    _, cache = mixture_forward(params, np.zeros((5, 4)))
    with pytest.raises(ValueError, match=r"grad_y must have shape \[5, 2\], got shape \(5, 3\)"):
        mixture_backward(params, cache, np.zeros((5, 3)))
    with pytest.raises(ValueError, match="d must be >= 1, got d=0"):
        init_mixture(0, 3, 2)
    with pytest.raises(TypeError, match="E must be an int"):
        init_mixture(4, 3.0, 2)
