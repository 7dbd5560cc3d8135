"""Stacked classifiers (nemon_np.stack, nemon_np.layers): every layer kind's box and relaxation
against sampled inputs and corners, gradients against finite differences, the stack form of a NEMON
against the NEMON, files, and resumed training against a run that went through."""
import json

import numpy as np
import pytest

import nemon_np
from nemon_np.certificates import certify
from nemon_np.conv import project_conv_mu_inf
from nemon_np.interval import enclosing_center_radius
from nemon_np.layers import LAYERS, patches, patches_transpose, patches_transpose_reference
from nemon_np.loading import load_model
from nemon_np.losses import softmax_cross_entropy
from nemon_np import train
from nemon_np.stack import PRESETS, StackedClassifier, explicit_twin, parse_architecture
from nemon_np.training import (TRAINING_STATE, BackgroundCheckpoints, TrainConfig, Trainer, copied_into,
                               restore_training_state, resume_point, save_checkpoint, save_training_state)

from conftest import EXACT, box_samples, finite_difference, random_model

# Random stacks that between them hold every layer kind: strided and padded convolutions, pooling,
# flatten (put in by the stack), dense, relu and the implicit layer before, between and after them.
ARCHS = [("conv3k3s2p1,relu,conv4k3s1p1,relu,nemon7,dense5,relu", (2, 6, 6)),
         ("conv3k3s1p1,relu,pool2,nemon6", (1, 6, 6)),
         ("dense8,relu,nemon6,dense5,relu", (5,)),
         ("conv2k2s2p0,relu,flatten,dense6,relu", (1, 4, 4)),
         ("conv3k3s2p1,relu,cnemon3k3z,pool3,dense5,relu", (2, 6, 6)),
         ("cnemon2k3,flatten,dense5,relu", (1, 4, 4)),
         ("conv3k3s1p1,bn,relu,nemon6,dense5,bn,relu", (1, 4, 4))]


def random_stack(arch, shape, seed, dtype=np.float64, n_out=4, weighted=False):
    """A stack with random biases (the initialization's are zero) and, for an implicit layer, a dense
    random A projected onto mu_inf(A) <= 0.6 (weighted by random weights when asked)."""
    rng = np.random.default_rng(seed)
    model = StackedClassifier(arch, shape, n_out, gamma=0.6, seed=seed, dtype=dtype)
    for layer in model.layers:
        if "running_var" in layer.buffers():   # batch normalization with its own statistics and scales
            C = len(layer.running_var)
            layer.running_mean, layer.running_var = rng.normal(size=C) * 0.3, rng.uniform(0.5, 2.0, C)
            layer.weight[...] = rng.uniform(-1.5, 1.5, C)
        if "b" in layer.params():
            layer.b[...] = 0.3 * rng.normal(size=layer.b.shape)
        if layer.implicit == "A":
            n = layer.units
            layer.weights = rng.uniform(0.5, 2.0, n) if weighted else None
            layer.A = nemon_np.project_mu_inf((rng.normal(size=(n, n)) / np.sqrt(n)).astype(dtype), 0.6,
                                              layer.weights)
        elif layer.implicit == "K":   # conv layers hold the unweighted measure
            layer.K = project_conv_mu_inf((rng.normal(size=layer.K.shape) / 3).astype(dtype), 0.6)
    return model


def sampled_margins(model, U_lo, U_hi, labels, rng, n=60):
    """The smallest margin y_k - y_j that n interior points and corners of each box attain, with the
    model's parameters evaluated in float64 to 1e-12."""
    exact = model.astype(np.float64)
    worst = None
    for V in box_samples(rng, U_lo, U_hi, n):
        Y = exact.logits(V, **EXACT)
        M = Y[np.arange(len(V)), labels][:, None] - Y
        worst = M if worst is None else np.minimum(worst, M)
    return worst


def test_every_layer_kind_is_in_some_test_stack():
    kinds = {type(layer).kind for arch, shape in ARCHS for layer in StackedClassifier(arch, shape, 3).layers}
    assert kinds == set(LAYERS)


def test_patches_transpose_is_the_transpose_of_patches(rng):
    for kernel, stride, padding in ((3, 2, 1), (4, 1, 1), (2, 2, 0), (3, 1, 0), (4, 2, 1), (5, 3, 2)):
        shape = (2, 6, 5, 3)
        X = rng.normal(size=shape)
        rows = patches(X, kernel, stride, padding)
        D = rng.normal(size=rows.shape)
        np.testing.assert_allclose(patches_transpose(D, shape, kernel, stride, padding),
                                   patches_transpose_reference(D, shape, kernel, stride, padding), atol=1e-12)
        single = patches_transpose(D.astype(np.float32), shape, kernel, stride, padding)
        assert single.dtype == np.float32
        np.testing.assert_allclose(single, patches_transpose_reference(D, shape, kernel, stride, padding), atol=1e-5)
        # <D, patches(X)> = <patches^T(D), X>: the two maps are adjoint.
        assert np.sum(D * rows) == pytest.approx(np.sum(patches_transpose(D, shape, kernel, stride, padding) * X))


@pytest.mark.parametrize("block_bytes", [1, 2 ** 21])
def test_conv_products_by_blocks_are_the_patch_matrix_products(block_bytes, monkeypatch, rng):
    """A convolution's product, weight gradient and transpose, taken over blocks of images (of one image
    each with block_bytes 1), against the products of the whole batch's patch matrix."""
    monkeypatch.setattr(nemon_np.layers, "PATCH_BLOCK_BYTES", block_bytes)
    for token, shape in (("conv4k3s2p1", (7, 7, 3)), ("conv3k2s1p0", (5, 6, 2)), ("conv2k4s2p2", (6, 6, 1))):
        layer, = parse_architecture(token)
        out_shape = layer.build(shape, rng, np.float64)
        X, dY = rng.normal(size=(5,) + shape), rng.normal(size=(5,) + out_shape)
        W = layer.W.reshape(-1, layer.channels)
        rows = patches(X, layer.kernel, layer.stride, layer.padding)
        np.testing.assert_allclose(layer._map(layer.W, X).reshape(-1, layer.channels), rows @ W, atol=1e-12)
        np.testing.assert_allclose(layer._weight_grad(dY, X).reshape(W.shape),
                                   rows.T @ dY.reshape(-1, layer.channels), atol=1e-12)
        np.testing.assert_allclose(layer._transpose(layer.W, dY),
                                   patches_transpose_reference(dY.reshape(-1, layer.channels) @ W.T, (5,) + shape,
                                                               layer.kernel, layer.stride, layer.padding),
                                   atol=1e-12)


