"""The measurements behind influence_unlearn's defaults (benchmarks/RESULTS.md, issue 16).

    python benchmarks/influence_policies.py convex     # logistic regression: error to the retrained optimum
    python benchmarks/influence_policies.py sweep      # one step at fixed dampings: ρ and RI on the study conditions
    python benchmarks/influence_policies.py policies   # trust-region variants on the study conditions
    python benchmarks/influence_policies.py noise      # RI of a retraining that only shuffles differently
    python benchmarks/influence_policies.py limit      # the retain objective minimised to convergence (L-BFGS)
    python benchmarks/influence_policies.py scale      # one step at multiples of the curvature's mean eigenvalue

The study conditions are the default study's (digits-blockmask, MLP recipe, seeds 0-2): the 50 targets
at C=0, and at C=10 the targets plus the near-duplicates ``find_similar`` adds (the +similar row).
``--weight-decay`` retrains the originals with another λ (sweep, policies). Every line printed is one
condition or one summary over the 3 seeds; RI medians are averaged over seeds, as in the study table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
import warnings
from collections.abc import Iterator

import numpy as np
import torch

import unlearn_fast as uf
from unlearn_fast.context import get_context
from unlearn_fast.data import default_recipe
from unlearn_fast.evaluate import Evaluation, compute_metrics
from unlearn_fast.influence import damping as damping_module
from unlearn_fast.influence import trust_region
from unlearn_fast.influence.vectors import flat_params, trainable
from unlearn_fast.methods.expansion import forget_request

SEEDS = (0, 1, 2)
BEFORE = {"damping": 1e-3, "trust_region": False, "steps": 1, "preconditioner": None}


def conditions(weight_decay: float | None = None) -> Iterator[tuple[str, int, uf.SimilarDataset, torch.nn.Module, torch.nn.Module, list[int], float]]:
    """(row, seed, data, original, oracle, forget ids, seconds of retraining) for the study's two rows."""
    recipe = default_recipe("digits-blockmask")
    recipe.pop("model")
    if weight_decay is not None:
        recipe["weight_decay"] = weight_decay
    for seed in SEEDS:
        for copies in (10, 0):
            data = uf.load_dataset("digits-blockmask", copies=copies, seed=seed)
            torch.manual_seed(seed)
            model = uf.build_model("mlp", data.input_shape, data.num_classes)
            original = uf.train(model, data, seed=seed, device="cpu", progress=False, **recipe)
            started = time.perf_counter()
            oracle = uf.unlearn(original, data.forget_ids, "oracle", device="cpu", progress=False)
            seconds = time.perf_counter() - started
            if copies:
                ids, _ = forget_request(original, get_context(original), data.forget_ids, "auto", device="cpu", progress=False)
                yield "+similar C=10", seed, data, original, oracle, ids, seconds
            else:
                yield "influence C=0", seed, data, original, oracle, list(data.forget_ids), seconds


def quality(model: torch.nn.Module, data: uf.SimilarDataset, original: torch.nn.Module, oracle: torch.nn.Module) -> dict:
    refs = {n: Evaluation(m, data, device="cpu").outputs("targets").loss for n, m in (("original", original), ("oracle", oracle))}
    ev = Evaluation(model, data, device="cpu", reference_target_loss=refs)
    ours = compute_metrics(ev, ["residual_influence", "residual_influence_median", "test_acc"])
    ours["test_acc"] -= compute_metrics(Evaluation(oracle, data, device="cpu"), ["test_acc"])["test_acc"]
    return ours


def summarise(rows: dict[tuple, list[dict]]) -> None:
    print("\nover seeds (RI median and mean averaged, test accuracy minus the oracle's, time / retraining):")
    for key, values in rows.items():
        med = [v["residual_influence_median"] for v in values]
        print(f"  {' '.join(map(str, key)):48s} RI median {np.mean(med):+.3f} (per seed {np.round(med, 2).tolist()}) "
              f"mean {np.mean([v['residual_influence'] for v in values]):+.3f} "
              f"test acc {np.mean([v['test_acc'] for v in values]):+.4f}"
              + (f" time {np.mean([v['time'] for v in values]):.2f}" if "time" in values[0] else "")
              + (f" rho {np.round([v['rho'] for v in values], 2).tolist()}" if "rho" in values[0] else ""))


