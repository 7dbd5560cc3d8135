"""Train a NEMON classifier on MNIST or CIFAR-10: ``python -m nemon_np.train --dataset mnist``.

Writes into --out (default runs/<dataset>-<timestamp>): model.npz (parameters, settings,
normalization; rewritten after every epoch, so Ctrl-C keeps the last complete one),
metrics.json and metrics.csv (one row per epoch) and training_curves.png.
"""
import argparse
import contextlib
import datetime
import json
import pathlib
import sys
import threading
import time
from dataclasses import fields

import numpy as np

from ._cli import OneLineErrorParser
from .data import AUGMENTATIONS, DATASETS, DataError, load_dataset, normalize
from .measures import mu_2, mu_inf
from .conv import PADDINGS
from .loading import load_model
from .optim import SCHEDULES
from .solvers import ADJOINT_METHODS, FORWARD_METHODS, TOL_MODES
from .constraints import get_constraint
from .stack import PRESETS
from .training import (CONSTRAINTS, LIPSCHITZ_FORMS, MODELS, BackgroundCheckpoints, TrainConfig, Trainer,
                       TRAINING_STATE, config_from_dict, is_complete, plot_history, restore_training_state,
                       resume_point, write_metrics)

HELP = {
    "model": "nemon (this library's l_inf-contractive model), mondeq (the monDEQ baseline, "
             "A = (1 - m) I - W^T W + S - S^T with m = 1 - gamma, Peaceman-Rachford and direct adjoint) "
             "or conv (convolutional NEMON: x = relu(K * x + B * u + b), pooling, read-out; "
             "mu_inf(K) <= gamma exact per output channel), or stack (explicit layers around an implicit one; "
             "selected by --arch, which gives its layers)",
    "arch": ("a stacked model (selects --model stack): a preset, "
             + "; ".join(f"{name} = {spec}" for name, spec in PRESETS.items())
             + "; or comma-separated layers: conv<C>[k<k>][s<s>][p<p>] (C channels, k x k taps, default 3, stride "
               "s, default 1, zero padding p, default k//2), dense<n>, relu, pool<s> (average), flatten (put in "
               "by itself before a flat layer), nemon<n> (a dense implicit NEMON layer of n units, mu_inf(A) <= "
               "gamma, at most one). The logits layer is appended. --hidden, --channels, --kernel, --pool, "
               "--padding and --readout-hidden shape the other models and are errors beside it"),
    "weight_init": "stacked models: default (uniform(-1, 1)/sqrt(fan-in), PyTorch's scale) or ibp (Shi et al. "
                   "2021's IBP initialization, N(0, 2 pi/fan_in^2) for every weight but the logits', which keeps an "
                   "interval box's radius from growing layer after layer at initialization)",
    "hidden": "hidden units n (size of the implicit state x; dense models); default: 100, 200 with --certified-eps",
    "channels": "conv model: channels C of the implicit convolutional layer",
    "kernel": "conv model: odd kernel size k of the k x k convolutions K (implicit) and B (input)",
    "pool": "conv model: s x s average pooling before the read-out (s divides the image size)",
    "readout_hidden": "width p of an explicit hidden ReLU layer between the implicit layer's features and the "
                      "logits, y = C relu(H f + h) + c (f: x, or its pooling for conv models); 0 = the paper's "
                      "linear read-out y = C f + c. The implicit layer and its certificates are unchanged; the "
                      "interval bounds pass the layer by interval arithmetic and the Lipschitz bound gains "
                      "the factor ||H||_inf",
    "padding": "conv model: circular (the paper's; mu_inf(K) exact) or zero padding (mu_inf(K) an upper bound)",
    "augment": "transform each training batch: crop-flip (random crops with padding 4 and horizontal flips, "
               "CIFAR-10's standard; what --augment alone means), flip (horizontal flips alone, no crops) "
               "or shift (translations by up to 2 pixels, edges replicated, no flips: for digits)",
    "augment_pad": "crop-flip's padding or shift's largest translation, in pixels; default 4 (crop-flip), "
                   "2 (shift)",
    "epochs": "passes over the training set; default: 40 (nemon, mondeq) or 10 (conv)",
    "batch_size": "samples per minibatch",
    "lr": "Adam learning rate at the start of the schedule; default: 1e-3 (nemon, mondeq) or 5e-3 (conv)",
    "schedule": "learning-rate schedule: constant, step (x0.1 at 25/50/75%%) or cosine to 0",
    "gamma": "bound on mu_inf(A), < 1: the well-posedness / contraction margin; default: 0.95 (nemon, mondeq) "
             "or 0.9 (conv); 0.5 with --certified-eps",
    "constraint": ("how the implicit layer is kept well-posed: "
                   + "; ".join(f"{name}: {get_constraint('nemon', name).__doc__.split(chr(10))[0].rstrip('.')}"
                               for name in CONSTRAINTS)
                   + " (conv models: projection or parametrization of each output channel's taps)"),
    "min_diagonal": "with --constraint projection: keep every diagonal entry a_ii (a conv kernel's centre taps "
                    "K[c, c, centre]) >= this value m <= 0, so that the average iteration's step alpha* = "
                    "1/(1 - min(min_i a_ii, 0)) stays >= 1/(1 - m) and its contraction factor "
                    "<= 1 - (1 - gamma)/(1 - m) during training (negative diagonals shrink alpha* as training "
                    "goes on, and the iterations grow); default: no floor, 0 with --certified-eps (dense models)",
    "lipschitz_reg": "weight of the l_inf Lipschitz bound ||C|| ||B|| / (1 - mu_inf(A)) added to the loss "
                     "(conv: ||B|| of the input convolution, mu_inf of K)",
    "lipschitz_form": "exact (the product bound above, with its subgradient) or smooth (the paper code's "
                      "(||B||^2 + ||C||^2) / (2 (1 - gamma)); with --readout-hidden (||B||^3 + ||H||^3 + "
                      "||C||^3) / (3 (1 - gamma)))",
    "solver": "default: average (nemon) or peaceman-rachford (mondeq). Fixed-point solver: average "
              "(step alpha, default alpha*), picard (alpha = 1), adaptive (the paper "
              "code's shrinking step), anderson (safeguarded Anderson acceleration of average); with "
              "--constraint mondeq: forward-backward or peaceman-rachford (monDEQ's splittings)",
    "alpha": "step of the average iteration, in (0, alpha*]; default alpha* = 1/(1 - min(min_i a_ii, 0))",
    "tol": "tolerance: forward stops at ||relu(Ax+Bu+b) - x||_inf <= tol (see --tol-mode), adjoint at l_1 "
           "residual <= adjoint-tol; default: 1e-4 (nemon, mondeq, stack), 1e-2 (conv: the paper's, relative) or "
           "1e-3 (conv with --certified-eps, absolute)",
    "tol_mode": "absolute (stop at ||F(x) - x||_inf <= tol) or relative (<= tol max(1, ||F(x)||_inf): the tolerance "
                "follows the state's scale, which grows with the Lipschitz bound during training); default: "
                "absolute; relative for conv models and with --certified-eps for dense ones (the certificates keep "
                "their own tolerance)",
    "adjoint_tol": "l_1 residual tolerance of the adjoint solve; default: tol for dense models, "
                   "tol x (hidden size / 100) for conv models (the same residual per hidden unit)",
    "max_iter": "iteration cap per sample for the forward and the adjoint solve",
    "adjoint": "default: iterative (nemon) or direct (mondeq). Backward solve: iterative (averaged adjoint "
               "iteration), adaptive, anderson, direct "
               "(exact LU per sample; the only one certified for --constraint mondeq), or jfb (Jacobian-free "
               "backpropagation, Fung et al. 2022: no backward solve, w = g, the gradient of one step of the "
               "layer at its fixed point: an approximation, cheaper)",
    "dtype": "float32 (fast) or float64",
    "seed": "seed of initialization and shuffling",
    "init": "start from this saved model (model.npz or its run folder) instead of a random initialization, "
            "e.g. to fine-tune; its architecture, gamma and dtype must match the flags. The optimizer "
            "state and the learning-rate schedule start afresh",
    "certified_eps": "certified training (interval bound propagation through the embedded network): train on "
                     "kappa CE(y) + (1 - kappa) CE(-m_lo), m_lo the interval lower bounds of every margin y_k - y_j "
                     "over the l_inf ball of this radius in pixel units around each training image (clipped to "
                     "[0, 1]); 0 = off. Each epoch then also reports the certified accuracy at this radius on the "
                     "first --certify-samples test images",
    "eps_warmup": "certified training: epochs of clean training (eps 0, kappa 1) before the ramp; default: 1",
    "eps_ramp": "certified training: epochs over which eps rises linearly from 0 to --certified-eps and kappa "
                "falls linearly from 1 to --kappa; default: 10 (nemon) or 4 (conv)",
    "kappa": "certified training: the clean loss's weight at the end of the ramp, in [0, 1] (1 - kappa "
             "weighs the worst-case margins)",
    "train_eps_factor": "certified training: train at this multiple of --certified-eps (a larger training radius "
                        "certifies more at the target radius, as in Gowal et al. 2018); default: 1.2 with "
                        "--certified-eps (measured in docs/benchmarks.md)",
    "blas_threads": "BLAS threads while training (1 was fastest for these small products on the 2-core machines "
                    "measured: OpenBLAS's threads made a dense step 14x slower)",
    "threads": "conv models and stacks: threads sharing each batch's convolutions, weight gradients (and a conv "
               "model's solver steps), each with one-thread BLAS (the same model for any number, up to float "
               "rounding): 2 on an otherwise idle 2-core machine, 1 when runs share the cores (a sweep of several)",
    "warmup_reg": "certified training of stacked models: weight lambda of the warm-up regularizers of Shi et al. "
                  "2021 (bound tightness and relu balance on the interval boxes of every relu layer's input), "
                  "lambda (1 - eps/eps_max) while eps ramps up; 0 = off; default: their value 0.5 for stacks "
                  "with --certified-eps (it won at MNIST 0.3, docs/benchmarks.md), else 0",
    "grad_clip": "scale each step's gradient down to this Euclidean norm when it is larger; 0 = off (Shi et al. "
                 "2021 use 10)",
    "crown_ibp": "certified training of stacked models: CROWN-IBP (Zhang et al. 2020): the margins' lower bound "
                 "is (1 - beta) interval + beta crown, beta falling linearly from this value to 0 over the eps "
                 "ramp (their 1 -> 0 schedule at 1), then the interval bound alone; while beta > 0 a step costs "
                 "about 6x an interval step (ibp-small on MNIST, docs/benchmarks.md); 0 = off",
    "certify_samples": "certified training: test images (the first N) whose certified accuracy each epoch reports",
    "warm_start": "dense nemon models: start each training sample's fixed-point solve (and with --certified-eps its "
                  "embedded network's) where the sample's solve of the previous epoch ended; the same fixed points "
                  "to the tolerance in fewer iterations, for 3 hidden-state vectors of memory a training image; "
                  "default: on with --certified-eps, off otherwise",
}
CHOICES = {"tol_mode": TOL_MODES, "schedule": SCHEDULES, "constraint": CONSTRAINTS, "solver": FORWARD_METHODS,
           "model": MODELS,
           "adjoint": ADJOINT_METHODS, "dtype": ("float32", "float64"), "lipschitz_form": LIPSCHITZ_FORMS,
           "padding": PADDINGS, "augment": tuple(AUGMENTATIONS),
           "weight_init": ("default", "ibp")}
