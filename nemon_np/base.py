"""What every implicit classifier here shares: label checks, the model file format, and the base
class with ``logits``, ``predict`` and the interval bounds through the embedded network.

Both model modules (:mod:`nemon_np.models`, :mod:`nemon_np.conv_model`) import this one and nothing
imports them back; :func:`nemon_np.loading.load_model`, which knows both, sits above them.
"""
import warnings
import zipfile

import numpy as np

from .readout import (enclosing_hidden_box, hidden_backward, hidden_box, hidden_box_grad, hidden_forward,
                      readout_affine_lower_bounds)
from .relaxation import unrolled_lower_bounds
from .interval import (UNIT_ROUNDOFF, affine_enclosure, center_radius, embed, enclosing_center_radius, enclosure_radius,
                       fold_embedded_grad, margin_lower_bounds, margin_lower_bounds_grad, margin_rounding,
                       narrow_preactivation_box)
from .decided import predict_by_rule
from .losses import softmax_cross_entropy
from .solvers import ConvergenceWarning, WellPosednessError

__all__ = ["check_labels", "read_model_file", "write_model_file", "model_file_format", "EmbeddedNetwork",
           "ImplicitClassifier"]

# Model files with a hidden read-out layer are version 2, so that readers of version 1, which would
# not know H and h, refuse them; files of a linear read-out stay version 1.
HIDDEN_READOUT_VERSION = 2


def check_labels(y, m, n_out):
    """y as m integer class labels in [0, n_out); anything else is a one-line ``ValueError``."""
    y = np.asarray(y)
    if y.shape != (m,) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y must be {m} integer class labels, got shape {y.shape} dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= n_out):
        raise ValueError(f"labels must lie in [0, {n_out - 1}], got range [{y.min()}, {y.max()}]")
    return y


def _read_arrays(path):
    """Every array of an ``.npz`` file, as a dict; anything else (a pickle, a plain ``.npy``, text,
    a truncated archive, object arrays) is a one-line ``ValueError`` naming the file. A missing
    file stays a ``FileNotFoundError``."""
    not_model = f"{path}: not a nemon_np model file"
    if hasattr(path, "seek"):   # an open binary file is read from its start, each time (the format, then the model)
        path.seek(0)
    try:
        z = np.load(path, allow_pickle=False)
        if not hasattr(z, "files"):
            raise ValueError(f"{not_model} (a single NumPy array, not an .npz archive)")
        with z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise
    except IsADirectoryError:
        raise ValueError(f"{path}: is a folder, not a model file") from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        if str(e).startswith(not_model):
            raise
        # numpy's own message advises unpickling untrusted data: not repeated here.
        reason = "pickled or object data" if "pickle" in str(e) or "Object arrays" in str(e) else type(e).__name__
        raise ValueError(f"{not_model} ({reason})") from None


def model_file_format(path):
    """The format marker of a model file (``"nemon_np.NEMON"``, ``"nemon_np.ConvNEMON"``), ``""``
    when it has none; an unreadable file is a one-line ``ValueError``."""
    data = _read_arrays(path)
    return str(data["format"]) if "format" in data else ""


def read_model_file(path, format_name, version, required):
    """The arrays of a model ``.npz`` as a dict, checked for its format marker, version and keys,
    with the ``meta.`` entries gathered under "metadata"; a truncated or foreign file is a
    one-line ``ValueError``."""
    data = _read_arrays(path)
    if str(data.get("format", "")) != format_name:
        raise ValueError(f"{path}: not a nemon_np model file of kind {format_name} "
                         f"(format marker {str(data.get('format', 'none'))!r})")
    if int(data["version"]) > version:
        raise ValueError(f"{path}: model format version {int(data['version'])} is newer than "
                         f"this nemon_np reads ({version})")
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"{path}: model file lacks {', '.join(missing)}")
    data["metadata"] = {k[5:]: (v.item() if v.ndim == 0 else v) for k, v in data.items() if k.startswith("meta.")}
    return data


