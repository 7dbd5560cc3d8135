"""The l_inf input-output Lipschitz bound of NEMON models, its subgradient and its smooth form.

DESIGN.md, "Input-output Lipschitz bound" (Jafarpour et al. 2021, Thm. 4):

    ||y(u1) - y(u2)||_inf <= ||C||_inf ||B||_inf / (1 - max(mu_inf(A), 0)) ||u1 - u2||_inf.

With diagonal weights eta the hidden state is measured in ``||x||_{inf,eta} = max_i |x_i|/eta_i``,
so B and C enter through the matching induced norms ``||diag(eta)^-1 B||_inf`` and
``||C diag(eta)||_inf`` and the measure is ``mu_inf(diag(eta)^-1 A diag(eta))``.
"""
import numpy as np

from .conv import _channel_rows, conv_row_measures
from .conv_model import ConvNEMON
from .measures import norm_inf, row_measures

__all__ = ["lipschitz_bound", "lipschitz_bound_and_grad", "smooth_lipschitz_bound_and_grad", "io_rows"]


def io_rows(model):
    """B and C as the row matrices whose ||.||_inf are the bound's two factors, with the chain
    rule from each back to the parameter: dense models B~ = diag(eta)^-1 B, C~ = C diag(eta)
    (B and C when unweighted); conv models the per-output-channel taps of B, (C, C_in k^2),
    and C itself (the average pooling before it has l_inf norm 1)."""
    B, C = np.asarray(model.B, np.float64), np.asarray(model.C, np.float64)
    if isinstance(model, ConvNEMON):
        return B.reshape(len(B), -1), C, lambda G: G.reshape(B.shape), lambda G: G
    eta = model.weights
    if eta is None:
        return B, C, lambda G: G, lambda G: G
    return B / eta[:, None], C * eta[None, :], lambda G: G / eta[:, None], lambda G: G * eta[None, :]


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
    :class:`ConvNEMON`, ||B||_inf is the convolution's norm, :func:`nemon_np.conv.conv_input_norm`).

    Raises ``ValueError`` when the model is not well-posed (mu_inf(A) >= 1): no bound holds.
    """
    mu = model.mu_inf()
    if mu >= 1.0:
        raise ValueError(f"mu_inf(A) = {mu:.6g} >= 1: the model is not certified well-posed, no Lipschitz bound")
    Bt, Ct, _, _ = io_rows(model)
    return norm_inf(Ct) * norm_inf(Bt) / (1.0 - max(mu, 0.0))


def _row_subgradient(M):
    """A subgradient of ``max_i sum_j |m_ij|`` (sign pattern of the maximizing row)."""
    i = int(np.argmax(np.abs(M).sum(axis=1)))
    G = np.zeros_like(M)
    G[i] = np.sign(M[i])
    return G


def lipschitz_bound_and_grad(model):
    """The bound of :func:`lipschitz_bound` and a subgradient with respect to A (K), B and C.

    With L = n_C n_B / (1 - max(mu, 0)), n_B = ||B~||_inf, n_C = ||C~||_inf (the forms of
    :func:`io_rows`), the subgradient uses the maximizing rows: dn_B/dB~ = sign of B~'s
    largest row, likewise for C~, and dmu/dA from :func:`_measure_subgradient` (zero when
    mu <= 0). The weights eta are held fixed.
    Returns (L, {"A" or "K": dL/dA, "B": dL/dB, "C": dL/dC}).
    """
    L = lipschitz_bound(model)
    Bt, Ct, to_B, to_C = io_rows(model)
    nB, nC = norm_inf(Bt), norm_inf(Ct)
    mu = model.mu_inf()
    denom = 1.0 - max(mu, 0.0)
    name, P = _implicit(model)
    dA = L / denom * _measure_subgradient(model) if mu > 0 else np.zeros(P.shape)
    dt = model.dtype
    return L, {name: dA.astype(dt), "B": to_B(nC / denom * _row_subgradient(Bt)).astype(dt),
               "C": to_C(nB / denom * _row_subgradient(Ct)).astype(dt)}


def smooth_lipschitz_bound_and_grad(model):
    """The paper code's smooth regularizer ``(||B||_inf^2 + ||C||_inf^2) / (2 (1 - max(gamma, 0)))``.

    An upper bound of :func:`lipschitz_bound` whenever mu_inf(A) <= gamma (AM-GM), with the
    margin gamma in place of mu_inf(A), so A (K) gets no gradient. Returns (value, {"A" or "K", "B", "C"}).
    """
    Bt, Ct, to_B, to_C = io_rows(model)
    nB, nC = norm_inf(Bt), norm_inf(Ct)
    denom = 1.0 - max(model.gamma, 0.0)
    name, P = _implicit(model)
    dt = model.dtype
    grads = {name: np.zeros_like(P), "B": to_B(nB / denom * _row_subgradient(Bt)).astype(dt),
             "C": to_C(nC / denom * _row_subgradient(Ct)).astype(dt)}
    return (nB ** 2 + nC ** 2) / (2 * denom), grads