TYPES = {"hidden": int, "tol_mode": str, "alpha": float, "solver": str, "adjoint": str, "adjoint_tol": float,
         "epochs": int, "lr": float,
         "gamma": float, "tol": float, "init": str, "arch": str, "augment_pad": int, "eps_warmup": float,
         "eps_ramp": float,
         "train_eps_factor": float, "min_diagonal": float, "warmup_reg": float}
# Flags that may be given bare, meaning the value here.
BARE = {"augment": "crop-flip"}
# On/off settings whose default depends on others (--flag / --no-flag; None until resolved).
SWITCHES = {"warm_start"}


# The files whose presence marks a folder as holding a run (what --out would overwrite).
RUN_FILES = ("model.npz", "metrics.json")


def build_parser():
    p = OneLineErrorParser(prog="python -m nemon_np.train", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default="mnist", help="data set to train on")
    p.add_argument("--data-dir", default=None,
                   help="folder with the official files (else $NEMON_DATA, else ~/.cache/nemon_np; "
                        "downloaded there when absent)")
    p.add_argument("--out", default=None, help="run folder (default runs/<dataset>-<timestamp>); a folder that "
                                               "already holds a run is an error, unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="let --out name a folder that holds a run, and replace its model, metrics and figures")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (there is one on a terminal only: a log file gets the per-epoch lines)")
    p.add_argument("--limit-train", type=int, default=None,
                   help="use only the first N training images (quick experiments)")
    p.add_argument("--resume", default=None, metavar="RUN",
                   help="continue the stopped run in folder RUN from its last complete epoch, with its own settings "
                        "(parameters, Adam's state, the learning-rate and eps schedules and the random stream as they "
                        "were: the same model as a run that went through); only --data-dir and --no-progress may "
                        "be given beside it. A complete run (its summary written) is left as it is")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=HELP[f.name])
            continue
        if f.name in SWITCHES:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=HELP[f.name])
            continue
        # A setting resolved later (default None) must say its type here: type(None) would refuse every value.
        kind = TYPES[f.name] if default is None else TYPES.get(f.name, type(default))
        bare = dict(nargs="?", const=BARE[f.name]) if f.name in BARE else {}
        p.add_argument(flag, type=kind, default=default, choices=CHOICES.get(f.name), help=HELP[f.name], **bare)
    return p