def write_model_file(path, format_name, version, params, metadata, **settings):
    """One ``.npz`` (no pickled objects) at ``path`` (or into an open binary file): the parameter arrays,
    the settings, a format marker and version, and each metadata entry under ``meta.<key>``; the inverse
    of :func:`read_model_file`."""
    state = {k: np.asarray(v) for k, v in {**params, **settings}.items()}
    state.update(format=np.array(format_name), version=np.array(version))
    for k, v in metadata.items():
        state["meta." + k] = np.asarray(v)
    if hasattr(path, "write"):   # an open binary file (a buffer to fingerprint the model)
        np.savez(path, **state)
        return
    with open(path, "wb") as f:
        np.savez(f, **state)


def _terms(P):
    """Terms summed per output of the linear map P: n for a matrix (n_out, n), C_in k^2 for a kernel."""
    return int(np.prod(np.shape(P)[1:]))


class EmbeddedNetwork:
    """The interval bounds of an implicit map x* = relu(P x* + B u + b) over input boxes, through its
    embedded network (DESIGN.md, "Interval certificates"): the sound float64 box
    (:meth:`interval_bounds`) for certificates, and the box in the model's dtype with its gradient
    (:meth:`embedded_box`, :meth:`embedded_box_backward`) for certified training.

    Written once over the hooks of the class that mixes it in: ``implicit`` (the name of the implicit
    matrix, "A" or "K"), ``B``, ``b``, ``dtype``, ``n_hidden``, ``mu_inf()``,
    ``_state_inputs(U, dtype)`` (inputs in the state's layout), ``_inject(B, U)`` and
    ``_inject_grad(delta, U)`` (the input map and its weight gradient), ``_apply_implicit(P, X)`` and
    ``_implicit_grad(delta, X)`` (the same for the implicit map), ``_transposed(P)`` (the matrix or
    kernel of P's transpose, for either map), ``_state_weights()`` (eta or None),
    ``_adjoint_tolerance(tol, units)`` and ``_solve_embedded`` / ``_adjoint_embedded`` (the average
    iteration and its adjoint for the embedded network of the implicit matrix or kernel they are given,
    whose state is [x_lo, x_hi] stacked on the last axis; they never need the embedded matrix itself,
    whose products they take in the sum-difference form). Both the classifiers
    (:class:`ImplicitClassifier`) and the implicit layers of a stack (:mod:`nemon_np.layers`) mix it in.
    """

    def _check_interval(self):
        """mu_inf of the model, which must be < 1: it certifies the embedded network too."""
        mu = self.mu_inf()
        if not mu < 1:
            raise WellPosednessError(f"mu_inf = {mu:.6g} >= 1: interval bounds need the l_inf contraction "
                                     "(a monDEQ model, certified by mu_2 only, has no interval certificate)")
        return mu

    def _embedded_injection(self, U_c, U_r, B, b, rounding=False):
        """[q_lo, q_hi] = [B u_c - |B| u_r + b, B u_c + |B| u_r + b], stacked on the last axis; with
        ``rounding`` each side is moved outward by the rounding allowance of its float64 evaluation.
        B may also be the implicit matrix or kernel (the two maps share one hook) with U_c, U_r a box
        of states: the box of A x over it."""
        if rounding:
            Q_c, Q_r = affine_enclosure(self._inject, B, b, U_c, U_r, _terms(B))
        else:
            Q_c, Q_r = self._inject(B, U_c) + b, self._inject(np.abs(B), U_r)
        return np.concatenate([Q_c - Q_r, Q_c + Q_r], axis=-1)

    def _implicit_row_scale(self):
        """(the largest absolute row sum of the implicit matrix or kernel, in float64; the terms of one of
        its rows): what the rounding allowances of its products scale with."""
        P64 = np.asarray(getattr(self, self.implicit), np.float64)
        return float(np.abs(P64).reshape(len(P64), -1).sum(axis=1).max()), _terms(P64)

    def mu_inf_upper(self):
        """An upper bound of the exact mu_inf of the stored parameters: the float64 value plus an
        allowance for the rounding of its sums (below (terms + 4) u times the largest weighted
        absolute row sum; 1e-9 of it is far above)."""
        mu = self.mu_inf()
        rows = self._implicit_row_scale()[0]
        eta = self._state_weights()
        spread = 1.0 if eta is None else float(eta.max() / eta.min())
        return mu + 1e-9 * (1.0 + abs(mu) + rows * spread)

    def interval_bounds(self, U_lo, U_hi, *, tol=None, max_iter=1000, method="average"):
        """Sound bounds of the fixed point over input boxes: for every u with U_lo <= u <= U_hi
        (inputs as :meth:`equilibrium` takes them, normalized), ``X_lo <= x*(u) <= X_hi``.

        The embedded network is solved by the average iteration in the model's dtype, per sample to
        ``tol`` (default 1e-4 in float32, 1e-8 in float64); then, in float64, its residual r gives
        the enclosure ``|x - x_emb*| <= (|r| + s) / (1 - mu)`` (s the rounding allowance, weighted
        for weighted models) and the box is widened by it. The box holds in exact arithmetic for the
        model's parameters, also for inputs rounded to a float32 model's dtype; a sample that did not
        reach ``tol`` gets a wider, still sound, box.

        Returns X_lo, X_hi (float64, the state's layout) and an OptimizeResult with the embedded
        solve's per-sample ``iterations``, ``residual`` and the enclosure ``radius``, and the input box
        it used (``input_center``, ``input_radius``, the state's layout) with its injection
        ``[q_lo, q_hi]`` (stacked on the last axis).
        Raises :class:`nemon_np.WellPosednessError` when mu_inf >= 1.
        """
        self._check_interval()
        lo, hi = self._state_inputs(U_lo, np.float64), self._state_inputs(U_hi, np.float64)
        if lo.shape != hi.shape or np.any(lo > hi):
            raise ValueError("U_lo and U_hi must have one shape and U_lo <= U_hi entrywise")
        if tol is None:
            tol = 1e-4 if self.dtype == np.float32 else 1e-8
        if self.dtype == np.float32:
            # A float32 model sees its inputs rounded to nearest: within 2^-24 relative of them.
            lo, hi = lo - np.abs(lo) * 2.0 ** -24, hi + np.abs(hi) * 2.0 ** -24
        U_c, U_r = enclosing_center_radius(lo, hi)
        P = getattr(self, self.implicit)
        P64 = P.astype(np.float64)
        Q = self._embedded_injection(U_c, U_r, self.B.astype(np.float64), self.b.astype(np.float64), rounding=True)
        info_inputs = dict(input_center=U_c, input_radius=U_r, injection=Q)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)   # the enclosure below covers it
            X, info = self._solve_embedded(P, Q.astype(self.dtype), tol, max_iter, method)
        E64, X64 = embed(P64), X.astype(np.float64)
        Z = self._apply_implicit(E64, X64) + Q
        slack = (_terms(E64) + 4) * UNIT_ROUNDOFF * (self._apply_implicit(np.abs(E64), np.abs(X64)) + np.abs(Q))
        eta = self._state_weights()
        eta2 = None if eta is None else np.concatenate([eta, eta])
        radius = enclosure_radius(np.maximum(Z, 0) - X64, slack, self.mu_inf_upper(), eta2)
        widen = radius.reshape((-1,) + (1,) * (X.ndim - 1)) * (1.0 if eta2 is None else eta2)
        widen = np.broadcast_to(widen, X64.shape)
        n = X.shape[-1] // 2
        # One ulp outward: the subtraction and addition round to nearest. Every fixed point is >= 0.
        X_lo = np.maximum(np.nextafter(X64[..., :n] - widen[..., :n], -np.inf), 0.0)
        X_hi = np.nextafter(X64[..., n:] + widen[..., n:], np.inf)
        info.update(radius=radius, **info_inputs)
        return X_lo, X_hi, info

    def embedded_box(self, U_c, U_r, tol, max_iter, method, alpha=None, tol_mode="absolute", X0=None):
        """The embedded network's fixed point over the boxes [U_c - U_r, U_c + U_r] (the state's
        layout, the model's dtype), as the solver leaves it (for training, not for certificates):
        (X, info), X = [x_lo, x_hi] stacked on the last axis, info the solver's OptimizeResult with
        the implicit matrix it used under ``"implicit_matrix"``. The solve starts from X0 (the layout
        of X; default zeros): the embedded network is contractive like the model, so any start gives
        the same box."""
        P = getattr(self, self.implicit)
        X, finfo = self._solve_embedded(P, self._embedded_injection(U_c, U_r, self.B, self.b), tol, max_iter,
                                        method, alpha, tol_mode, X0)
        finfo["implicit_matrix"] = P
        return X, finfo

    def embedded_box_backward(self, G, X, finfo, U_c, U_r, tol, max_iter, adjoint="iterative", adjoint_tol=None,
                              with_input=False):
        """Gradients through :meth:`embedded_box` from G = dL/d[x_lo, x_hi] (the mean loss's):
        the adjoint w = G + E^T D w of the embedded network, delta = D w, dL/dE = delta [x_lo, x_hi]^T
        folded onto the implicit matrix by :func:`fold_embedded_grad`, dL/dB = (delta_lo + delta_hi)
        u_c^T + sign(B) (delta_hi - delta_lo) u_r^T, dL/db = sum (delta_lo + delta_hi); with
        ``with_input`` also dL/du_c = B^T (delta_lo + delta_hi) and dL/du_r = |B|^T (delta_hi - delta_lo)
        (the state's layout). Returns (grads keyed by the implicit matrix's name, "B", "b"; binfo[,
        dU_c, dU_r])."""
        P, n = finfo["implicit_matrix"], X.shape[-1] // 2
        mask = (finfo.preactivation > 0).astype(self.dtype)
        m = len(X)
        # Per-sample scale (m G), so that the adjoint tolerance means the same at any batch size.
        adjoint_tol = self._adjoint_tolerance(tol, 2 * self.n_hidden) if adjoint_tol is None else adjoint_tol
        W, binfo = self._adjoint_embedded(P, mask, m * G, finfo.alpha, adjoint_tol, max_iter, adjoint)
        delta = mask * W / m
        d_lo, d_hi = delta[..., :n], delta[..., n:]
        grads = {self.implicit: fold_embedded_grad(self._implicit_grad(delta, X), P),
                 "B": (self._inject_grad(d_lo + d_hi, U_c) + np.sign(self.B) * self._inject_grad(d_hi - d_lo, U_r)),
                 "b": (d_lo + d_hi).reshape(-1, n).sum(axis=0)}
        if not with_input:
            return grads, binfo
        dU_c = self._inject(self._transposed(self.B), d_lo + d_hi)
        dU_r = self._inject(self._transposed(np.abs(self.B)), d_hi - d_lo)
        return grads, binfo, dU_c, dU_r


