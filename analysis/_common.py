"""Shared by the analysis scripts: their common command-line arguments, and figures written as
PNG and PDF side by side."""
import argparse

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


def save_figure(fig, out, name, dpi=110):
    """Write ``out/name.png`` and ``out/name.pdf`` and close the figure."""
    for ext in ("png", "pdf"):
        fig.savefig(out / f"{name}.{ext}", dpi=dpi)
    plt.close(fig)
