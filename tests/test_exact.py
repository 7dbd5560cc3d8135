"""Exact verification (nemon_np.exact) against a dense grid search of two-input models, the lp bound
between crown and exact, and exact as the soundness oracle of every other certificate."""
import numpy as np
import pytest

from nemon_np import ConvNEMON
from nemon_np.certificates import ExactCertificate, certify
from nemon_np.pixels import to_inputs
from nemon_np.stack import StackedClassifier

from conftest import conv_as_dense, random_model

TOL = dict(tol=1e-10)


def _model(seed, readout_hidden=0, dtype=np.float64, weights=None):
    """Two inputs, 6 units, 3 classes; inputs (and a hidden read-out layer) scaled up so that at eps
    0.1 some balls are robust and some are not (seeds 2, 4; 3 with the hidden layer)."""
    model = random_model(2, 6, 3, 0.7, seed=seed, readout_hidden=readout_hidden, dtype=dtype, weights=weights)
    model.B = (3 * model.B).astype(dtype)
    if readout_hidden:
        model.H = (3 * model.H).astype(dtype)
    return model


def _images(model, seed, m=12):
    """m images and the labels the model predicts for them (the fixed point solved in float64)."""
    P = np.random.default_rng(seed).uniform(0.2, 0.8, size=(m, 2))
    return P, model.astype(np.float64).predict(to_inputs(model, P, np.float64), tol=1e-12)


def _grid_robust(model, P, y, eps, n=151):
    """Whether every point of an n^d grid over each ball (d inputs, clipped to [0, 1]) keeps the label."""
    g = np.linspace(-eps, eps, n)
    G = np.stack(np.meshgrid(*[g] * P.shape[1]), -1).reshape(-1, P.shape[1])
    return np.array([np.all(model.predict(to_inputs(model, np.clip(p + G, 0, 1)), tol=1e-12) == k)
                     for p, k in zip(P, y)])


def _margin_at(model, pixels, k):
    Y = model.astype(np.float64).logits(to_inputs(model, pixels[None], np.float64), tol=1e-12)[0]
    return np.delete(Y[k] - Y, k).min()


@pytest.mark.parametrize("seed,readout_hidden", [(2, 0), (3, 4)])
def test_exact_decides_every_image_and_agrees_with_a_grid_search(seed, readout_hidden):
    model = _model(seed, readout_hidden)
    P, y = _images(model, seed)
    eps = 0.08
    res = certify(model, P, y, eps, "exact", **TOL)
    robust = _grid_robust(model, P, y, eps)
    assert set(res.status) <= {"certified", "falsified"}   # complete: nothing left unknown
    assert np.all(res.certified <= robust)                 # a certified ball has no grid point that flips
    assert np.any(res.status == "certified") and np.any(res.status == "falsified")
    for i in np.flatnonzero(res.status == "falsified"):   # counterexamples lie in the ball and flip the label
        cx = res.counterexamples[i]
        assert np.all(np.abs(cx - P[i]) <= eps + 1e-12) and np.all((cx >= 0) & (cx <= 1))
        assert _margin_at(model, cx, y[i]) <= 0 and res.counterexample_margins[i] <= 0
    assert np.all(np.isnan(res.counterexamples[res.status == "certified"]))


@pytest.mark.parametrize("arch,seed,scale", [("dense6,relu,nemon5,dense4,relu", 4, 10),
                                             ("dense6,bn,relu,nemon5", 4, 4)])
