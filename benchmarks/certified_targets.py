"""The certified-accuracy targets of issue 25: a NEMON stack against its compute-matched explicit twin.

Run:  python benchmarks/certified_targets.py --data-dir DIR --dataset mnist --eps 0.3 \
          --nemon RUN [RUN ...] --explicit RUN [RUN ...] [--target 90] [--jobs 2] \
          [--exact-images 1000 --time-limit 60] [--out docs/figures/certified_targets.json] [--recorded OTHER.json ...]

For every run (one a seed, written by ``python -m nemon_np.train``), on the saved model: clean accuracy,
the certified accuracy at eps (pixel units) by the interval and the crown certificates, and PGD's
accuracy (20 steps, a random start), on the first 1,000 test images and on all of them. Every image
that a certificate certifies is attacked by PGD, FGSM and noise at eps; the script stops with exit 1
if one is broken (a certificate is a proof). With --exact-images N, the first N test images are also verified
exactly (:func:`evaluate_exact`: complete, so it certifies at least what crown does; undecided images count as
not certified); at N >= 1,000 exact verification competes for the row's certificate on both sides, and the
row's figure on all test images stays that of the best certificate run on all of them ("certificate_all").
The training seconds are the runs' own, summed over their
epochs (the optimizer steps, without the per-epoch test evaluation and certification): CPU seconds
(``train_cpu_seconds``) where every run of both sides recorded them, else wall seconds (``train_seconds``; runs
trained before the CPU clock was kept), and the row says which ("seconds_clock"). Wall seconds count whatever
else ran on the machine; CPU seconds count what the run itself computed, so "compute-matched" means that.

The row of the target is written into --out (an existing file keeps its other targets), in the form
``{"targets": [{"dataset", "eps", "certificate", "certified_per_seed", "clean_per_seed",
"seconds_per_seed", "images": 1000, "target", "met", "shortfall" (points), "next_run", "command",
"explicit_matched": {...}, ...}]}``, and printed as the Markdown table of docs/benchmarks.md. Every target in
the file is then set beside its twin (:func:`matched_comparison`: the difference in certified accuracy and a
verdict that claims a side only where every seed of one beats every seed of the other), printed and drawn in
certified_targets_matched.png beside --out. Each run's row keeps
its training curve, from which the figure is drawn. A run folder that is not on this machine (a seed trained
elsewhere, or in an earlier session whose checkout is gone) is taken as --out or a --recorded file records its
evaluation at the same dataset and eps, if one does. Numbers are written rounded to 4 decimals (percentages
and seconds: far below what the figures resolve) and lists of numbers on one line, so that the committed files
stay small.
"""
import argparse
import json
import math
import os
import pathlib
import re
import sys
import threading
import time
from dataclasses import asdict, fields

import numpy as np
from threadpoolctl import threadpool_limits

from nemon_np._threads import ONE_THREAD_ENV
from nemon_np.certificates import ExactCertificate, certify
from nemon_np.data import load_dataset
from nemon_np.loading import load_model
from nemon_np.pixels import forward_options, solver_options_for, to_inputs
from nemon_np.robustness import attack_flags
from nemon_np.training import CERTIFIED_DEFAULTS, TrainConfig, config_from_dict

CERTIFICATES = ("interval", "crown")
CLOCK_NAMES = {"cpu": "CPU s", "wall": "wall s"}


def _int_keys(d):
    """JSON object keys back to the image counts they were (1000, 10000)."""
    return {int(k) if k.isdigit() else k: v for k, v in d.items()}


