"""Stacked classifiers: explicit layers around (at most) one implicit layer, then the logits.

``StackedClassifier("conv16k4s2p1,relu,conv32k4s1p0,relu,nemon100", (1, 28, 28), 10)`` is two
strided convolutions, a dense NEMON layer x* = relu(A x* + B u + b) on their flattened output, and
a dense logits layer. The layers are :mod:`nemon_np.layers`; every method here is written once over
their interface, so a new layer kind is one class there.

Architecture strings are comma-separated tokens (:func:`parse_architecture`):

* ``conv<C>k<k>s<s>p<p>``: a convolution of C channels, k x k taps, stride s, zero padding p
  (defaults k 3, s 1, p k // 2);
* ``dense<n>``: an affine layer of n units; ``relu``; ``pool<s>``: s x s average pooling; ``bn``:
  batch normalization per channel (batch statistics in training, the running ones at evaluation);
  ``flatten`` (put in by itself where a flat layer follows a spatial one);
* ``nemon<n>``: a dense implicit (NEMON) layer of n units, mu_inf(A) <= gamma;
* ``cnemon<C>[k<k>][z]``: a conv implicit layer of C channels, k x k (default 3), circular padding
  (``z``: zero padding), mu_inf(K) <= gamma per output channel;
* or a preset name of :data:`PRESETS`.

The logits layer ``dense<n_out>`` is appended; it is the specification of the margins: a box of its
input bounds each margin y_k - y_j = (W_k - W_j) . g + b_k - b_j by the relative classifier
(DESIGN.md, "Interval certificates"). Inputs are flat, (m, C H W) channel-major as the data loaders
give them; a spatial first layer reads them as channel-last images.

Certified training (Gowal et al. 2018) passes the box of the input through every layer's ``box``
(the implicit layer's is its embedded network's) and back through ``box_backward``; certificates
pass float64 boxes through ``enclosing_box``, sound for the stored parameters.
"""
import re

import numpy as np
from scipy.optimize import OptimizeResult

from ._threads import check_n_jobs
from ._validation import all_finite, as_float_dtype, check_gamma
from .base import check_labels, read_model_file, write_model_file
from .decided import predict_by_rule
from .interval import (UNIT_ROUNDOFF, center_radius, enclosing_center_radius, margin_lower_bounds,
                       margin_lower_bounds_grad, margin_rounding)
from .layers import (CLEAN_INPUT, AvgPool2d, BatchNorm, Conv2d, Dense, Flatten, ImplicitConv, ImplicitDense, ReLU,
                     box_magnitude)
from .losses import softmax_cross_entropy
from .relaxation import batched_dot, concretize
from .warmup import WARMUP_TOL, warmup_regularizer

__all__ = ["StackedClassifier", "as_stack", "parse_architecture", "PRESETS", "explicit_twin", "WEIGHT_INITS"]

FORMAT_NAME = "nemon_np.Stack"
FORMAT_VERSION = 1

# Entries of the largest (rows, state) array that a relaxation pass holds at once: 16 MB of float64.
RELAXATION_ENTRIES = 2_000_000

# The anchors' shapes. IBP's CNNs (Gowal et al. 2018, Table 1: small, medium, large; 4 x 4 stride-2
# convolutions padded by 1, 3 x 3 ones by 1) and, with an implicit layer where the first dense layer
# was, NEMON stacks in the shape of IBP-MonDEQ's (Wei & Kolter 2022): explicit convolutions, the
# implicit layer, a dense layer. Each ``-nemon`` preset's explicit twin is the preset without it.
PRESETS = {
    "ibp-small": "conv16k4s2p1,relu,conv32k4s1p1,relu,dense100,relu",
    "ibp-medium": "conv32k3s1p1,relu,conv32k4s2p1,relu,conv64k3s1p1,relu,conv64k4s2p1,relu,dense512,relu,"
                  "dense512,relu",
    "ibp-large": "conv64k3s1p1,relu,conv64k3s1p1,relu,conv128k3s2p1,relu,conv128k3s1p1,relu,conv128k3s1p1,relu,"
                 "dense512,relu",
    "ibp-small-nemon": "conv16k4s2p1,relu,conv32k4s1p1,relu,nemon100",
    "nemon-small": "conv16k4s2p1,relu,conv32k4s2p1,relu,nemon200,dense100,relu",
    "nemon-medium": "conv32k3s1p1,relu,conv32k4s2p1,relu,conv64k3s1p1,relu,conv64k4s2p1,relu,nemon500,dense512,relu",
    "cnemon-small": "conv16k4s2p1,relu,cnemon32k3,pool2,dense100,relu",
    # Shi et al. 2021's CNN-7 with batch normalization after every layer but the logits.
    "cnn7-bn": "conv64k3s1p1,bn,relu,conv64k3s1p1,bn,relu,conv128k3s2p1,bn,relu,conv128k3s1p1,bn,relu,"
               "conv128k3s1p1,bn,relu,dense512,bn,relu",
}

# How the weights that read each layer's input are drawn. "default": uniform(-1, 1) / sqrt(fan-in),
# PyTorch's scale. "ibp": Shi et al. 2021's IBP initialization, N(0, 2 pi / fan_in^2) for every such
# weight but the logits layer's: E |w| = std sqrt(2 / pi) = 2 / fan_in, so |W| doubles the radius of an
# interval box and the relu after it halves a box centred at 0, which keeps the radius from layer to
# layer at initialization (their Sec. 3.1), where the default scale grows it about sqrt(fan_in) times.
WEIGHT_INITS = ("default", "ibp")

_TOKEN = re.compile(r"^(?:(?P<conv>conv)(?P<c>\d+)(?:k(?P<k>\d+))?(?:s(?P<s>\d+))?(?:p(?P<p>\d+))?"
                    r"|(?P<dense>dense)(?P<n>\d+)|(?P<nemon>nemon)(?P<u>\d+)|(?P<pool>pool)(?P<ps>\d+)"
                    r"|(?P<cnemon>cnemon)(?P<cc>\d+)(?:k(?P<ck>\d+))?(?P<zero>z)?"
                    r"|(?P<relu>relu)|(?P<flatten>flatten)|(?P<bn>bn))$")