def test_exact_on_a_stack_of_dense_layers_agrees_with_a_grid_search(arch, seed, scale):
    """Dense layers before and after the implicit layer (batch normalization at evaluation too); the
    weights scaled up so that at eps 0.1 some balls are robust and some are not."""
    rng = np.random.default_rng(7)
    model = StackedClassifier(arch, (2,), 3, gamma=0.7, seed=seed, dtype=np.float64)
    for layer in model.layers:
        if "b" in layer.params():
            layer.b[...] = 0.3 * rng.normal(size=layer.b.shape)
        if "W" in layer.params():
            layer.W *= scale if layer is model.layers[0] else 2
        if "running_var" in layer.buffers():
            layer.running_mean, layer.running_var = rng.normal(size=6) * 0.3, rng.uniform(0.5, 2.0, 6)
    P = rng.uniform(0.2, 0.8, size=(12, 2))
    y = model.predict(to_inputs(model, P, np.float64), tol=1e-12)
    res = certify(model, P, y, 0.1, "exact", **TOL)
    robust = _grid_robust(model, P, y, 0.1)
    assert set(res.status) <= {"certified", "falsified"} and np.all(res.certified <= robust)
    assert np.any(res.status == "certified") and np.any(res.status == "falsified")
    for i in np.flatnonzero(res.status == "falsified"):
        assert _margin_at(model, res.counterexamples[i], y[i]) <= 0
    crown = certify(model, P, y, 0.1, "crown", **TOL)
    assert np.all(crown.certified <= res.certified)
    # Programs over interval boxes, not narrowed ones: the same answers, with no fewer binaries.
    wide = certify(model, P, y, 0.1, ExactCertificate(narrow=False), **TOL)
    np.testing.assert_array_equal(wide.status, res.status)
    solved = (wide.binaries > 0) & (res.binaries > 0)
    assert np.all(res.binaries[solved] <= wide.binaries[solved])


def _conv_reference(x, W, b, stride, padding):
    """A channel-last convolution (H, W, C_in) -> (Ho, Wo, C_out) by its defining sum, loop by loop."""
    k = W.shape[0]
    xp = np.pad(x, ((padding, padding), (padding, padding), (0, 0)))
    Ho, Wo = (xp.shape[0] - k) // stride + 1, (xp.shape[1] - k) // stride + 1
    out = np.empty((Ho, Wo, W.shape[3]))
    for p in range(Ho):
        for q in range(Wo):
            out[p, q] = np.einsum("aec,aeco->o", xp[stride * p:stride * p + k, stride * q:stride * q + k], W) + b
    return out


@pytest.mark.parametrize("token,shape", [("conv4k3s1p1", (2, 5, 4)), ("conv3k4s2p1", (3, 6, 7)),
                                         ("conv2k2s1p0", (1, 3, 3))])
