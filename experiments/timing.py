"""Wall-clock timing shared by the layer benchmarks (`bench_conv`, `bench_conv_transpose`, `bench_depthwise`)."""

import statistics
import time

import jax


def median_ms(fn, *args, repeats: int) -> float:
    """Median milliseconds of `fn(*args)` over `repeats` calls, after one untimed call that compiles it."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)
