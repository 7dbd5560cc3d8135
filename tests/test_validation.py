"""nemon_np._validation.all_finite against NumPy's entry-wise check, on the layouts and values it reads through
bit patterns (float32, float64, C and Fortran order) and on those it sums (views, integers, empty)."""
import numpy as np
import pytest

from nemon_np._validation import all_finite

SPECIAL = (np.inf, -np.inf, np.nan, -np.nan)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("order", ["C", "F"])
def test_all_finite_is_the_entry_wise_check(rng, dtype, order):
    finfo = np.finfo(dtype)
    for shape in ((1,), (7,), (100, 784), (3, 5, 4)):
        a = np.asarray(rng.normal(size=shape) * 1e3, dtype=dtype, order=order)
        a.flat[0] = finfo.max                # the largest finite numbers and a subnormal: finite
        a.flat[-1] = -finfo.max
        a.flat[a.size // 2] = finfo.tiny / 4
        assert all_finite(a)
        for value in SPECIAL:
            for where in {0, a.size // 3, a.size - 1}:
                b = a.copy(order=order)
                b.flat[where] = value
                assert all_finite(b) == bool(np.all(np.isfinite(b))) is False


def test_all_finite_on_what_it_sums(rng):
    a = rng.normal(size=(20, 30))
    assert all_finite(a[:, ::2]) and all_finite(np.arange(12).reshape(3, 4)) and all_finite(np.empty((0, 3)))
    a[3, 4] = np.nan
    assert not all_finite(a[:, ::2])
    big = np.full(10, np.finfo(np.float64).max)   # the sum overflows, every entry is finite
    assert all_finite(big[::2])