def test_a_certified_step_by_blocks_of_one_image_is_the_whole_batchs(monkeypatch, rng):
    model = random_stack(*ARCHS[0], 4)
    U = rng.normal(size=(3, model.n_in))
    y = rng.integers(0, model.n_out, 3)
    whole = model.certified_loss_and_grad(U, y, U - 0.1, U + 0.15, 0.3, **EXACT)
    monkeypatch.setattr(nemon_np.layers, "PATCH_BLOCK_BYTES", 1)
    blocks = model.certified_loss_and_grad(U, y, U - 0.1, U + 0.15, 0.3, **EXACT)
    assert blocks[0] == pytest.approx(whole[0], rel=1e-12)
    for name, g in whole[1].items():
        np.testing.assert_allclose(blocks[1][name], g, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("arch,shape", ARCHS)
def test_every_layer_box_holds_sampled_inputs_and_corners(arch, shape, dtype, rng):
    """Each layer's enclosing box contains its output at every sampled input of its input box, on
    boxes pushed through the stack from a random input box."""
    model = random_stack(arch, shape, 1, dtype)
    exact = model.astype(np.float64)
    U = rng.normal(size=(6, model.n_in))
    boxes = model.enclosing_boxes(U - 0.1, U + 0.1, **EXACT)
    for i, layer in enumerate(exact.layers[:-1]):
        lo, hi = boxes[i]
        out_lo, out_hi = boxes[i + 1]
        for X in box_samples(rng, lo, hi, 30):
            Y, _ = layer.forward(X, dict(EXACT))
            assert np.all(Y >= out_lo) and np.all(Y <= out_hi), (arch, i, layer)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("arch,shape", ARCHS)
def test_interval_and_crown_margins_are_sound_and_ordered(arch, shape, dtype, weighted, rng):
    """Sampled margins never fall below crown's bound, nor crown's below the interval bound."""
    model = random_stack(arch, shape, 2, dtype, weighted=weighted)
    U = rng.normal(size=(8, model.n_in))
    labels = rng.integers(0, model.n_out, 8)
    for eps in (0.02, 0.2):
        M_int, _ = model.interval_margins(U - eps, U + eps, labels)
        M_crown, _ = model.relaxed_margins(U - eps, U + eps, labels)
        worst = sampled_margins(model, U - eps, U + eps, labels, rng)
        assert np.all(M_crown >= M_int)
        assert np.all(M_crown <= worst + 1e-12)
        assert np.any(M_crown > M_int + 1e-6)   # the relaxation is tighter somewhere


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("arch,shape", ARCHS)
def test_relaxed_boxes_hold_every_reachable_state_and_lie_inside_the_interval_boxes(arch, shape, dtype, rng):
    """CROWN's intermediate boxes: every layer's output at sampled inputs and corners of the input box,
    pushed through the stack in float64, lies in them; each lies inside the interval box it narrows."""
    model = random_stack(arch, shape, 5, dtype)
    exact = model.astype(np.float64)
    U, eps = rng.normal(size=(3, model.n_in)), 0.2
    wide = model.enclosing_boxes(U - eps, U + eps)
    done = []
    narrow = model.relaxed_boxes(U - eps, U + eps, progress=done.append)
    assert done == [1, 2, 3]
    given = model.relaxed_boxes(U - eps, U + eps, boxes=wide)   # the interval boxes passed, not recomputed
    assert all(np.array_equal(a, b) for box, same in zip(narrow, given) for a, b in zip(box, same))
    for wrong in (wide[:-1], [(lo[:2], hi[:2]) for lo, hi in wide]):
        with pytest.raises(ValueError, match="boxes must be enclosing_boxes of these inputs"):
            model.relaxed_boxes(U - eps, U + eps, boxes=wrong)
    for (w_lo, w_hi), (n_lo, n_hi) in zip(wide, narrow):
        assert np.all(n_lo >= w_lo) and np.all(n_hi <= w_hi) and np.all(n_lo <= n_hi)
    for V in box_samples(rng, U - eps, U + eps, 40):
        X = exact._inputs(V, np.float64)
        for i, layer in enumerate(exact.layers[:-1]):
            X, _ = layer.forward(X, dict(EXACT))
            # 1e-12: the sampled fixed points are solved to that tolerance, the boxes hold the exact ones.
            assert np.all(X >= narrow[i + 1][0] - 1e-12) and np.all(X <= narrow[i + 1][1] + 1e-12), (arch, i, layer)


def test_a_second_round_of_relaxed_boxes_stays_sound_and_inside_the_first(rng):
    model = random_stack(*ARCHS[0], 5)
    exact = model.astype(np.float64)
    U, eps = rng.normal(size=(2, model.n_in)), 0.3
    one, two = model.relaxed_boxes(U - eps, U + eps), model.relaxed_boxes(U - eps, U + eps, rounds=2)
    for (lo1, hi1), (lo2, hi2) in zip(one, two):
        assert np.all(lo2 >= lo1) and np.all(hi2 <= hi1)
    for V in box_samples(rng, U - eps, U + eps, 40):
        X = exact._inputs(V, np.float64)
        for i, layer in enumerate(exact.layers[:-1]):
            X, _ = layer.forward(X, dict(EXACT))
            assert np.all(X >= two[i + 1][0] - 1e-12) and np.all(X <= two[i + 1][1] + 1e-12)
    for bad in (0, 1.5, None):
        with pytest.raises(ValueError, match="rounds must be an integer >= 1"):
            model.relaxed_boxes(U - eps, U + eps, rounds=bad)


def test_relaxed_boxes_narrow_the_deeper_layers():
    """Somewhere past the first relu every test stack's boxes are narrower than the interval ones."""
    for arch, shape in ARCHS:
        model = random_stack(arch, shape, 5)
        U = np.random.default_rng(0).normal(size=(3, model.n_in))
        wide, narrow = model.enclosing_boxes(U - 0.2, U + 0.2), model.relaxed_boxes(U - 0.2, U + 0.2)
        assert any(np.any(n[1] - n[0] < w[1] - w[0] - 1e-9) for w, n in zip(wide[2:], narrow[2:])), arch


def test_a_relaxed_box_lies_outside_the_linear_programs_bounds():
    """CROWN's bound of a unit is a dual feasible point of the linear program over the triangle
    relaxation (the same boxes), so it is never tighter than the program's optimum (cvxpy), and that
    optimum is never tighter than the unit's sampled range."""
    import cvxpy as cp
    rng = np.random.default_rng(3)
    model = random_stack("dense6,relu,dense5,relu", (4,), 6)
    U, eps = rng.normal(size=(1, 4)), 0.4
    boxes = model.relaxed_boxes(U - eps, U + eps)
    (W1, b1), (W2, b2) = ((layer.W, layer.b) for layer in (model.layers[0], model.layers[2]))
    l, h = boxes[1][0][0], boxes[1][1][0]
    u, x = cp.Variable(4), cp.Variable(6)
    z = W1 @ u + b1
    cons = [u >= U[0] - eps, u <= U[0] + eps, x >= 0, x >= z]
    for t in range(6):
        if l[t] >= 0:
            cons.append(x[t] == z[t])
        elif h[t] <= 0:
            cons.append(x[t] == 0)
        else:
            cons.append(x[t] <= h[t] * (z[t] - l[t]) / (h[t] - l[t]))
    samples = np.array([model.layers[2].forward(np.maximum(V @ W1.T + b1, 0), {})[0][0]
                        for V in box_samples(rng, U - eps, U + eps, 200)])
    assert np.any(boxes[3][1][0] - boxes[3][0][0] < model.enclosing_boxes(U - eps, U + eps)[3][1][0]
                  - model.enclosing_boxes(U - eps, U + eps)[3][0][0] - 1e-9)
    for t in range(5):
        low = cp.Problem(cp.Minimize(W2[t] @ x + b2[t]), cons).solve(solver=cp.HIGHS)
        high = cp.Problem(cp.Maximize(W2[t] @ x + b2[t]), cons).solve(solver=cp.HIGHS)
        assert boxes[3][0][0, t] <= low + 1e-7 and low <= samples[:, t].min() + 1e-9
        assert boxes[3][1][0, t] >= high - 1e-7 and high >= samples[:, t].max() - 1e-9


@pytest.mark.parametrize("arch,shape", ARCHS)
def test_crown_full_margins_are_sound_and_never_below_crown(arch, shape, rng):
    model = random_stack(arch, shape, 2)
    pixels, labels = rng.uniform(0, 1, size=(6, model.n_in)), rng.integers(0, model.n_out, 6)
    crown = certify(model, pixels, labels, 0.1, "crown").margins
    full = certify(model, pixels, labels, 0.1, "crown-full").margins
    U_lo, U_hi = nemon_np.pixels.input_box(model, pixels, 0.1)
    assert np.all(full >= crown) and np.all(full <= sampled_margins(model, U_lo, U_hi, labels, rng) + 1e-12)


def _params_fd(model, f, h=1e-6):
    return {k: finite_difference(f, P, h) for k, P in model.params().items()}


def _assert_gradients(model, grads, fd):
    """grads against the finite differences fd, except at the implicit matrix's zero entries: there the
    embedded network's Metzler split has a kink (a_ij moves between A_M and A_N), where central
    differences average the two one-sided derivatives."""
    implicit = {f"{i}.{layer.implicit}" for i, layer in enumerate(model.layers) if layer.implicit}
    for k, g in fd.items():
        keep = model.params()[k] != 0 if k in implicit else np.ones(g.shape, bool)
        np.testing.assert_allclose(grads[k][keep], g[keep], atol=1e-7, err_msg=k)


@pytest.mark.parametrize("arch,shape", ARCHS[:3] + ARCHS[4:5] + ARCHS[6:])
def test_loss_and_input_gradients_match_finite_differences(arch, shape, rng):
    model = random_stack(arch, shape, 3)
    U = rng.normal(size=(3, model.n_in))
    y = rng.integers(0, model.n_out, 3)
    _, grads = model.loss_and_grad(U, y, **EXACT)
    _assert_gradients(model, grads, _params_fd(model, lambda: model.loss_and_grad(U, y, **EXACT)[0]))
    # Attacks see the evaluated model (batch normalization with its running statistics).
    evaluated_loss = lambda: softmax_cross_entropy(model.logits(U, **EXACT), y)[0]  # noqa: E731
    np.testing.assert_allclose(model.input_grad(U, y, **EXACT), finite_difference(evaluated_loss, U), atol=1e-7)


@pytest.mark.parametrize("arch,shape", ARCHS[:3] + ARCHS[4:5] + ARCHS[6:])
def test_certified_loss_gradient_matches_finite_differences(arch, shape, rng):
    """The IBP loss through every layer's box (the implicit layer's embedded network included)."""
    model = random_stack(arch, shape, 4)
    U = rng.normal(size=(3, model.n_in))
    y = rng.integers(0, model.n_out, 3)
    lo, hi = U - 0.1, U + 0.15
    loss = lambda: model.certified_loss_and_grad(U, y, lo, hi, 0.3, **EXACT)[0]  # noqa: E731
    _, grads = model.certified_loss_and_grad(U, y, lo, hi, 0.3, **EXACT)
    _assert_gradients(model, grads, _params_fd(model, loss))


@pytest.mark.parametrize("arch,shape", ARCHS)
def test_crown_ibp_loss_gradient_matches_finite_differences(arch, shape, rng):
    """CROWN-IBP's loss, through every layer's relaxation and the boxes it reads (the implicit layer's
    unrolled copies and embedded network, batch normalization's clean-pass statistics)."""
    model = random_stack(arch, shape, 5)
    U = rng.normal(size=(3, model.n_in))
    y = rng.integers(0, model.n_out, 3)
    lo, hi = U - 0.1, U + 0.15
    opts = dict(crown_weight=0.6, **EXACT)
    total, grads, info = model.certified_loss_and_grad(U, y, lo, hi, 0.3, return_info=True, **opts)
    assert np.any(info["crown_margins"] > info["interval_margins"] + 1e-6)   # the crown part is not vacuous
    # h = 1e-7: on the batch-normalized stack one of B's entries sits within 1e-6 of a kink (a relu
    # relaxation's box end crossing 0), where wider central differences average the two slopes.
    fd = _params_fd(model, lambda: model.certified_loss_and_grad(U, y, lo, hi, 0.3, **opts)[0], h=1e-7)
    _assert_gradients(model, grads, fd)


def test_threads_share_a_stacks_convolutions(monkeypatch, rng, tmp_path):
    """``n_jobs = 2`` gives each of two threads half of every convolution's image blocks: the logits
    are the same bit for bit (each block's rows are computed as before), the certified loss (with its
    crown part) and its gradients up to the rounding of the weight gradients' sums."""
    import nemon_np.layers
    monkeypatch.setattr(nemon_np.layers, "PATCH_BLOCK_BYTES", 64)   # a block an image: several to share
    arch, shape = ARCHS[0]
    model = random_stack(arch, shape, 8)
    U = rng.normal(size=(6, model.n_in))
    y = rng.integers(0, model.n_out, 6)
    args = (U, y, U - 0.1, U + 0.15, 0.5)
    logits = model.logits(U, **EXACT)
    loss, grads = model.certified_loss_and_grad(*args, crown_weight=0.5, **EXACT)
    model.n_jobs = 2
    conv = model.layers[0]
    assert conv._by_threads(conv._blocks((6,) + conv._in_shape, 8), len) == [3, 3]
    empty = np.zeros((0,) + conv._in_shape)   # no images, no blocks: a zero weight gradient
    assert conv._weight_grad(conv._map(conv.W, empty), empty).shape == conv.W.shape
    assert np.array_equal(model.logits(U, **EXACT), logits)
    loss2, grads2 = model.certified_loss_and_grad(*args, crown_weight=0.5, **EXACT)
    np.testing.assert_allclose(loss2, loss, rtol=1e-13)
    for k, g in grads.items():
        np.testing.assert_allclose(grads2[k], g, rtol=1e-10, atol=1e-13, err_msg=k)
    model.save(tmp_path / "m.npz")
    assert StackedClassifier.load(tmp_path / "m.npz").n_jobs == 1   # a run-time setting, not saved
    with pytest.raises(ValueError, match="n_jobs must be a positive whole number"):
        model.n_jobs = 0
    assert TrainConfig(arch="ibp-small", threads=2).validate().threads == 2


def test_batch_norm_trains_the_box_that_certificates_evaluate(rng):
    """Batch normalization's training box and relaxation read the clean pass's batch statistics, which
    the running statistics estimate: with the running statistics set to the batch's own, the training
    interval margins equal the certificate's over the same input boxes, to the solver's tolerance and
    the certificate's rounding allowances, and crown's are close. (The box centres' statistics, which training
    used before, differ from the clean pass's wherever eps > 0: a model trained on them had boxes a
    thousand times wider at evaluation than in training.)"""
    arch, shape = ARCHS[-1]
    model = random_stack(arch, shape, 7)
    U = rng.normal(size=(16, model.n_in))
    y = rng.integers(0, model.n_out, 16)
    options, X = model._options(train=True, **EXACT), model._inputs(U)
    for layer in model.layers:
        if layer.kind == "bn":
            mu, var, _ = layer._stats(X)
        X = layer.forward(X, options)[0]
        if layer.kind == "bn":   # after the forward pass, which moves them
            layer.running_mean, layer.running_var = mu, var
    eps = 0.2
    M_interval = model.interval_margins(U - eps, U + eps, y, **EXACT)[0]
    M_crown = model.relaxed_margins(U - eps, U + eps, y, **EXACT)[0]
    info = model.certified_loss_and_grad(U, y, U - eps, U + eps, 0.5, crown_weight=1.0, return_info=True,
                                         **EXACT)[2]
    others = np.arange(model.n_out)[None, :] != y[:, None]
    assert np.ptp(M_interval[others]) > 1   # boxes wide enough that mismatched statistics would show
    np.testing.assert_allclose(info["interval_margins"][others], M_interval[others], atol=1e-8)
    # Crown's certificate picks the implicit layer's unrolled step per row where training takes the
    # last (test below): close, not equal.
    np.testing.assert_allclose(info["crown_margins"][others], M_crown[others], atol=1e-3)
    with pytest.raises(ValueError, match="clean pass"):
        model.layers[1].box(np.zeros((1, 4, 4, 3)), np.zeros((1, 4, 4, 3)), options)


@pytest.mark.parametrize("arch,shape", [a for a in ARCHS if "bn" not in a[0]])
def test_training_crown_margins_are_sound_and_at_most_the_certificates(arch, shape, rng):
    """The training relaxation (float64 here) bounds sampled margins. Over the certificate's boxes the
    crown certificate equals it on explicit stacks (up to its rounding allowance); where the implicit
    layer reads the input, the certificate, which takes each row's best unrolled step where training
    takes the last, is never below it. (With layers before the implicit layer the certificate picks its
    step by the bound over the layer's input box, greedily, and the last step can end better. Over the
    training boxes, equal to those to 1e-12, crown can differ more: its multiplier jumps from 0 to the
    unit's row where a box's lower end crosses 0.)"""
    model = random_stack(arch, shape, 6)
    U = rng.normal(size=(6, model.n_in))
    y = rng.integers(0, model.n_out, 6)
    options = model._options(train=True, **EXACT)
    for eps in (0.02, 0.2):
        info = model.certified_loss_and_grad(U, y, U - eps, U + eps, 0.5, crown_weight=1.0, return_info=True,
                                             **EXACT)[2]
        assert np.all(info["crown_margins"] <= sampled_margins(model, U - eps, U + eps, y, rng) + 1e-12)
        boxes = [enclosing_center_radius(*box) for box in model.enclosing_boxes(U - eps, U + eps, **EXACT)]
        trained = model._training_crown(boxes, y, [options] * len(model.layers))[0]
        certified = model.relaxed_margins(U - eps, U + eps, y, **EXACT)[0]
        if model.implicit_index in (None, 0):
            assert np.all(certified >= trained - 1e-9)
        if model.implicit_layer is None:
            np.testing.assert_allclose(certified, np.maximum(trained, info["interval_margins"]), atol=1e-9)


def test_the_warmup_regularizers_are_on_by_default_for_a_stacks_certified_training_alone():
    stack = dict(arch="dense8,relu")
    assert TrainConfig(**stack, certified_eps=0.1).validate().warmup_reg == 0.5
    assert TrainConfig(**stack, certified_eps=0.1, warmup_reg=0.0).validate().warmup_reg == 0.0
    assert TrainConfig(**stack, certified_eps=0.1, warmup_reg=0.25).validate().warmup_reg == 0.25
    assert TrainConfig(**stack).validate().warmup_reg == 0.0                 # nothing to regularize: no boxes
    assert TrainConfig(certified_eps=0.1).validate().warmup_reg == 0.0       # a dense NEMON has no relu layer
    with pytest.raises(ValueError, match="needs model stack and certified_eps > 0"):
        TrainConfig(**stack, warmup_reg=0.5).validate()
    assert train.build_parser().parse_args([]).warmup_reg is None           # the flag leaves it to the config
    assert train.build_parser().parse_args(["--warmup-reg", "0"]).warmup_reg == 0.0   # and takes a number


def test_crown_ibp_schedule_and_its_errors():
    cfg = TrainConfig(arch="dense8,relu", certified_eps=0.1, epochs=6, eps_warmup=1, eps_ramp=4,
                      crown_ibp=1.0).validate()
    assert cfg.eps_ramp == 4
    assert [cfg.crown_ibp_weight(p) for p in (0, 1, 3, 5, 6)] == [1.0, 1.0, 0.5, 0.0, 0.0]
    assert TrainConfig(arch="dense8,relu", certified_eps=0.1, epochs=12).validate().crown_ibp_weight(2) == 0.0
    with pytest.raises(ValueError, match="crown_ibp must lie in"):
        TrainConfig(arch="dense8,relu", certified_eps=0.1, crown_ibp=1.5).validate()
    with pytest.raises(ValueError, match="needs model stack and certified_eps > 0"):
        TrainConfig(certified_eps=0.1, crown_ibp=0.5).validate()
    with pytest.raises(ValueError, match="crown_weight must lie in"):
        model = StackedClassifier("dense4,relu", (3,), 2)
        U = np.zeros((1, 3))
        model.certified_loss_and_grad(U, [0], U, U + 0.1, 0.5, crown_weight=-0.1)


def _assert_stack_equals_model(stack, model, names, U, y, exact):
    """Copy the model's parameters into the stack (``names``: stack key -> model name), then compare
    logits (bit for bit), the loss and certified loss and their gradients (bit for bit when ``exact``,
    else within float rounding)."""
    for key, name in names.items():
        i, k = key.split(".")
        setattr(stack.layers[int(i)], k, getattr(model, name).copy())
    options = dict(tol=1e-10, max_iter=2000)
    assert np.array_equal(stack.logits(U, **options), model.logits(U, **options))
    for method in ("loss_and_grad", "certified_loss_and_grad"):
        args = (U, y) if method == "loss_and_grad" else (U, y, U - 0.1, U + 0.1, 0.4)
        loss_s, g_s = getattr(stack, method)(*args, **options)
        loss_m, g_m = getattr(model, method)(*args, **options)
        if exact:
            assert loss_s == loss_m and all(np.array_equal(g_s[key], g_m[name]) for key, name in names.items())
        else:
            assert loss_s == pytest.approx(loss_m, rel=1e-12)
            for key, name in names.items():
                np.testing.assert_allclose(g_s[key], g_m[name], rtol=1e-9, atol=1e-12, err_msg=f"{method} {key}")


@pytest.mark.parametrize("readout_hidden", [0, 6])
def test_the_stack_form_of_a_nemon_equals_it(readout_hidden, rng):
    """nemon<n> (and nemon<n>,dense<p>,relu) holding a NEMON's parameters gives its logits, gradients,
    certified loss and interval margins bit for bit (float64), and its crown margins to rounding."""
    nemon = random_model(5, 8, 4, 0.7, seed=5, readout_hidden=readout_hidden)
    arch = "nemon8" + (f",dense{readout_hidden},relu" if readout_hidden else "")
    stack = StackedClassifier(arch, (5,), 4, gamma=nemon.gamma, dtype=np.float64)
    names = {"0.A": "A", "0.B": "B", "0.b": "b", f"{len(stack.layers) - 1}.W": "C", f"{len(stack.layers) - 1}.b": "c"}
    if readout_hidden:
        names.update({"1.W": "H", "1.b": "h"})
    U = rng.normal(size=(7, 5))
    y = rng.integers(0, 4, 7)
    _assert_stack_equals_model(stack, nemon, names, U, y, exact=True)
    M_s, _ = stack.interval_margins(U - 0.05, U + 0.05, y)
    M_n, _ = nemon.interval_margins(U - 0.05, U + 0.05, y)
    assert np.array_equal(M_s, M_n)
    C_s, _ = stack.relaxed_margins(U - 0.05, U + 0.05, y, steps=8)
    C_n, _ = nemon.relaxed_margins(U - 0.05, U + 0.05, y, steps=8)
    np.testing.assert_allclose(C_s, C_n, rtol=0, atol=1e-9)


def test_presets_parse_and_build_and_twins_are_explicit():
    for name in PRESETS:
        model = StackedClassifier(name, (1, 28, 28), 10)
        twin = StackedClassifier(explicit_twin(name), (1, 28, 28), 10)
        assert twin.implicit_layer is None and twin.mu_inf() == 0.0
        assert (model.implicit_layer is not None) == ("nemon" in name)
        assert len(twin.layers) == len(model.layers) + (model.implicit_layer is not None)


@pytest.mark.parametrize("arch,message", [("conv16x3", "cannot read layer 'conv16x3'"),
                                          ("nemon10,nemon10", "at most one implicit layer"),
                                          ("", "a preset"), ("conv4k9s1p0", "does not fit")])
def test_bad_architectures_are_one_line_errors(arch, message):
    with pytest.raises(ValueError, match=message) as err:
        StackedClassifier(arch, (1, 6, 6), 3)
    assert "\n" not in str(err.value)


def test_a_conv_layer_cannot_read_flat_inputs():
    with pytest.raises(ValueError, match="reads images"):
        StackedClassifier("dense5,conv3", (1, 6, 6), 3)


@pytest.mark.parametrize("arch,shape,weighted", [ARCHS[0] + (False,), ARCHS[0] + (True,), ARCHS[6] + (False,)])
def test_save_and_load_keep_the_model(tmp_path, arch, shape, weighted, rng):
    model = random_stack(arch, shape, 6, np.float32, weighted=weighted)
    model.metadata.update(dataset="mnist", mean=np.array([0.1]))
    model.save(tmp_path / "model.npz")
    loaded = load_model(tmp_path / "model.npz")
    assert isinstance(loaded, StackedClassifier) and loaded.arch == model.arch
    U = rng.normal(size=(4, model.n_in))
    assert np.array_equal(loaded.logits(U), model.logits(U))
    assert (loaded.weights is None) == (not weighted)
    if weighted:
        assert np.array_equal(loaded.weights, model.weights) and loaded.mu_inf() == model.mu_inf()
    assert loaded.metadata["dataset"] == "mnist"


def test_a_file_with_a_wrong_shape_is_a_one_line_error(tmp_path):
    model = StackedClassifier("dense4,relu", (3,), 2)
    model.layers[0].W = np.zeros((5, 3), np.float32)
    model.save(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="0.W has shape"):
        load_model(tmp_path / "bad.npz")


def test_lipschitz_certificate_of_a_stack_holds_on_samples(rng):
    """The Lipschitz bound of a stack (a product of its layers' l_inf gains, the implicit layer's
    ||B|| / (1 - mu)) bounds every sampled change of every margin."""
    for weighted in (False, True):
        model = random_stack("conv3k3s2p1,relu,nemon7,dense5,relu", (2, 6, 6), 7, weighted=weighted)
        L = nemon_np.lipschitz_bound(model)
        U = rng.normal(size=(20, model.n_in))
        D = rng.uniform(-1, 1, size=U.shape) * 0.05
        dY = np.abs(model.logits(U + D, **EXACT) - model.logits(U, **EXACT)).max(axis=1)
        assert np.all(dY <= L * np.abs(D).max(axis=1) * (1 + 1e-9))


def _tiny_data(rng, n=60):
    X = rng.normal(size=(n, 16)).astype(np.float32)
    y = (X[:, :4].sum(axis=1) > 0).astype(np.int64) + 2 * (X[:, 4] > 0)
    return X, y


def test_crown_ibp_training_follows_its_schedule_and_changes_the_model(rng):
    """A CROWN-IBP run logs beta per epoch (1 -> 0 over the ramp, at each epoch's end) and trains a
    different model than the interval loss alone, from the same start; after the ramp both losses
    are IBP's."""
    X, y = _tiny_data(rng)
    cfg = dict(arch="conv3k3s2p1,relu,nemon6", epochs=3, batch_size=20, dtype="float64", tol=1e-8, eps_warmup=0,
               eps_ramp=2, certified_eps=0.1, certify_samples=20)
    crown = Trainer(TrainConfig(crown_ibp=1.0, **cfg), 16, 4, image_shape=(1, 4, 4))
    crown.fit(X, y, X_test=X[:20], y_test=y[:20], progress=False)
    plain = Trainer(TrainConfig(**cfg), 16, 4, image_shape=(1, 4, 4))
    plain.fit(X, y, X_test=X[:20], y_test=y[:20], progress=False)
    # Three batches an epoch: the last one of epoch e is at e + 2/3 epochs, t = (e + 2/3) / 2 of the ramp.
    assert [r["crown_ibp_weight"] for r in crown.history] == pytest.approx([2 / 3, 1 / 6, 0.0], abs=1e-12)
    assert "crown_ibp_weight" not in plain.history[0]
    assert not np.array_equal(crown.model.params()["0.W"], plain.model.params()["0.W"])
    assert all(np.isfinite(r["train_loss"]) for r in crown.history)


@pytest.mark.parametrize("config", [dict(arch="conv3k3s2p1,relu,nemon6", certified_eps=0.1, eps_ramp=1),
                                    dict(arch="dense6,relu,nemon5", constraint="parametrization"),
                                    dict(model="nemon", hidden=6, constraint="weighted", augment="shift"),
                                    dict(model="nemon", hidden=6, certified_eps=0.1, eps_ramp=1, warm_start=True)])
@pytest.mark.parametrize("writer", ["synchronous", "background"])
def test_a_resumed_run_equals_one_that_went_through(tmp_path, config, writer, rng):
    """Stopped after epoch 2 of 3 and resumed from its files, a run ends with the parameters of the run
    that went through, bit for bit (Adam's state, the constraint's free parameters, the schedules and
    the random stream all come back). The background writer's files are those of the epoch it was
    given, though the next epoch changes the trainer's arrays while it writes."""
    X, y = _tiny_data(rng)
    cfg = dict(epochs=3, batch_size=20, dtype="float64", tol=1e-8, eps_warmup=0, **config)
    through = Trainer(TrainConfig(**cfg), 16, 4, image_shape=(1, 4, 4))
    through.fit(X, y, progress=False)
    checkpoints = BackgroundCheckpoints(tmp_path)

    def stop_after_two(row):
        if writer == "background":
            checkpoints.write(stopped, TrainConfig(**cfg))
        else:
            save_checkpoint(stopped.model, tmp_path)
            save_training_state(stopped, tmp_path)
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    stopped = Trainer(TrainConfig(**cfg), 16, 4, image_shape=(1, 4, 4))
    with pytest.raises(KeyboardInterrupt):
        stopped.fit(X, y, on_epoch=stop_after_two, progress=False)
    checkpoints.wait()
    resumed = Trainer(TrainConfig(**cfg), 16, 4, model=load_model(tmp_path / "model.npz"), image_shape=(1, 4, 4))
    restore_training_state(resumed, tmp_path, stopped.history)
    resumed.fit(X, y, progress=False)
    for k, v in through.model.params().items():
        assert np.array_equal(resumed.model.params()[k], v), k
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in through.history]


