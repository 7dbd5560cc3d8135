"""Constraint modes: how training keeps the implicit layer well-posed, one class a mode.

Every mode maps its free (optimized) parameters to the model's implicit matrix (A, or the kernel K
of a conv model) and back, through three operations (DESIGN.md, "Keeping mu_inf(A) <= gamma"):

* ``free``: the free parameters, a dict of arrays the optimizer updates in place, built from a model;
* ``grads(G)``: dL/d(free parameters) from G = dL/dA (dL/dK);
* ``apply(model)``: write the constrained A (and weights) into the model after a step.

Rounding in a parametrization (and in a cast to float32) can leave a row an ulp above gamma;
every mode certified by mu_inf passes its result through the exact projection, a no-op for rows
inside, so that mu_inf(A) <= gamma holds in the model's dtype.

The registry maps (model kind, name) to the class, as scikit-learn's SGD maps loss names to loss
classes; the training CLI's ``--constraint`` choices come from it. Adding a mode is adding one
class with :func:`register`.
"""
import numpy as np

from .conv import (parametrize_conv_mu_inf, parametrize_conv_mu_inf_grad, parametrize_conv_mu_inf_inverse,
                   project_conv_mu_inf)
from .projection import (diagonal_floor, parametrize_mondeq, parametrize_mondeq_grad, parametrize_mu_inf,
                         parametrize_mu_inf_grad, parametrize_mu_inf_inverse, parametrize_weighted_mu_inf,
                         parametrize_weighted_mu_inf_grad, project_mondeq, project_mu_inf, project_norm_inf)

__all__ = ["Constraint", "register", "get_constraint", "constraint_names", "REGISTRY"]

REGISTRY = {}


def register(cls):
    """Class decorator: enter a :class:`Constraint` subclass in the registry under (cls.model, cls.name)."""
    key = (cls.model, cls.name)
    if key in REGISTRY:
        raise ValueError(f"constraint {cls.name!r} for model {cls.model!r} is registered twice")
    REGISTRY[key] = cls
    return cls


def constraint_names(model=None):
    """Names of the registered modes for a model kind, in registration order (all kinds if None)."""
    names = [name for (kind, name) in REGISTRY if model is None or kind == model]
    return tuple(dict.fromkeys(names))


def get_constraint(model, name):
    """The class registered for model kind ``model`` under ``name``; a one-line ``ValueError`` naming
    the modes that kind has otherwise."""
    try:
        return REGISTRY[(model, name)]
    except KeyError:
        raise ValueError(f"model {model} supports constraint {' or '.join(constraint_names(model))}, "
                         f"got {name!r}") from None


class Constraint:
    """One constraint mode (see the module doc). Subclasses set the class attributes and define
    :meth:`initial_free`, and :meth:`grads` and :meth:`apply` where the defaults (the implicit
    matrix itself is the free parameter) do not fit.

    Class attributes
    ----------------
    name : str, the ``--constraint`` value; model : str, the model kind ("nemon", "conv", "mondeq")
    certificate : "mu_inf", "mu_2" or None: what the mode guarantees (None: nothing)
    warm_start : bool, whether a saved model holds every free parameter (``--init`` allowed)
    takes_min_diagonal : bool, whether the mode keeps a floor ``min_diagonal`` on the diagonal (the
    centre taps of a conv kernel), which bounds alpha* below (:func:`nemon_np.projection.diagonal_floor`)
    """
    name = None
    model = "nemon"
    certificate = "mu_inf"
    warm_start = True
    takes_min_diagonal = False

    def __init__(self, model, min_diagonal=None):
        self.check_min_diagonal(min_diagonal, model.gamma)
        self.gamma = model.gamma
        self.min_diagonal = min_diagonal
        self.parameter = "K" if hasattr(model, "K") else "A"
        self.free = self.initial_free(model)
        self.apply(model)

    @classmethod
    def check_min_diagonal(cls, min_diagonal, gamma):
        """A one-line ``ValueError`` unless ``min_diagonal`` is None, or a valid floor
        (:func:`nemon_np.projection.diagonal_floor`) for a mode that takes one."""
        if min_diagonal is None:
            return
        if not cls.takes_min_diagonal:
            raise ValueError(f"min_diagonal goes with constraint projection, got constraint {cls.name}")
        diagonal_floor(min_diagonal, gamma)

    def initial_free(self, model):
        """The free parameters that reproduce ``model``'s implicit matrix (the matrix itself by default)."""
        return {self.parameter: getattr(model, self.parameter)}

    def grads(self, G):
        """dL/d(free parameters) from G = dL/dA (dL/dK): G itself by default."""
        return {self.parameter: G}

    def apply(self, model):
        """Write the constrained implicit matrix into ``model``; the default keeps it as it is."""