def _resumed_run(parser, args):
    """(config, metrics history, out folder) of the run that ``--resume`` names, with its dataset and
    --limit-train put back into ``args``; a flag that would change the run is a one-line error."""
    ignored = {"resume", "data_dir", "no_progress"}
    if args.overwrite:
        parser.error("--resume continues a run and --overwrite replaces one: give one of them")
    changed = [k for k, v in vars(args).items() if k not in ignored and v != parser.get_default(k)]
    if changed:
        parser.error(f"--resume continues a run with its own settings; drop --{changed[0].replace('_', '-')}")
    out = pathlib.Path(args.resume)
    try:
        payload = json.loads((out / "metrics.json").read_text())
        run = payload["run"]
    except (OSError, ValueError, KeyError):
        parser.error(f"--resume: {out} holds no resumable run (metrics.json with its run settings)")
    if not (out / "model.npz").is_file():
        parser.error(f"--resume: {out / 'model.npz'} not found")
    args.dataset, args.limit_train = run["dataset"], run["limit_train"]
    return config_from_dict(payload["config"]), payload["epochs"], out


@contextlib.contextmanager
def _ctrl_c_between_batches():
    """While training, Ctrl-C is recorded and the loop stops before its next batch: Python ignores an
    interrupt that lands in a destructor (a progress bar's, say), so one raised wherever it arrives
    can be lost. A second Ctrl-C stops at once. Yields the question the loop asks."""
    import signal
    requested = []

    def record(signum, frame):
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)

    ours = (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    previous = signal.signal(signal.SIGINT, record) if ours else None
    try:
        yield lambda: bool(requested)
    finally:
        if ours:
            signal.signal(signal.SIGINT, previous)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    history = []
    if args.resume is not None:
        config, history, out = _resumed_run(parser, args)
        if is_complete(out):
            # Finishing again would only rewrite its files, and its summary with this process's seconds.
            print(f"{out} is complete ({len(history)} epochs and its summary in metrics.json): nothing to resume")
            return 0
    else:
        config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    try:
        config.validate()
        if args.limit_train is not None and args.limit_train < 1:
            raise ValueError(f"--limit-train must be >= 1, got {args.limit_train}")
        if not 0 <= config.certified_eps <= 1:
            raise ValueError(f"--certified-eps is a radius in pixel units, in [0, 1] (0: no certified training), "
                             f"got {config.certified_eps:g}")
    except ValueError as e:
        parser.error(str(e))
    if args.resume is None:
        out = pathlib.Path(args.out or f"runs/{args.dataset}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
        held = [name for name in RUN_FILES if (out / name).exists()]
        if held and not args.overwrite:
            parser.error(f"--out {out} already holds a run ({', '.join(held)}): pass --overwrite to replace it, "
                         f"--resume {out} to continue it, or another --out")
    run = {"dataset": args.dataset, "limit_train": args.limit_train}
    try:
        data = load_dataset(args.dataset, args.data_dir)
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(config.dtype).type
    X = normalize(data.train_images[:args.limit_train], data.mean, data.std, dtype)
    y = data.train_labels[:args.limit_train]
    X_test = normalize(data.test_images, data.mean, data.std, dtype)
    image_shape = data.train_images.shape[1:]
    image_shape = (1,) + image_shape if len(image_shape) == 2 else image_shape
    try:
        model = None
        if args.resume is not None:
            model, saved_history = resume_point(out)
            if saved_history is not None and len(saved_history) != len(history):
                print(f"resuming from {out / TRAINING_STATE} (epoch {len(saved_history)}); metrics.json had "
                      f"{len(history)} epochs: the run was stopped while it wrote an epoch's files", file=sys.stderr)
            history = history if saved_history is None else saved_history
        trainer = Trainer(config, X.shape[1], data.n_classes, model=model, image_shape=image_shape)
        if args.resume is not None:
            restore_training_state(trainer, out, history)
    except ValueError as e:
        parser.error(str(e))
    trainer.model.metadata.update(dataset=data.name, mean=np.array(data.mean), std=np.array(data.std),
                                  constraint=config.constraint_class().name)
    augmentation = "" if config.augment == "none" else ", augmented (" + ", ".join(
        [config.augment] + ([] if config.augment_pad is None else [f"{config.augment_pad} px"])) + ")"
    print(f"training {config.model} {trainer.model} on {data.name} ({len(X)} train, {len(X_test)} test images from "
          f"{data.source}); "
          f"{'monDEQ parametrization' if config.model == 'mondeq' else 'constraint ' + config.constraint}"
          f"{augmentation}"
          f"{', starting from ' + str(config.init) if config.init else ''}, "
          f"solver {config.solver}, tol {config.tol:g}{' (relative)' if config.tol_mode == 'relative' else ''}"
          f"{f', certified training at eps {config.certified_eps:g}' if config.certified_eps else ''}"
          f"{f', {config.threads} threads' if config.threads > 1 else ''}"
          f"; writing to {out}"
          f"{f', resuming after epoch {len(history)}' if history else ''}")
    started = time.perf_counter()
    # A resumed run's total counts the epochs of the processes before this one (their epoch_seconds).
    earlier_seconds = sum(row.get("epoch_seconds", 0.0) for row in history)

    # The epoch's files are written while the next epoch trains; waited for before anything reads them.
    checkpoints = BackgroundCheckpoints(out)

    def on_epoch(row):
        checkpoints.write(trainer, config, {"run": run})
        print(f"epoch {row['epoch']:3d}  train loss {row['train_loss']:.4f} acc {100 * row['train_acc']:.2f}%  "
              f"test loss {row['test_loss']:.4f} acc {100 * row['test_acc']:.2f}%  mu_inf {row['mu_inf']:.4f}  "
              f"iters fwd {row['fwd_iter_mean']:.1f} bwd {row['bwd_iter_mean']:.1f}  "
              # The subset is named: its first images are easier than the rest (MNIST's first 200 certify about
              # 5 points above the first 1,000), so the line is a monitor, not the model's figure.
              + (f"eps {row['eps']:.3g} kappa {row['kappa']:.2f} certified@{config.certified_eps:g} (first "
                 f"{row['test_certified_samples']}) {100 * row['test_certified_acc']:.2f}%  "
                 if "test_certified_acc" in row else "")
              + f"{row['epoch_seconds']:.1f}s", flush=True)

    try:
        try:
            with _ctrl_c_between_batches() as stop:
                trainer.fit(X, y, X_test, data.test_labels, on_epoch=on_epoch, progress=not args.no_progress,
                            should_stop=stop)
        finally:
            checkpoints.wait()
    except KeyboardInterrupt:
        done = len(trainer.history)
        print(f"\ninterrupted: {out / 'model.npz'} holds the last complete epoch ({done}); continue with "
              f"python -m nemon_np.train --resume {out}"
              if done else "\ninterrupted before the first epoch ended: nothing saved", file=sys.stderr)
        if done:
            plot_history(trainer.history, out / "training_curves.png",
                         f"{describe(config)} on {data.name} (interrupted)", config.gamma)
        return 130
    # The guarantee is checked on the saved file, not on the in-memory model.
    saved = load_model(out / "model.npz")
    measure, verified, statement = certify(saved, config)
    summary = {"test_acc": trainer.history[-1]["test_acc"], "certificate": statement,
               "mu_inf_saved": saved.mu_inf(),
               "mu_inf_unweighted_saved": saved.mu_inf() if saved.weights is None else mu_inf(saved.A),
               "weighted": saved.weights is not None, "verified": verified, "train_samples": len(X),
               "total_seconds": earlier_seconds + time.perf_counter() - started}
    if "test_certified_acc" in trainer.history[-1]:
        summary.update(certified_eps=config.certified_eps, test_certified_acc=trainer.history[-1]["test_certified_acc"],
                       test_certified_samples=trainer.history[-1]["test_certified_samples"])
    write_metrics(out, config, trainer.history, {"run": run, "summary": summary})
    plot_history(trainer.history, out / "training_curves.png",
                 f"{describe(config)} on {data.name}, {config.constraint} constraint", config.gamma)
    certified = (f", certified {100 * summary['test_certified_acc']:.2f}% at eps {config.certified_eps:g} (interval "
                 f"bounds, first {summary['test_certified_samples']} test images)"
                 if "test_certified_acc" in summary else "")
    check = "" if verified is None else f": {'verified' if verified else 'VIOLATED'} on {out / 'model.npz'}"
    print(f"done in {summary['total_seconds']:.0f}s: test accuracy {100 * summary['test_acc']:.2f}%{certified}, "
          f"{statement}{check}")
    return 0 if verified is not False else 1


def describe(config):
    """A short name of the configured model for figure titles."""
    if config.model == "stack":
        return f"stack {config.arch}"
    readout = f", read-out hidden layer {config.readout_hidden}" if config.readout_hidden else ""
    if config.model == "conv":
        return f"conv NEMON, {config.channels} channels, {config.kernel}x{config.kernel}{readout}"
    return f"{'monDEQ' if config.model == 'mondeq' else 'NEMON'}, n = {config.hidden}{readout}"


def certify(model, config):
    """The well-posedness condition a run promised, checked on a model: (value, verified, text).

    projection, parametrization, weighted, norm: mu_inf(A) <= gamma (weighted with the saved
    weights where learned; ||A||_inf <= gamma implies it); mondeq: mu_2(A) <= gamma;
    none: nothing was promised (verified is None).
    """
    certificate = config.constraint_class().certificate
    if model.implicit_part()[0] is None:
        return 0.0, None, "explicit stack: no implicit layer, nothing to constrain"
    if certificate is None:
        value = model.mu_inf()
        return value, None, f"unconstrained: mu_inf(A) = {value:.4f}, mu_2(A) = {mu_2(model.A):.4f}, no certificate"
    if certificate == "mu_2":
        value = mu_2(model.A)
        return value, bool(value <= config.gamma + 1e-9), f"mu_2(A) = {value:.6f} <= gamma = {config.gamma}"
    value = model.mu_inf()
    if config.model == "conv":
        return value, bool(value <= config.gamma + 1e-12), (f"mu_inf(K) = {value:.6f} (exact, per output channel) "
                                                            f"<= gamma = {config.gamma}")
    norm = "weighted with the saved weights" if model.weights is not None else "unweighted"
    return value, bool(value <= config.gamma + 1e-12), f"mu_inf(A) = {value:.6f} ({norm}) <= gamma = {config.gamma}"


if __name__ == "__main__":
    sys.exit(main())
