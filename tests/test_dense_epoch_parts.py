"""benchmarks/dense_epoch_parts.py: its timers see every compiled part of the library's own step, and leave
the library as they found it (a renamed kernel would otherwise be timed as "the rest", silently)."""
import pathlib
import sys
from collections import defaultdict

import numpy as np

from nemon_np import models, optim, projection, solvers
from nemon_np.training import TrainConfig, Trainer

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import dense_epoch_parts  # noqa: E402


def test_the_timers_see_every_part_and_are_removed_after(rng):
    parts = {(models.DenseImplicitMap, "_inject"), (models.DenseImplicitMap, "_inject_grad"),
             (solvers, "_averaged_fixed_point"), (projection, "_project_rows"), (projection, "_round_inside"),
             (optim, "_adam_update")}
    originals = {(owner, name): owner.__dict__[name] for owner, name in parts}
    X = rng.normal(size=(60, 12)).astype(np.float32)
    y = rng.integers(0, 3, size=60)
    config = TrainConfig(hidden=8, epochs=1, batch_size=20, dtype="float32", gamma=0.9, tol=1e-4)
    table = defaultdict(float)
    undo = dense_epoch_parts.instrument(table)
    try:
        assert solvers._averaged_fixed_point is not originals[(solvers, "_averaged_fixed_point")]
        Trainer(config, 12, 3).fit(X, y, progress=False)
    finally:
        undo()
    assert set(table) == {"forward kernel", "adjoint kernel", "input product U B^T", "input gradient delta^T U",
                          "projection", "Adam"}
    assert all(owner.__dict__[name] is originals[(owner, name)] for owner, name in parts)
