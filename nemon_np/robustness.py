"""l_inf robustness of NEMON models: the input-output Lipschitz bound.

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

__all__ = ["lipschitz_bound", "lipschitz_bound_and_grad", "smooth_lipschitz_bound_and_grad", "solver_options_for",
           "to_inputs", "attack", "certified_correct", "empirical_lipschitz", "robustness_report", "plot_report",
           "ATTACKS"]

ATTACKS = ("noise", "fgsm", "pgd")


def _io_rows(model):
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
    ``||C~||_inf ||B~||_inf / (1 - max(mu, 0))`` with the forms of :func:`_io_rows` (for a
    :class:`ConvNEMON`, ||B||_inf is the convolution's norm, :func:`nemon_np.conv.conv_input_norm`).

    Raises ``ValueError`` when the model is not well-posed (mu_inf(A) >= 1): no bound holds.
    """
    mu = model.mu_inf()
    if mu >= 1.0:
        raise ValueError(f"mu_inf(A) = {mu:.6g} >= 1: the model is not certified well-posed, no Lipschitz bound")
    Bt, Ct, _, _ = _io_rows(model)
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
    :func:`_io_rows`), the subgradient uses the maximizing rows: dn_B/dB~ = sign of B~'s
    largest row, likewise for C~, and dmu/dA from :func:`_measure_subgradient` (zero when
    mu <= 0). The weights eta are held fixed.
    Returns (L, {"A" or "K": dL/dA, "B": dL/dB, "C": dL/dC}).
    """
    L = lipschitz_bound(model)
    Bt, Ct, to_B, to_C = _io_rows(model)
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
    Bt, Ct, to_B, to_C = _io_rows(model)
    nB, nC = norm_inf(Bt), norm_inf(Ct)
    denom = 1.0 - max(model.gamma, 0.0)
    name, P = _implicit(model)
    dt = model.dtype
    grads = {name: np.zeros_like(P), "B": to_B(nB / denom * _row_subgradient(Bt)).astype(dt),
             "C": to_C(nC / denom * _row_subgradient(Ct)).astype(dt)}
    return (nB ** 2 + nC ** 2) / (2 * denom), grads


# -- attacks and certificates, in pixel units -------------------------------------------------------

def solver_options_for(model, tol=None, max_iter=1000):
    """Forward/adjoint solvers certified for ``model``: monDEQ models (metadata certificate
    "mu_2") use Peaceman-Rachford and the direct adjoint, NEMON models the average iteration.
    Default tolerance 1e-4 in float32 (whose rounding stalls solves near 1e-5), 1e-8 in float64."""
    if tol is None:
        tol = 1e-4 if model.dtype == np.float32 else 1e-8
    if model.metadata.get("certificate") == "mu_2":
        return dict(tol=tol, max_iter=max_iter, method="peaceman-rachford", adjoint="direct")
    return dict(tol=tol, max_iter=max_iter, method="average", adjoint="iterative")


def _channel_stats(model, n_features):
    mean = np.atleast_1d(np.asarray(model.metadata.get("mean", 0.0), np.float64))
    std = np.atleast_1d(np.asarray(model.metadata.get("std", 1.0), np.float64))
    per = n_features // len(mean)
    return np.repeat(mean, per), np.repeat(std, per)


def to_inputs(model, pixels):
    """Model inputs ``(pixels - mean) / std`` from pixels in [0, 1], shape (m, features), per channel
    (channel-major layout, as :func:`nemon_np.data.normalize`)."""
    pixels = np.asarray(pixels, np.float64)
    mean, std = _channel_stats(model, pixels.shape[1])
    return ((pixels - mean) / std).astype(model.dtype)


def _ce_pixel_grad(model, P, y, options):
    """Gradient of each sample's own cross-entropy with respect to its pixels."""
    U = to_inputs(model, P)
    _, std = _channel_stats(model, P.shape[1])
    return model.input_grad(U, y, **options) * len(P) / std


