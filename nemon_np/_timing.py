"""Wall-clock timing for the benchmarks and the analysis scripts."""
import time


def best_time(f, repeats, warmup=True):
    """Smallest wall time in seconds of ``repeats`` calls of ``f()`` (the least disturbed by other load)."""
    if warmup:
        f()
    best = float("inf")
    for _ in range(max(int(repeats), 1)):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best
