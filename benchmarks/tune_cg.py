"""Tuning and profiling of benchmarks/test_bench_cg.py (not collected by pytest).

``python benchmarks/tune_cg.py tune`` searches each peer's loosest tolerance setting that still meets
the bar (the ``TUNED`` values); ``python benchmarks/tune_cg.py profile [fisher|ggn]`` profiles our solve.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_bench_cg import (  # noqa: E402
    BAR, TUNED, Setting, _check_dattri_operator, _check_pydvl_operator, _dattri_solve, _pydvl_solve, ours_solve,
)


def _tune() -> None:
    """Loosest setting of each peer whose solution meets BAR by our operator."""
    setting = Setting()
    for kind, tuned in TUNED["dattri"].items():
        print(f"dattri {kind} ({tuned['mode']}): operator mismatch {_check_dattri_operator(setting, kind, tuned['mode']):.2e}")
        for max_iter in range(100, 1001, 10):
            start = time.perf_counter()
            residual = setting.residual(kind, _dattri_solve(setting, kind, max_iter, tuned["mode"]))
            print(f"  max_iter={max_iter}: residual {residual:.3g} ({time.perf_counter() - start:.1f} s)", flush=True)
            if residual <= BAR:
                break
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        print(f"pyDVL fisher: operator mismatch {_check_pydvl_operator(setting):.2e}")
        for rtol in (1.2e-2, 1e-2, 7e-3, 5e-3, 3e-3, 2e-3, 1e-3):
            start = time.perf_counter()
            solution, products = _pydvl_solve(setting, rtol)
            residual = setting.residual("fisher", solution)
            print(f"  rtol={rtol:g}: {products - 1} iterations, residual {residual:.3g} "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
            if residual <= BAR:
                break


def _profile(kind: str) -> None:
    import cProfile
    import pstats

    setting = Setting()
    ours_solve(setting, kind)  # warm-up
    profiler = cProfile.Profile()
    profiler.enable()
    result = ours_solve(setting, kind)
    profiler.disable()
    print(result.message)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ours_solve(setting, kind)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    torch.set_num_threads(2)
    if sys.argv[1:2] == ["tune"]:
        _tune()
    elif sys.argv[1:2] == ["profile"]:
        _profile(sys.argv[2] if len(sys.argv) > 2 else "fisher")
    else:
        raise SystemExit("usage: python benchmarks/tune_cg.py tune | profile [fisher|ggn]")
