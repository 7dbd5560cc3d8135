"""Warm starts across epochs: each training sample's last fixed point and embedded box.

A sample's fixed point x* = relu(A x* + B u + b) moves little from one epoch to the next once the
learning rate has come down, so the solve that starts where the sample's last one ended needs fewer
iterations than one from zero (measured on the dense certified recipe at n = 200: forward 9.4 -> 3.6-5.5
iterations a sample, the embedded network's 10 -> 4-6; docs/benchmarks.md, "Warm starts").

Sound for any start: the average iteration converges to the unique fixed point from every start when
mu_inf(A) < 1 (DESIGN.md, "Well-posedness"), and so does the embedded network's, whose measure is
A's; each solve still stops on the same residual test, so only the iteration count changes. The
certificates never use these starts: they solve from zero and widen by the final residual.
"""
import numpy as np

__all__ = ["WarmStarts"]


class WarmStarts:
    """Per-sample starts for the forward solve (X0) and the embedded network's ([x_lo, x_hi], box0).

    ``WarmStarts(n_samples)`` holds nothing until :meth:`update` first stores a batch; rows never stored
    are zeros, the solvers' own start. The arrays are (n_samples,) + the state's shape in the
    solver's dtype: 3 n numbers a sample with boxes (144 MB for 60,000 MNIST images at n = 200,
    float32), which is why the trainer offers them for dense models only.
    """

    def __init__(self, n_samples):
        n_samples = int(n_samples)
        if n_samples < 1:
            raise ValueError(f"n_samples must be a positive whole number, got {n_samples!r}")
        self.n_samples = n_samples
        self.states = None
        self.boxes = None

    def starts(self, idx):
        """(X0, box0) for the samples ``idx``: their stored rows, or None where nothing is stored yet
        (the solver then starts from zero)."""
        return (None if self.states is None else self.states[idx],
                None if self.boxes is None else self.boxes[idx])

    def update(self, idx, states, boxes=None):
        """Store the fixed points ``states`` (len(idx), ...) and, if given, the boxes of the samples
        ``idx``."""
        self.states = self._stored(self.states, idx, states)
        if boxes is not None:
            self.boxes = self._stored(self.boxes, idx, boxes)

    def _stored(self, table, idx, rows):
        rows = np.asarray(rows)
        if table is None:
            table = np.zeros((self.n_samples,) + rows.shape[1:], rows.dtype)
        elif table.shape[1:] != rows.shape[1:]:
            raise ValueError(f"warm starts hold rows of shape {table.shape[1:]}, got {rows.shape[1:]}")
        table[idx] = rows
        return table

    def arrays(self):
        """The stored tables as a dict (for the training state file); empty before any update."""
        return {k: v for k, v in (("states", self.states), ("boxes", self.boxes)) if v is not None}

    @classmethod
    def from_arrays(cls, arrays):
        """WarmStarts holding the non-empty dict of tables that :meth:`arrays` wrote; tables of unequal
        length or unknown names are a one-line ``ValueError``."""
        lengths = {len(v) for v in arrays.values()}
        if len(lengths) != 1:
            raise ValueError(f"warm-start tables of unequal lengths {sorted(lengths)}")
        warm = cls(lengths.pop())
        for name, table in arrays.items():
            if name not in ("states", "boxes"):
                raise ValueError(f"unknown warm-start table {name!r}")
            setattr(warm, name, np.array(table))
        return warm
