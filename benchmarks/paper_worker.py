"""Times the paper's own PyTorch code (Jafarpour et al. 2021) on arrays that ``vs_paper.py`` wrote.

Run by ``benchmarks/vs_paper.py`` with a Python that has torch (never this project's venv: the library
has no PyTorch); not imported by anything else. It builds the paper's models from a checkout of its
repository (``--paper-code``), exactly as its ``experiments.py`` does for MNIST, and runs the inner loop
of its ``train.train`` (zero_grad, forward, cross entropy, backward, Adam step) over the batches, then its
test loop. torchvision is replaced by an empty stand-in module: the paper's ``train.py`` imports it for
its data loaders only, which are not used here (the data come as .npy arrays), and PyPI's torchvision
does not import beside the torch wheel on these machines.

Prints one JSON line: train seconds (wall and CPU) and test seconds for each epoch, test accuracy, the
paper's iteration counts.
"""
import argparse
import json
import sys
import time
import types

import numpy as np


def import_paper(code_dir):
    for name in ("torchvision", "torchvision.datasets", "torchvision.transforms"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.path.insert(0, code_dir)
    import splitting
    import train
    return splitting, train


def build(kind, channels, splitting, train):
    """experiments.py's MNIST models: the dense one (n = 100, alpha 1, tol 1e-2) and the single-conv one
    (here with ``channels`` output channels, 5 x 5 kernels, alpha 0.5, tol 1e-2)."""
    if kind == "dense":
        return train.NESingleFcNet(splitting.NEmonForwardStep, in_dim=28 ** 2, out_dim=100, alpha=1.0, max_iter=300,
                                   tol=1e-2, m=0.0)
    return train.NESingleConvNet(splitting.NEmonForwardStep, in_dim=28, in_channels=1, out_channels=channels,
                                 alpha=0.5, max_iter=300, tol=1e-2, m=0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paper-code", required=True, help="a checkout of the paper's repository")
    p.add_argument("--arrays", required=True, help="the .npz that vs_paper.py wrote (X, y, X_test, y_test)")
    p.add_argument("--model", choices=("dense", "conv"), default="dense")
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--test-batch-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    splitting, train = import_paper(args.paper_code)
    data = np.load(args.arrays)
    shape = (-1, 1, 28, 28)
    X, y = torch.from_numpy(data["X"].reshape(shape)), torch.from_numpy(data["y"].astype(np.int64))
    Xt, yt = torch.from_numpy(data["X_test"].reshape(shape)), torch.from_numpy(data["y_test"].astype(np.int64))
    model = build(args.model, args.channels, splitting, train)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(args.seed)
    out = {"train_seconds": [], "train_cpu_seconds": [], "test_seconds": [], "test_acc": [], "fwd_iters": [],
           "bwd_iters": []}
    for _ in range(args.epochs):
        model.train()
        model.mon.stats.reset()
        order = torch.from_numpy(rng.permutation(len(X)))
        start, cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(X), args.batch_size):
            idx = order[i:i + args.batch_size]
            optimizer.zero_grad()
            loss = F.cross_entropy(model(X[idx]), y[idx])
            loss.backward()
            optimizer.step()
        out["train_seconds"].append(time.perf_counter() - start)
        out["train_cpu_seconds"].append(time.process_time() - cpu)
        out["fwd_iters"].append(model.mon.stats.fwd_iters.avg)
        out["bwd_iters"].append(model.mon.stats.bkwd_iters.avg)
        model.eval()
        start, correct = time.perf_counter(), 0
        with torch.no_grad():
            for i in range(0, len(Xt), args.test_batch_size):
                batch = slice(i, i + args.test_batch_size)
                correct += int((model(Xt[batch]).argmax(1) == yt[batch]).sum())
        out["test_seconds"].append(time.perf_counter() - start)
        out["test_acc"].append(correct / len(Xt))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