def test_a_convolutions_sparse_matrix_is_the_convolution(token, shape):
    """Conv2d's mixed-integer form is its sparse matrix on flat channel-last states: against the defining
    sum, strides, zero padding and several input channels included."""
    model = StackedClassifier(token, shape, 2, seed=3, dtype=np.float64)
    conv = model.layers[0]
    conv.b[...] = np.random.default_rng(0).normal(size=conv.b.shape)
    x = np.random.default_rng(1).normal(size=shape[1:] + shape[:1])
    M = conv.sparse_matrix()
    assert M.nnz <= M.shape[0] * conv.kernel ** 2 * shape[0]
    reference = _conv_reference(x, conv.W, conv.b, conv.stride, conv.padding)
    np.testing.assert_allclose((M @ x.ravel()).reshape(reference.shape) + conv.b, reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_exact_on_a_stack_with_convolutions_agrees_with_a_grid_search(dtype):
    """Convolutions before the implicit layer, on 2-channel 2 x 2 images normalized per channel: the
    program reads the inputs channel-major and the convolutions channel-last. Certified balls have no
    grid point that flips the label, falsified ones a counterexample in the ball, and crown's are certified."""
    rng = np.random.default_rng(5)
    model = StackedClassifier("conv3k2s1p1,relu,conv2k2s1p0,relu,nemon5", (2, 2, 1), 3, gamma=0.7, seed=2,
                              dtype=np.float64)
    for layer in model.layers:
        if "b" in layer.params():
            layer.b[...] = 0.3 * rng.normal(size=layer.b.shape)
        if "W" in layer.params():
            layer.W *= 6 if layer is model.layers[0] else 2
    model = model.astype(dtype)
    model.metadata.update(mean=np.array([0.4, 0.5]), std=np.array([0.3, 0.6]))
    P = rng.uniform(0.2, 0.8, size=(12, 4))
    y = model.astype(np.float64).predict(to_inputs(model, P, np.float64), tol=1e-12)
    res = certify(model, P, y, 0.1, "exact", **TOL)
    assert set(res.status) <= {"certified", "falsified"}
    assert np.any(res.status == "certified") and np.any(res.status == "falsified")
    model64 = model.astype(np.float64)   # the stored parameters in float64, as exact decides them
    assert np.all(res.certified <= _grid_robust(model64, P, y, 0.1, n=9))
    for i in np.flatnonzero(res.status == "falsified"):
        cx = res.counterexamples[i]
        assert np.all(np.abs(cx - P[i]) <= 0.1 + 1e-12) and _margin_at(model64, cx, y[i]) <= 0
    crown = certify(model, P, y, 0.1, "crown", **TOL)
    assert np.all(crown.certified <= res.certified)


def test_a_misclassified_image_is_falsified_by_itself():
    model = _model(2)
    P, y = _images(model, 2, m=3)
    wrong = (y + 1) % model.n_out
    res = certify(model, P, wrong, 0.01, "exact", **TOL)
    assert list(res.status) == ["falsified"] * 3 and np.array_equal(res.counterexamples, P)


@pytest.mark.parametrize("seed", [2, 4])
def test_lp_lies_between_crown_and_exact(seed):
    model = _model(seed)
    P, y = _images(model, seed)
    for eps in (0.03, 0.08):
        crown = certify(model, P, y, eps, "crown", **TOL)
        lp = certify(model, P, y, eps, "lp", **TOL)
        exact = certify(model, P, y, eps, "exact", **TOL)
        assert np.all(lp.margins >= crown.margins - 1e-7)
        assert np.all(crown.certified <= lp.certified) and np.all(lp.certified <= exact.certified)
        assert "falsified" not in set(lp.status)   # a relaxation proves or says nothing
        done = exact.status == "certified"
        assert np.all(exact.margins[done] >= lp.margins[done] - 1e-7)
    assert np.any(lp.margins > crown.margins + 1e-6)   # the triangle relaxation is tighter somewhere


@pytest.mark.parametrize("kind", ["float64", "float32", "weighted", "hidden"])
def test_no_certificate_certifies_an_image_that_exact_falsifies(kind):
    """Exact as the oracle: every image that lipschitz, interval, crown, crown-full, combined or lp certifies is not
    falsified (in float32 the counterexample is re-solved for the stored parameters in float64)."""
    dtype = np.float32 if kind == "float32" else np.float64
    weights = np.random.default_rng(0).uniform(0.5, 2.0, 6) if kind == "weighted" else None
    seed = 3 if kind == "hidden" else 2
    model = _model(seed, readout_hidden=4 if kind == "hidden" else 0, dtype=dtype, weights=weights)
    P, y = _images(model, seed, m=16)
    for eps in (0.03, 0.1):
        exact = certify(model, P, y, eps, "exact", **TOL)
        assert np.any(exact.status == "falsified") or eps < 0.1   # the check is not vacuous
        for name in ("lipschitz", "interval", "crown", "crown-full", "combined", "lp"):
            res = certify(model, P, y, eps, name, **TOL)
            assert not np.any(res.certified & (exact.status == "falsified")), name


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_no_certificate_of_a_conv_model_certifies_what_exact_falsifies_on_it_written_densely(dtype):
    """A conv NEMON (2 x 4 x 4 inputs, 3 channels, normalized per channel) is a dense NEMON through
    conv_matrix: exact on the dense form of its stored parameters is the oracle of every certificate
    of the conv form, float32 included."""
    from nemon_np.conv import mu_inf_conv
    rng = np.random.default_rng(1)
    conv = ConvNEMON(2, (4, 4), channels=3, kernel=3, n_out=3, pool=2, gamma=0.9, seed=1, dtype=dtype)
    K = rng.normal(size=conv.K.shape)
    conv.K, conv.b = (K * 0.6 / mu_inf_conv(np.abs(K))).astype(dtype), (0.3 * rng.normal(size=3)).astype(dtype)
    conv.B = (3 * conv.B).astype(dtype)
    conv.metadata.update(mean=np.array([0.4, 0.5]), std=np.array([0.3, 0.6]))
    dense = conv_as_dense(conv.astype(np.float64))
    dense.metadata = dict(conv.metadata)
    P = rng.uniform(0.2, 0.8, size=(12, conv.n_in))
    y = dense.predict(to_inputs(dense, P), tol=1e-12)
    falsified = 0
    for eps in (0.03, 0.1):
        exact = certify(dense, P, y, eps, "exact", **TOL)
        falsified += np.sum(exact.status == "falsified")
        for name in ("lipschitz", "interval", "crown", "crown-full", "combined"):
            res = certify(conv, P, y, eps, name, **TOL)
            assert not np.any(res.certified & (exact.status == "falsified")), name
    assert falsified > 0   # the check is not vacuous


def test_an_image_out_of_time_is_unknown_never_certified():
    model = _model(2)
    P, y = _images(model, 2)
    crown = certify(model, P, y, 0.08, "crown", **TOL)
    res = certify(model, P, y, 0.08, ExactCertificate(time_limit=1e-9), **TOL)
    left = ~crown.certified & (res.status != "falsified")
    assert np.any(left) and np.all(res.status[left] == "unknown") and not np.any(res.certified[left])
    assert np.array_equal(res.certified[crown.certified], crown.certified[crown.certified])


@pytest.mark.parametrize("name", ["exact", "lp"])
def test_a_solve_that_ends_with_no_solution_leaves_the_image_unknown(name, monkeypatch):
    """HiGHS can end a solve with status UNKNOWN, which cvxpy reports as ValueError("Cannot unpack invalid
    solution") (seen on an LP of a conv stack): the pairs stay open, the image is unknown, the run goes on."""
    import cvxpy as cp
    model = _model(2)
    P, y = _images(model, 2)
    crown = certify(model, P, y, 0.08, "crown", **TOL)

    def fails(self, *args, **kwargs):
        raise ValueError("Cannot unpack invalid solution: Solution(status=UNKNOWN, ...)")
    monkeypatch.setattr(cp.Problem, "solve", fails)
    res = certify(model, P, y, 0.08, ExactCertificate(time_limit=10, attack_steps=0) if name == "exact" else name,
                  **TOL)
    left = ~crown.certified & (res.status != "falsified")
    assert np.any(left) and np.all(res.status[left] == "unknown")
    assert np.array_equal(res.certified, crown.certified)

    def breaks(self, *args, **kwargs):
        raise ValueError("some other error")
    monkeypatch.setattr(cp.Problem, "solve", breaks)
    with pytest.raises(ValueError, match="some other error"):   # other errors are not swallowed
        certify(model, P, y, 0.08, name, **TOL)


def test_processes_share_the_images_with_the_same_results():
    model = _model(4)
    P, y = _images(model, 4)
    one = certify(model, P, y, 0.1, "exact", **TOL)
    two = certify(model, P, y, 0.1, ExactCertificate(n_jobs=2), **TOL)
    assert np.array_equal(one.status, two.status) and np.array_equal(one.certified, two.certified)
    assert np.array_equal(np.isnan(one.counterexamples), np.isnan(two.counterexamples))
    np.testing.assert_allclose(one.margins, two.margins, rtol=1e-9, atol=1e-9)


def test_a_cached_verification_resumes_without_solving_decided_images_again(tmp_path, monkeypatch):
    """Every decided image is kept as it finishes; a rerun reads those back (the solver is not called
    for them: here it would raise), solves only the unknown ones, and a changed model reads nothing."""
    import nemon_np.exact as exact_module
    model = _model(4)
    P, y = _images(model, 4)
    first = certify(model, P, y, 0.1, ExactCertificate(cache=tmp_path / "cache"), **TOL)
    decided = first.status != "unknown"
    assert len(list((tmp_path / "cache").glob("*.npz"))) == decided.sum() > 0

    def no_solver(*args, **kwargs):
        raise AssertionError("a cached image was solved again")
    monkeypatch.setattr(exact_module, "verify_exact", no_solver)
    again = certify(model, P, y, 0.1, ExactCertificate(cache=tmp_path / "cache"), **TOL)
    for key in ("status", "certified", "counterexample_margins"):
        np.testing.assert_array_equal(getattr(again, key), getattr(first, key))
    np.testing.assert_array_equal(again.margins, first.margins)
    changed = _model(4)
    changed.A = (0.9 * changed.A).astype(changed.A.dtype)
    with pytest.raises(AssertionError, match="solved again"):
        certify(changed, P, y, 0.1, ExactCertificate(cache=tmp_path / "cache"), **TOL)
    with pytest.raises(AssertionError, match="solved again"):
        certify(model, P, y, 0.09, ExactCertificate(cache=tmp_path / "cache"), **TOL)


def test_an_unknown_image_is_read_back_only_by_a_run_that_tries_no_harder(tmp_path, monkeypatch):
    import nemon_np.exact as exact_module
    model = _model(2)
    P, y = _images(model, 2)
    quick = dict(time_limit=1e-9, attack_steps=0, narrow=False, cache=tmp_path)
    res = certify(model, P, y, 0.08, ExactCertificate(**quick), **TOL)
    assert np.any(res.status == "unknown")
    assert len(list(tmp_path.glob("*.npz"))) == len(y)

    def no_solver(*args, **kwargs):
        raise AssertionError("solved again")
    monkeypatch.setattr(exact_module, "verify_exact", no_solver)
    again = certify(model, P, y, 0.08, ExactCertificate(**quick), **TOL)
    np.testing.assert_array_equal(again.status, res.status)
    for harder in (dict(time_limit=1.0), dict(attack_steps=5), dict(narrow=True)):
        with pytest.raises(AssertionError, match="solved again"):
            certify(model, P, y, 0.08, ExactCertificate(**{**quick, **harder}), **TOL)


def test_the_attack_falsifies_before_any_program_and_changes_no_answer():
    """With no time for a program, PGD's points alone falsify the images it breaks (each counterexample
    re-solved and in the ball); with time, the statuses are those without the attack."""
    model = _model(4)
    P, y = _images(model, 4)
    eps = 0.1
    quick = certify(model, P, y, eps, ExactCertificate(time_limit=1e-9, attack_steps=20), **TOL)
    none = certify(model, P, y, eps, ExactCertificate(time_limit=1e-9, attack_steps=0), **TOL)
    attacked = (quick.status == "falsified") & (none.status != "falsified")
    assert np.any(attacked)
    for i in np.flatnonzero(attacked):
        cx = quick.counterexamples[i]
        assert np.all(np.abs(cx - P[i]) <= eps + 1e-12) and np.all((cx >= 0) & (cx <= 1))
        assert _margin_at(model, cx, y[i]) <= 0 and quick.counterexample_margins[i] <= 0
    full = certify(model, P, y, eps, ExactCertificate(attack_steps=20), **TOL)
    plain = certify(model, P, y, eps, ExactCertificate(attack_steps=0), **TOL)
    np.testing.assert_array_equal(full.status, plain.status)
    with pytest.raises(ValueError, match="attack_steps must be a whole number"):
        ExactCertificate(attack_steps=-1)


def test_bad_inputs_are_one_line_errors():
    model = _model(2)
    P, y = _images(model, 2, m=2)
    with pytest.raises(ValueError, match="n_jobs must be >= 1"):
        ExactCertificate(n_jobs=0)
    with pytest.raises(ValueError, match="time_limit must be a positive number"):
        certify(model, P, y, 0.1, ExactCertificate(time_limit=0), **TOL)
    conv = ConvNEMON(1, (4, 4), channels=2, kernel=3, n_out=3, pool=2, gamma=0.5)
    with pytest.raises(ValueError, match="handles dense NEMONs and stacks, got ConvNEMON"):
        certify(conv, np.full((1, 16), 0.5), [0], 0.1, "exact")
    stack = StackedClassifier("conv2k3s1p1,relu,cnemon2k3,pool2,dense3", (1, 4, 4), 3)
    with pytest.raises(ValueError, match="cnemon2k3.* has no mixed-integer form"):
        certify(stack, np.full((1, 16), 0.5), [0], 0.1, "exact")


def test_radii_bracket_the_exact_radius():
    """crown's radius <= exact's lower end <= PGD's radius; exact's bracket is tol wide where decided, a
    grid over the ball of the lower radius keeps the label and exact's upper end is a real
    counterexample's distance."""
    from nemon_np.radius import attack_radius, certified_radius, exact_radius
    model = _model(2)
    P, y = _images(model, 2, m=6)
    tol = 0.004
    crown = certified_radius(model, P, y, "crown", eps_max=0.3, resolution=tol, **TOL)
    lower, upper = exact_radius(model, P, y, eps_max=0.3, resolution=tol, **TOL)
    pgd = attack_radius(model, P, y, eps_max=0.3, resolution=tol)
    assert np.all(crown <= lower + 1e-12) and np.all(lower <= upper) and np.all(lower <= pgd + tol)
    assert np.all(upper - lower <= 2 * tol) and np.any(lower > crown)
    for i in range(len(P)):
        if lower[i] > 0:
            assert _grid_robust(model, P[i:i + 1], y[i:i + 1], lower[i], n=41)[0]


def test_radius_arguments_are_checked():
    from nemon_np.radius import certified_radius
    model = _model(2)
    with pytest.raises(ValueError, match="eps_max must lie in"):
        certified_radius(model, np.full((1, 2), 0.5), [0], eps_max=2.0)