def command_of(run):
    """The ``python -m nemon_np.train`` command that reproduces a run: its non-default settings. A setting
    whose default depends on the model (None in TrainConfig) is left out where the run had the value that
    its model and radius resolve to, except the certified recipe's own (:data:`CERTIFIED_DEFAULTS` of the
    model): those defaults change as recipes are measured (``--warmup-reg`` did), and a recorded command
    must still reproduce its run afterwards. The config is read as ``--resume`` reads it
    (:func:`nemon_np.training.config_from_dict`: a setting that shapes another kind of model, such as the
    "hidden" that older stack runs record, is dropped)."""
    payload = json.loads((pathlib.Path(run) / "metrics.json").read_text())
    config, defaults = asdict(config_from_dict(payload["config"])), asdict(TrainConfig())
    resolved = asdict(TrainConfig(model=config["model"], arch=config.get("arch"), augment=config["augment"],
                                  certified_eps=config.get("certified_eps", 0.0)).validate())
    recipe = CERTIFIED_DEFAULTS.get(config["model"], {}) if config.get("certified_eps") else {}
    flags = [f"--dataset {payload.get('run', {}).get('dataset', 'mnist')}"]
    for f in fields(TrainConfig):
        value = config.get(f.name)
        if defaults[f.name] is None and value == resolved[f.name] and f.name not in recipe and f.name != "arch":
            continue
        if value == -math.inf and resolved[f.name] is None:   # "no floor" either way (config_from_dict)
            continue
        if value != defaults[f.name] and value is not None:
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):   # the on/off switches (--warm-start / --no-warm-start)
                flags.append(flag if value else "--no-" + flag[2:])
            elif isinstance(value, float):   # its repr reads back as the same float; "=" keeps -inf a value
                flags.append(f"{flag}={value!r}" if value < 0 else f"{flag} {value!r}")
            else:
                flags.append(f"{flag} {value}")
    return "python -m nemon_np.train " + " ".join(flags)


def needs_evaluation(run, path):
    """Whether the run folder is here and its evaluation file ``path`` is missing or older than its model."""
    run = pathlib.Path(run)
    return run.is_dir() and not (path.is_file() and path.stat().st_mtime > (run / "model.npz").stat().st_mtime)


def training_cpu_seconds(history):
    """The CPU seconds of a run's optimizer steps (every epoch's ``train_cpu_seconds``), or None where an epoch
    did not record them (runs before the clock was kept)."""
    values = [r.get("train_cpu_seconds") for r in history]
    return None if not values or None in values else float(sum(values))


def seconds_clock(rows):
    """"cpu" where every run of either side recorded its CPU seconds (what other jobs on a shared machine inflate
    least), else "wall": both sides are always matched on one clock."""
    return "cpu" if all(r.get("train_cpu_seconds") is not None for rs in rows.values() for r in rs) else "wall"


def test_pixels(data):
    """The test images as (m, features) pixels in [0, 1], and their labels."""
    return data.test_images.reshape(len(data.test_images), -1).astype(np.float64) / 255.0, data.test_labels


def clean_flags(model, pixels, labels):
    """(m,) bool: the images the model classifies correctly."""
    return model.predict(to_inputs(model, pixels), **forward_options(solver_options_for(model))) == labels


def attack_survival(model, pixels, labels, clean, eps, pgd_steps, say):
    """(correct under the clean image (``clean``, :func:`clean_flags`) and every attack of
    :func:`nemon_np.robustness.attack_flags` at eps, 500 images at a time, correct under PGD): two (m,) bool
    arrays; ``say(what, flags)`` reports each attack."""
    flags = attack_flags(model, pixels, labels, eps, pgd_steps, seed=0, chunk=500,
                         progress=lambda kind, ok: say(f"{kind} accuracy", ok))
    return np.logical_and.reduce([clean, *flags.values()]), flags["pgd"]


def percent_of_first(flags):
    """{n: % of the first n flags that are true} for n = 1,000 (where there are as many) and n = all of them: the
    two image counts every figure of a row is given on."""
    return {n: 100 * float(np.mean(flags[:n])) for n in (1000, len(flags)) if n <= len(flags)}


def _reporter(run):
    started = time.perf_counter()
    return lambda what, flags: print(f"  {run}: {what} {100 * np.mean(flags):.2f}% of {len(flags)} "
                                     f"({time.perf_counter() - started:.0f} s)", flush=True)