@contextlib.contextmanager
def patched(settings: dict) -> Iterator[None]:
    """Set trust-region / damping module constants (RHO_ACCEPT, DAMPING_GROWTH) for one run."""
    saved = {}
    for name, value in settings.items():
        module = trust_region if hasattr(trust_region, name) else damping_module
        saved[name] = (module, getattr(module, name))
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, (module, value) in saved.items():
            setattr(module, name, value)


def run_convex() -> None:
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    from helpers import LOGISTIC_LAMBDA, flat, logistic_problem, retrained_logistic

    variants = {"before (one step, damping 1e-3)": BEFORE, "one undamped step": {"steps": 1, "preconditioner": None},
                "defaults": {}}
    for name in ("breast_cancer", "digits"):
        model, data = logistic_problem(name)
        for trial, fraction in enumerate([0.01, 0.03, 0.05, 0.08, 0.10]):
            forget = torch.randperm(len(data), generator=torch.Generator().manual_seed(100 + trial))[:max(1, int(fraction * len(data)))].tolist()
            target = flat(retrained_logistic(data, forget))
            for solver in ("cg", "exact"):
                errors = []
                for options in variants.values():
                    m = copy.deepcopy(model)
                    uf.influence_unlearn(m, forget, data=data, loss="cross_entropy", weight_decay=LOGISTIC_LAMBDA, solver=solver,
                                         device="cpu", progress=False, **options)
                    errors.append(float((flat(m) - target).norm() / (flat(model) - target).norm()))
                print(f"{name:13s} m={len(forget):3d} ({fraction:.0%}) {solver:5s} " + "  ".join(
                    f"{label} {e:.2g}" for label, e in zip(variants, errors)))


def run_sweep(weight_decay: float | None, dampings: list[float]) -> None:
    rows: dict[tuple, list[dict]] = {}
    for row, seed, data, original, oracle, ids, _ in conditions(weight_decay):
        for delta in dampings:
            m = copy.deepcopy(original)
            report = uf.influence_unlearn(m, ids, damping=delta, trust_region=False, steps=1, device="cpu", progress=False)
            q = {**quality(m, data, original, oracle), "rho": report.trials[0].rho}
            rows.setdefault((row, f"damping {delta:g}"), []).append(q)
            print(f"{row} seed {seed} damping {delta:g}: ρ {q['rho']:.3f} RI median {q['residual_influence_median']:+.3f}", flush=True)
    summarise(rows)


POLICIES = {
    "defaults": ({}, {}),
    "acceptance rho > 0.25": ({}, {"RHO_ACCEPT": 0.25}),
    "damping growth 4": ({}, {"DAMPING_GROWTH": 4.0}),
    "no preconditioner": ({"preconditioner": None}, {}),
    "steps=3": ({"steps": 3}, {}),
    "before (one step, damping 1e-3)": (BEFORE, {}),
}


def run_policies(weight_decay: float | None) -> None:
    rows: dict[tuple, list[dict]] = {}
    for row, seed, data, original, oracle, ids, retrain_seconds in conditions(weight_decay):
        for name, (options, constants) in POLICIES.items():
            m = copy.deepcopy(original)
            with patched(constants), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                started = time.perf_counter()
                report = uf.influence_unlearn(m, ids, device="cpu", progress=False, **options)
                seconds = time.perf_counter() - started
            q = {**quality(m, data, original, oracle), "time": seconds / retrain_seconds}
            rows.setdefault((row, name), []).append(q)
            trials = [(f"{t.damping:.2g}", round(t.rho, 2), t.accepted) for t in report.trials]
            print(f"{row} seed {seed} {name}: RI median {q['residual_influence_median']:+.3f} trials {trials}", flush=True)
    summarise(rows)


def run_noise() -> None:
    from unlearn_fast.train import fit, make_recipe

    rows: dict[tuple, list[dict]] = {}
    for row, seed, data, original, oracle, ids, _ in conditions():
        ctx = get_context(original)
        x, y = ctx.tensors()
        keep = torch.tensor(ctx.retain_ids(ids))
        for other in (100, 200):
            m = copy.deepcopy(original)
            m.load_state_dict(ctx.initial_state)
            recipe = {k: ctx.recipe[k] for k in ("epochs", "lr", "batch_size", "weight_decay", "momentum", "schedule", "amp")}
            fit(m, x[keep], y[keep], make_recipe(**recipe, seed=seed + other), ctx.loss, device=torch.device("cpu"), progress=False)
            rows.setdefault((row, "retrained with another data order"), []).append(quality(m, data, original, oracle))
    summarise(rows)


