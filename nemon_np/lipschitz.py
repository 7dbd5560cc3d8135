"""The l_inf input-output Lipschitz bound of NEMON models, its subgradient and its smooth form.

DESIGN.md, "Input-output Lipschitz bound" (Jafarpour et al. 2021, Thm. 4):

    ||y(u1) - y(u2)||_inf <= ||C||_inf ||B||_inf / (1 - max(mu_inf(A), 0)) ||u1 - u2||_inf.

With diagonal weights eta the hidden state is measured in ``||x||_{inf,eta} = max_i |x_i|/eta_i``,
so B and C enter through the matching induced norms ``||diag(eta)^-1 B||_inf`` and
``||C diag(eta)||_inf`` and the measure is ``mu_inf(diag(eta)^-1 A diag(eta))``.

A hidden read-out layer g = relu(H f + h) (:mod:`nemon_np.readout`) adds the factor ||H~||_inf
(relu is 1-Lipschitz in each entry): the state's norm moves onto H~ = H diag(eta), and C enters
as ||C||_inf. Average pooling, a conv model's features, has l_inf norm 1.
"""
import numpy as np

from .conv import _channel_rows, conv_row_measures
from .conv_model import ConvNEMON
from .measures import norm_inf, row_measures

__all__ = ["lipschitz_bound", "lipschitz_bound_and_grad", "smooth_lipschitz_bound_and_grad", "io_rows",
           "lipschitz_factors"]


def io_rows(model):
    """B and C as the row matrices whose ||.||_inf are the bound's input and output factors, with the
    chain rule from each back to the parameter: dense models B~ = diag(eta)^-1 B, C~ = C diag(eta)
    (B and C when unweighted); conv models the per-output-channel taps of B, (C, C_in k^2), and C
    itself (the average pooling before it has l_inf norm 1). With a hidden read-out layer the state's
    weights go to H (:func:`lipschitz_factors`) and C~ = C."""
    B, C = np.asarray(model.B, np.float64), np.asarray(model.C, np.float64)
    same = lambda G: G  # noqa: E731
    if isinstance(model, ConvNEMON):
        return B.reshape(len(B), -1), C, lambda G: G.reshape(B.shape), same
    eta = model.weights
    if eta is None:
        return B, C, same, same
    to_B = lambda G: G / eta[:, None]  # noqa: E731
    if model.H is not None:
        return B / eta[:, None], C, to_B, same
    return B / eta[:, None], C * eta[None, :], to_B, lambda G: G * eta[None, :]


def lipschitz_factors(model):
    """The bound's factors as {name: (rows, to_param)}: "B" and "C" from :func:`io_rows`, and "H"
    (H~ = H diag(eta) for weighted dense models, H otherwise) with a hidden read-out layer; the
    bound is the product of their ||rows||_inf over (1 - max(mu, 0)). A model that has its own
    ``lipschitz_factors()`` (a stack: one factor a layer) gives them itself."""
    if hasattr(model, "lipschitz_factors"):
        return model.lipschitz_factors()
    Bt, Ct, to_B, to_C = io_rows(model)
    factors = {"B": (Bt, to_B), "C": (Ct, to_C)}
    if model.H is not None:
        H = np.asarray(model.H, np.float64)
        eta = None if isinstance(model, ConvNEMON) else model.weights
        factors["H"] = (H, lambda G: G) if eta is None else (H * eta[None, :], lambda G: G * eta[None, :])
    return factors


def _implicit(model):
    """The name and value of the implicit layer's parameter: "A" (dense) or "K" (conv)."""
    return ("K", model.K) if isinstance(model, ConvNEMON) else ("A", model.A)


def _measure_subgradient(model):
    """A subgradient of the model's mu_inf with respect to A (or K): in the maximizing row,
    1 on the diagonal entry (the centre tap of a conv channel) and w_j sign(a_ij) off it,
    w_j = eta_j / eta_i for weighted models, 1 otherwise."""
    name, P = _implicit(model)
    if name == "K":
        R, diag = _channel_rows(np.asarray(P, np.float64))
        i, w = int(np.argmax(conv_row_measures(P))), np.ones(R.shape[1])
    else:
        R, diag = np.asarray(P, np.float64), np.arange(len(P))
        i = int(np.argmax(row_measures(R, model.weights)))
        w = np.ones(len(R)) if model.weights is None else model.weights / model.weights[i]
    G = np.zeros_like(R)
    G[i] = w * np.sign(R[i])
    G[i, diag[i]] = 1.0
    return G.reshape(P.shape)