class ImplicitClassifier(EmbeddedNetwork):
    """What every implicit classifier here derives from its ``equilibrium(U, **options) -> (X, info)``
    and ``readout(X) -> logits``: the logits of inputs and the predicted classes, and the interval
    bounds of the fixed point and the margins over input boxes (DESIGN.md, "Interval certificates").

    The interval methods are written once over the hooks of :class:`EmbeddedNetwork` and these:
    ``_features(X)`` and ``_features_grad(G)`` (what the read-out reads: x, or its average pooling, a
    linear map with non-negative weights, and its transpose) and ``_feature_terms`` (entries averaged
    per feature, 0 for none).

    The read-out may have a hidden layer (:mod:`nemon_np.readout`): parameters ``H`` (p, n_f) and
    ``h`` (p,) of g = relu(H f + h), which ``y = C g + c`` reads instead of the features f; ``H`` is
    None without one.
    """

    H = h = None   # a linear read-out

    @property
    def n_out(self):
        return self.C.shape[0]

    def params(self):
        """The parameters as a dict keyed by the implicit matrix's name ("A" or "K"), "B", "b", "C", "c"
        (and "H", "h" with a hidden read-out layer): the arrays themselves."""
        return {self.implicit: getattr(self, self.implicit), "B": self.B, "b": self.b, **self.readout_params()}

    @property
    def readout_hidden(self):
        """The width p of the read-out's hidden layer, 0 for a linear read-out."""
        return 0 if self.H is None else len(self.H)

    def readout_params(self):
        """The read-out's parameters: {"C", "c"} and, with a hidden layer, {"H", "h"}."""
        extra = {} if self.H is None else {"H": self.H, "h": self.h}
        return {"C": self.C, "c": self.c, **extra}

    def _file_version(self):
        """The model file version this model is written with: 1, or 2 with a hidden read-out layer."""
        return 1 if self.H is None else HIDDEN_READOUT_VERSION

    def _load_readout(self, data, n_features, path):
        """Set C, c (and H, h when the file has them) from a model file's arrays, in the model's dtype;
        shapes that do not fit ``n_features`` features are a one-line ``ValueError``."""
        C, c, H, h = data["C"], data["c"], data.get("H"), data.get("h")
        n_read = n_features
        if H is not None or h is not None:
            if H is None or h is None or H.ndim != 2 or H.shape[1] != n_features or h.shape != (len(H),):
                raise ValueError(f"{path}: the hidden read-out layer's shapes do not fit {n_features} features "
                                 f"(H {getattr(H, 'shape', None)}, h {getattr(h, 'shape', None)})")
            self.H, self.h = (np.ascontiguousarray(a, dtype=self.dtype) for a in (H, h))
            n_read = len(H)
        if C.ndim != 2 or C.shape[1] != n_read or c.shape != (len(C),):
            raise ValueError(f"{path}: the read-out's shapes do not fit {n_read} inputs (C {C.shape}, c {c.shape})")
        self.C, self.c = (np.ascontiguousarray(a, dtype=self.dtype) for a in (C, c))

    def readout(self, X):
        """Logits ``C g + c`` of fixed points X (the state's layout), g the hidden layer's output on the
        features f of X (x, or its average pooling; g = f for a linear read-out)."""
        return self._readout_forward(self._features(X))[0]

    def _readout_forward(self, F):
        """(logits, G, P) from features F (m, n_f): G what C reads, P the hidden layer's pre-activation
        (None without a hidden layer)."""
        if self.H is None:
            return F @ self.C.T + self.c, F, None
        G, P = hidden_forward(F, self.H, self.h)
        return G @ self.C.T + self.c, G, P

    def _readout_backward(self, dY, F, G, P):
        """(dF, grads) from dY = dL/dy through :meth:`_readout_forward`: dL/dF and the gradients of
        the read-out's parameters, keyed as :meth:`readout_params`."""
        grads = {"C": dY.T @ G, "c": dY.sum(axis=0)}
        dG = dY @ self.C
        if self.H is None:
            return dG, grads
        dF, grads["H"], grads["h"] = hidden_backward(dG, F, self.H, P)
        return dF, grads

    def _robust_readout_loss(self, F_c, F_r, y):
        """The robust part of the certified loss from a box of features [F_c - F_r, F_c + F_r]:
        CE(-m_lo), m_lo the relative classifier's margin lower bounds (through the hidden layer's box
        when there is one), and its gradients. Returns (robust, m_lo, dF_c, dF_r, grads of the
        read-out's parameters keyed as :meth:`readout_params`); in the arrays' dtype, for training."""
        G_c, G_r = F_c, F_r
        if self.H is not None:
            G_c, G_r, P_lo, P_hi = hidden_box(F_c, F_r, self.H, self.h)
        M = margin_lower_bounds(self.C, self.c, G_c, G_r, y)
        robust, d_neg = softmax_cross_entropy(-M, y)
        dF_c, dF_r, dC, dc = margin_lower_bounds_grad(self.C, G_c, G_r, y, -d_neg)
        grads = {"C": dC, "c": dc}
        if self.H is not None:
            dF_c, dF_r, grads["H"], grads["h"] = hidden_box_grad(dF_c, dF_r, F_c, F_r, self.H, P_lo, P_hi)
        return robust, M, dF_c, dF_r, grads

    def implicit_part(self):
        """(the object a constraint mode acts on, the prefix of its parameters' names in ``params()``):
        the model itself and "" (a stack answers with its implicit layer)."""
        return self, ""

    def logits(self, U, **solver_options):
        """Logits ``y`` of :meth:`readout` at the fixed points, shape (m, n_out); keyword
        options go to ``equilibrium``."""
        return self.logits_and_info(U, **solver_options)[0]

    def logits_and_info(self, U, **solver_options):
        """(logits, info): :meth:`logits` and the forward solver's OptimizeResult (per-sample
        ``iterations``, ``residual``, ``converged``)."""
        X, info = self.equilibrium(U, **solver_options)
        return self.readout(X), info

    def astype(self, dtype):
        """A copy of the model with every parameter cast to ``dtype`` (float32 or float64)."""
        import copy
        model = copy.copy(self)
        model.dtype = np.dtype(dtype).type
        for k, v in self.params().items():
            setattr(model, k, np.ascontiguousarray(v, dtype=model.dtype))
        return model

    def predict(self, U, stop="converged", **solver_options):
        """Predicted class per sample, argmax of the logits. ``stop="decided"`` stops each sample's
        solve where its class provably cannot change any more (:func:`nemon_np.decided.decided_labels`):
        the same classes as the fixed points', in fewer iterations (but, measured, not less CPU:
        docs/benchmarks.md)."""
        return predict_by_rule(self, U, stop, solver_options)

    def interval_margins(self, U_lo, U_hi, labels, **options):
        """Sound lower bounds of the margins y_k - y_j over input boxes, k = labels, by the relative
        classifier on the bounds of :meth:`interval_bounds` (its ``options``), passed through the
        hidden read-out layer by :func:`nemon_np.readout.enclosing_hidden_box` when there is one, minus
        the rounding allowance of their float64 evaluation: (m, n_out) float64, 0 at j = k. The
        prediction is certified constant over the box when every other entry is > 0. Returns (M, info)."""
        M, info, _ = self._interval_margins(U_lo, U_hi, labels, options)
        return M, info

    def _interval_margins(self, U_lo, U_hi, labels, options):
        """:meth:`interval_margins` and its parts (labels, X_lo, X_hi, F_c, F_r, P_lo, P_hi)."""
        X_lo, X_hi, info = self.interval_bounds(U_lo, U_hi, **options)
        labels = check_labels(labels, len(X_lo), self.n_out)
        M, parts = self._state_box_margins(X_lo, X_hi, labels)
        return M, info, (labels, X_lo, X_hi) + parts

    def _state_box_margins(self, X_lo, X_hi, labels):
        """Sound float64 lower bounds of the margins y_k - y_j (k = labels) over a box of states
        [X_lo, X_hi] (float64, the state's layout), through the read-out, minus the rounding allowance
        of their evaluation: (M (m, n_out), 0 at j = k; (F_c, F_r, P_lo, P_hi))."""
        F_lo, F_hi = self._features(X_lo), self._features(X_hi)
        if self._feature_terms:   # averages of non-negative numbers: rounding within (t + 2) u, relative
            F_lo, F_hi = (F_lo * (1 - (self._feature_terms + 2) * UNIT_ROUNDOFF),
                          F_hi * (1 + (self._feature_terms + 2) * UNIT_ROUNDOFF))
        F_c, F_r = G_c, G_r = enclosing_center_radius(F_lo, F_hi)
        P_lo = P_hi = None
        if self.H is not None:
            G_c, G_r, P_lo, P_hi = enclosing_hidden_box(F_c, F_r, self.H, self.h)
        C, c = self.C.astype(np.float64), self.c.astype(np.float64)
        M = margin_lower_bounds(C, c, G_c, G_r, labels) - margin_rounding(C, c, G_c, G_r, labels)
        M[np.arange(len(labels)), labels] = 0.0
        return M, (F_c, F_r, P_lo, P_hi)

    def _decision_parts(self, U, options):
        """What :func:`nemon_np.decided.decided_labels` needs: (the implicit map, its injection
        Q = B u + b, logits of states, :meth:`_state_box_margins`)."""
        return self, self._inject(self.B, self._state_inputs(U)) + self.b, self.readout, self._state_box_margins

    def relaxed_margins(self, U_lo, U_hi, labels, steps=2, **options):
        """Sound lower bounds of the margins y_k - y_j over input boxes (as :meth:`interval_margins`,
        which they never fall below) by linear relaxation (CROWN, :mod:`nemon_np.relaxation`): an
        affine bound of each margin in the features (through the hidden read-out layer by
        :func:`nemon_np.readout.readout_affine_lower_bounds`), carried back through ``steps`` copies of
        the fixed-point map and bounded over the input box and the embedded network's box of x*.

        The pre-activation box of z* = A x* + B u + b is the interval product over those boxes (rounding
        allowed for), narrowed by x* = relu(z*): z* <= x*_hi, and z* = x* >= x*_lo where x*_lo > 0.
        Returns (M, info), M (m, n_out) float64, 0 at j = k."""
        if not (isinstance(steps, (int, np.integer)) and steps >= 0):
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        M, info, (labels, X_lo, X_hi, F_c, F_r, P_lo, P_hi) = self._interval_margins(U_lo, U_hi, labels, options)
        W, beta = readout_affine_lower_bounds(self.C, self.c, self.H, self.h, F_c, F_r, P_lo, P_hi, labels)
        m, n_out = beta.shape
        x_c, x_r = enclosing_center_radius(X_lo, X_hi)
        U_c, U_r, Q = info["input_center"], info["input_radius"], info["injection"]
        n = Q.shape[-1] // 2
        P64, B64 = getattr(self, self.implicit).astype(np.float64), self.B.astype(np.float64)
        K_s = self._apply_implicit(np.abs(P64), np.abs(x_c) + x_r)
        B_s = self._inject(np.abs(B64), np.abs(U_c) + U_r)
        # The box of A x* is the same enclosing interval product as the injection's (both maps are the
        # models' one linear-map hook); each sum with [q_lo, q_hi] rounds by at most half an ulp.
        AX = self._embedded_injection(x_c, x_r, P64, 0.0, rounding=True)
        Z_lo, Z_hi = np.nextafter(AX[..., :n] + Q[..., :n], -np.inf), np.nextafter(AX[..., n:] + Q[..., n:], np.inf)
        Z_lo, Z_hi = narrow_preactivation_box(Z_lo, Z_hi, X_lo, X_hi)[:2]
        KT, BT, b64 = self._transposed(P64), self._transposed(B64), self.b.astype(np.float64)
        step = max(1, 2_000_000 // (n_out * x_c[0].size))   # bounds each (step, n_out, *state) array to 16 MB
        for s in range(0, m, step):
            rows = slice(s, s + step)
            k = len(beta[rows])
            nu = self._features_grad(W[rows].reshape(k * n_out, -1)).reshape((k, n_out) + x_c.shape[1:])
            box = dict(x_c=x_c[rows], x_r=x_r[rows], u_c=U_c[rows], u_r=U_r[rows], z_lo=Z_lo[rows], z_hi=Z_hi[rows],
                       b=b64, K_s=K_s[rows], B_s=B_s[rows])
            L = unrolled_lower_bounds(nu, beta[rows], box, lambda V: self._apply_implicit(KT, V),
                                      lambda V: self._inject(BT, V), steps)
            M[rows] = np.maximum(M[rows], L)
        M[np.arange(m), labels] = 0.0
        return M, info

    def certified_loss_and_grad(self, U, y, U_lo, U_hi, kappa, *, tol=1e-6, max_iter=500, method="average",
                                alpha=None, adjoint="iterative", adjoint_tol=None, on_violation="raise",
                                return_info=False, tol_mode="absolute", X0=None, box0=None):
        """The IBP-style loss ``kappa CE(y(U)) + (1 - kappa) CE(-m_lo)`` (Gowal et al. 2018) and its
        gradients (keyed as :meth:`loss_and_grad`'s); m_lo (m, n_out) are the lower bounds of
        y_k - y_j over the boxes [U_lo, U_hi] (DESIGN.md, "Certified training").

        The robust part goes through the hidden read-out layer's box (:func:`nemon_np.readout.hidden_box`
        and its gradient) when there is one, and through the embedded fixed point by the implicit
        method: with the margins' gradient g = dL/d[x_lo, x_hi], the adjoint w = g + E^T D w of the embedded network,
        delta = D w, dL/dE = delta [x_lo, x_hi]^T folded onto A by :func:`fold_embedded_grad`, and
        dL/dB = (delta_lo + delta_hi) u_c^T + sign(B) (delta_hi - delta_lo) u_r^T. Solver options as
        for :meth:`loss_and_grad`; the bounds here are the solver's, not widened (for training, not
        for certificates). ``X0`` and ``box0`` start the forward and the embedded solves (default
        zeros; :class:`nemon_np.warm_starts.WarmStarts` keeps each training sample's last ones).
        ``return_info`` adds {"forward", "backward", "state", "embedded", "embedded_backward", "box",
        "margins"}: "state" and "box" are the fixed points and the embedded network's [x_lo, x_hi].
        """
        if not 0 <= kappa <= 1:
            raise ValueError(f"kappa must lie in [0, 1], got {kappa!r}")
        solver = dict(tol=tol, max_iter=max_iter, method=method, alpha=alpha, tol_mode=tol_mode)
        loss, grads, info = self.loss_and_grad(U, y, adjoint=adjoint, adjoint_tol=adjoint_tol, return_info=True,
                                               on_violation=on_violation, X0=X0, **solver)
        if kappa == 1:
            return (loss, grads, info) if return_info else (loss, grads)
        self._check_interval()
        lo, hi = self._state_inputs(U_lo, self.dtype), self._state_inputs(U_hi, self.dtype)
        U_c, U_r = center_radius(lo, hi)
        if U_c.shape[0] != len(y) or np.any(U_r < 0):
            raise ValueError(f"U_lo and U_hi must hold {len(y)} boxes with U_lo <= U_hi")
        X, finfo = self.embedded_box(U_c, U_r, tol, max_iter, method, alpha, tol_mode, box0)
        n = X.shape[-1] // 2
        F_c, F_r = center_radius(self._features(X[..., :n]), self._features(X[..., n:]))
        robust, M, dF_c, dF_r, readout_grads = self._robust_readout_loss(F_c, F_r, y)
        G = np.concatenate([self._features_grad((dF_c - dF_r) / 2), self._features_grad((dF_c + dF_r) / 2)], axis=-1)
        robust_grads, binfo = self.embedded_box_backward(G, X, finfo, U_c, U_r, tol, max_iter, adjoint, adjoint_tol)
        robust_grads.update(readout_grads)
        total = kappa * loss + (1 - kappa) * robust
        grads = {k: (kappa * g + (1 - kappa) * robust_grads[k]).astype(self.dtype) for k, g in grads.items()}
        if not return_info:
            return total, grads
        info.update(embedded=finfo, embedded_backward=binfo, box=X, margins=M, robust_loss=robust)
        return total, grads, info
