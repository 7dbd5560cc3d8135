"""l_inf robustness of NEMON models: the input-output Lipschitz bound.

DESIGN.md, "Input-output Lipschitz bound" (Jafarpour et al. 2021, Thm. 4):

    ||y(u1) - y(u2)||_inf <= ||C||_inf ||B||_inf / (1 - max(mu_inf(A), 0)) ||u1 - u2||_inf.

With diagonal weights eta the hidden state is measured in ``||x||_{inf,eta} = max_i |x_i|/eta_i``,
so B and C enter through the matching induced norms ``||diag(eta)^-1 B||_inf`` and
``||C diag(eta)||_inf`` and the measure is ``mu_inf(diag(eta)^-1 A diag(eta))``.
"""
import numpy as np

from .measures import norm_inf

__all__ = ["lipschitz_bound", "lipschitz_bound_and_grad"]


def lipschitz_bound(model):
    """Certified l_inf -> l_inf Lipschitz constant of ``u -> y`` (in the units of u).

    Raises ``ValueError`` when the model is not well-posed (mu_inf(A) >= 1): no bound holds.
    """
    mu = model.mu_inf()
    if mu >= 1.0:
        raise ValueError(f"mu_inf(A) = {mu:.6g} >= 1: the model is not certified well-posed, no Lipschitz bound")
    B, C = model.B.astype(np.float64), model.C.astype(np.float64)
    if model.weights is not None:
        B = B / model.weights[:, None]
        C = C * model.weights[None, :]
    return norm_inf(C) * norm_inf(B) / (1.0 - max(mu, 0.0))


def _row_subgradient(M, row_weights=None):
    """A subgradient of ``max_i sum_j |m_ij|`` (sign pattern of the maximizing row)."""
    i = int(np.argmax(np.abs(M).sum(axis=1)))
    G = np.zeros_like(M)
    G[i] = np.sign(M[i])
    return G


def lipschitz_bound_and_grad(model):
    """The bound of :func:`lipschitz_bound` and a subgradient with respect to A, B and C.

    With L = n_C n_B / (1 - max(mu, 0)), n_B = ||B~||_inf, n_C = ||C~||_inf (B~, C~ the
    weighted forms), the subgradient uses the maximizing rows: dn_B/dB~ = sign of B~'s
    largest row, likewise for C~, and dmu/da_ij = 1 on the diagonal, w_ij sign(a_ij) off it,
    in A's maximizing row (zero when mu <= 0). The weights eta are held fixed.
    Returns (L, {"A": dL/dA, "B": dL/dB, "C": dL/dC}).
    """
    from .measures import row_measures
    L = lipschitz_bound(model)
    eta = model.weights
    A, B, C = (np.asarray(model.A, np.float64), np.asarray(model.B, np.float64),
               np.asarray(model.C, np.float64))
    Bw = B if eta is None else B / eta[:, None]
    Cw = C if eta is None else C * eta[None, :]
    nB, nC = norm_inf(Bw), norm_inf(Cw)
    mu = model.mu_inf()
    denom = 1.0 - max(mu, 0.0)
    dB = nC / denom * _row_subgradient(Bw)
    dC = nB / denom * _row_subgradient(Cw)
    if eta is not None:
        dB, dC = dB / eta[:, None], dC * eta[None, :]
    dA = np.zeros_like(A)
    if mu > 0:
        i = int(np.argmax(row_measures(A, eta)))
        w = np.ones(len(A)) if eta is None else eta / eta[i]
        dA[i] = w * np.sign(A[i])
        dA[i, i] = 1.0
        dA *= L / denom
    dt = model.dtype
    return L, {"A": dA.astype(dt), "B": dB.astype(dt), "C": dC.astype(dt)}