def test_the_background_writer_writes_the_epoch_it_was_given(tmp_path, rng, monkeypatch):
    """Held back until the trainer has run another epoch (which changes its parameters, Adam's moments
    and the warm starts in place), the background writer still writes the files of the epoch it was
    given: those the synchronous functions write at that moment."""
    import threading
    import nemon_np.training as training
    X, y = _tiny_data(rng)
    cfg = TrainConfig(model="nemon", hidden=6, epochs=2, batch_size=20, certified_eps=0.1, eps_warmup=0,
                      eps_ramp=1, warm_start=True)
    trainer = Trainer(cfg, 16, 4)

    def stop(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer.fit(X, y, progress=False, on_epoch=stop)
    (tmp_path / "sync").mkdir(), (tmp_path / "background").mkdir()
    save_checkpoint(trainer.model, tmp_path / "sync")
    save_training_state(trainer, tmp_path / "sync")
    gate = threading.Event()
    for name in ("_atomic_write", "_write_training_state"):
        real = getattr(training, name)
        monkeypatch.setattr(training, name, lambda *a, _real=real: gate.wait() and _real(*a))
    checkpoints = BackgroundCheckpoints(tmp_path / "background")
    checkpoints.write(trainer, cfg)
    trainer.fit(X, y, progress=False)
    gate.set()
    checkpoints.wait()
    for name in ("model.npz", "training_state.npz"):
        with np.load(tmp_path / "sync" / name) as a, np.load(tmp_path / "background" / name) as b:
            assert a.files == b.files
            assert all(np.array_equal(a[k], b[k]) for k in a.files), name
    with np.load(tmp_path / "sync" / "model.npz") as a:
        assert not np.array_equal(a["A"], trainer.model.A)   # the second epoch did change them


def test_the_resume_point_is_the_training_states_own_model_and_history(tmp_path, rng):
    """resume_point reads the model and the history from the training state (a model.npz written later
    is not used); from a state file written before it held them, model.npz and no history; an
    unreadable state is a one-line ValueError."""
    X, y = _tiny_data(rng)
    cfg = TrainConfig(arch="conv3k3s2p1,relu,nemon6", epochs=1, batch_size=20, certified_eps=0.1, eps_warmup=0,
                      eps_ramp=1)
    trainer = Trainer(cfg, 16, 4, image_shape=(1, 4, 4))
    trainer.fit(X, y, progress=False)
    save_training_state(trainer, tmp_path)
    later = Trainer(cfg, 16, 4, image_shape=(1, 4, 4))
    later.model.layers[0].W = later.model.layers[0].W + 1
    save_checkpoint(later.model, tmp_path)
    model, history = resume_point(tmp_path)
    for k, v in trainer.model.params().items():
        assert np.array_equal(model.params()[k], v), k
    assert history == json.loads(json.dumps(trainer.history))
    with np.load(tmp_path / TRAINING_STATE) as z:
        older = {k: z[k] for k in z.files if k not in ("model_npz", "history")}
    np.savez(tmp_path / TRAINING_STATE, **older)
    model, history = resume_point(tmp_path)
    assert history is None and np.array_equal(model.layers[0].W, later.model.layers[0].W)
    (tmp_path / TRAINING_STATE).write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable training state"):
        resume_point(tmp_path)


def test_an_implicit_layer_whose_input_is_below_the_tolerance_is_reported(rng):
    """A stack whose implicit layer gets injections below the solver's tolerance outputs its zero start
    for every sample and learns nothing through it: training says so once an epoch, naming the cause;
    a live one, and an explicit stack (no solves at all), train without the warning."""
    import warnings
    X, y = _tiny_data(rng)
    for arch, scale, dead in (("dense8,relu,nemon6", 1e-9, True), ("dense8,relu,nemon6", 1.0, False),
                              ("dense8,relu,dense6,relu", 1e-9, False)):
        trainer = Trainer(TrainConfig(arch=arch, epochs=1, batch_size=20, tol=1e-4), 16, 4)
        # Tiny first and last weights: the injection and the adjoint's right-hand side both under tol.
        for layer in trainer.model.layers[0], trainer.model.layers[-1]:
            layer.W *= scale
        for layer in trainer.model.layers[0], trainer.model.layers[2]:
            layer.b[...] = 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(X, y, progress=False)
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert any("stopped at its zero start" in m for m in messages) == dead, (arch, scale, messages)


def test_copies_reuse_the_buffers_that_match_and_only_those(rng):
    """The background writer's copies go into the last write's arrays where key, shape and dtype match
    (their pages are what make a copy cheap), into new arrays otherwise, and equal the arrays copied
    without sharing memory with them."""
    arrays = {"same": rng.standard_normal((5, 3)).astype(np.float32), "shape": np.arange(4.0),
              "dtype": np.arange(3, dtype=np.int64), "new": np.array("text")}
    buffers = {"same": np.zeros((5, 3), np.float32), "shape": np.zeros(5), "dtype": np.zeros(3)}
    copies = copied_into(arrays, buffers)
    assert copies["same"] is buffers["same"]
    assert all(copies[k] is not buffers[k] for k in ("shape", "dtype"))
    for k, v in arrays.items():
        assert copies[k].dtype == v.dtype and np.array_equal(copies[k], v), k
        assert not np.shares_memory(copies[k], v), k
    assert np.array_equal(buffers["shape"], np.zeros(5))   # a buffer that does not fit is left alone


def test_a_failed_background_write_is_raised_not_lost(tmp_path, rng):
    X, y = _tiny_data(rng)
    cfg = TrainConfig(model="nemon", hidden=6, epochs=1, batch_size=20)
    trainer = Trainer(cfg, 16, 4)
    trainer.fit(X, y, progress=False)
    checkpoints = BackgroundCheckpoints(tmp_path / "no-such-folder")
    checkpoints.write(trainer, cfg)
    with pytest.raises(FileNotFoundError):
        checkpoints.wait()
    checkpoints.wait()   # reported once


def test_a_trained_stack_is_certified_soundly_on_mnist(shared_data):
    """A stack trained with the certified loss on real MNIST: no image that the interval, crown,
    Lipschitz or combined certificate certifies is misclassified by PGD, FGSM or noise."""
    from nemon_np.data import load_dataset, normalize
    from nemon_np.robustness import robustness_report
    data = load_dataset("mnist", shared_data)
    X = normalize(data.train_images[:2000], data.mean, data.std, np.float32)
    cfg = TrainConfig(arch="conv8k4s2p1,relu,nemon40", weight_init="ibp", epochs=3, eps_warmup=0, eps_ramp=2,
                      certified_eps=0.1)
    trainer = Trainer(cfg, 784, 10, image_shape=(1, 28, 28))
    trainer.model.metadata.update(dataset="mnist", mean=np.array(data.mean), std=np.array(data.std))
    trainer.fit(X, data.train_labels[:2000], progress=False)
    pixels = data.test_images[:200].reshape(200, -1) / 255.0
    labels = data.test_labels[:200]
    report = robustness_report(trainer.model, pixels, labels, (0.05, 0.1), pgd_steps=10)
    assert report["certified"]["certified-crown"][0] > 0.3
    assert all(n == 0 for counts in report["broken_certified"].values() for n in counts), report["broken_certified"]
    combined = certify(trainer.model, pixels, labels, 0.1, "combined").certified
    interval = certify(trainer.model, pixels, labels, 0.1, "interval").certified
    assert np.all(combined >= interval)


def test_arch_selects_a_stack_and_bad_combinations_are_errors():
    assert TrainConfig(arch="ibp-small").validate().model == "stack"
    with pytest.raises(ValueError, match="arch goes with model stack"):
        TrainConfig(model="conv", arch="ibp-small").validate()
    with pytest.raises(ValueError, match="weight_init"):
        TrainConfig(weight_init="ibp").validate()
    with pytest.raises(ValueError, match="cannot read layer"):
        TrainConfig(arch="conv3x").validate()


def test_ibp_initialization_keeps_the_box_radius(rng):
    """At initialization with weight_init="ibp", an interval box centred at 0 keeps its mean radius
    through a dense layer of fan-in n and a relu (Shi et al. 2021: |W| doubles it, E |w| = 2 / n, the
    relu halves it), where the default scale grows it about sqrt(n) times."""
    growth = {}
    for init in ("default", "ibp"):
        model = StackedClassifier("dense400,relu,dense400", (400,), 2, weight_init=init, dtype=np.float64)
        r = np.full((1, 400), 0.1)
        c1, r1, _ = model.layers[0].box(np.zeros((1, 400)), r, {})
        _, r2, _ = model.layers[1].box(c1, r1, {})
        growth[init] = r2.mean() / 0.1
    assert growth["ibp"] == pytest.approx(1.0, rel=0.1)
    assert growth["default"] > 4


def test_warmup_regularizer_gradients_match_finite_differences(rng):
    """Shi et al. 2021's tightness and relu-balance terms and their gradients (active and inactive sets
    held fixed: the differences are taken where no entry changes set)."""
    from nemon_np.warmup import relu_balance_term, tightness_term
    c, r = rng.normal(size=(6, 9)) + 1.0, rng.uniform(0.05, 0.5, size=(6, 9))   # mostly active: unbalanced
    value, dc = relu_balance_term(c, r)
    assert value > 0
    np.testing.assert_allclose(dc, finite_difference(lambda: relu_balance_term(c, r)[0], c), atol=1e-7)
    value, dr = tightness_term(0.01, r)
    assert value > 0
    np.testing.assert_allclose(dr, finite_difference(lambda: tightness_term(0.01, r)[0], r), atol=1e-7)
    assert tightness_term(1.0, r)[0] == 0.0   # boxes no wider than 1 / tol times the input's: no penalty


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_relu_balance_kernel_equals_its_numpy_reference(dtype, rng):
    """The two-pass numba form of the relu-balance term against the formula in NumPy: both ratios
    penalized, one, none, and a layer without inactive entries."""
    from nemon_np.warmup import relu_balance_term, relu_balance_term_reference
    rtol = 1e-12 if dtype == np.float64 else 2e-5
    for shift in (0.6, 0.2, 0.0, 5.0):
        c = (rng.normal(size=(7, 5, 5, 3)) * 0.5 + shift).astype(dtype)
        r = rng.uniform(0, 0.5, c.shape).astype(dtype)
        value, grad = relu_balance_term(c, r)
        ref_value, ref_grad = relu_balance_term_reference(c, r)
        assert grad.dtype == dtype and grad.shape == c.shape
        assert value == pytest.approx(ref_value, rel=rtol)
        np.testing.assert_allclose(grad, ref_grad, rtol=rtol, atol=rtol * np.abs(ref_grad).max())
    assert value == 2.0 and not grad.any()   # shift 5: every entry active


def test_certified_loss_with_the_warmup_terms_matches_finite_differences(rng):
    model = random_stack("dense8,relu,nemon6,dense5,relu", (5,), 8)
    U = rng.normal(size=(4, 5))
    y = rng.integers(0, model.n_out, 4)
    lo, hi = U - 0.1, U + 0.1
    opts = dict(warmup_weight=0.3, **EXACT)
    total, grads, info = model.certified_loss_and_grad(U, y, lo, hi, 0.4, return_info=True, **opts)
    plain = model.certified_loss_and_grad(U, y, lo, hi, 0.4, **EXACT)[0]
    assert info["warmup_loss"] > 0 and total == pytest.approx(plain + 0.3 * info["warmup_loss"])
    fd = _params_fd(model, lambda: model.certified_loss_and_grad(U, y, lo, hi, 0.4, **opts)[0])
    _assert_gradients(model, grads, fd)


def test_the_stack_form_of_a_conv_nemon_equals_it(rng):
    """cnemon<C>k<k>z,pool<s> holding a ConvNEMON's parameters gives its logits bit for bit, and its
    gradients, certified loss and interval margins within float rounding (the pooling's transpose and
    the per-sample scale are applied in another order)."""
    conv = nemon_np.ConvNEMON(2, (6, 6), channels=3, kernel=3, n_out=4, pool=3, gamma=0.7, padding="zero", seed=2,
                              dtype=np.float64)
    conv.b, conv.c = 0.3 * rng.normal(size=3), rng.normal(size=4)
    stack = StackedClassifier("cnemon3k3z,pool3", (2, 6, 6), 4, gamma=0.7, dtype=np.float64)
    head = len(stack.layers) - 1
    names = {"0.K": "K", "0.B": "B", "0.b": "b", f"{head}.W": "C", f"{head}.b": "c"}
    U = rng.normal(size=(5, 72))
    y = rng.integers(0, 4, 5)
    _assert_stack_equals_model(stack, conv, names, U, y, exact=False)
    np.testing.assert_allclose(stack.interval_margins(U - 0.05, U + 0.05, y)[0],
                               conv.interval_margins(U - 0.05, U + 0.05, y)[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["dense", "dense-hidden", "dense-weighted", "conv", "conv-hidden"])
def test_from_model_gives_the_stack_form_of_a_saved_model(tmp_path, kind, rng):
    """A saved NEMON or ConvNEMON, read back and turned into a stack: the same logits and certificates."""
    if kind.startswith("dense"):
        weights = rng.uniform(0.5, 2.0, 8) if kind == "dense-weighted" else None
        model = random_model(5, 8, 4, 0.7, seed=9, weights=weights, readout_hidden=6 if "hidden" in kind else 0)
        U = rng.normal(size=(6, 5))
    else:
        model = nemon_np.ConvNEMON(1, (4, 4), channels=2, kernel=3, n_out=4, pool=2, gamma=0.6, seed=9,
                                   dtype=np.float64, readout_hidden=5 if "hidden" in kind else 0)
        U = rng.normal(size=(6, 16))
    model.save(tmp_path / "model.npz")
    model = load_model(tmp_path / "model.npz")
    stack = StackedClassifier.from_model(model)
    y = rng.integers(0, 4, 6)
    assert np.array_equal(stack.logits(U, tol=1e-10), model.logits(U, tol=1e-10))
    for name in ("interval", "crown", "lipschitz"):
        pixels = 1 / (1 + np.exp(-U))   # in [0, 1]; no normalization in the metadata
        np.testing.assert_allclose(certify(stack, pixels, y, 0.05, name).margins,
                                   certify(model, pixels, y, 0.05, name).margins, rtol=0, atol=1e-9, err_msg=name)
