"""The NEMON implicit layer with a linear read-out, trained by implicit differentiation.

Model (DESIGN.md; Jafarpour et al., NeurIPS 2021, eq. (2)):

    x* = relu(A x* + B u + b),     y = C x* + c,

well-posed when mu_inf(A) < 1 (or its weighted version, for learned weights eta).

Gradients of the mean softmax cross-entropy over a batch (DESIGN.md, "Implicit
gradient"): with z = A x* + B u + b, D = diag(1[z > 0]), g = C^T dL/dy, solve
w = g + A^T D w and put delta = D w; then

    dL/dA = delta x*^T,  dL/dB = delta u^T,  dL/db = delta,  dL/du = B^T delta,
    dL/dC = dL/dy x*^T,  dL/dc = dL/dy                 (summed over the batch).
"""
import numpy as np

from ._validation import all_finite, as_float_dtype, as_weights, check_gamma, check_readout_hidden
from .base import ImplicitClassifier, check_labels, read_model_file, write_model_file
from .losses import softmax_cross_entropy
from .measures import mu_inf
from .projection import project_mu_inf
from .readout import init_hidden_layer
from .solvers import MONDEQ_METHODS, contraction_alpha, solve_adjoint, solve_equilibrium

__all__ = ["NEMON", "DenseImplicitMap"]

FORMAT_NAME = "nemon_np.NEMON"
FORMAT_VERSION = 2   # the newest version read; 2 adds the optional hidden read-out layer
PARAMETERS = ("A", "B", "b", "C", "c")


