"""Timing helpers shared by the benchmarks: median wall time of repeated calls after warm-up; the interleaved
medians are the package's (vtab_lily.cost), so the cost table and the benchmarks time alike."""
import statistics
import time

from vtab_lily.cost import interleaved_medians  # noqa: F401 (the benchmarks import it from here)


def median_seconds(fn, repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)
