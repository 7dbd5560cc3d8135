import os
import pathlib

import numpy as np
import pytest
from hypothesis import settings

import nemon_np
import nemon_np.conv

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def random_model(n_in, n, n_out, mu, seed, dtype=np.float64, weights=None, readout_hidden=0):
    """A NEMON with dense random parameters and A projected onto mu_inf(A) <= mu (with a hidden
    read-out layer of ``readout_hidden`` units and a random bias h when > 0)."""
    rng = np.random.default_rng(seed)
    model = nemon_np.NEMON(n_in, n, n_out, gamma=min(mu, 0.99), seed=seed, dtype=dtype, weights=weights,
                           readout_hidden=readout_hidden)
    if readout_hidden:
        model.h = (0.3 * rng.normal(size=readout_hidden)).astype(dtype)
    model.A = nemon_np.project_mu_inf((rng.normal(size=(n, n)) / np.sqrt(n)).astype(dtype), mu, weights)
    model.b = (0.3 * rng.normal(size=n)).astype(dtype)
    model.c = rng.normal(size=n_out).astype(dtype)
    return model


def box_samples(rng, lo, hi, n):
    """n points of each box [lo, hi]: random interior points and random corners, alternating."""
    for t in range(n):
        yield np.where(rng.random(lo.shape) < 0.5, lo, hi) if t % 2 else lo + rng.random(lo.shape) * (hi - lo)


def finite_difference(f, P, h=1e-6):
    """Central differences of the scalar f() with respect to every entry of P (modified in place, restored)."""
    out = np.zeros_like(P, dtype=np.float64)
    for idx in np.ndindex(P.shape):
        old = P[idx]
        P[idx] = old + h
        fp = f()
        P[idx] = old - h
        fm = f()
        P[idx] = old
        out[idx] = (fp - fm) / (2 * h)
    return out


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (../shared/data beside the repository)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def mnist_data(shared_data):
    """The real MNIST of ../shared/data, loaded once (skips with the reason when it is absent)."""
    from nemon_np.data import load_mnist
    return load_mnist(shared_data, download=False)


# Solver settings for comparisons with exact references: fixed points to 1e-12 (TIGHT: adjoints too).
EXACT = dict(tol=1e-12, max_iter=20_000)
TIGHT = dict(tol=1e-13, adjoint_tol=1e-13, max_iter=20_000)


# Property-based tests (tests/test_properties.py): a fixed example budget, derandomized, so that the
# suite is deterministic and within its time budget; HYPOTHESIS_PROFILE=dev explores further.
settings.register_profile("ci", max_examples=30, derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def conv_as_dense(conv):
    """The conv model as a dense NEMON on the channel-first flattened state, from conv_matrix."""
    (Hh, Ww), C, s = conv.image_size, conv.channels, conv.pool
    n = C * Hh * Ww
    dense = nemon_np.NEMON(conv.n_in, n, conv.n_out, gamma=conv.gamma, readout_hidden=conv.readout_hidden)
    dense.A = nemon_np.conv.conv_matrix(conv.K, Hh, Ww, conv.padding)
    dense.B = nemon_np.conv.conv_matrix(conv.B, Hh, Ww, conv.padding)
    dense.b = np.repeat(conv.b, Hh * Ww)
    pool = np.zeros(((Hh // s) * (Ww // s) * C, n))   # features in the conv model's (i, j, channel) order
    for c in range(C):
        for i in range(Hh):
            for j in range(Ww):
                pool[((i // s) * (Ww // s) + j // s) * C + c, (c * Hh + i) * Ww + j] = 1.0 / (s * s)
    if conv.H is None:
        dense.C, dense.c = conv.C @ pool, conv.c
    else:
        dense.H, dense.h, dense.C, dense.c = conv.H @ pool, conv.h, conv.C, conv.c
    return dense
