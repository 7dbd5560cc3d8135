"""What the field's certified-training recipes cost on this machine, against the 150-minute run budget (issue 25).

Run:  python benchmarks/certified_budget.py [--arch ibp-small ibp-medium ibp-large cnn7-bn] [--steps 3]
          [--budget-minutes 150]

For each explicit model of the anchors (IBP's small, medium and large CNNs, Gowal et al. 2018; Shi et al.
2021's CNN-7 with batch normalization) on MNIST (1 x 28 x 28, 60,000 training images) and CIFAR-10
(3 x 32 x 32, 50,000), a process of its own times ``--steps`` IBP-training steps of this code
(``stack_step.time_step``: batch 100, float32, IBP initialization, one thread, CPU seconds, after a warm-up
step). An epoch is images / 100 such steps. The schedule is Shi et al.'s, the shortest the field reports
for its best interval-trained models: 70 epochs on MNIST, 160 on CIFAR-10. Prints, per model and dataset,
the seconds a step, the minutes an epoch, the epochs that fit in the budget on one thread, and the hours
the schedule takes on one thread, as a multiple of the budget (two threads at most halve it).

The NEMON stacks cost more than these explicit models a step (their fixed-point iterations), so the
multiples are lower bounds for them.
"""
import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from stack_step import time_step  # noqa: E402

# (input shape, training images, epochs of Shi et al. 2021's schedule)
DATASETS = {"mnist": ("1,28,28", 60000, 70), "cifar10": ("3,32,32", 50000, 160)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["ibp-small", "ibp-medium", "ibp-large", "cnn7-bn"],
                   help="presets or layer strings (explicit models: see the module docstring)")
    p.add_argument("--dataset", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--steps", type=int, default=3, help="steps timed per model (after one warm-up step)")
    p.add_argument("--budget-minutes", type=float, default=150.0, help="the run budget")
    args = p.parse_args(argv)
    if args.steps < 1 or not args.budget_minutes > 0:
        p.error("--steps must be >= 1 and --budget-minutes > 0")
    budget = 60 * args.budget_minutes
    print(f"| dataset | model | s a step | min an epoch | epochs in {args.budget_minutes:g} min | schedule | "
          f"hours, one thread | x the budget |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for dataset in args.dataset:
        shape, images, epochs = DATASETS[dataset]
        for arch in args.arch:
            step, _ = time_step(None, arch, shape, args.steps)
            epoch = step * images / 100
            hours = epochs * epoch / 3600
            print(f"| {dataset} | `{arch}` | {step:.2f} | {epoch / 60:.1f} | {budget / epoch:.1f} | {epochs} epochs | "
                  f"{hours:.1f} | {3600 * hours / budget:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
