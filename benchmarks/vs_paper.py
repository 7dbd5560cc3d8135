"""Our training epoch against the paper's own PyTorch code, in one run, A B B A (issue #27).

Run:  python benchmarks/vs_paper.py --paper-code DIR --paper-python PY [--model dense|conv] [--images N]
          [--epochs E] [--repeats R] [--data-dir DIR] [-- extra nemon_np.train flags for our side]
      python benchmarks/vs_paper.py --old-code CHECKOUT [...]   (this code against an older one, in turn)

DIR is a checkout of the paper's repository (github.com/davydovalexander/Non-Euclidean_Mon_Op_Net; it is
not part of this project and nothing of it is copied here); PY a Python with torch (``pip install
torch==2.13.0`` in a venv of its own). Both sides train on the same first N MNIST training images
(normalized once, here, and handed over as arrays), batch 100, from a fresh model, with one thread each
(BLAS, numba, torch), in separate processes taken in turn (A B, then B A), R times; each then tests on the 10,000 test
images. The paper's side is its ``experiments.py`` MNIST model (dense: n = 100, alpha 1, tol 1e-2;
conv: 5 x 5 kernels, --channels) in its own training loop (``paper_worker.py``). Ours is
``python -m nemon_np.train --dataset mnist`` with its defaults (conv: ``--model conv --kernel 5``), plus
whatever follows ``--``. Prints each run, the medians and the ratios paper / ours (above 1: ours is faster).

The dense part also prints the BLAS floor of our epoch: the time numpy's matmul takes for the products
an epoch cannot avoid at the iteration counts our run measured (input product and its gradient, and one
n x n product per forward and adjoint iteration of every sample), in the training dtype, one thread.
"""
import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
from threadpoolctl import threadpool_limits

# As nemon_np._threads.ONE_THREAD_ENV, written here because this script also times other checkouts of
# nemon_np (PYTHONPATH=/path/to/old python benchmarks/vs_paper.py), which may not have it.
ONE_THREAD_ENV = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")}

HERE = pathlib.Path(__file__).resolve().parent


