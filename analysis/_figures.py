"""Shared by the analysis scripts: figures are written as PNG and PDF side by side."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(fig, out, name, dpi=110):
    """Write ``out/name.png`` and ``out/name.pdf`` and close the figure."""
    for ext in ("png", "pdf"):
        fig.savefig(out / f"{name}.{ext}", dpi=dpi)
    plt.close(fig)
