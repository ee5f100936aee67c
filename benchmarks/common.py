"""Timing helper shared by the benchmarks: median wall time of repeated calls after warm-up."""
import statistics
import time


def median_seconds(fn, repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved_medians(steps, repeats: int) -> list[float]:
    """Median time of each function, timed in alternation so that machine drift hits all alike."""
    times = [[] for _ in steps]
    for step in steps:
        step()  # warm-up
    for _ in range(repeats):
        for i, step in enumerate(steps):
            times[i].append(median_seconds(step, repeats=1, warmup=0))
    return [statistics.median(t) for t in times]