def split_train_flags(argv):
    """(this script's arguments, the ``nemon_np.train`` flags that follow ``--``) of a command line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--" not in argv:
        return argv, []
    return argv[:argv.index("--")], argv[argv.index("--") + 1:]


def first_mnist(data_dir, images, test_images=None):
    """The first ``images`` training and ``test_images`` test images of MNIST (None: all), normalized
    as training normalizes them: X, y, X_test, y_test."""
    from nemon_np.data import load_mnist, normalize
    d = load_mnist(data_dir)
    return (normalize(d.train_images[:images], d.mean, d.std), d.train_labels[:images],
            normalize(d.test_images[:test_images], d.mean, d.std), d.test_labels[:test_images])


def our_config(model, epochs, extra):
    """The TrainConfig that ``python -m nemon_np.train`` builds from these flags (fails as it does)."""
    from dataclasses import fields
    from nemon_np.train import build_parser
    from nemon_np.training import TrainConfig
    flags = ["--dataset", "mnist", "--epochs", str(epochs)]
    flags += ["--model", "conv", "--kernel", "5"] if model == "conv" else []
    args = build_parser().parse_args(flags + list(extra))
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    config.validate()
    return config


def run_ours(arrays, model, epochs, extra, test_stop="converged"):
    """Our side, in its own process: one JSON line like the paper worker's. The test evaluation stops
    each sample where ``test_stop`` says (:func:`nemon_np.training.evaluate`)."""
    from nemon_np.training import Trainer, evaluate
    data = np.load(arrays)
    X, y, Xt, yt = data["X"], data["y"], data["X_test"], data["y_test"]
    config = our_config(model, epochs, extra)
    shape = (1, 28, 28) if config.model != "nemon" else None
    warm = Trainer(dataclasses.replace(config, epochs=1), 784, 10, image_shape=shape)
    warm.fit(X[:200], y[:200], progress=False)   # compiled kernels load outside the timing
    cpu0 = time.process_time()
    trainer = Trainer(config, 784, 10, image_shape=shape)
    cpu = []
    trainer.fit(X, y, progress=False, on_epoch=lambda row: cpu.append(time.process_time()))
    start, test_cpu = time.perf_counter(), time.process_time()
    # Passed only when asked, so that older checkouts (PYTHONPATH=...) run the default.
    stop = {} if test_stop == "converged" else {"stop": test_stop}
    _, acc, test_iterations = evaluate(trainer.model, Xt, yt, **stop, **config.solver_options())
    test, test_cpu = time.perf_counter() - start, time.process_time() - test_cpu
    h = trainer.history
    # CPU seconds of each epoch's training part: the epoch's CPU time less that of its closing evaluation
    # (there is none: X_test is not passed), so the difference of consecutive on_epoch stamps
    cpu_epochs = np.diff([cpu0] + cpu).tolist()
    return {"train_seconds": [r["train_seconds"] for r in h], "train_cpu_seconds": cpu_epochs,
            "test_seconds": [test], "test_cpu_seconds": [test_cpu], "test_acc": [acc],
            "test_iters": float(np.mean(test_iterations)),
            "fwd_iters": [r["fwd_iter_mean"] for r in h], "bwd_iters": [r["bwd_iter_mean"] for r in h],
            "hidden": config.hidden, "dtype": config.dtype, "batch_size": config.batch_size}


def blas_floor(images, hidden, fwd_iters, bwd_iters, dtype, batch=100, repeats=3):
    """CPU seconds numpy's matmul takes for one epoch's unavoidable products (module docstring), best of
    ``repeats``: per batch of m, U B (m x 784 x n) and U^T G (784 x m x n), and (fwd + bwd) products
    of m x n x n."""
    rng = np.random.default_rng(0)
    U = rng.standard_normal((batch, 784)).astype(dtype)
    B = rng.standard_normal((784, hidden)).astype(dtype)
    G = rng.standard_normal((batch, hidden)).astype(dtype)
    A = rng.standard_normal((hidden, hidden)).astype(dtype)
    n_batches = images // batch
    products = int(round((fwd_iters + bwd_iters) * n_batches))
    with threadpool_limits(1, user_api="blas"):
        best = min(_time_products(U, B, G, A, n_batches, products) for _ in range(repeats))
    return best


def _time_products(U, B, G, A, n_batches, products):
    start = time.process_time()
    for _ in range(n_batches):
        U @ B
        U.T @ G
    for _ in range(products):
        G @ A
    return time.process_time() - start


def run_side(cmd, pythonpath=None):
    """Run one side's command with one thread (and ``pythonpath`` first on PYTHONPATH); its JSON line."""
    env = {**os.environ, **ONE_THREAD_ENV}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    argv, extra = split_train_flags(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paper-code", help="a checkout of the paper's repository (omit to time our side alone)")
    p.add_argument("--paper-python", default=None, help="a Python that has torch, for the paper's side")
    p.add_argument("--old-code", help="another checkout of nemon_np: its code (on PYTHONPATH) trains our side too, "
                   "in turn with this one, and the ratio old / ours is printed pair by pair")
    p.add_argument("--model", choices=("dense", "conv"), default="dense")
    p.add_argument("--channels", type=int, default=32, help="conv channels on the paper's side (ours: --channels "
                   "after --, default 32)")
    p.add_argument("--images", type=int, default=60000, help="the first N training images (default all 60,000)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--test-stop", choices=("converged", "decided"), default="converged",
                   help="where our test evaluation stops each sample: at the solver's tolerance, or where its "
                        "class provably cannot change any more (nemon_np.decided)")
    p.add_argument("--side", choices=("ours",), help=argparse.SUPPRESS)
    p.add_argument("--arrays", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.side == "ours":
        print(json.dumps(run_ours(args.arrays, args.model, args.epochs, extra, args.test_stop)))
        return 0
    if args.paper_code and not args.paper_python:
        p.error("--paper-code needs --paper-python (a Python with torch)")
    if args.old_code and not (pathlib.Path(args.old_code) / "nemon_np" / "__init__.py").is_file():
        p.error(f"--old-code {args.old_code} is not a checkout of nemon_np (no nemon_np/__init__.py in it)")
    if args.images < 100 or args.epochs < 1 or args.repeats < 1:
        p.error("--images must be >= 100, --epochs and --repeats >= 1")
    our_config(args.model, args.epochs, extra)   # a bad flag fails here, not after the paper's run
    X, y, X_test, y_test = first_mnist(args.data_dir, args.images)
    with tempfile.TemporaryDirectory() as tmp:
        arrays = pathlib.Path(tmp) / "mnist.npz"
        np.savez(arrays, X=X, y=y, X_test=X_test, y_test=y_test)
        sides = {"ours": [sys.executable, __file__, "--side", "ours", "--arrays", str(arrays), "--model", args.model,
                          "--epochs", str(args.epochs), "--test-stop", args.test_stop, "--", *extra]}
        if args.paper_code:
            sides = {"paper": [args.paper_python, str(HERE / "paper_worker.py"), "--paper-code", args.paper_code,
                               "--arrays", str(arrays), "--model", args.model, "--channels", str(args.channels),
                               "--epochs", str(args.epochs)], **sides}
        if args.old_code:
            sides["old"] = sides["ours"]
        runs = {name: [] for name in sides}
        for rep in range(args.repeats):
            # A B, then B A: neither side always runs second, so a drift in the machine's speed within a
            # pair cannot favour one of them.
            for name, cmd in (list(sides.items())[::-1] if rep % 2 else sides.items()):
                r = run_side(cmd, args.old_code if name == "old" else None)
                runs[name].append(r)
                print(f"[{rep + 1}/{args.repeats}] {name:5s}: train {sum(r['train_seconds']):7.2f} s "
                      f"(CPU {sum(r['train_cpu_seconds']):.2f} s) "
                      f"({', '.join(f'{s:.2f}' for s in r['train_seconds'])} an epoch), "
                      f"test {r['test_seconds'][-1]:6.2f} s"
                      + (f" (CPU {r['test_cpu_seconds'][-1]:.2f} s, {r['test_iters']:.1f} iterations)"
                         if "test_cpu_seconds" in r else "") + ", "
                      f"accuracy {100 * r['test_acc'][-1]:.2f}%, iterations forward "
                      f"{np.mean(r['fwd_iters']):.1f} / adjoint {np.mean(r['bwd_iters']):.1f}", flush=True)
    med = {name: {k: float(np.median([sum(r[k]) if k.startswith("train") else r[k][-1] for r in rs]))
                  for k in ("train_seconds", "train_cpu_seconds", "test_seconds", "test_acc")}
           for name, rs in runs.items()}
    print(f"{args.model}, {args.images} images, {args.epochs} epoch(s), medians of {args.repeats}:")
    for name, m in med.items():
        print(f"  {name:5s} train {m['train_seconds']:.2f} s (CPU {m['train_cpu_seconds']:.2f} s), "
              f"test {m['test_seconds']:.2f} s, "
              f"accuracy {100 * m['test_acc']:.2f}%")
    if "paper" in med:
        print(f"  paper / ours: training {med['paper']['train_seconds'] / med['ours']['train_seconds']:.2f}x "
              f"(CPU seconds: {med['paper']['train_cpu_seconds'] / med['ours']['train_cpu_seconds']:.2f}x), "
              f"test {med['paper']['test_seconds'] / med['ours']['test_seconds']:.2f}x")
    if "old" in runs:
        pairs = [sum(o["train_cpu_seconds"]) / sum(n["train_cpu_seconds"]) for o, n in zip(runs["old"], runs["ours"])]
        print(f"  old / ours, training CPU seconds pair by pair: {', '.join(f'{r:.3f}' for r in pairs)}; "
              f"median {np.median(pairs):.3f}x")
    if args.model == "dense":
        r = runs["ours"][0]
        floor = blas_floor(args.images, r["hidden"], np.mean(r["fwd_iters"]), np.mean(r["bwd_iters"]),
                           np.dtype(r["dtype"]), r["batch_size"]) * args.epochs
        print(f"  BLAS floor of our epochs (matmul only, {r['dtype']}, one thread): {floor:.2f} CPU s; ours is "
              f"{med['ours']['train_cpu_seconds'] / floor:.2f}x the floor (CPU seconds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
