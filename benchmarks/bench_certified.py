"""Certified robustness of trained runs: interval, linear-relaxation and Lipschitz certificates, and the
explicit twin.

Run:  python benchmarks/bench_certified.py RUN_DIR [RUN_DIR ...] --data-dir DIR [--samples 1000]
          [--eps 0.01 0.02 0.05 0.1 0.3] [--explicit] [--speed] [--out results.json]

For each run written by ``python -m nemon_np.train`` (dense or conv NEMON): clean accuracy and the
certified accuracy at each eps (pixel units) on the first --samples test images, by the interval
certificate, by its linear relaxation (crown) and by the Lipschitz certificate (nemon_np.certify:
sound, tolerance and rounding included). With --explicit, the run's explicit twin
(benchmarks/explicit_ibp.py: one hidden ReLU layer of the same width, or one conv layer of the same
channels, with the same pooling and head) is trained with the run's own config (epochs, batch order,
learning rate and schedule, augmentation, certified eps and kappa ramps) and certified by the same
code. With --speed, the time to certify
the whole test set (10,000 images for MNIST) at the largest eps by intervals.
"""
import argparse
import json
import pathlib
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from explicit_ibp import ExplicitNet, train_explicit  # noqa: E402

from nemon_np._cli import add_threads_argument, load_run  # noqa: E402
from nemon_np.certificates import certify  # noqa: E402
from nemon_np.data import normalize  # noqa: E402
from nemon_np.pixels import forward_options, input_ball, solver_options_for, to_inputs  # noqa: E402
from nemon_np.training import config_from_dict  # noqa: E402

EPS = (0.01, 0.02, 0.05, 0.1, 0.3)


def evaluate(model, pixels, labels, eps_list, certificates):
    """Clean accuracy and {certificate: [certified accuracy at each eps]}, with the seconds taken."""
    fwd = forward_options(solver_options_for(model))
    clean = float(np.mean(model.predict(to_inputs(model, pixels), **fwd) == labels))
    rows, seconds = {}, {}
    for name in certificates:
        t0 = time.perf_counter()
        rows[name] = [certify(model, pixels, labels, eps, name).certified_accuracy for eps in eps_list]
        seconds[name] = time.perf_counter() - t0
    return {"clean_acc": clean, "certified": rows, "certify_seconds": seconds}


def explicit_twin(run, model, config, summary, data):
    """Train the explicit twin of a run with the run's config; returns (its model as a zero-A NEMON, seconds)."""
    conv = config.model == "conv"
    shape = data.train_images.shape[1:]
    shape = (1,) + shape if len(shape) == 2 else shape
    net = ExplicitNet(model.n_in, model.channels if conv else model.n_hidden, model.n_out, seed=config.seed,
                      dtype=np.dtype(config.dtype).type, image_shape=shape if conv else None,
                      kernel=config.kernel, pool=config.pool, padding=config.padding,
                      readout_hidden=config.readout_hidden)
    mean, std = np.array(data.mean), np.array(data.std)
    n_train = summary.get("train_samples", len(data.train_images))   # the run's --limit-train, if any
    X = normalize(data.train_images[:n_train], mean, std, np.dtype(config.dtype).type)
    n_in = X.shape[1]
    per = n_in // len(np.atleast_1d(mean))
    m, s = np.repeat(np.atleast_1d(mean), per), np.repeat(np.atleast_1d(std), per)
    ball = lambda U, eps: input_ball(U, eps, m, s, clip=True)  # noqa: E731
    print(f"  training the explicit twin ({config.epochs} epochs) ...", flush=True)
    seconds = train_explicit(net, X, data.train_labels[:n_train], config, ball,
                             progress=lambda e: print(f"    epoch {e}", flush=True) if e % 5 == 0 else None)
    twin = net.as_nemon()
    twin.metadata.update(mean=mean, std=std, dataset=data.name)
    return twin, float(sum(seconds))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders of python -m nemon_np.train")
    p.add_argument("--data-dir", default=None, help="data folder (as for training)")
    p.add_argument("--samples", type=int, default=1000, help="first N test images")
    p.add_argument("--eps", type=float, nargs="+", default=list(EPS), help="radii in pixel units")
    p.add_argument("--explicit", action="store_true", help="also train and certify each run's explicit twin")
    p.add_argument("--speed", action="store_true", help="time certifying the whole test set at the largest eps")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    add_threads_argument(p)
    args = p.parse_args(argv)
    threadpool_limits(1, user_api="blas")
    results = {}
    for run in args.runs:
        run = pathlib.Path(run)
        model, data, _ = load_run(p, run, args.data_dir, args.threads)
        metrics = json.loads((run / "metrics.json").read_text())
        config = config_from_dict(metrics["config"]).validate()
        images = data.test_images[:args.samples]
        pixels = images.reshape(len(images), -1) / 255.0
        labels = data.test_labels[:args.samples]
        print(f"{run}: {model}, trained at certified eps {config.certified_eps:g}", flush=True)
        r = {"model": repr(model), "config": vars(config), "eps": args.eps,
             "nemon": evaluate(model, pixels, labels, args.eps, ("interval", "crown", "lipschitz"))}
        if args.speed:
            all_pixels = data.test_images.reshape(len(data.test_images), -1) / 255.0
            certify(model, all_pixels[:100], data.test_labels[:100], max(args.eps))   # compile and warm up
            t0 = time.perf_counter()
            res = certify(model, all_pixels, data.test_labels, max(args.eps))
            r["speed"] = {"images": len(all_pixels), "eps": max(args.eps), "seconds": time.perf_counter() - t0,
                          "certified_accuracy": res.certified_accuracy}
        if args.explicit:
            twin, seconds = explicit_twin(run, model, config, metrics.get("summary", {}), data)
            r["explicit"] = evaluate(twin, pixels, labels, args.eps, ("interval", "crown"))
            r["explicit"]["train_seconds"] = seconds
        results[str(run)] = r
        print_table(r)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    return 0


def print_table(r):
    eps = r["eps"]
    print(f"  {'':34s} {'clean':>7s} " + " ".join(f"{'eps ' + format(e, 'g'):>9s}" for e in eps))
    rows = [("NEMON, interval", r["nemon"], "interval"), ("NEMON, linear relaxation", r["nemon"], "crown"),
            ("NEMON, Lipschitz", r["nemon"], "lipschitz")]
    if "explicit" in r:
        rows += [("explicit twin (IBP), interval", r["explicit"], "interval"),
                 ("explicit twin, linear relaxation", r["explicit"], "crown")]
    for name, res, cert in rows:
        print(f"  {name:34s} {100 * res['clean_acc']:6.2f}% "
              + " ".join(f"{100 * a:8.2f}%" for a in res["certified"][cert]))
    if "speed" in r:
        s = r["speed"]
        print(f"  certifying {s['images']} test images at eps {s['eps']:g} by intervals: {s['seconds']:.2f} s "
              f"({100 * s['certified_accuracy']:.2f}% certified)")
    if "explicit" in r:
        print(f"  explicit twin trained in {r['explicit']['train_seconds']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