def attack(model, pixels, labels, eps, kind="pgd", steps=10, step_size=None, seed=0, options=None):
    """Perturbed pixels within the l_inf ball of radius ``eps`` around ``pixels``, clipped to [0, 1].

    kind: "noise" (uniform in the ball), "fgsm" (one signed-gradient step of size eps) or "pgd"
    (random start in the ball, then ``steps`` signed-gradient steps of ``step_size``, default
    2.5 eps / steps, each projected back onto the ball and [0, 1]; the iterate with the highest
    loss per sample is kept). Gradients are the model's implicit input gradients.
    """
    if kind not in ATTACKS:
        raise ValueError(f"unknown attack {kind!r}; choose one of {', '.join(ATTACKS)}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    P = np.asarray(pixels, np.float64)
    options = options or solver_options_for(model)
    rng = np.random.default_rng(seed)
    lo, hi = np.maximum(P - eps, 0.0), np.minimum(P + eps, 1.0)
    if kind == "noise":
        return np.clip(P + rng.uniform(-eps, eps, size=P.shape), lo, hi)
    if kind == "fgsm":
        return np.clip(P + eps * np.sign(_ce_pixel_grad(model, P, labels, options)), lo, hi)
    step_size = 2.5 * eps / steps if step_size is None else step_size
    X = np.clip(P + rng.uniform(-eps, eps, size=P.shape), lo, hi)
    best, best_loss = X.copy(), np.full(len(P), -np.inf)
    fwd = {k: v for k, v in options.items() if k not in ("adjoint",)}
    for _ in range(steps + 1):
        logits = model.logits(to_inputs(model, X), **fwd).astype(np.float64)
        z = logits - logits.max(axis=1, keepdims=True)
        loss = np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(P)), labels]
        better = loss > best_loss
        best[better], best_loss[better] = X[better], loss[better]
        X = np.clip(X + step_size * np.sign(_ce_pixel_grad(model, X, labels, options)), lo, hi)
    return best


def certified_correct(model, pixels, labels, eps, options=None):
    """Samples whose prediction is correct and provably constant in the l_inf ball of radius ``eps``
    (pixel units): y_k - y_j > ||(c_k - c_j) diag(eta)||_1 ||diag(eta)^-1 B||_inf eps_u / (1 - max(mu, 0))
    for every j != k, eps_u = eps / std (DESIGN.md); for conv models with the forms of :func:`_io_rows`.
    All False when mu_inf(A) >= 1 (no certificate).
    """
    P = np.asarray(pixels, np.float64)
    options = options or solver_options_for(model)
    fwd = {k: v for k, v in options.items() if k not in ("adjoint",)}
    Y = model.logits(to_inputs(model, P), **fwd).astype(np.float64)
    correct = Y.argmax(axis=1) == labels
    mu = model.mu_inf()
    if mu >= 1:
        return np.zeros(len(P), bool)
    _, std = _channel_stats(model, P.shape[1])
    Bt, Cw, _, _ = _io_rows(model)
    nB = norm_inf(Bt)
    eps_u = eps / std.min()
    # ||(c_k - c_j) diag(eta)||_1 for every pair (k, j).
    pair = np.abs(Cw[:, None, :] - Cw[None, :, :]).sum(axis=2)
    radius = pair * nB * eps_u / (1.0 - max(mu, 0.0))
    k = labels
    margins = Y[np.arange(len(P)), k][:, None] - Y
    need = radius[k]
    need[np.arange(len(P)), k] = -np.inf
    return correct & np.all(margins > need, axis=1)


def empirical_lipschitz(model, pixels, radius=1e-3, steps=3, options=None):
    """A lower bound of the l_inf -> l_inf Lipschitz constant of u -> y (normalized-input units):
    for every sample and logit k, signed-gradient ascent of |y_k(u + d) - y_k(u)| over ||d||_inf <= radius,
    the largest ratio |dy_k| / ||d||_inf found. Every ratio is realized by two actual forward solves."""
    options = options or solver_options_for(model, tol=1e-10)
    fwd = {k: v for k, v in options.items() if k not in ("adjoint",)}
    U = to_inputs(model, pixels).astype(np.float64)
    if model.dtype != np.float64:
        raise ValueError("empirical_lipschitz needs a float64 model (differences of 1e-3 are lost in float32)")
    Y0 = model.logits(U, **fwd)
    best = 0.0
    for k in range(model.n_out):
        for sign in (1.0, -1.0):
            E = np.zeros((len(U), model.n_out))
            E[:, k] = sign
            D = np.zeros_like(U)
            for _ in range(steps):
                D = np.clip(D + radius * np.sign(model.input_vjp(U + D, E, **options)), -radius, radius)
            dy = np.abs(model.logits(U + D, **fwd)[:, k] - Y0[:, k])
            du = np.abs(D).max(axis=1)
            ok = du > 0
            if ok.any():
                best = max(best, float((dy[ok] / du[ok]).max()))
    return best


def robustness_report(model, pixels, labels, eps_list=(0.0, 0.01, 0.02, 0.05, 0.1), pgd_steps=10, seed=0,
                      lipschitz_samples=50, progress=None):
    """Accuracy under each attack at each eps (pixel units), certified accuracy, the Lipschitz bound
    and an empirical lower bound of the Lipschitz constant, as one dict."""
    options = solver_options_for(model)
    fwd = {k: v for k, v in options.items() if k not in ("adjoint",)}
    P = np.asarray(pixels, np.float64)
    labels = np.asarray(labels)
    acc = lambda X: float(np.mean(model.predict(to_inputs(model, X), **fwd) == labels))  # noqa: E731
    report = {"clean_acc": acc(P), "eps": list(eps_list), "attacks": {}, "certified": []}
    for kind in ATTACKS:
        report["attacks"][kind] = []
        for eps in eps_list:
            X = attack(model, P, labels, eps, kind, steps=pgd_steps, seed=seed, options=options)
            report["attacks"][kind].append(acc(X))
            if progress:
                progress()
    report["certified"] = [float(np.mean(certified_correct(model, P, labels, eps, options))) for eps in eps_list]
    mu = model.mu_inf()
    report["mu_inf"] = mu
    report["lipschitz_bound"] = lipschitz_bound(model) if mu < 1 else None
    m64 = model if model.dtype == np.float64 else _as_float64(model)
    report["lipschitz_empirical"] = empirical_lipschitz(m64, P[:lipschitz_samples])
    return report