def lipschitz_bound(model):
    """Certified l_inf -> l_inf Lipschitz constant of ``u -> y`` (in the units of u):
    ``||C~||_inf ||B~||_inf / (1 - max(mu, 0))`` with the forms of :func:`io_rows` (for a
    :class:`ConvNEMON`, ||B||_inf is the convolution's norm, :func:`nemon_np.conv.conv_input_norm`),
    times ||H~||_inf with a hidden read-out layer (:func:`lipschitz_factors`).

    Raises ``ValueError`` when the model is not well-posed (mu_inf(A) >= 1): no bound holds.
    """
    mu = model.mu_inf()
    if mu >= 1.0:
        raise ValueError(f"mu_inf(A) = {mu:.6g} >= 1: the model is not certified well-posed, no Lipschitz bound")
    return float(np.prod([norm_inf(R) for R, _ in lipschitz_factors(model).values()])) / (1.0 - max(mu, 0.0))


def _row_subgradient(M):
    """A subgradient of ``max_i sum_j |m_ij|`` (sign pattern of the maximizing row)."""
    i = int(np.argmax(np.abs(M).sum(axis=1)))
    G = np.zeros_like(M)
    G[i] = np.sign(M[i])
    return G


def lipschitz_bound_and_grad(model):
    """The bound of :func:`lipschitz_bound` and a subgradient with respect to A (K), B and C (and H).

    With L = prod_i n_i / (1 - max(mu, 0)), n_i = ||R_i||_inf over the factors R_i of
    :func:`lipschitz_factors` (B~, C~, H~), the subgradient uses the maximizing rows:
    dL/dR_i = prod_{j != i} n_j / (1 - max(mu, 0)) times the sign of R_i's largest row, and
    dL/dA = L / (1 - max(mu, 0)) dmu/dA from :func:`_measure_subgradient` (zero when mu <= 0).
    The weights eta are held fixed.
    Returns (L, {"A" or "K": dL/dA, "B": dL/dB, "C": dL/dC[, "H": dL/dH]}).
    """
    L = lipschitz_bound(model)
    factors = lipschitz_factors(model)
    norms = {k: norm_inf(R) for k, (R, _) in factors.items()}
    mu = model.mu_inf()
    denom = 1.0 - max(mu, 0.0)
    name, P = _implicit(model)
    dA = L / denom * _measure_subgradient(model) if mu > 0 else np.zeros(P.shape)
    grads = {name: dA.astype(model.dtype)}
    for k, (R, to_param) in factors.items():
        others = float(np.prod([n for j, n in norms.items() if j != k]))
        grads[k] = to_param(others / denom * _row_subgradient(R)).astype(model.dtype)
    return L, grads


def smooth_lipschitz_bound_and_grad(model):
    """The paper code's smooth regularizer ``(||B||_inf^2 + ||C||_inf^2) / (2 (1 - max(gamma, 0)))``;
    with a hidden read-out layer ``(||B||^3 + ||H||^3 + ||C||^3) / (3 (1 - max(gamma, 0)))``.

    An upper bound of :func:`lipschitz_bound` whenever mu_inf(A) <= gamma (the AM-GM inequality over
    the k factors of :func:`lipschitz_factors`, sum n_i^k / k >= prod n_i), with the margin gamma in
    place of mu_inf(A), so A (K) gets no gradient. Returns (value, {"A" or "K", "B", "C"[, "H"]}).
    """
    factors = lipschitz_factors(model)
    k = len(factors)
    norms = {name: norm_inf(R) for name, (R, _) in factors.items()}
    denom = 1.0 - max(model.gamma, 0.0)
    name, P = _implicit(model)
    grads = {name: np.zeros_like(P)}
    for f, (R, to_param) in factors.items():
        grads[f] = to_param(norms[f] ** (k - 1) / denom * _row_subgradient(R)).astype(model.dtype)
    return sum(n ** k for n in norms.values()) / (k * denom), grads
