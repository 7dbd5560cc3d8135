"""l_inf robustness of NEMON models: the input-output Lipschitz bound.

DESIGN.md, "Input-output Lipschitz bound" (Jafarpour et al. 2021, Thm. 4):

    ||y(u1) - y(u2)||_inf <= ||C||_inf ||B||_inf / (1 - max(mu_inf(A), 0)) ||u1 - u2||_inf.

With diagonal weights eta the hidden state is measured in ``||x||_{inf,eta} = max_i |x_i|/eta_i``,
so B and C enter through the matching induced norms ``||diag(eta)^-1 B||_inf`` and
``||C diag(eta)||_inf`` and the measure is ``mu_inf(diag(eta)^-1 A diag(eta))``.
"""
import numpy as np

from .measures import norm_inf

__all__ = ["lipschitz_bound"]


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