def plot_report(report, path, title=""):
    """One figure of a :func:`robustness_report`: accuracy against the l_inf radius for each attack,
    and the certified accuracy, which every attack must stay above."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.2))
    eps = report["eps"]
    labels = {"noise": "uniform noise", "fgsm": "FGSM", "pgd": "PGD (random start)"}
    for kind in ATTACKS:
        ax.plot(eps, [100 * a for a in report["attacks"][kind]], marker="o", label=labels[kind])
    ax.plot(eps, [100 * a for a in report["certified"]], marker="s", color="k", ls="--",
            label="certified (Lipschitz bound)")
    ax.set(xlabel="l_inf radius eps (pixels in [0, 1])", ylabel="accuracy (%)", ylim=(-2, 102), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _as_float64(model):
    import copy
    m = copy.copy(model)
    m.dtype = np.float64
    for k, v in model.params().items():
        setattr(m, k, v.astype(np.float64))
    return m


def main(argv=None):
    """``python -m nemon_np.robustness RUN_DIR``: attacks, certificate and Lipschitz bounds of a run."""
    import json
    import pathlib

    from tqdm.auto import tqdm

    from ._cli import OneLineErrorParser, load_run

    p = OneLineErrorParser(prog="python -m nemon_np.robustness",
                           description="Accuracy of a trained model under l_inf perturbations of its test images "
                                       "(pixel units, [0, 1] images): uniform noise, FGSM and PGD through the "
                                       "model's implicit input gradient; certified accuracy from the Lipschitz "
                                       "bound; and an empirical lower bound of the Lipschitz constant.")
    p.add_argument("run_dir", help="a folder written by python -m nemon_np.train (or its model.npz)")
    p.add_argument("--data-dir", default=None, help="folder with the data set (as for training)")
    p.add_argument("--samples", type=int, default=1000, help="test images used (the first N)")
    p.add_argument("--eps", type=float, nargs="+", default=[0.0, 0.01, 0.02, 0.05, 0.1],
                   help="radii in pixel units")
    p.add_argument("--pgd-steps", type=int, default=10, help="PGD steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the random starts and noise")
    p.add_argument("--out", default=None, help="write the report as JSON here (default RUN_DIR/robustness.json)")
    args = p.parse_args(argv)
    if args.samples < 1 or args.pgd_steps < 1 or min(args.eps) < 0:
        p.error("--samples and --pgd-steps must be >= 1 and every --eps >= 0")
    model, data, model_path = load_run(p, args.run_dir, args.data_dir)
    images = data.test_images[:args.samples]
    pixels = images.reshape(len(images), -1).astype(np.float64) / 255.0
    bar = tqdm(total=len(ATTACKS) * len(args.eps), desc="attacks", unit="attack")
    report = robustness_report(model, pixels, data.test_labels[:args.samples], tuple(args.eps), args.pgd_steps,
                               args.seed, progress=bar.update)
    bar.close()
    print(f"{model}, {len(pixels)} test images, clean accuracy {100 * report['clean_acc']:.2f}%")
    print(f"{'eps (pixels)':>12s} " + " ".join(f"{e:>7g}" for e in args.eps))
    for kind in ATTACKS:
        print(f"{kind:>12s} " + " ".join(f"{100 * a:6.2f}%" for a in report["attacks"][kind]))
    print(f"{'certified':>12s} " + " ".join(f"{100 * a:6.2f}%" for a in report["certified"]))
    bound = report["lipschitz_bound"]
    print(f"Lipschitz bound {bound:.4g}" if bound is not None else "Lipschitz bound: none (mu_inf(A) >= 1)",
          f"(normalized-input units); empirical lower bound {report['lipschitz_empirical']:.4g}")
    out = pathlib.Path(args.out) if args.out else model_path.parent / "robustness.json"
    out.write_text(json.dumps(report, indent=2))
    figure = out.with_suffix(".png")
    plot_report(report, figure, f"{type(model).__name__} on {model.metadata.get('dataset', '?')}, "
                                f"{len(pixels)} test images")
    print(f"wrote {out} and {figure}")
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
