"""How much robustness the certificates leave unproven (issue 26): exact verification of a dense NEMON
beside the interval, crown and lp certificates and PGD, on the first test images.

Run:  python benchmarks/exact_verification.py RUN --data-dir DIR --eps 0.02 --images 200 [--time-limit 60] [--jobs 2]
          [--out docs/figures/exact_verification_0.02.json]

RUN is a folder written by ``python -m nemon_np.train`` with a dense NEMON (``make run`` trains the
default one). For each image: the status exact gives it (certified, falsified with a counterexample
re-solved in float64, or unknown when --time-limit seconds ran out) and its seconds, beside whether
interval, crown and lp certify it and whether PGD (20 steps, a random start) leaves it correct.
Prints the shares and the seconds per image, writes them as JSON, and stops with exit 1 when the
results contradict each other (a certified image that PGD or exact breaks, an image PGD breaks that
exact certifies): each is a proof, so any of these would be a bug.
"""
import argparse
import json
import pathlib
import sys
import time

import numpy as np
from tqdm import tqdm

from nemon_np.certificates import ExactCertificate, certify
from nemon_np.data import load_dataset
from nemon_np.loading import load_model
from nemon_np.pixels import forward_options, solver_options_for, to_inputs
from nemon_np.robustness import attack


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("run", help="run folder (or model.npz) of a dense NEMON")
    parser.add_argument("--data-dir", default=None, help="folder with the MNIST files")
    parser.add_argument("--eps", type=float, default=0.02, help="radius in pixel units")
    parser.add_argument("--images", type=int, default=200, help="the first N test images")
    parser.add_argument("--time-limit", type=float, default=60.0, help="exact's seconds per image")
    parser.add_argument("--jobs", type=int, default=2, help="processes sharing exact's images")
    parser.add_argument("--out", default=None, help="JSON file (default docs/figures/exact_verification_<eps>.json)")
    args = parser.parse_args(argv)
    path = pathlib.Path(args.run)
    model = load_model(path / "model.npz" if path.is_dir() else path)
    data = load_dataset(model.metadata.get("dataset", "mnist"), args.data_dir)
    pixels = data.test_images[:args.images].reshape(args.images, -1).astype(np.float64) / 255.0
    labels = data.test_labels[:args.images]
    fwd = forward_options(solver_options_for(model))
    rows, seconds = {}, {}
    for name in ("interval", "crown", "lp"):
        t0 = time.perf_counter()
        rows[name] = certify(model, pixels, labels, args.eps, name).certified
        seconds[name] = (time.perf_counter() - t0) / args.images
    t0 = time.perf_counter()
    bar = tqdm(total=args.images, desc="exact", unit="image")
    exact = certify(model, pixels, labels, args.eps, ExactCertificate(args.time_limit, args.jobs),
                    batch_size=10 * args.jobs, progress=lambda n: bar.update(n - bar.n))
    bar.close()
    seconds["exact"] = (time.perf_counter() - t0) / args.images
    adversarial = attack(model, pixels, labels, args.eps, "pgd", steps=20, seed=0)
    pgd = model.predict(to_inputs(model, adversarial), **fwd) == labels
    share = lambda flags: 100 * float(np.mean(flags))  # noqa: E731
    status = exact.status
    report = {"run": str(args.run), "eps": args.eps, "images": args.images, "time_limit": args.time_limit,
              "certified": {**{k: share(v) for k, v in rows.items()}, "exact": share(status == "certified")},
              "falsified": share(status == "falsified"), "unknown": share(status == "unknown"),
              "decided": share(status != "unknown"), "pgd": share(pgd), "seconds_per_image": seconds,
              "exact_seconds": {"median": float(np.median(exact.seconds)), "max": float(np.max(exact.seconds))},
              "binaries_median": float(np.median(exact.binaries)) if "binaries" in exact else None,
              "command": "python benchmarks/exact_verification.py " + " ".join(argv or sys.argv[1:])}
    print(f"eps {args.eps}, first {args.images} test images, {args.run}:")
    for name in ("interval", "crown", "lp", "exact"):
        print(f"  {name:9s} certified {report['certified'][name]:6.2f}%   {seconds[name]:.3f} s an image")
    print(f"  exact     falsified {report['falsified']:.2f}%, unknown {report['unknown']:.2f}% "
          f"(decided {report['decided']:.2f}%), seconds an image: median {report['exact_seconds']['median']:.2f}, "
          f"max {report['exact_seconds']['max']:.2f}")
    print(f"  PGD leaves {report['pgd']:.2f}% correct")
    out = pathlib.Path(args.out or f"docs/figures/exact_verification_{args.eps:g}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    contradictions = sum(int(np.sum(flags & (status == "falsified"))) for flags in rows.values())
    contradictions += int(np.sum((status == "certified") & ~pgd))
    contradictions += sum(int(np.sum(flags & ~pgd)) for flags in rows.values())
    if contradictions:
        print(f"{contradictions} contradictions between proofs and attacks", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