class DenseImplicitMap:
    """The dense implicit map x* = relu(A x* + B u + b) on (m, n_in) inputs: its shapes, mu_inf(A),
    the forward solve, the adjoint for a given dL/dx*, and the hooks of
    :class:`nemon_np.base.EmbeddedNetwork`. Mixed into :class:`NEMON` and into the dense implicit
    layer of a stack (:class:`nemon_np.layers.ImplicitDense`); it needs the attributes A, B, b,
    weights and dtype.
    """

    # -- shapes -----------------------------------------------------------
    @property
    def n_in(self):
        return self.B.shape[1]

    @property
    def n_hidden(self):
        return self.A.shape[0]

    def mu_inf(self):
        """mu_inf(A) in the model's (weighted) norm."""
        return mu_inf(self.A, self.weights)

    def alpha_star(self):
        """alpha* = 1 / (1 - min(min_i a_ii, 0)): the average iteration's certified step (DESIGN.md; the
        weights leave the diagonal as it is)."""
        return contraction_alpha(self.A)

    def _inputs(self, U, dtype=None):
        """U as a checked (m, n_in) batch of ``dtype`` (default the model's)."""
        U = np.asarray(U)
        if U.ndim == 1:
            U = U[None, :]
        if U.ndim != 2 or U.shape[1] != self.n_in:
            raise ValueError(f"U must have shape (batch, {self.n_in}), got {np.shape(U)}")
        if not all_finite(U):
            raise ValueError("U has non-finite entries (NaN or inf)")
        return np.ascontiguousarray(U, dtype=self.dtype if dtype is None else dtype)

    # -- the hooks of the interval methods (nemon_np.base.EmbeddedNetwork) ----------------
    implicit = "A"
    _feature_terms = 0
    _state_inputs = _inputs

    @staticmethod
    def _inject(B, U):
        return U @ B.T

    @staticmethod
    def _inject_grad(delta, U):
        return delta.T @ U

    _apply_implicit, _implicit_grad = _inject, _inject_grad

    @staticmethod
    def _transposed(P):
        return np.ascontiguousarray(P.T)

    @staticmethod
    def _features(X):
        return X

    @staticmethod
    def _features_grad(G):
        return G

    def _state_weights(self):
        return self.weights

    @staticmethod
    def _adjoint_tolerance(tol, units):
        return tol

    def _solve_embedded(self, A, Q, tol, max_iter, method, alpha=None, tol_mode="absolute", X0=None):
        return solve_equilibrium(A, Q, method=method, alpha=alpha, tol=tol, max_iter=max_iter, X0=X0,
                                 weights=self.weights, tol_mode=tol_mode, embedded=True)

    def _adjoint_embedded(self, A, mask, G, alpha, tol, max_iter, method):
        return solve_adjoint(A, mask, G, method=method,
                             alpha=alpha if method == "iterative" else None, tol=tol, max_iter=max_iter,
                             weights=self.weights, embedded=True)

    # -- forward ----------------------------------------------------------
    def equilibrium(self, U, tol=1e-6, max_iter=500, method="average", alpha=None, X0=None,
                    on_violation="raise", tol_mode="absolute"):
        """Fixed points x* of ``x = relu(Ax + Bu + b)`` for a batch U of shape (m, n_in).

        Returns ``(X, info)``: X (m, n_hidden) and the solver's OptimizeResult with
        per-sample ``iterations`` and ``residual`` (see :func:`nemon_np.solve_equilibrium`).
        """
        return self._solve_checked(self._inputs(U), tol, max_iter, method, alpha, X0, on_violation, tol_mode)

    def _solve_checked(self, U, tol, max_iter, method, alpha, X0, on_violation, tol_mode):
        """:meth:`equilibrium` of inputs that :meth:`_inputs` has already checked."""
        return self._solve_injected(self._inject(self.B, U) + self.b, tol, max_iter, method, alpha, X0, on_violation,
                                    tol_mode)

    def _solve_injected(self, Q, tol, max_iter, method, alpha, X0, on_violation, tol_mode):
        """:meth:`equilibrium` from the injection Q = B u + b (m, n_hidden) instead of the inputs."""
        return solve_equilibrium(self.A, Q, method=method, alpha=alpha, tol=tol, max_iter=max_iter,
                                 X0=X0, weights=self.weights, on_violation=on_violation, tol_mode=tol_mode)

    def _init_map(self, rng, n, n_in):
        """A, B, b of n units on n_in inputs from ``rng``, in the attributes gamma, weights and dtype:
        A normal with scale 0.1 / sqrt(n), projected into P(gamma) (it starts small and well-posed), B
        PyTorch Linear's uniform(-1, 1) / sqrt(n_in), b zero."""
        A0 = rng.normal(scale=0.1 / np.sqrt(n), size=(n, n))
        self.A = project_mu_inf(A0.astype(self.dtype), self.gamma, self.weights)
        self.B = rng.uniform(-1, 1, size=(n, n_in)).astype(self.dtype) / np.sqrt(n_in).astype(self.dtype)
        self.b = np.zeros(n, self.dtype)

    def _state_adjoint(self, finfo, G, tol, max_iter, method, alpha, adjoint, adjoint_tol, on_violation):
        """(delta, binfo): delta = D w / m from the adjoint w = G + A^T D w at the forward solve
        ``finfo`` (D = 1[z > 0]), G = m dL/dx* (m, n_hidden): the per-sample loss's gradient (g of order
        1), so that tol means the same at any batch size."""
        mask = (finfo.preactivation > 0).astype(self.dtype)
        m = len(G)
        W, binfo = solve_adjoint(self.A, mask, G, method=adjoint,
                                 alpha=alpha if method == "average" else None,
                                 tol=tol if adjoint_tol is None else adjoint_tol,
                                 max_iter=max_iter, weights=self.weights, on_violation=on_violation,
                                 certificate="mu_2" if method in MONDEQ_METHODS else "mu_inf")
        return (mask * W) / m, binfo

    def _input_vjp(self, delta):
        """B^T delta: (m, n_in)."""
        return delta @ self.B


