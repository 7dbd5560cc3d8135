"""Shared command-line plumbing: one-line errors instead of argparse's usage dump."""
import argparse
import sys


def limit_blas_threads(n=1):
    """Cap the process's BLAS threads (threadpoolctl): the products here are small, and OpenBLAS's
    threads made them up to 14x slower on 2-core machines (docs/benchmarks.md)."""
    from threadpoolctl import threadpool_limits
    threadpool_limits(n, user_api="blas")


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: ``prog: error: message (see --help)``."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def add_threads_argument(parser):
    """``--threads N``: a conv model's or a stack's own threads (their ``n_jobs``)."""
    parser.add_argument("--threads", type=int, default=1,
                        help="conv models and stacks: threads sharing each batch's convolutions (and a conv model's "
                             "solver steps; as in "
                             "python -m nemon_np.train; 2 on an otherwise idle 2-core machine)")


def load_run(parser, run_dir, data_dir, threads=1):
    """The model of a training run (RUN_DIR/model.npz, or that file) and its data set; a conv model
    or a stack gets ``threads`` threads.

    Problems end the program with a one-line message (exit 2): a missing file or a thread count
    a dense model cannot use through the parser, an unreadable model or data set as ``error: ...``.
    Returns (model, data, model_path).
    """
    import pathlib

    from ._threads import check_n_jobs
    from .data import DataError, load_dataset
    from .loading import load_model

    path = pathlib.Path(run_dir)
    model_path = path / "model.npz" if path.is_dir() else path
    if not model_path.is_file():
        parser.error(f"{model_path} not found")
    try:
        threads = check_n_jobs(threads, "--threads")
    except ValueError as e:
        parser.error(str(e))
    try:
        model = load_model(model_path)
        name = model.metadata.get("dataset")
        if name is None:
            raise ValueError(f"{model_path} does not say which data set it was trained on")
        if hasattr(model, "n_jobs"):   # the models with threads of their own
            model.n_jobs = threads
        elif threads > 1:
            parser.error(f"--threads {threads} applies to conv models and stacks only; {model_path} holds a "
                         f"{type(model).__name__}")
        return model, load_dataset(name, data_dir), model_path
    except (ValueError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
