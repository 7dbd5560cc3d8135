"""nemon_np: implicit neural networks that are well-posed and robust by l_inf contraction.

NEMON models (Jafarpour, Davydov, Proskurnikov, Bullo, "Robust Implicit Networks via
Non-Euclidean Contractions", NeurIPS 2021) in NumPy and numba: ``x = relu(Ax + Bu + b)``,
``y = Cx + c`` with mu_inf(A) <= gamma < 1.
"""
from .losses import softmax_cross_entropy
from .conv_model import ConvNEMON
from .loading import load_model
from .measures import best_weights, mu_1, mu_2, mu_inf, norm_inf, row_measures
from .models import NEMON
from .projection import (parametrize_mu_inf, parametrize_mu_inf_grad, parametrize_mu_inf_inverse,
                         parametrize_weighted_mu_inf, parametrize_weighted_mu_inf_grad, project_mu_inf)
from .solvers import (ConvergenceWarning, WellPosednessError, contraction_alpha, contraction_factor,
                      solve_adjoint, solve_equilibrium)

__version__ = "0.1.0"


def __getattr__(name):
    # scikit-learn is imported only by those who use the estimator; the robustness module
    # is not imported by the package so that `python -m nemon_np.robustness` runs it cleanly.
    if name == "NEMONClassifier":
        from .estimator import NEMONClassifier
        return NEMONClassifier
    if name in ("lipschitz_bound", "certify"):
        from .certificates import certify
        from .lipschitz import lipschitz_bound
        return {"lipschitz_bound": lipschitz_bound, "certify": certify}[name]
    raise AttributeError(f"module 'nemon_np' has no attribute {name!r}")


__all__ = ["NEMON", "ConvNEMON", "load_model", "NEMONClassifier", "mu_inf", "mu_1", "mu_2", "norm_inf", "row_measures",
           "best_weights",
           "project_mu_inf", "parametrize_mu_inf", "parametrize_mu_inf_grad",
           "parametrize_mu_inf_inverse", "parametrize_weighted_mu_inf", "parametrize_weighted_mu_inf_grad",
           "lipschitz_bound", "certify", "solve_equilibrium", "solve_adjoint",
           "contraction_alpha", "contraction_factor", "softmax_cross_entropy",
           "WellPosednessError", "ConvergenceWarning"]
