"""Evaluate a trained run: ``python -m nemon_np.evaluate RUN_DIR``.

Reloads RUN_DIR/model.npz and prints test accuracy, mu_inf(A) (in the model's norm,
weighted if it learned weights) and the l_inf Lipschitz bound of the logits, in the units
of the normalized input and of pixels in [0, 1].
"""
import argparse
import sys

import numpy as np

from ._cli import OneLineErrorParser, add_threads_argument, limit_blas_threads, load_run
from .conv_model import ConvNEMON
from .data import normalize
from .measures import mu_2, mu_inf
from .lipschitz import lipschitz_bound
from .pixels import forward_options, solver_options_for
from .training import evaluate


def main(argv=None):
    p = OneLineErrorParser(prog="python -m nemon_np.evaluate", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a folder written by python -m nemon_np.train (or a model.npz)")
    p.add_argument("--data-dir", default=None, help="folder with the data set (as for training)")
    p.add_argument("--tol", type=float, default=None,
                   help="fixed-point tolerance for evaluation (default 1e-4 for float32 models, 1e-8 for float64)")
    add_threads_argument(p)
    args = p.parse_args(argv)
    if args.tol is not None and not (0 < args.tol < float("inf")):
        p.error(f"--tol must be a positive number, got {args.tol:g}")
    limit_blas_threads()
    model, data, _ = load_run(p, args.run_dir, args.data_dir, args.threads)
    mean, std = model.metadata["mean"], model.metadata["std"]
    X = normalize(data.test_images, mean, std, model.dtype)
    options = forward_options(solver_options_for(model, args.tol))
    loss, acc, its = evaluate(model, X, data.test_labels, **options)
    L = lipschitz_bound(model) if model.mu_inf() < 1 else None
    norm = "weighted, saved weights" if model.weights is not None else "unweighted"
    print(f"model           {model}")
    print(f"test accuracy   {100 * acc:.2f}%  (loss {loss:.4f}, {len(X)} images, {its.mean():.1f} "
          f"{options['method']} iterations per image at tol {options['tol']:g})")
    if model.implicit_part()[0] is None:
        print("mu_inf          none: an explicit stack has no implicit layer")
    elif isinstance(model, ConvNEMON):
        print(f"mu_inf(K)       {model.mu_inf():.6f}  (exact measure of the {model.padding} convolution, "
              f"gamma = {model.gamma})")
    else:
        print(f"mu_inf(A)       {model.mu_inf():.6f}  ({norm}; gamma = {model.gamma}; unweighted "
              f"{mu_inf(model.A):.4f}); mu_2(A) {mu_2(model.A):.4f}")
    if L is None:
        print("Lipschitz bound none: mu_inf(A) >= 1 gives no l_inf certificate")
    else:
        print(f"Lipschitz bound {L:.4g} per unit of normalized input, {L / float(np.min(std)):.4g} per pixel unit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
