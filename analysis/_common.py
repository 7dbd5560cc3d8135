"""Shared by the analysis scripts: their common command-line arguments, a model trained on MNIST in
process, and figures written as PNG and PDF side by side."""
import argparse
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def analysis_parser(doc, default_out, quick_help):
    """An ArgumentParser with the arguments every analysis script takes: --out, --quick, --seed, --data-dir."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=default_out, help="output folder")
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw and training")
    p.add_argument("--data-dir", default=None, help="MNIST folder (as for nemon_np.train)")
    return p


def train_on_mnist(config, data, limit=None):
    """A model trained by :class:`nemon_np.training.Trainer` with ``config`` on the first ``limit`` MNIST
    training images of ``data`` (all when None), with the data's normalization in its metadata; and the
    training seconds."""
    import numpy as np
    from nemon_np.data import normalize
    from nemon_np.training import Trainer
    X = normalize(data.train_images[:limit], data.mean, data.std)
    y = data.train_labels[:limit]
    start = time.perf_counter()
    trainer = Trainer(config, 784, 10)
    # The normalization first: certified training draws its pixel balls from it.
    trainer.model.metadata.update(dataset="mnist", mean=np.array(data.mean), std=np.array(data.std))
    trainer.fit(X, y, progress=False)
    return trainer.model, time.perf_counter() - start


def save_figure(fig, out, name, dpi=110):
    """Write ``out/name.png`` and ``out/name.pdf`` and close the figure."""
    for ext in ("png", "pdf"):
        fig.savefig(out / f"{name}.{ext}", dpi=dpi)
    plt.close(fig)


def _summary(value, traces):
    """``value`` without the keys named in ``traces`` (per-iteration or per-sample arrays), at any depth."""
    if isinstance(value, dict):
        return {k: _summary(v, traces) for k, v in value.items() if k not in traces}
    if isinstance(value, list):
        return [_summary(v, traces) for v in value]
    return value


def finish(out, results, lines=(), traces=(), started=None):
    """The common ending of an analysis script: ``out/results.json`` (everything), ``out/summary.json``
    (the same without the keys in ``traces``: the small file fit to be committed and cited), then
    ``lines`` printed and where everything went. Returns 0, the script's exit status."""
    import json
    if started is not None:
        results["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "summary.json").write_text(json.dumps(_summary(results, set(traces)), indent=1))
    print("\n".join(lines))
    print(f"wrote {out}/results.json, {out}/summary.json and figures in {results.get('seconds', 0):.0f}s")
    return 0