def evaluate_run(run, data, eps, pgd_steps):
    """Clean, certified (each certificate) and PGD accuracy on the first 1,000 and on all test images,
    the images certified but broken by an attack (must be 0), the training seconds and the command."""
    model = load_model(pathlib.Path(run) / "model.npz")
    history = json.loads((pathlib.Path(run) / "metrics.json").read_text())["epochs"]
    pixels, labels = test_pixels(data)
    clean = clean_flags(model, pixels, labels)
    certified, seconds = {}, {}
    say = _reporter(run)
    for name in CERTIFICATES:
        t0 = time.perf_counter()
        certified[name] = certify(model, pixels, labels, eps, name).certified
        seconds[name] = time.perf_counter() - t0
        say(f"certified by {name}", certified[name])
    survived, pgd = attack_survival(model, pixels, labels, clean, eps, pgd_steps, say)
    broken = {name: int(np.sum(flags & ~survived)) for name, flags in certified.items()}
    return {"run": str(run), "clean": percent_of_first(clean),
            "certified": {name: percent_of_first(f) for name, f in certified.items()},
            "pgd": percent_of_first(pgd), "broken_certified": broken,
            "certify_seconds": seconds, "train_seconds": float(sum(r["train_seconds"] for r in history)),
            "train_cpu_seconds": training_cpu_seconds(history),
            "epoch_seconds": float(sum(r["epoch_seconds"] for r in history)),
            "epochs": len(history), "command": command_of(run), "curve": training_curve(history)}


def evaluate_exact(run, data, eps, pgd_steps, images, time_limit):
    """Complete verification of the first ``images`` test images (:class:`nemon_np.certificates.ExactCertificate`:
    crown, then PGD, then a mixed-integer program for each image still open, ``time_limit`` solver seconds an
    image; an image whose limit runs out is "unknown", never certified), every certified image attacked as in
    :func:`evaluate_run`. Decided images are kept in the run's ``exact_cache`` (the one ``python -m
    nemon_np.robustness RUN --exact`` keeps), so a stopped evaluation resumes. {"images", "certified" (% of the
    first 1,000 and of all ``images``, :func:`percent_of_first`), "unknown", "broken", "seconds", "time_limit"}."""
    model = load_model(pathlib.Path(run) / "model.npz")
    pixels, labels = (a[:images] for a in test_pixels(data))
    say = _reporter(run)
    method = ExactCertificate(time_limit, cache=pathlib.Path(run) / "exact_cache", attack_steps=pgd_steps)
    t0 = time.perf_counter()
    res = certify(model, pixels, labels, eps, method)
    seconds = time.perf_counter() - t0
    say("certified by exact", res.certified)
    survived, _ = attack_survival(model, pixels, labels, clean_flags(model, pixels, labels), eps, pgd_steps, say)
    return {"images": len(labels), "certified": percent_of_first(res.certified),
            "unknown": int(np.sum(res.status == "unknown")), "broken": int(np.sum(res.certified & ~survived)),
            "seconds": seconds, "time_limit": time_limit}


def _in_own_process(evaluate, run, dataset, data_dir, *args):
    """``evaluate(run, data, *args)`` in a process of its own (one of ``--jobs``; one thread by its
    environment)."""
    return evaluate(run, load_dataset(dataset, data_dir), *args)