@register
class Projection(Constraint):
    """Adam on A, then the exact Frobenius projection onto mu_inf(A) <= gamma (and a_ii >= min_diagonal)."""
    name = "projection"
    takes_min_diagonal = True

    def apply(self, model):
        model.A[...] = project_mu_inf(model.A, self.gamma, min_diagonal=self.min_diagonal)


@register
class Parametrization(Constraint):
    """Adam on T with A = gamma I + T - diag(|T| 1) (the paper's code)."""
    name = "parametrization"

    def initial_free(self, model):
        return {"T": parametrize_mu_inf_inverse(model.A, self.gamma)}

    def grads(self, G):
        return {"T": parametrize_mu_inf_grad(self.free["T"], G)}

    def apply(self, model):
        model.A = project_mu_inf(parametrize_mu_inf(self.free["T"], self.gamma).astype(model.dtype), self.gamma)


@register
class Weighted(Constraint):
    """Adam on T and s with A = gamma I + D^-1 T D - diag(|T| 1), D = diag(exp(s)) (learned weights).

    mu_inf(A) <= gamma in the weighted norm with learned weights eta = exp(-s), the paper's search space."""
    name = "weighted"
    warm_start = False   # the log-scales start at zero; a saved model's weights are not read back

    def initial_free(self, model):
        return {"T": parametrize_mu_inf_inverse(model.A, self.gamma), "s": np.zeros(model.n_hidden, model.dtype)}

    def grads(self, G):
        dT, ds = parametrize_weighted_mu_inf_grad(self.free["T"], self.free["s"], G)
        return {"T": dT, "s": ds}

    def apply(self, model):
        A, eta = parametrize_weighted_mu_inf(self.free["T"], self.free["s"], self.gamma)
        model.A, model.weights = project_mu_inf(A.astype(model.dtype), self.gamma, eta), eta


@register
class NormProjection(Constraint):
    """projection onto ||A||_inf <= gamma (implicit deep learning's condition; implies mu_inf <= gamma)."""
    name = "norm"

    def apply(self, model):
        model.A[...] = project_norm_inf(model.A, self.gamma)


@register
class MondeqProjection(Constraint):
    """projection onto monDEQ's set mu_2(A) <= gamma (margin m = 1 - gamma); needs a monDEQ splitting."""
    name = "mondeq"
    certificate = "mu_2"

    def apply(self, model):
        model.A[...] = project_mondeq(model.A, 1.0 - self.gamma)


@register
class Unconstrained(Constraint):
    """no constraint: A trained freely, no certificate (the solvers only warn)."""
    name = "none"
    certificate = None


@register
class MondeqParametrization(Constraint):
    """The monDEQ baseline: A = (1 - m) I - W^T W + S - S^T, m = 1 - gamma (Winston & Kolter 2020)."""
    name = "mondeq-parametrization"
    model = "mondeq"
    certificate = "mu_2"
    warm_start = False   # W and S are not stored in the model file

    def initial_free(self, model):
        rng = np.random.default_rng(model.seed + 1)
        n = model.n_hidden
        return {"W": (rng.normal(size=(n, n)) * 0.3 / np.sqrt(n)).astype(model.dtype),
                "S": (rng.normal(size=(n, n)) * 0.1 / np.sqrt(n)).astype(model.dtype)}

    def grads(self, G):
        dW, dS = parametrize_mondeq_grad(self.free["W"], self.free["S"], G)
        return {"W": dW, "S": dS}

    def apply(self, model):
        model.A = parametrize_mondeq(self.free["W"], self.free["S"], 1.0 - self.gamma).astype(model.dtype)


@register
class ConvProjection(Constraint):
    """Adam on the kernel K, then the exact projection of each output channel's taps."""
    name = "projection"
    model = "conv"
    takes_min_diagonal = True

    def apply(self, model):
        model.K[...] = project_conv_mu_inf(model.K, self.gamma, min_diagonal=self.min_diagonal)


@register
class ConvParametrization(Constraint):
    """Adam on T with the parametrization per output channel (centre tap as the diagonal)."""
    name = "parametrization"
    model = "conv"

    def initial_free(self, model):
        return {"T": parametrize_conv_mu_inf_inverse(model.K, self.gamma)}

    def grads(self, G):
        return {"T": parametrize_conv_mu_inf_grad(self.free["T"], G)}

    def apply(self, model):
        model.K = project_conv_mu_inf(parametrize_conv_mu_inf(self.free["T"], self.gamma).astype(model.dtype),
                                      self.gamma)