def _add_box_grad(grad, extra):
    """(d centre, d radius) plus another such pair; None entries are zero."""
    if extra is None:
        return grad
    if grad is None:
        return tuple(extra)
    return tuple(a if b is None else (b if a is None else a + b) for a, b in zip(grad, extra))


def parse_architecture(arch):
    """The layers (unbuilt) that an architecture string or preset name describes (module docstring),
    with a ``flatten`` put in where a flat layer follows a spatial one; a one-line ``ValueError``
    names the first token it cannot read."""
    if not isinstance(arch, str) or not arch.strip():
        raise ValueError(f"an architecture is a preset ({', '.join(PRESETS)}) or comma-separated layers, got {arch!r}")
    spec = PRESETS.get(arch.strip(), arch)
    layers = []
    for token in (t.strip() for t in spec.split(",")):
        g = _TOKEN.match(token)
        if g is None:
            raise ValueError(f"architecture {arch!r}: cannot read layer {token!r} (layers: conv<C>[k<k>][s<s>][p<p>], "
                             f"dense<n>, nemon<n>, cnemon<C>[k<k>][z], pool<s>, relu, bn, flatten; presets: "
                             f"{', '.join(PRESETS)})")
        if g["conv"]:
            k = int(g["k"] or 3)
            layers.append(Conv2d(int(g["c"]), k, int(g["s"] or 1), None if g["p"] is None else int(g["p"])))
        elif g["dense"]:
            layers.append(Dense(int(g["n"])))
        elif g["nemon"]:
            layers.append(ImplicitDense(int(g["u"])))
        elif g["cnemon"]:
            layers.append(ImplicitConv(int(g["cc"]), int(g["ck"] or 3), "zero" if g["zero"] else "circular"))
        elif g["pool"]:
            layers.append(AvgPool2d(int(g["ps"])))
        elif g["bn"]:
            layers.append(BatchNorm())
        else:
            layers.append(ReLU() if g["relu"] else Flatten())
    if sum(layer.implicit is not None for layer in layers) > 1:
        raise ValueError(f"architecture {arch!r}: a stack holds at most one implicit layer")
    return layers


def explicit_twin(arch):
    """The architecture string with each implicit layer replaced by the explicit layer of its shape,
    ``nemon<n>`` by ``dense<n>,relu`` and ``cnemon<C>k<k>`` by ``conv<C>k<k>,relu`` (same size): the
    explicit stack of the same shape (the compute-matched comparison of docs/benchmarks.md)."""
    def twin(layer):
        if isinstance(layer, ImplicitDense):
            return f"dense{layer.units},relu"
        if isinstance(layer, ImplicitConv):
            return f"conv{layer._channels}k{layer.kernel}s1p{layer.kernel // 2},relu"
        return layer.token
    return ",".join(twin(layer) for layer in parse_architecture(arch))


