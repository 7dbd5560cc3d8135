"""Evaluate a trained run: ``python -m nemon_np.evaluate RUN_DIR``.

Reloads RUN_DIR/model.npz and prints test accuracy, mu_inf(A) (in the model's norm,
weighted if it learned weights) and the l_inf Lipschitz bound of the logits, in the units
of the normalized input and of pixels in [0, 1].
"""
import argparse
import pathlib
import sys

import numpy as np

from ._cli import OneLineErrorParser
from .data import DataError, load_dataset, normalize
from .measures import mu_inf
from .models import NEMON
from .robustness import lipschitz_bound
from .training import evaluate


def main(argv=None):
    p = OneLineErrorParser(prog="python -m nemon_np.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a folder written by python -m nemon_np.train (or a model.npz)")
    p.add_argument("--data-dir", default=None, help="folder with the data set (as for training)")
    p.add_argument("--tol", type=float, default=1e-6, help="fixed-point tolerance for evaluation")
    args = p.parse_args(argv)
    path = pathlib.Path(args.run_dir)
    path = path / "model.npz" if path.is_dir() else path
    if not path.is_file():
        p.error(f"{path} not found")
    try:
        model = NEMON.load(path)
        name = model.metadata.get("dataset")
        if name is None:
            raise ValueError(f"{path} does not say which data set it was trained on")
        data = load_dataset(name, args.data_dir)
    except (ValueError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    mean, std = model.metadata["mean"], model.metadata["std"]
    X = normalize(data.test_images, mean, std, model.dtype)
    loss, acc, its = evaluate(model, X, data.test_labels, tol=args.tol, max_iter=1000)
    L = lipschitz_bound(model)
    norm = "weighted, saved weights" if model.weights is not None else "unweighted"
    print(f"model           {model}")
    print(f"test accuracy   {100 * acc:.2f}%  (loss {loss:.4f}, {len(X)} images, "
          f"{its.mean():.1f} fixed-point iterations per image at tol {args.tol:g})")
    print(f"mu_inf(A)       {model.mu_inf():.6f}  ({norm}; gamma = {model.gamma}; unweighted {mu_inf(model.A):.4f})")
    print(f"Lipschitz bound {L:.4g} per unit of normalized input, {L / float(np.min(std)):.4g} per pixel unit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