def run_limit(dampings: list[float]) -> None:
    """Minimise the retain objective Φ (+ δ/2‖θ − θ₀‖²) to convergence: where the steps would end."""
    from unlearn_fast.influence.retain_objective import RetainObjective

    rows: dict[tuple, list[dict]] = {}
    for row, seed, data, original, oracle, ids, _ in conditions():
        for delta in dampings:
            m = copy.deepcopy(original)
            ctx, params = get_context(m), trainable(m)
            x, y = ctx.tensors()
            retain = ctx.retain_ids(ids)
            objective = RetainObjective(m, ctx.loss, params, ctx.weight_decay, (x[ids], y[ids]), (x[retain], y[retain]),
                                        n_retain=len(retain), batch_size=4096)
            theta0, tilt, weights = objective.theta0, objective.tilt, list(params.values())
            optimiser = torch.optim.LBFGS(weights, lr=1, max_iter=500, history_size=50, line_search_fn="strong_wolfe",
                                          tolerance_grad=1e-10, tolerance_change=1e-14)

            def closure() -> torch.Tensor:
                optimiser.zero_grad()
                theta = torch.cat([p.reshape(-1) for p in weights])
                value = (torch.nn.functional.cross_entropy(m(x[retain]), y[retain]) + ctx.weight_decay / 2 * theta.pow(2).sum()
                         - tilt @ theta + delta / 2 * (theta - theta0).pow(2).sum())
                value.backward()
                return value

            m.eval()
            for _ in range(3):
                optimiser.step(closure)
            moved = float((flat_params(params) - theta0).norm() / theta0.norm())
            rows.setdefault((row, f"converged, damping {delta:g}"), []).append({**quality(m, data, original, oracle)})
            print(f"{row} seed {seed} damping {delta:g}: moved {moved:.2f} of ‖θ₀‖, RI median "
                  f"{rows[(row, f'converged, damping {delta:g}')][-1]['residual_influence_median']:+.3f}", flush=True)
    summarise(rows)


def run_scale(multiples: list[float]) -> None:
    """One unchecked step at δ = c·s, s = tr(C)/P the GGN's mean eigenvalue on the retain samples: kronfluence's
    default damping is c = 0.1 of that mean (its ``damping_factor``, applied to the mean eigenvalue)."""
    from unlearn_fast.influence.curvature import CurvatureOperator
    from unlearn_fast.influence.damping import curvature_scale

    rows: dict[tuple, list[dict]] = {}
    for row, seed, data, original, oracle, ids, _ in conditions():
        ctx = get_context(original)
        x, y = ctx.tensors()
        keep = torch.as_tensor(ctx.retain_ids(ids))
        scale = curvature_scale(CurvatureOperator(original, ctx.loss, (x[keep], y[keep]), kind="ggn",
                                                  weight_decay=ctx.weight_decay, device="cpu"))
        for multiple in multiples:
            m = copy.deepcopy(original)
            report = uf.influence_unlearn(m, ids, damping=multiple * scale, trust_region=False, steps=1, device="cpu",
                                          progress=False)
            q = {**quality(m, data, original, oracle), "rho": report.trials[0].rho}
            rows.setdefault((row, f"damping {multiple:g}·s"), []).append(q)
            print(f"{row} seed {seed} s {scale:.3g} damping {multiple:g}·s = {multiple * scale:.3g}: ρ {q['rho']:.3f} "
                  f"RI median {q['residual_influence_median']:+.3f}", flush=True)
    summarise(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["convex", "sweep", "policies", "noise", "limit", "scale"])
    parser.add_argument("--weight-decay", type=float, default=None, help="sweep, policies: retrain the originals with this λ")
    parser.add_argument("--dampings", type=float, nargs="+", default=[2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3])
    parser.add_argument("--multiples", type=float, nargs="+", default=[0.01, 0.1, 1.0], help="scale: δ = multiple · tr(C)/P")
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    {"convex": run_convex, "policies": lambda: run_policies(args.weight_decay), "noise": run_noise,
     "sweep": lambda: run_sweep(args.weight_decay, args.dampings), "limit": lambda: run_limit(args.dampings),
     "scale": lambda: run_scale(args.multiples)}[args.what]()


if __name__ == "__main__":
    main()