class StackedClassifier:
    """A classifier made of layers (module docstring).

    Parameters
    ----------
    arch : str, an architecture string or a :data:`PRESETS` name (without the logits layer)
    input_shape : (C, H, W) for images, or (n,) for flat inputs
    n_out : int, classes
    gamma : float < 1, the implicit layer's bound mu_inf(A) <= gamma at initialization
    seed : int, the initialization's seed (``numpy.random.default_rng``), layer after layer
    dtype : float32 or float64
    weight_init : a name of :data:`WEIGHT_INITS`: "default" or "ibp" (Shi et al. 2021)

    Attributes
    ----------
    layers : list of :class:`nemon_np.layers.Layer`, the last the logits layer (a Dense)
    metadata : dict saved with the model (dataset, normalization, ...)
    n_jobs : int, threads that each convolution's products share, a block of images each (a run-time
        setting, not saved: a model read from a file starts with one); the same results up to the
        rounding of the weight gradients' sums
    """

    @property
    def crown_steps(self):
        """The crown certificate's default copies of the fixed-point map: the implicit layer's model's
        (8 dense, 2 conv: nemon_np.certificates.CrownCertificate)."""
        layer = self.implicit_layer
        return 8 if layer is None else layer.crown_steps

    def __init__(self, arch, input_shape, n_out, gamma=0.5, seed=0, dtype=np.float32, weight_init="default"):
        self.gamma, self.seed, self.dtype = check_gamma(gamma), int(seed), as_float_dtype(dtype)
        self.input_shape = tuple(int(v) for v in input_shape)
        if len(self.input_shape) not in (1, 3) or min(self.input_shape) < 1:
            raise ValueError(f"input_shape must be (C, H, W) or (n,), got {input_shape!r}")
        if int(n_out) != n_out or n_out < 2:
            raise ValueError(f"n_out must be a whole number >= 2, got {n_out!r}")
        self.metadata = {}
        self.layers = parse_architecture(arch)
        self.layers.append(Dense(int(n_out)))
        if weight_init not in WEIGHT_INITS:
            raise ValueError(f"weight_init must be one of {', '.join(WEIGHT_INITS)}, got {weight_init!r}")
        self._build(np.random.default_rng(self.seed))
        if weight_init == "ibp":
            # A stream of its own, so that the default draws above are the same with either init.
            rng = np.random.default_rng([self.seed, 1])
            for layer in self.layers[:-1]:
                if layer.input_weight is not None:
                    old = getattr(layer, layer.input_weight)
                    std = np.sqrt(2 * np.pi) / layer.fan_in
                    setattr(layer, layer.input_weight, rng.normal(scale=std, size=old.shape).astype(self.dtype))

    def _build(self, rng):
        """Build every layer on the shape its predecessor gives, putting in a Flatten where a flat layer
        follows a spatial one (or a spatial layer would read a flat input: an error)."""
        C = self.input_shape[0]
        shape = self.input_shape[1:] + (C,) if self.layers[0].spatial_input is True and len(self.input_shape) == 3 \
            else (int(np.prod(self.input_shape)),)
        built = []
        for layer in self.layers:
            if len(shape) == 3 and layer.spatial_input is False:
                flatten = Flatten()
                shape = flatten.build(shape, rng, self.dtype)
                built.append(flatten)
            if len(shape) == 1 and layer.spatial_input and not isinstance(layer, Flatten):
                raise ValueError(f"layer {layer.token} reads images, but its input is flat ({shape[0]} features)")
            if isinstance(layer, Flatten) and len(shape) == 1:
                continue
            shape = layer.build(shape, rng, self.dtype, self.gamma)
            if layer.implicit is not None:
                layer.seed = self.seed   # constraint modes that draw their own parameters seed from it
            built.append(layer)
        self.layers = built

    @property
    def n_jobs(self):
        return self.layers[0].n_jobs

    @n_jobs.setter
    def n_jobs(self, n_jobs):
        n_jobs = check_n_jobs(n_jobs)
        for layer in self.layers:
            layer.n_jobs = n_jobs

    # -- shapes and the implicit layer --------------------------------------------------------
    @property
    def arch(self):
        """The architecture string of every layer but the logits (Flatten layers included)."""
        return ",".join(layer.token for layer in self.layers[:-1])

    @property
    def n_in(self):
        return int(np.prod(self.input_shape))

    @property
    def n_out(self):
        return self.layers[-1].units

    @property
    def implicit_index(self):
        """The index of the implicit layer in :attr:`layers`, None for an explicit stack."""
        found = [i for i, layer in enumerate(self.layers) if layer.implicit is not None]
        return found[0] if found else None

    @property
    def implicit_layer(self):
        i = self.implicit_index
        return None if i is None else self.layers[i]

    @property
    def constraint_kind(self):
        """The model kind whose constraint modes act on the implicit layer ("nemon" or "conv")."""
        layer = self.implicit_layer
        return "nemon" if layer is None else layer.constraint_kind

    def implicit_part(self):
        """(the object a constraint mode acts on, the prefix of its parameters' names in
        :meth:`params`): the implicit layer and "<index>.", or (None, None) for an explicit stack."""
        i = self.implicit_index
        return (None, None) if i is None else (self.layers[i], f"{i}.")

    @property
    def weights(self):
        layer = self.implicit_layer
        return None if layer is None else layer.weights

    @property
    def A(self):
        layer = self.implicit_layer
        if layer is None:
            raise AttributeError("an explicit stack has no implicit matrix A")
        return layer.A

    def mu_inf(self):
        """mu_inf of the implicit layer (in its norm); 0 for an explicit stack (an implicit layer with A = 0)."""
        layer = self.implicit_layer
        return 0.0 if layer is None else layer.mu_inf()

    def mu_inf_upper(self):
        layer = self.implicit_layer
        return 0.0 if layer is None else layer.mu_inf_upper()

    def alpha_star(self):
        layer = self.implicit_layer
        return 1.0 if layer is None else layer.alpha_star()

    def params(self):
        """Every layer's parameters, keyed "<layer index>.<name>": the arrays themselves."""
        return {f"{i}.{k}": v for i, layer in enumerate(self.layers) for k, v in layer.params().items()}

    # -- inputs ---------------------------------------------------------------------------------
    def input_order(self):
        """The flat input feature (channel-major, as :meth:`logits` reads inputs) at each entry of the first
        layer's flattened state: states = inputs[:, order] (channel-last for a spatial first layer)."""
        index = np.arange(self.n_in, dtype=np.float64)[None, :]
        return self._inputs(index, np.float64).reshape(-1).astype(np.int64)

    def _inputs(self, U, dtype=None):
        """U (m, n_in), (n_in,) or (m, C, H, W) as the first layer's states: flat, or channel-last."""
        U = np.asarray(U)
        if U.ndim == 1:
            U = U[None, :]
        if U.ndim == 4 and U.shape[1:] == self.input_shape:
            U = U.reshape(len(U), -1)
        if U.ndim != 2 or U.shape[1] != self.n_in:
            raise ValueError(f"U must have shape (batch, {self.n_in}), got {np.shape(U)}")
        if not all_finite(U):
            raise ValueError("U has non-finite entries (NaN or inf)")
        U = np.ascontiguousarray(U, dtype=self.dtype if dtype is None else dtype)
        if self.layers[0].spatial_input is True and len(self.input_shape) == 3:
            U = np.ascontiguousarray(U.reshape((len(U),) + self.input_shape).transpose(0, 2, 3, 1))
        return U

    def _input_layout(self, G, U):
        """A gradient G in the first layer's layout back in U's layout."""
        if G.ndim == 4:
            G = np.ascontiguousarray(G.transpose(0, 3, 1, 2))
        return G.reshape(np.shape(U)) if np.ndim(U) in (1, 4) else G.reshape(len(G), -1)

    # -- forward and backward -------------------------------------------------------------------
    @staticmethod
    def _options(tol=1e-6, max_iter=500, method="average", alpha=None, tol_mode="absolute", on_violation="raise",
                 adjoint="iterative", adjoint_tol=None, X0=None, train=False):
        """The layers' options: the solver settings, and ``train`` (batch statistics in batch
        normalization: the losses train, logits, attacks and certificates evaluate)."""
        return dict(tol=tol, max_iter=max_iter, method=method, alpha=alpha, tol_mode=tol_mode,
                    on_violation=on_violation, adjoint=adjoint, adjoint_tol=adjoint_tol, train=train)

    def _forward(self, X, options):
        caches = []
        for layer in self.layers:
            X, cache = layer.forward(X, options)
            caches.append(cache)
        return X, caches

    def _backward(self, dY, caches, options, extra=None):
        """(dX, grads) of the pass whose ``caches`` are given, dY on its output; ``extra[i]`` is added to
        the gradient on layer i's input (the boxes' gradients on the clean pass, ``CLEAN_INPUT``)."""
        grads, extra = {}, extra or {}
        for i in range(len(self.layers) - 1, -1, -1):
            dY, g = self.layers[i].backward(dY, caches[i], options)
            grads.update({f"{i}.{k}": v for k, v in g.items()})
            if i in extra:
                dY = dY + extra[i]
        return dY, grads

    @staticmethod
    def _take_clean_input(grads, i, extra):
        """Move a layer's ``CLEAN_INPUT`` gradient (layer i) out of its grads into ``extra``."""
        d = grads.pop(CLEAN_INPUT, None)
        if d is not None:
            extra[i] = d if i not in extra else extra[i] + d
        return grads

    def _solver_info(self, caches, m, key):
        """The implicit layer's solver info from a pass's caches (zero iterations for an explicit stack)."""
        i = self.implicit_index
        if i is None:
            return OptimizeResult(iterations=np.zeros(m, np.int64), residual=np.zeros(m), converged=np.ones(m, bool))
        return caches[i][key]

    def logits_and_info(self, U, **solver_options):
        """(logits (m, n_out), the implicit layer's forward solver info)."""
        options = self._options(**solver_options)
        Y, caches = self._forward(self._inputs(U), options)
        return Y, self._solver_info(caches, len(Y), "forward")

    def logits(self, U, **solver_options):
        """Logits (m, n_out); keyword options go to the implicit layer's solver."""
        return self.logits_and_info(U, **solver_options)[0]

    def predict(self, U, stop="converged", **solver_options):
        """Predicted class per sample; ``stop`` as :meth:`nemon_np.NEMON.predict`'s."""
        return predict_by_rule(self, U, stop, solver_options)

    def _decision_parts(self, U, options):
        """What :func:`nemon_np.decided.decided_labels` needs: (the implicit layer, its injection from
        the layers before it, logits of its states through the layers after it, sound margins over a
        box of its states through their enclosing boxes), or None for an explicit stack."""
        i = self.implicit_index
        if i is None:
            return None
        options = self._options(**options)
        X = self._inputs(U)
        for layer in self.layers[:i]:
            X = layer.forward(X, options)[0]
        implicit, after = self.layers[i], self.layers[i + 1:]

        def logits(S):
            for layer in after:
                S = layer.forward(S, options)[0]
            return S

        def margins(lo, hi, labels):
            for layer in after[:-1]:
                lo, hi = layer.enclosing_box(lo, hi, options)
            return self._interval_head((lo, hi), labels), None

        return implicit, implicit._inject(implicit.B, X) + implicit.b, logits, margins

    def _clean_forward(self, U, y, dY, options):
        """The forward pass of the inputs U: (mean loss (None when dY is given), dY on the logits, the
        layers' caches, the implicit layer's forward info with the batch's ``logits``)."""
        X = self._inputs(U)
        Y, caches = self._forward(X, options)
        m = len(X)
        if dY is None:
            loss, dY = softmax_cross_entropy(Y, check_labels(y, m, self.n_out))
        else:
            loss, dY = None, np.asarray(dY, dtype=self.dtype)
            if dY.shape != (m, self.n_out):
                raise ValueError(f"dY must have shape ({m}, {self.n_out}), got {dY.shape}")
        forward = self._solver_info(caches, m, "forward")
        forward["logits"] = Y
        return loss, dY, caches, forward

    def _loss_backward(self, U, y, dY, solver_options, train):
        options = self._options(train=train, **solver_options)
        loss, dY, caches, forward = self._clean_forward(U, y, dY, options)
        dX, grads = self._backward(dY, caches, options)
        return loss, grads, dX, {"forward": forward, "backward": self._solver_info(caches, len(dY), "backward")}

    def loss_and_grad(self, U, y, *, return_info=False, **solver_options):
        """Mean softmax cross-entropy over the batch and its gradients, keyed as :meth:`params`;
        ``return_info`` adds {"forward", "backward"}: the implicit layer's solver info (the forward
        info also holds the batch's ``logits``). Solver options as :meth:`nemon_np.NEMON.loss_and_grad`."""
        loss, grads, _, info = self._loss_backward(U, y, None, solver_options, train=True)
        return (loss, grads, info) if return_info else (loss, grads)

    def input_grad(self, U, y, **solver_options):
        """Gradient of the mean loss with respect to U, in U's layout."""
        return self._input_layout(self._loss_backward(U, y, None, solver_options, train=False)[2], U)

    def input_vjp(self, U, dY, **solver_options):
        """``d/dU sum_{i,k} dY_ik y_ik(U)``, in U's layout."""
        return self._input_layout(self._loss_backward(U, None, dY, solver_options, train=False)[2], U)

    # -- interval bounds ------------------------------------------------------------------------
    def certified_loss_and_grad(self, U, y, U_lo, U_hi, kappa, *, return_info=False, warmup_weight=0.0,
                                warmup_tol=WARMUP_TOL, crown_weight=0.0, **solver_options):
        """The IBP-style loss ``kappa CE(y(U)) + (1 - kappa) CE(-m_lo)`` (Gowal et al. 2018) and its
        gradients (keyed as :meth:`params`); m_lo (m, n_out) the lower bounds of y_k - y_j over the
        boxes [U_lo, U_hi], passed through every layer's ``box`` in the model's dtype (for training, not
        for certificates) and read by the relative classifier of the logits layer.

        ``crown_weight`` = beta > 0 is CROWN-IBP (Zhang et al. 2020, "Towards stable and efficient
        training of verifiably robust neural networks", eq. (8)): m_lo = (1 - beta) m_IBP + beta m_CROWN,
        m_CROWN the margin rows carried back through every layer's ``relax`` (CROWN over the interval
        boxes of the relus' inputs) and bounded over the input box; the gradient passes through the
        relaxation and the boxes it reads.

        ``warmup_weight`` > 0 adds that times the warm-up regularizers of Shi et al. 2021 on the boxes of
        every relu layer's input (:func:`nemon_np.warmup.warmup_regularizer`, tolerance ``warmup_tol``).
        ``return_info`` adds {"forward", "backward", "embedded", "margins", "robust_loss",
        "warmup_loss"}."""
        if not 0 <= kappa <= 1:
            raise ValueError(f"kappa must lie in [0, 1], got {kappa!r}")
        if kappa == 1:
            loss, grads, _, info = self._loss_backward(U, y, None, solver_options, train=True)
            return (loss, grads, info) if return_info else (loss, grads)
        options = self._options(train=True, **solver_options)
        loss, dY, clean_caches, forward = self._clean_forward(U, y, None, options)
        layer_options = self._layer_options(options, clean_caches)
        lo, hi = self._inputs(U_lo), self._inputs(U_hi)
        X_c, X_r = center_radius(lo, hi)
        if len(X_c) != len(y) or np.any(X_r < 0):
            raise ValueError(f"U_lo and U_hi must hold {len(y)} boxes with U_lo <= U_hi")
        if not 0 <= crown_weight <= 1:
            raise ValueError(f"crown_weight must lie in [0, 1], got {crown_weight!r}")
        caches, boxes, t0 = [], [(X_c, X_r)], float(np.mean(X_r))
        for layer, opts in zip(self.layers[:-1], layer_options):
            X_c, X_r, cache = layer.box(X_c, X_r, opts)
            caches.append(cache)
            boxes.append((X_c, X_r))
        last = len(self.layers) - 1
        relu_at = [i for i in range(last) if isinstance(self.layers[i], ReLU)] if warmup_weight else []
        warmup, warmup_grads = warmup_regularizer(t0, [boxes[i] for i in relu_at], warmup_tol)
        # Extra gradients of the boxes' (centre, radius), by position in ``boxes``: the warm-up
        # regularizers' at the relus' inputs, ((1 - kappa) is undone below) and the crown bound's.
        box_grads = {i: tuple(warmup_weight / (1 - kappa) * g.astype(self.dtype) for g in dg)
                     for i, dg in zip(relu_at, warmup_grads)}
        head = self.layers[-1]
        M = M_ibp = margin_lower_bounds(head.W, head.b, X_c, X_r, y)
        if crown_weight > 0:
            M_crown, crown_caches = self._training_crown(boxes, y, layer_options)
            M = (1 - crown_weight) * M_ibp + crown_weight * M_crown
        robust, d_neg = softmax_cross_entropy(-M, y)
        dM = -d_neg
        dX_c, dX_r, dW, db = margin_lower_bounds_grad(head.W, X_c, X_r, y, (1 - crown_weight) * dM)
        robust_grads, clean_extra = {f"{last}.W": dW, f"{last}.b": db}, {}
        if crown_weight > 0:
            crown_grads = self._training_crown_backward(crown_weight * dM, y, boxes, crown_caches, box_grads,
                                                        layer_options, clean_extra)
            for k, g in crown_grads.items():
                robust_grads[k] = robust_grads[k] + g if k in robust_grads else g
        for i in range(last - 1, -1, -1):
            dX_c, dX_r = _add_box_grad((dX_c, dX_r), box_grads.get(i + 1))
            dX_c, dX_r, g = self.layers[i].box_backward(dX_c, dX_r, caches[i], layer_options[i])
            for k, v in self._take_clean_input(g, i, clean_extra).items():
                k = f"{i}.{k}"
                robust_grads[k] = robust_grads[k] + v if k in robust_grads else v
        # One clean backward carries the clean loss's gradient (weighted by kappa below) and the boxes'
        # gradients on the clean pass (weighted 1 - kappa): the latter enter scaled by (1 - kappa) / kappa.
        # At kappa 0 the pass carries them alone.
        w = kappa if kappa > 0 else 1.0
        _, grads = self._backward(dY if kappa > 0 else np.zeros_like(dY), clean_caches, options,
                                  {i: (1 - kappa) / w * d for i, d in clean_extra.items()})
        total = kappa * loss + (1 - kappa) * robust + warmup_weight * warmup
        grads = {k: (w * g + (1 - kappa) * robust_grads[k]).astype(self.dtype) for k, g in grads.items()}
        if not return_info:
            return total, grads
        info = {"forward": forward, "backward": self._solver_info(clean_caches, len(y), "backward")}
        i = self.implicit_index
        if i is not None:
            info.update(embedded=caches[i]["forward"], embedded_backward=caches[i]["backward"])
        info.update(margins=M, interval_margins=M_ibp, robust_loss=robust, warmup_loss=warmup)
        if crown_weight > 0:
            info["crown_margins"] = M_crown
        return total, grads, info

    @staticmethod
    def _layer_options(options, clean_caches):
        """Each layer's options in certified training: ``options`` and ``clean``, the layer's cache
        from the batch's clean pass."""
        return [{**options, "clean": cache} for cache in clean_caches]

    def _training_crown(self, boxes, y, layer_options):
        """CROWN's margin lower bounds over the training boxes (``boxes[i]`` the box of layer i's input
        in the model's dtype, entry 0 the input box): the rows W_y - W_j, b_y - b_j of the logits layer
        through every layer's ``relax`` (``layer_options[i]`` layer i's options), bounded over the input
        box; (M (m, n_out), the layers' caches)."""
        head, last = self.layers[-1], len(self.layers) - 1
        Lam = head.W[y][:, None, :] - head.W[None, :, :]
        beta = head.b[y][:, None] - head.b[None, :]
        caches = {}
        for i in range(last - 1, -1, -1):
            Lam, add, caches[i] = self.layers[i].relax(Lam, boxes[i], boxes[i + 1], layer_options[i])
            beta = beta + add
        u_c, u_r = (v[:, None] for v in boxes[0])
        caches["input"] = Lam
        return beta + batched_dot(Lam, u_c) - batched_dot(np.abs(Lam), u_r), caches

    def _training_crown_backward(self, dM, y, boxes, caches, box_grads, layer_options, clean_extra):
        """The gradient of sum(dM M) for :meth:`_training_crown`'s M: the parameters' (returned, keyed
        as :meth:`params`), the boxes' (added to ``box_grads``, by position in ``boxes``) and the clean
        pass's (added to ``clean_extra``, by layer)."""
        Lam, last = caches["input"], len(self.layers) - 1
        u_c, u_r = (v[:, None] for v in boxes[0])
        dLam = dM.reshape(dM.shape + (1,) * (Lam.ndim - 2)) * (u_c - np.sign(Lam) * u_r)
        grads = {}
        for i in range(last):
            dLam, d_in, d_out, g = self.layers[i].relax_backward(dLam, dM, caches[i], layer_options[i])
            for j, d in ((i, d_in), (i + 1, d_out)):
                if d is not None and j > 0:
                    box_grads[j] = _add_box_grad(box_grads.get(j), d)
            grads.update({f"{i}.{k}": v for k, v in self._take_clean_input(g, i, clean_extra).items()})
        # Lam = W_y - W_j and beta = b_y - b_j, row j of sample s.
        dW, db = -dLam.sum(axis=0), -dM.sum(axis=0)
        np.add.at(dW, y, dLam.sum(axis=1))
        np.add.at(db, y, dM.sum(axis=1))
        grads[f"{last}.W"], grads[f"{last}.b"] = dW, db
        return grads

    def _check_interval(self):
        layer = self.implicit_layer
        return 0.0 if layer is None else layer._check_interval()

    def enclosing_boxes(self, U_lo, U_hi, **options):
        """Sound float64 boxes over the input boxes (inputs as :meth:`logits` takes them, normalized):
        a list whose entry 0 is the input box in the first layer's layout and entry i + 1 the box (lo, hi)
        of layer i's output, for every layer but the logits. Raises
        :class:`nemon_np.WellPosednessError` when mu_inf >= 1."""
        self._check_interval()
        lo, hi = self._inputs(U_lo, np.float64), self._inputs(U_hi, np.float64)
        if lo.shape != hi.shape or np.any(lo > hi):
            raise ValueError("U_lo and U_hi must have one shape and U_lo <= U_hi entrywise")
        if self.dtype == np.float32:
            # A float32 model sees its inputs rounded to nearest: within 2^-24 relative of them.
            lo, hi = lo - np.abs(lo) * 2.0 ** -24, hi + np.abs(hi) * 2.0 ** -24
        boxes = [(lo, hi)]
        for layer in self.layers[:-1]:
            lo, hi = layer.enclosing_box(lo, hi, options)
            boxes.append((lo, hi))
        return boxes

    def _interval_head(self, box, labels):
        """The relative classifier's margin lower bounds over the logits layer's input box, minus their
        float64 rounding; 0 at j = k."""
        G_c, G_r = enclosing_center_radius(*box)
        head = self.layers[-1]
        W, b = head.W.astype(np.float64), head.b.astype(np.float64)
        M = margin_lower_bounds(W, b, G_c, G_r, labels) - margin_rounding(W, b, G_c, G_r, labels)
        M[np.arange(len(labels)), labels] = 0.0
        return M

    def interval_margins(self, U_lo, U_hi, labels, **options):
        """Sound lower bounds of the margins y_k - y_j over input boxes, k = labels: the relative
        classifier of the logits layer on the box of :meth:`enclosing_boxes`, minus the rounding
        allowance of its float64 evaluation; (M (m, n_out) float64, 0 at j = k, info)."""
        box = self.enclosing_boxes(U_lo, U_hi, **options)[-1]
        return self._interval_head(box, check_labels(labels, len(box[0]), self.n_out)), {}

    def _check_steps(self, steps):
        steps = self.crown_steps if steps is None else steps
        if not (isinstance(steps, (int, np.integer)) and steps >= 0):
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        return steps

    def _bound_rows(self, Lam, beta, allowance, boxes, last, steps):
        """Lower bounds (m, r) of the rows Lam . v + beta (Lam (m, r, *shape)) over layer ``last``'s output
        v: carried back through the ``relax_back`` of layers ``last`` .. 0 over ``boxes`` (as
        :meth:`enclosing_boxes`) and bounded over the input box, minus every rounding ``allowance``."""
        for i in range(last, -1, -1):
            Lam, beta, allowance = self.layers[i].relax_back(Lam, beta, allowance, boxes[i], boxes[i + 1], steps)
        u_c, u_r = enclosing_center_radius(*boxes[0])
        rho_in = 2 * (u_c[0].size + 10) * UNIT_ROUNDOFF
        return concretize(Lam, beta, u_c[:, None], u_r[:, None], rho_in) - allowance

    def relaxed_margins(self, U_lo, U_hi, labels, steps=None, boxes=None, **options):
        """Sound lower bounds of the margins over input boxes by linear relaxation (CROWN, Zhang et al.
        2018), never below :meth:`interval_margins`: each margin row (W_k - W_j) . g + b_k - b_j of the
        logits layer is carried back through every layer's ``relax_back`` to an affine function of the
        input, bounded over the input box. The relus relax over ``boxes``: those of :meth:`enclosing_boxes`
        (None) or of :meth:`relaxed_boxes` for the same input boxes; the implicit layer passes ``steps``
        copies of its fixed-point map (default :attr:`crown_steps`). Returns (M (m, n_out) float64, 0 at
        j = k, info)."""
        steps = self._check_steps(steps)
        boxes = self.enclosing_boxes(U_lo, U_hi, **options) if boxes is None else boxes
        labels = check_labels(labels, len(boxes[0][0]), self.n_out)
        M = self._interval_head(boxes[-1], labels)
        head = self.layers[-1]
        W, b = head.W.astype(np.float64), head.b.astype(np.float64)
        chunk = max(1, RELAXATION_ENTRIES // (self.n_out * self._largest_state(boxes)))
        for s in range(0, len(labels), chunk):
            rows = slice(s, s + chunk)
            k = labels[rows]
            part = [(lo[rows], hi[rows]) for lo, hi in boxes]
            Lam = W[k][:, None, :] - W[None, :, :]
            beta = b[k][:, None] - b[None, :]
            # The rounding of W_k - W_j and b_k - b_j, against the logits layer's input box.
            s_g = box_magnitude(part[-1])
            rho = 2 * (W.shape[1] + 10) * UNIT_ROUNDOFF
            allowance = rho * (np.abs(beta) + batched_dot(np.abs(Lam), s_g[:, None]))
            L = self._bound_rows(Lam, beta, allowance, part, len(self.layers) - 2, steps)
            M[rows] = np.maximum(M[rows], L)
        M[np.arange(len(labels)), labels] = 0.0
        return M, {}

    @staticmethod
    def _largest_state(boxes):
        return max(int(np.prod(lo.shape[1:])) for lo, _ in boxes)

    def relaxed_boxes(self, U_lo, U_hi, steps=None, rounds=1, progress=None, boxes=None, **options):
        """:meth:`enclosing_boxes` narrowed by linear relaxation: CROWN's own intermediate bounds (Zhang
        et al. 2018), where :meth:`relaxed_margins` alone relaxes over interval boxes.

        Layer by layer, the output box of layer i is narrowed on the coordinates whose boxes a relaxation
        reads (:meth:`nemon_np.layers.Layer.relaxation_reads`: the inputs of relus that can change sign,
        an implicit layer's state): for each such coordinate v_t the rows +e_t and -e_t are carried back
        through layers i .. 0 (:meth:`relaxed_margins`'s pass, ``steps`` as there) and bounded over the
        input box, so that lo_t >= min v_t and hi_t <= max v_t over the ball; the box is intersected with
        these bounds, and the boxes after it with their interval images of it (``enclosing_box``). Each
        bound relaxes over boxes before it that are already sound, so every box stays sound, and
        narrower boxes tighten every relaxation and mixed-integer encoding over them.

        ``rounds`` > 1 repeats the pass from the boxes of the last: an implicit layer's relaxation reads its
        own box, so each pass can narrow it again (on the default dense MNIST model at eps 0.02, crown over
        1, 2 and 3 rounds' boxes certifies 71.5, 73.0 and 74.0% of the first 200 test images, 67.5% over
        interval boxes); a stack without one gains little from a second.

        Cost: two rows per open coordinate through every layer before it, an image at a time (on the
        MNIST stack ``nemon-medium`` about 4 CPU s an image a round); ``progress`` is called with the
        images done. ``boxes``: :meth:`enclosing_boxes` of the same input boxes where the caller has them
        already (None: computed here). Returns the boxes as :meth:`enclosing_boxes` does."""
        steps = self._check_steps(steps)
        if not (isinstance(rounds, (int, np.integer)) and rounds >= 1):
            raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
        if boxes is None:
            boxes = self.enclosing_boxes(U_lo, U_hi, **options)
        elif len(boxes) != len(self.layers) or len(boxes[0][0]) != len(self._inputs(U_lo, np.float64)):
            raise ValueError(f"boxes must be enclosing_boxes of these inputs: {len(self.layers)} (lo, hi) pairs of "
                             f"one row an image, got {len(boxes)} pairs of {len(boxes[0][0]) if boxes else 0} rows")
        narrowed = []
        for image in range(len(boxes[0][0])):
            one = [(lo[image:image + 1], hi[image:image + 1]) for lo, hi in boxes]
            for _ in range(rounds):
                one = self._narrowed_boxes(one, steps, options)
            narrowed.append(one)
            if progress is not None:
                progress(image + 1)
        return [tuple(np.concatenate([one[i][side] for one in narrowed]) for side in (0, 1))
                for i in range(len(boxes))] if narrowed else boxes

    def _narrowed_boxes(self, boxes, steps, options):
        """:meth:`relaxed_boxes` for one image's boxes (a new list)."""
        boxes, n = list(boxes), len(self.layers) - 1
        chunk = max(1, RELAXATION_ENTRIES // (2 * self._largest_state(boxes)))
        for i in range(n):
            masks = [self.layers[i].relaxation_reads(boxes[i], boxes[i + 1])[1]]
            if i + 1 < n:
                masks.append(self.layers[i + 1].relaxation_reads(boxes[i + 1], boxes[i + 2])[0])
            masks = [mask[0] for mask in masks if mask is not None]
            if not masks:
                continue
            shape = boxes[i + 1][0].shape
            lo, hi = (v.reshape(-1).copy() for v in boxes[i + 1])
            open_ = np.flatnonzero(np.logical_or.reduce(masks))
            for s in range(0, len(open_), chunk):
                t = open_[s:s + chunk]
                r = len(t)
                E = np.zeros((1, 2 * r, len(lo)))
                E[0, np.arange(r), t], E[0, r + np.arange(r), t] = 1.0, -1.0
                B = self._bound_rows(E.reshape((1, 2 * r) + shape[1:]), np.zeros((1, 2 * r)), np.zeros((1, 2 * r)),
                                     boxes, i, steps)[0]
                lo[t], hi[t] = np.maximum(lo[t], B[:r]), np.minimum(hi[t], -B[r:])
            boxes[i + 1] = (lo.reshape(shape), hi.reshape(shape))
            for j in range(i + 1, n):
                a, b = self.layers[j].enclosing_box(*boxes[j], options)
                boxes[j + 1] = (np.maximum(a, boxes[j + 1][0]), np.minimum(b, boxes[j + 1][1]))
        return boxes

    # -- the Lipschitz bound ----------------------------------------------------------------------
    def lipschitz_factors(self):
        """{name: (rows, to_param)} as :func:`nemon_np.lipschitz.lipschitz_factors`: "C" the logits
        layer's rows, and each other layer's ``lipschitz_rows``; the bound is their product of
        ||rows||_inf over (1 - max(mu, 0)). A weighted implicit layer measures its state in the norm
        of its weights, so the layer after it reads W diag(eta)."""
        factors, eta = {}, None
        for i, layer in enumerate(self.layers):
            rows = layer.lipschitz_rows()
            if eta is not None and rows is not None:
                if not isinstance(layer, Dense):
                    raise ValueError(f"a weighted implicit layer followed by {layer.token} has no Lipschitz factor")
                rows, eta = rows * eta[None, :], None
            if layer.implicit is not None:
                eta = layer.weights
            if rows is not None:
                factors["C" if i == len(self.layers) - 1 else str(i)] = (rows, lambda G: G)
        return factors

    @classmethod
    def from_model(cls, model):
        """The stack form of a :class:`nemon_np.NEMON` or :class:`nemon_np.ConvNEMON` (a copy of its
        parameters, weights and metadata): ``nemon<n>`` or ``cnemon<C>k<k>[z],pool<s>``, with
        ``dense<p>,relu`` for a hidden read-out layer. The same logits, gradients and certificates
        (bit for bit for the dense model, within float rounding for the conv one)."""
        readout = f",dense{model.readout_hidden},relu" if model.readout_hidden else ""
        if model.implicit == "A":
            arch, shape, names = f"nemon{model.n_hidden}{readout}", (model.n_in,), {"0.A": "A"}
        else:
            arch = f"cnemon{model.channels}k{model.kernel}{'z' if model.padding == 'zero' else ''},pool{model.pool}"
            arch, shape, names = arch + readout, (model.in_channels,) + tuple(model.image_size), {"0.K": "K"}
        stack = cls(arch, shape, model.n_out, gamma=model.gamma, seed=model.seed, dtype=model.dtype)
        head = len(stack.layers) - 1
        names.update({"0.B": "B", "0.b": "b", f"{head}.W": "C", f"{head}.b": "c"})
        if model.readout_hidden:
            names.update({f"{head - 2}.W": "H", f"{head - 2}.b": "h"})
        for key, name in names.items():
            i, k = key.split(".")
            setattr(stack.layers[int(i)], k, np.array(getattr(model, name), dtype=stack.dtype))
        stack.layers[0].weights = None if model.weights is None else np.array(model.weights)
        stack.metadata = dict(model.metadata)
        return stack

    # -- copies and files -------------------------------------------------------------------------
    def astype(self, dtype):
        """A copy with every parameter cast to ``dtype``."""
        import copy
        model = copy.deepcopy(self)
        model.dtype = as_float_dtype(dtype)
        for layer in model.layers:
            if hasattr(layer, "dtype"):
                layer.dtype = model.dtype
            for k, v in layer.params().items():
                setattr(layer, k, np.ascontiguousarray(v, dtype=model.dtype))
        return model

    def save(self, path):
        """Write every parameter and setting to one ``.npz`` file (no pickled objects)."""
        weights = {} if self.weights is None else {f"{self.implicit_index}.weights": self.weights}
        buffers = {f"{i}.{k}": v for i, layer in enumerate(self.layers) for k, v in layer.buffers().items()}
        write_model_file(path, FORMAT_NAME, FORMAT_VERSION, {**self.params(), **weights, **buffers}, self.metadata,
                         arch=self.arch, input_shape=np.array(self.input_shape), n_out=self.n_out, gamma=self.gamma,
                         seed=self.seed, dtype=np.dtype(self.dtype).name)

    @classmethod
    def load(cls, path):
        """Read a model written by :meth:`save`; a truncated or foreign file is a one-line ``ValueError``."""
        data = read_model_file(path, FORMAT_NAME, FORMAT_VERSION, ("arch", "input_shape", "n_out", "gamma", "seed",
                                                                   "dtype"))
        try:
            model = cls(str(data["arch"]), tuple(data["input_shape"]), int(data["n_out"]), float(data["gamma"]),
                        int(data["seed"]), str(data["dtype"]))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        for i, layer in enumerate(model.layers):
            for k, v in layer.params().items():
                key = f"{i}.{k}"
                if key not in data:
                    raise ValueError(f"{path}: model file lacks {key}")
                if data[key].shape != v.shape:
                    raise ValueError(f"{path}: {key} has shape {data[key].shape}, the architecture needs {v.shape}")
                setattr(layer, k, np.ascontiguousarray(data[key], dtype=model.dtype))
            for k, v in layer.buffers().items():   # float64 state, such as batch normalization's statistics
                key = f"{i}.{k}"
                if key not in data or data[key].shape != v.shape:
                    raise ValueError(f"{path}: model file lacks {key} of shape {v.shape}")
                setattr(layer, k, np.asarray(data[key], np.float64))
            if layer.implicit is not None and f"{i}.weights" in data:
                layer.weights = np.asarray(data[f"{i}.weights"], np.float64)
        model.metadata = data["metadata"]
        return model

    def __repr__(self):
        return (f"StackedClassifier({self.arch!r}, input_shape={self.input_shape}, n_out={self.n_out}, "
                f"gamma={self.gamma}, dtype={np.dtype(self.dtype).name})")


def as_stack(model):
    """The model as a :class:`StackedClassifier`: itself, or the stack form of a NEMON or ConvNEMON
    (:meth:`StackedClassifier.from_model`, the same function and parameters)."""
    return model if isinstance(model, StackedClassifier) else StackedClassifier.from_model(model)