def exit_with_parent(parent_pid, interval=2.0):
    """A pool worker's initializer: a daemon thread ends the worker once ``parent_pid`` is no longer its parent.
    A pool's workers outlive a parent stopped by a signal (``kill``, a session's end), and would go on
    verifying, unattended, for what is left of an evaluation: hours of two cores."""
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(interval)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def evaluate_runs(runs, args, data, evaluate, *extra):
    """(run, ``evaluate(run, data, args.eps, args.pgd_steps, *extra)``) for each run (:func:`evaluate_run`,
    :func:`evaluate_exact`) as it finishes, ``args.jobs`` processes at a time (each one thread: the environment
    of :data:`nemon_np._threads.ONE_THREAD_ENV`, which spawned processes inherit), or in this process with one
    job. A generator, so that the caller keeps each evaluation as it comes: a stopped pass loses only the runs
    still under way."""
    if args.jobs == 1 or len(runs) < 2:
        for run in runs:
            yield run, evaluate(run, data, args.eps, args.pgd_steps, *extra)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    os.environ.update(ONE_THREAD_ENV)
    with ProcessPoolExecutor(min(args.jobs, len(runs)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=exit_with_parent, initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(_in_own_process, evaluate, run, args.dataset, args.data_dir, args.eps,
                               args.pgd_steps, *extra): run for run in runs}
        for future in as_completed(futures):
            yield futures[future], future.result()


def training_curve(history):
    """The run's curve, kept in its row so that the figure can be drawn where the run folder is not: per
    epoch, the cumulative training seconds, the certified accuracy (interval bounds, the per-epoch test
    subset) and the clean test accuracy, in %."""
    return {"train_seconds": np.cumsum([h["train_seconds"] for h in history]).tolist(),
            "certified": [None if h.get("test_certified_acc") is None else 100 * h["test_certified_acc"]
                          for h in history],
            "clean": [100 * h["test_acc"] for h in history]}


def run_curve(row):
    """The row's recorded curve, else the run folder's (rows written before curves were kept), else None."""
    if "curve" in row:
        return row["curve"]
    metrics = pathlib.Path(row["run"]) / "metrics.json"
    return training_curve(json.loads(metrics.read_text())["epochs"]) if metrics.is_file() else None


def plot_curves(rows, path, title):
    """Certified accuracy (interval, the runs' per-epoch test subset) and clean test accuracy against the
    cumulative training seconds of every run: the compute-matched comparison as a picture. A figure that would
    have no curve at all (no run recorded one, none is here) is left as it is. Returns whether it was drawn."""
    curves = {(kind, r["run"]): run_curve(r) for kind in rows for r in rows[kind]}
    for (kind, run), curve in curves.items():
        if curve is None:
            print(f"{run}: no curve recorded and no metrics.json here, so no curve in {path}")
    if all(c is None for c in curves.values()):
        print(f"no run has a curve: {path} is left as it is")
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for (kind, run), curve in curves.items():
        if curve is None:
            continue
        style = dict(color={"nemon": "C0", "explicit": "C1"}[kind], label=f"{kind} ({pathlib.Path(run).name})",
                     ls="-" if "_s0" in run else "--")
        ax[0].plot(curve["train_seconds"], np.array(curve["certified"], float), **style)
        ax[1].plot(curve["train_seconds"], curve["clean"], **style)
    ax[0].set(xlabel="training seconds", ylabel="certified accuracy (%)", ylim=(0, 100),
              title=f"{title}\ncertified by intervals, on the per-epoch test subset")
    ax[1].set(xlabel="training seconds", ylabel="clean test accuracy (%)", title="clean accuracy\n ")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def target_label(dataset, eps):
    """"MNIST 0.3", "CIFAR-10 8/255": a target as the field writes it (CIFAR-10 radii in 255ths)."""
    if dataset == "cifar10":
        return f"CIFAR-10 {round(eps * 255):d}/255"
    return f"{dataset.upper()} {eps:g}"


def matched_comparison(targets):
    """Does the implicit layer pay? For every target row with an explicit twin: both sides' certified
    accuracy (the row's certificate, first 1,000 test images and all of them, per seed), the difference of the
    means (NEMON - explicit, points), the training seconds and their ratio, and a verdict that claims a side
    only where every seed of one beats every seed of the other ("nemon ahead", "explicit ahead"), else "within
    the seeds' spread" (two seeds support no finer test); none with one seed on a side; and the clock the seconds
    were read on ("cpu" or "wall", the row's "seconds_clock"). One dict a target, MNIST first, by radius."""
    out = []
    for t in sorted(targets, key=lambda t: (t["dataset"] != "mnist", t["dataset"], t["eps"])):
        x = t.get("explicit_matched")
        if x is None:
            continue
        nemon, explicit = t["certified_per_seed"], x["certified_per_seed"]
        if min(len(nemon), len(explicit)) < 2:   # one seed beats another by chance as often as not
            verdict = "one seed: no verdict"
        elif min(nemon) > max(explicit):
            verdict = "nemon ahead"
        elif min(explicit) > max(nemon):
            verdict = "explicit ahead"
        else:
            verdict = "within the seeds' spread"
        seconds = float(np.mean(t["seconds_per_seed"]))
        out.append({"label": target_label(t["dataset"], t["eps"]), "target": t.get("target"),
                    "nemon": nemon, "explicit": explicit,
                    "nemon_all": t.get("certified_all_per_seed"), "explicit_all": x.get("certified_all_per_seed"),
                    "difference": float(np.mean(nemon) - np.mean(explicit)),
                    "nemon_seconds": seconds, "explicit_seconds": float(x["seconds"]),
                    # rows written before the clock was recorded were all matched on wall seconds
                    "seconds_clock": t.get("seconds_clock", "wall"),
                    "seconds_ratio": seconds / x["seconds"], "verdict": verdict})
    return out


def plot_matched(comparison, path):
    """Every target's NEMON stack beside its compute-matched explicit twin: certified accuracy on the first 1,000
    test images (bars the means, dots the seeds, a black bar the target) and the training seconds, each target's
    on its own clock (named under it: two targets' seconds compare only on one clock)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    at = np.arange(len(comparison))
    for side, shift, color, label in (("nemon", -0.2, "C0", "NEMON stack"), ("explicit", 0.2, "C1", "explicit twin")):
        ax[0].bar(at + shift, [np.mean(c[side]) for c in comparison], 0.38, color=color, alpha=0.6, label=label)
        for i, c in enumerate(comparison):
            ax[0].plot([i + shift] * len(c[side]), c[side], "o", color=color, ms=4)
        ax[1].bar(at + shift, [c[f"{side}_seconds"] for c in comparison], 0.38, color=color, alpha=0.6, label=label)
    for i, c in enumerate(comparison):
        if c["target"] is not None:
            ax[0].plot([i - 0.42, i + 0.42], [c["target"]] * 2, "k-", lw=2, label="target" if i == 0 else None)
        ax[0].annotate(f"{c['difference']:+.2f}\n{c['verdict']}", (i, 2), ha="center", fontsize=7)
    ax[0].set_xticks(at, [c["label"] for c in comparison], fontsize=8)
    ax[1].set_xticks(at, [f"{c['label']}\n{CLOCK_NAMES[c['seconds_clock']]}" for c in comparison], fontsize=8)
    for a in ax:
        a.grid(alpha=0.3, axis="y")
    ax[0].set(ylabel="certified accuracy (%), first 1,000 test images", ylim=(0, 100),
              title="certified: NEMON - explicit (points) and the verdict")
    ax[1].set(ylabel="training seconds (mean over seeds)", title="the compute they were matched on")
    ax[0].legend(fontsize=7, loc="center", bbox_to_anchor=(0.75, 0.72))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def shortfall(target, certified_per_seed, next_run):
    """The row's verdict: {"met": bool, "shortfall": points below the target (0 when met), "next_run": the
    note of what would come next, where it is not met}; {} without a target."""
    if target is None:
        return {}
    short = max(0.0, round(target - float(np.mean(certified_per_seed)), 2))
    return {"met": short == 0, "shortfall": short, **({"next_run": next_run} if short and next_run else {})}


def same_target(row, dataset, eps):
    """Whether a written row is the target at (dataset, eps): its eps was written rounded (:func:`rounded`), so
    8/255 reads back as 0.0314 and is compared so."""
    return row["dataset"] == dataset and rounded(float(row["eps"])) == rounded(float(eps))


def rounded(value, decimals=4):
    """``value`` (nested dicts and lists) with every float rounded to ``decimals`` (NaN and inf kept)."""
    if isinstance(value, float):
        return round(value, decimals) if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: rounded(v, decimals) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, decimals) for v in value]
    return value


def dumps(value):
    """``value`` as JSON, rounded (:func:`rounded`), indented, with each list of numbers on one line: the
    committed files stay small and readable."""
    text = json.dumps(rounded(value), indent=2)
    # A leaf list (no bracket or brace inside): its newlines and indents to single spaces. JSON strings hold
    # no raw newline, so only the layout changes.
    return re.sub(r"\[([^\[\]{}]*)\]", lambda m: "[" + re.sub(r"\s*\n\s*", " ", m.group(1)).strip() + "]", text)


def best_certificate(rows, images=1000):
    """The certificate with the highest mean certified accuracy on the first ``images`` test images, among
    those every row has a figure for there (exact verification is run on the first 1,000 at most)."""
    names = [c for c in rows[0]["certified"] if all(images in r["certified"].get(c, {}) for r in rows)]
    return max(names, key=lambda c: np.mean([r["certified"][c][images] for r in rows]))


def side_summary(rows, n_all, spent):
    """One side's figures in the row: its best certificate on the first 1,000 images and on all of them, per
    seed, clean and PGD accuracy, interval and crown (and exact, where it ran on the first 1,000), seconds."""
    cert, cert_all = best_certificate(rows), best_certificate(rows, n_all)
    out = {"certificate": cert, "certified_per_seed": [r["certified"][cert][1000] for r in rows],
           "certificate_all": cert_all, "certified_all_per_seed": [r["certified"][cert_all][n_all] for r in rows],
           "clean_per_seed": [r["clean"][1000] for r in rows], "pgd_per_seed": [r["pgd"][1000] for r in rows]}
    for name in ("interval", "crown", "exact"):
        if all(1000 in r["certified"].get(name, {}) for r in rows):
            out[f"{name}_per_seed"] = [r["certified"][name][1000] for r in rows]
    if "exact_per_seed" in out:
        out["exact_unknown_per_seed"] = [r["exact"]["unknown"] for r in rows]
    return out | {"seconds_per_seed": [spent(r) for r in rows]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="data folder (as for training)")
    p.add_argument("--dataset", default="mnist", choices=("mnist", "cifar10"))
    p.add_argument("--eps", type=float, required=True, help="the target's radius in pixel units")
    p.add_argument("--nemon", nargs="+", required=True, help="run folders of the NEMON stack, one a seed")
    p.add_argument("--explicit", nargs="+", required=True, help="run folders of the compute-matched explicit twin")
    p.add_argument("--target", type=float, default=None, help="the target's certified accuracy (%%)")
    p.add_argument("--next-run", default=None,
                   help="where the target is not met: what the next run would be (recorded in the row)")
    p.add_argument("--pgd-steps", type=int, default=20)
    p.add_argument("--out", default="docs/figures/certified_targets.json")
    p.add_argument("--recorded", nargs="+", default=[], metavar="JSON",
                   help="other files this script wrote, whose evaluations stand in for run folders that are not "
                        "here (--out's own records are read too)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs evaluated at once, each in a process of its own on one thread (2 on the 2-core machines "
                        "here: a medium stack's 10,000 images take about 20 minutes)")
    p.add_argument("--exact-images", type=int, default=0, metavar="N",
                   help="also verify the first N test images exactly (crown, PGD, then a mixed-integer program for "
                        "each image still open; 1,000 makes it a candidate for the row's certificate; images left "
                        "undecided count as not certified): seconds to hours, by how many images crown leaves open")
    p.add_argument("--time-limit", type=float, default=60.0, help="with --exact-images: solver seconds an image")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.exact_images < 0 or not args.time_limit > 0:
        p.error("--exact-images must be >= 0 and --time-limit > 0")
    threadpool_limits(1, user_api="blas")
    data = load_dataset(args.dataset, args.data_dir)
    out = pathlib.Path(args.out)
    existing = json.loads(out.read_text(), object_hook=_int_keys) if out.is_file() else {"targets": []}
    for source in args.recorded:
        if not pathlib.Path(source).is_file():
            p.error(f"--recorded {source}: no such file")
    sources = [json.loads(pathlib.Path(f).read_text(), object_hook=_int_keys) for f in args.recorded] + [existing]
    recorded = {(kind, r["run"]): r for records in sources for t in records.get("targets", [])   # --out's last: it wins
                if same_target(t, args.dataset, args.eps)
                for kind, rs in t.get("runs", {}).items() for r in rs}
    # Each run's evaluation is kept beside its model, so that adding a seed evaluates that seed alone.
    cache = lambda run: pathlib.Path(run) / f"targets_eps{args.eps:g}_pgd{args.pgd_steps}.json"  # noqa: E731
    runs = [run for kind in ("nemon", "explicit") for run in getattr(args, kind)]
    fresh = [run for run in runs if needs_evaluation(run, cache(run))]
    if fresh:
        print(f"evaluating {', '.join(fresh)} ({min(args.jobs, len(fresh))} at a time) ...", flush=True)
    for run, row in evaluate_runs(fresh, args, data, evaluate_run):
        cache(run).write_text(json.dumps(row, indent=2))
    exact_cache = lambda run: pathlib.Path(run) / (  # noqa: E731
        f"targets_eps{args.eps:g}_exact{args.exact_images}_t{args.time_limit:g}_pgd{args.pgd_steps}.json")
    exact_fresh = [run for run in runs if args.exact_images and needs_evaluation(run, exact_cache(run))]
    if exact_fresh:
        print(f"verifying the first {args.exact_images} test images of {', '.join(exact_fresh)} exactly ...",
              flush=True)
    for run, row in evaluate_runs(exact_fresh, args, data, evaluate_exact, args.exact_images, args.time_limit):
        exact_cache(run).write_text(json.dumps(row, indent=2))
    rows = {}
    for kind in ("nemon", "explicit"):
        rows[kind] = []
        for run in getattr(args, kind):
            if not pathlib.Path(run).is_dir():
                # A seed trained on another machine: its evaluation of the saved model, as --out recorded it.
                if (kind, run) not in recorded:
                    p.error(f"{run}: no such run folder, and neither {out} nor a --recorded file records an "
                            f"evaluation of it at eps {args.eps:g}")
                print(f"{kind} {run}: the run folder is not here; its evaluation as recorded", flush=True)
                rows[kind].append(recorded[(kind, run)])
                continue
            rows[kind].append(json.loads(cache(run).read_text(), object_hook=_int_keys))
            if args.exact_images:
                exact = json.loads(exact_cache(run).read_text(), object_hook=_int_keys)
                rows[kind][-1]["certified"]["exact"] = exact["certified"]
                rows[kind][-1]["broken_certified"]["exact"] = exact["broken"]
                rows[kind][-1]["exact"] = exact
            if run not in fresh:   # an earlier version's row: its command and curve as this version writes them
                print(f"{kind} {run}: evaluated before ({cache(run)})", flush=True)
                rows[kind][-1]["command"] = command_of(run)
                rows[kind][-1]["curve"] = run_curve({"run": run})
            r = rows[kind][-1]
            exact = (f", exact {r['exact']['certified'][r['exact']['images']]:.2f}% of {r['exact']['images']} "
                     f"({r['exact']['unknown']} undecided)") if "exact" in r else ""
            print(f"  clean {r['clean'][1000]:.2f}%, interval {r['certified']['interval'][1000]:.2f}%, crown "
                  f"{r['certified']['crown'][1000]:.2f}%, PGD {r['pgd'][1000]:.2f}% (first 1,000){exact}; broken "
                  f"{r['broken_certified']}", flush=True)
    unverified = [r["run"] for rs in rows.values() for r in rs if args.exact_images and "exact" not in r]
    if unverified:   # one side by exact and the other by crown would not be a like-for-like comparison
        p.error(f"--exact-images: {unverified[0]} is recorded without exact verification and its folder is not here")
    broken = sum(n for rs in rows.values() for r in rs for n in r["broken_certified"].values())
    n_all = len(data.test_labels)
    nemon, explicit = rows["nemon"], rows["explicit"]
    clock = seconds_clock(rows)
    spent = lambda r: r["train_cpu_seconds" if clock == "cpu" else "train_seconds"]  # noqa: E731
    ours, twin = side_summary(nemon, n_all, spent), side_summary(explicit, n_all, spent)
    target = {"dataset": args.dataset, "eps": args.eps, **ours, "seconds_clock": clock, "images": 1000,
              "images_all": n_all,
              "target": args.target, **shortfall(args.target, ours["certified_per_seed"], args.next_run),
              "command": nemon[0]["command"], "broken_certified": broken,
              "explicit_matched": {**twin, "certified": float(np.mean(twin["certified_per_seed"])),
                                   "clean": float(np.mean(twin["clean_per_seed"])),
                                   "pgd": float(np.mean(twin["pgd_per_seed"])),
                                   "seconds": float(np.mean(twin["seconds_per_seed"])),
                                   "command": explicit[0]["command"]},
              "runs": rows}
    existing["targets"] = [t for t in existing["targets"] if not same_target(t, args.dataset, args.eps)] + [target]
    out.write_text(dumps(existing))
    figure = out.with_name(f"certified_targets_{args.dataset}_{args.eps:g}.png")
    drawn = plot_curves(rows, figure, f"{target_label(args.dataset, args.eps)}: NEMON stack against its explicit twin")
    comparison = matched_comparison(existing["targets"])
    summary = out.with_name("certified_targets_matched.png")
    plot_matched(comparison, summary)
    print(f"wrote {out}" + (f", {figure}" if drawn else "") + f" and {summary}")
    mean = lambda v: f"{np.mean(v):.2f}" + (f" ± {np.std(v):.2f}" if len(v) > 1 else "")  # noqa: E731
    exact = all("exact_per_seed" in side for side in (ours, twin))
    print(f"\n| model | seeds | clean | interval | crown | {'exact (undecided) | ' if exact else ''}PGD | "
          f"certified, all {n_all} | train s ({clock}) |")
    print("| --- " * (9 if exact else 8) + "|")
    for kind, side in (("nemon", ours), ("explicit", twin)):
        undecided = f" ({sum(side['exact_unknown_per_seed'])})" if exact else ""
        print(f"| {kind} | {len(side['clean_per_seed'])} | {mean(side['clean_per_seed'])}% | "
              f"{mean(side['interval_per_seed'])}% | {mean(side['crown_per_seed'])}% | "
              + (f"{mean(side['exact_per_seed'])}%{undecided} | " if exact else "")
              + f"{mean(side['pgd_per_seed'])}% | {mean(side['certified_all_per_seed'])}% "
              f"({side['certificate_all']}) | {mean(side['seconds_per_seed'])} |")
    print("\nevery target beside its compute-matched twin (the implicit layer pays where the NEMON stack is ahead):")
    print("| target | NEMON certified | explicit certified | NEMON - explicit | seconds, NEMON / explicit | verdict |")
    print("| --- | --- | --- | --- | --- | --- |")
    for c in comparison:
        print(f"| {c['label']} | {mean(c['nemon'])}% | {mean(c['explicit'])}% | {c['difference']:+.2f} | "
              f"{c['seconds_ratio']:.2f} | {c['verdict']} |")
    print(f"\ncertified images broken by an attack: {broken}")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
