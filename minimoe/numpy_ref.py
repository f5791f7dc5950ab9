"""The NumPy reference behind chapters 01-02: a gate, affine experts, and their gradients by hand.

Shapes: N samples, d features, E experts, o outputs, k experts per sample.

A mixture of experts (Jacobs et al. 1991) computes y = sum_e gates[n, e] * expert_e(x[n]),
with gates = softmax(x @ W_gate + b_gate). The soft gate (k=None) runs every expert; a sparse
gate keeps the top-k logits per sample and zeroes the rest (Shazeer et al. 2017). Two
conventions for the kept weights:
  renormalize=True   softmax over the k chosen logits (Mixtral); equals softmax -> top-k ->
                     divide by the kept sum. With k=1 every gate is exactly 1.
  renormalize=False  the chosen experts' probabilities under the full softmax (Switch
                     Transformer, Fedus et al. 2021); rows sum to less than 1.
Everything is dense [N, E] with zeros outside the chosen experts: clear, not fast. Chapter 03
does the sparse dispatch in PyTorch.
"""

import numbers

import numpy as np


def _array(name, value, shape):
    """np.asarray(value), checked against `shape`: ints are fixed sizes, strings free dims."""
    a = np.asarray(value)
    fixed = [(s, n) for s, n in zip(shape, a.shape, strict=False) if isinstance(s, int)]
    if a.ndim != len(shape) or any(s != n for s, n in fixed):
        expected = "[" + ", ".join(str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {expected}, got shape {a.shape}")
    return a


def _check_k(k, num_experts):
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int in [1, E={num_experts}] or None, got {k!r}")
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must be in [1, E={num_experts}], got k={k}")
    return int(k)


def softmax(logits, axis=-1):
    """Numerically stable softmax: subtracting the max changes nothing but avoids exp overflow."""
    logits = np.asarray(logits)
    z = np.exp(logits - logits.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


def softmax_backward(probs, grad_probs, axis=-1):
    """dL/dlogits from p = softmax(logits) and g = dL/dp: p * (g - sum(p * g))."""
    probs = np.asarray(probs)
    grad_probs = _array("grad_probs", grad_probs, probs.shape)
    return probs * (grad_probs - (probs * grad_probs).sum(axis=axis, keepdims=True))


def top_k(scores, k):
    """scores [N, E] -> indices [N, k] of the k largest, best first; ties go to the lower index."""
    scores = _array("scores", scores, ("N", "E"))
    k = _check_k(k, scores.shape[1])
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def _chosen(logits, k):
    """Boolean mask [N, E] of each row's top-k logits."""
    mask = np.zeros(logits.shape, dtype=bool)
    np.put_along_axis(mask, top_k(logits, k), True, axis=1)
    return mask


def gate(logits, k=None, renormalize=True):
    """logits [N, E] -> gates [N, E], zero outside each row's top-k experts.

    k=None: the soft gate softmax(logits). k int: keep the top-k logits; renormalize=True gives
    softmax over the kept logits (rows sum to 1), renormalize=False the kept entries of the
    full softmax. With k=1 and renormalize=True every gate is exactly 1, so no gradient
    reaches the gate: that is why Switch Transformer uses renormalize=False.
    """
    logits = _array("logits", logits, ("N", "E"))
    if k is None:
        return softmax(logits)
    mask = _chosen(logits, _check_k(k, logits.shape[1]))
    if renormalize:
        return softmax(np.where(mask, logits, -np.inf))
    return softmax(logits) * mask


def gate_backward(logits, gates, grad_gates, k=None, renormalize=True):
    """dL/dlogits [N, E] from the forward's logits [N, E], gates [N, E] and dL/dgates [N, E].

    renormalize=True (and k=None) is a softmax over the kept logits, so its backward is the
    softmax backward on `gates`: the dropped logits get exactly zero gradient.
    renormalize=False is mask * softmax(logits): the full softmax backward of mask * grad_gates,
    so the dropped logits still get a gradient through the normaliser.
    """
    logits = _array("logits", logits, ("N", "E"))
    gates = _array("gates", gates, logits.shape)
    grad_gates = _array("grad_gates", grad_gates, logits.shape)
    if k is not None:
        k = _check_k(k, logits.shape[1])
    if k is None or renormalize:
        return softmax_backward(gates, grad_gates)
    return softmax_backward(softmax(logits), grad_gates * _chosen(logits, k))


def init_mixture(d, E, o, rng=None):
    """Params of E affine experts R^d -> R^o and a linear gate; rng: a Generator or a seed.

    W_gate [d, E] small (the gate starts near uniform), b_gate [E] zero,
    W [E, d, o] ~ N(0, 1/d), b [E, o] zero.
    """
    for name, value in (("d", d), ("E", E), ("o", o)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {name}={value}")
    rng = np.random.default_rng(rng)
    return {
        "W_gate": 0.01 * rng.standard_normal((d, E)),
        "b_gate": np.zeros(E),
        "W": rng.standard_normal((E, d, o)) / np.sqrt(d),
        "b": np.zeros((E, o)),
    }


def _check_params(params):
    """Check the four arrays against each other; return (d, E, o)."""
    missing = {"W_gate", "b_gate", "W", "b"} - set(params)
    if missing:
        raise ValueError(f"params is missing {sorted(missing)}")
    E, d, o = _array("params['W']", params["W"], ("E", "d", "o")).shape
    _array("params['b']", params["b"], (E, o))
    _array("params['W_gate']", params["W_gate"], (d, E))
    _array("params['b_gate']", params["b_gate"], (E,))
    return d, E, o


def mixture_forward(params, x, k=None, renormalize=True):
    """x [N, d] -> (y [N, o], cache for mixture_backward).

    expert_out[n, e] = x[n] @ W[e] + b[e]; y[n] = sum_e gates[n, e] * expert_out[n, e], with
    gates = gate(x @ W_gate + b_gate, k, renormalize). Every expert runs on every sample.
    """
    d, _, _ = _check_params(params)
    x = _array("x", x, ("N", d))
    logits = x @ params["W_gate"] + params["b_gate"]                    # [N, E]
    gates = gate(logits, k, renormalize)                                # [N, E]
    expert_out = np.einsum("nd,edo->neo", x, params["W"]) + params["b"]  # [N, E, o]
    y = np.einsum("ne,neo->no", gates, expert_out)
    cache = dict(x=x, logits=logits, gates=gates, expert_out=expert_out, k=k, renormalize=renormalize)
    return y, cache


def mixture_backward(params, cache, grad_y):
    """dL/dy [N, o] -> grads {W_gate, b_gate, W, b, x}, each shaped like its input."""
    x, gates, expert_out = cache["x"], cache["gates"], cache["expert_out"]
    grad_y = _array("grad_y", grad_y, (x.shape[0], expert_out.shape[2]))
    grad_gates = np.einsum("no,neo->ne", grad_y, expert_out)        # [N, E]
    grad_out = gates[:, :, None] * grad_y[:, None, :]                # [N, E, o]
    grad_logits = gate_backward(cache["logits"], gates, grad_gates, cache["k"], cache["renormalize"])
    return {
        "W_gate": x.T @ grad_logits,
        "b_gate": grad_logits.sum(0),
        "W": np.einsum("nd,neo->edo", x, grad_out),
        "b": grad_out.sum(0),
        "x": grad_logits @ params["W_gate"].T + np.einsum("neo,edo->nd", grad_out, params["W"]),
    }


def mse_loss(y, target):
    """(loss, dloss/dy): loss = mean over all elements of (y - target)^2."""
    y = np.asarray(y)
    target = _array("target", target, y.shape)
    diff = y - target
    return float(np.mean(diff**2)), 2.0 * diff / diff.size