class NEMON(DenseImplicitMap, ImplicitClassifier):
    """Non-Euclidean monotone operator network: ``x = relu(Ax + Bu + b)``, ``y = Cx + c``.

    Parameters
    ----------
    n_in, n_hidden, n_out : int
        Input, hidden-state and output sizes.
    gamma : float, < 1
        Well-posedness margin: the initial A is projected onto mu_inf(A) <= gamma.
    seed : int
        Seed of the initialization (``numpy.random.default_rng``).
    dtype : float32 or float64
    weights : (n_hidden,) array, optional
        Diagonal weights eta > 0 of the weighted norm ``||x||_{inf,eta} = max_i |x_i|/eta_i``
        in which A is held contractive; None is the unweighted l_inf norm.
    readout_hidden : int
        Width p of an explicit hidden ReLU layer in the read-out, ``y = C relu(H x + h) + c``
        (:mod:`nemon_np.readout`); 0 (the default) is the paper's linear read-out.

    Attributes
    ----------
    A (n, n), B (n, n_in), b (n,), C (n_out, n), c (n_out,) : ndarray of ``dtype``
        (with a hidden read-out layer also H (p, n) and h (p,), and C (n_out, p))
    metadata : dict of str -> str, number or array
        Saved with the model (for instance the dataset and its normalization).
    """

    crown_steps = 8   # the crown certificate's default (nemon_np.certificates.CrownCertificate)

    def __init__(self, n_in, n_hidden, n_out, gamma=0.0, seed=0, dtype=np.float64, weights=None, readout_hidden=0):
        for name, v in (("n_in", n_in), ("n_hidden", n_hidden), ("n_out", n_out)):
            if int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive whole number, got {v!r}")
        self.gamma = check_gamma(gamma)
        self.dtype = as_float_dtype(dtype)
        self.seed = int(seed)
        self.weights = as_weights(weights, int(n_hidden))
        readout_hidden = check_readout_hidden(readout_hidden)
        self.metadata = {}
        rng = np.random.default_rng(self.seed)
        n, n_in, n_out = int(n_hidden), int(n_in), int(n_out)
        self._init_map(rng, n, n_in)
        if readout_hidden:
            self.H, self.h, self.C = init_hidden_layer(rng, readout_hidden, n, n_out, self.dtype)
        else:
            self.C = rng.uniform(-1, 1, size=(n_out, n)).astype(self.dtype) / np.sqrt(n).astype(self.dtype)
        self.c = np.zeros(n_out, self.dtype)

    # -- backward ---------------------------------------------------------
    def _backward(self, U, y, tol, max_iter, method, alpha, adjoint, adjoint_tol, on_violation, dY=None,
                  tol_mode="absolute", X0=None):
        """Forward solve (from X0, default zeros), then the adjoint for dL/dY: the cross-entropy's
        (``y`` given) or ``dY``'s."""
        U = self._inputs(U)
        X, finfo = self._solve_checked(U, tol, max_iter, method, alpha, X0, on_violation, tol_mode)
        finfo["logits"], G, P = self._readout_forward(X)
        if dY is None:
            loss, dY = softmax_cross_entropy(finfo["logits"], check_labels(y, U.shape[0], self.n_out))
        else:
            loss, dY = None, np.asarray(dY, dtype=self.dtype)
            if dY.shape != (U.shape[0], self.n_out):
                raise ValueError(f"dY must have shape ({U.shape[0]}, {self.n_out}), got {dY.shape}")
        dX, readout_grads = self._readout_backward(dY, X, G, P)
        delta, binfo = self._state_adjoint(finfo, U.shape[0] * dX, tol, max_iter, method, alpha, adjoint, adjoint_tol,
                                           on_violation)
        return U, X, loss, readout_grads, delta, {"forward": finfo, "backward": binfo, "state": X}

    def input_vjp(self, U, dY, *, tol=1e-6, max_iter=500, method="average", alpha=None,
                  adjoint="iterative", adjoint_tol=None, on_violation="raise", tol_mode="absolute"):
        """``d/dU sum_{i,k} dY_ik y_ik(U)``: the input gradient of any linear functional of the logits.

        With dY = e_k for every sample it is the gradient of logit k per sample, row k of the
        input-output Jacobian ``C (I - D A)^-1 D B``. Returns (m, n_in).
        """
        _, _, _, _, delta, _ = self._backward(U, None, tol, max_iter, method, alpha, adjoint, adjoint_tol,
                                              on_violation, dY=dY, tol_mode=tol_mode)
        return delta @ self.B

    def loss_and_grad(self, U, y, *, tol=1e-6, max_iter=500, method="average", alpha=None,
                      adjoint="iterative", adjoint_tol=None, return_info=False, on_violation="raise",
                      tol_mode="absolute", X0=None):
        """Mean softmax cross-entropy over the batch and its gradients.

        Parameters
        ----------
        U : (m, n_in) inputs; y : (m,) integer labels
        tol, max_iter, method, alpha : forward solver settings (:meth:`equilibrium`)
        adjoint : {"iterative", "direct"}
            Averaged adjoint iteration or exact per-sample solve (:func:`nemon_np.solve_adjoint`).
        adjoint_tol : float, optional
            l_1 residual tolerance of the adjoint iteration (default ``tol``).
        return_info : bool
            Also return ``{"forward": info, "backward": info, "state": X}`` from the solvers (the
            forward info also holds the batch's ``logits``; X the fixed points solved).
        on_violation : {"raise", "warn"}
            When the solvers' certificate fails (see :func:`nemon_np.solve_equilibrium`).
        tol_mode : {"absolute", "relative"}
            The forward stopping rule (:func:`nemon_np.solve_equilibrium`).
        X0 : (m, n_hidden) array, optional
            The forward solve's start (default zeros), for instance the sample's fixed point under
            the previous parameters (:class:`nemon_np.warm_starts.WarmStarts`). Any start converges
            to the same x* (mu_inf(A) < 1); a near one takes fewer iterations.

        Returns
        -------
        loss : float
        grads : dict ``"A","B","b","C","c"`` -> arrays shaped like the parameters
        """
        U, X, loss, readout_grads, delta, info = self._backward(U, y, tol, max_iter, method, alpha, adjoint,
                                                                adjoint_tol, on_violation, tol_mode=tol_mode, X0=X0)
        grads = {"A": delta.T @ X, "B": self._inject_grad(delta, U), "b": delta.sum(axis=0), **readout_grads}
        return (loss, grads, info) if return_info else (loss, grads)

    def input_grad(self, U, y, *, tol=1e-6, max_iter=500, method="average", alpha=None,
                   adjoint="iterative", adjoint_tol=None, on_violation="raise", tol_mode="absolute"):
        """Gradient of the *mean* loss of :meth:`loss_and_grad` with respect to U, shape (m, n_in).

        ``dL/du_i = B^T delta_i``; multiply by m for the gradient of sample i's own loss.
        """
        _, _, _, _, delta, _ = self._backward(U, y, tol, max_iter, method, alpha, adjoint, adjoint_tol,
                                              on_violation, tol_mode=tol_mode)
        return delta @ self.B

    # -- persistence ------------------------------------------------------
    def save(self, path):
        """Write every parameter and setting to one ``.npz`` file (no pickled objects)."""
        write_model_file(path, FORMAT_NAME, self._file_version(), self.params(), self.metadata,
                         gamma=self.gamma, seed=self.seed, dtype=np.dtype(self.dtype).name,
                         weights=np.array([]) if self.weights is None else self.weights)

    @classmethod
    def load(cls, path):
        """Read a model written by :meth:`save`; a truncated or foreign file is a ``ValueError``."""
        data = read_model_file(path, FORMAT_NAME, FORMAT_VERSION, PARAMETERS + ("gamma", "seed", "dtype", "weights"))
        A, B = data["A"], data["B"]
        n = A.shape[0] if A.ndim == 2 else -1
        if A.shape != (n, n) or B.ndim != 2 or B.shape[0] != n or data["b"].shape != (n,):
            raise ValueError(f"{path}: parameter shapes are inconsistent "
                             f"(A {A.shape}, B {B.shape}, b {data['b'].shape})")
        model = cls.__new__(cls)
        model.gamma = float(data["gamma"])
        model.seed = int(data["seed"])
        model.dtype = as_float_dtype(str(data["dtype"]))
        w = data["weights"]
        model.weights = None if w.size == 0 else as_weights(w, n)
        for k in ("A", "B", "b"):
            setattr(model, k, np.ascontiguousarray(data[k], dtype=model.dtype))
        model._load_readout(data, n, path)
        model.metadata = data["metadata"]
        return model

    def __repr__(self):
        w = "" if self.weights is None else ", weighted"
        r = f", readout_hidden={self.readout_hidden}" if self.H is not None else ""
        return (f"NEMON(n_in={self.n_in}, n_hidden={self.n_hidden}, n_out={self.n_out}, "
                f"gamma={self.gamma}, dtype={np.dtype(self.dtype).name}{w}{r})")
