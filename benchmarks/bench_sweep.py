"""Sweep benchmark: 4 independent dense runs through a local Dask cluster against one after the other.

Run:  python benchmarks/bench_sweep.py --data-dir ../shared/data [--epochs 5] [--workers 2]

The same four runs of ``python -m nemon_np.train`` (seeds 0-3, the default dense model, --epochs
epochs), first one after the other in this process, then as ``python -m nemon_np.sweep --seeds 4``
does it on a local cluster of --workers processes (cluster start-up included). Prints both wall
times, their ratio, and whether the runs agree (same seed, same test accuracy).
"""
import argparse
import json
import pathlib
import sys
import tempfile
import time

from threadpoolctl import threadpool_limits

from nemon_np.sweep import plan_runs, run_sweep, run_training


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="MNIST folder (as for nemon_np.train)")
    p.add_argument("--epochs", type=int, default=5, help="epochs per run")
    p.add_argument("--workers", type=int, default=2, help="local cluster: worker processes")
    args = p.parse_args(argv)
    train_args = ["--epochs", str(args.epochs)] + (["--data-dir", args.data_dir] if args.data_dir else [])
    with tempfile.TemporaryDirectory() as tmp:
        serial = plan_runs({}, 4, pathlib.Path(tmp) / "serial", train_args)
        t0 = time.perf_counter()
        with threadpool_limits(1, user_api="blas"):
            for _, _, folder, argv_run in serial:
                status, message = run_training(argv_run, folder)
                assert status == "done", message
        t_serial = time.perf_counter() - t0
        parallel = plan_runs({}, 4, pathlib.Path(tmp) / "sweep", train_args)
        t0 = time.perf_counter()
        results = run_sweep(parallel, workers=args.workers, progress=False)
        t_sweep = time.perf_counter() - t0
        assert all(s == "done" for s, _ in results.values()), results
        accs = [[json.loads((f / "metrics.json").read_text())["summary"]["test_acc"] for _, _, f, _ in runs]
                for runs in (serial, parallel)]
    print(f"4 dense runs of {args.epochs} epochs: one after the other {t_serial:.1f} s, as a sweep on {args.workers} "
          f"local workers {t_sweep:.1f} s (cluster start-up included): ratio {t_sweep / t_serial:.2f}")
    print(f"test accuracies serial {accs[0]}, sweep {accs[1]}: {'identical' if accs[0] == accs[1] else 'DIFFERENT'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
