"""The study: datasets × methods × seeds → flat result records (the main job).

For each seed and each near-duplicate count C, the study builds the dataset, trains ``original``,
runs ``oracle`` (without the targets and their near-duplicates) and every requested method, and
evaluates all of them against the ``original`` and ``oracle`` references. Records are written to
``results.json`` / ``results.csv`` and summarised in ``report.md`` with plots.
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from . import atomic_io
from .data import DATASETS, default_recipe, load_dataset
from .evaluate import DEFAULT_METRICS, METRICS, Evaluation, compute_metrics
from .methods import METHODS, unlearn
from .methods.expansion import SIMILAR_SUFFIX, expansion_quality, similar_base
from .models import build_model
from .report.summary import RESULTS_SCHEMA_VERSION
from .data.similar_dataset import as_tensors
from .train import fit, make_recipe, train
from .validation import as_list, check_positive_int, resolve_device

REFERENCES = ("original", "oracle")
# "<method>+similar" (SIMILAR_SUFFIX): the method after expanding the forget set with the
# near-duplicates that find_similar finds at its default method and threshold. The two "+similar"
# rows made the default study (3 seeds, 2 CPU cores) take 21.8 s instead of 17.6 s.
SIMILAR_OPTIONS = {"similar": "auto", "similar_action": "remove"}
# Every registered method; the ten of the method zoo (graddiff … ssd) took the default study
# (3 seeds × C ∈ {10, 0}, 2 CPU cores) from about 22 s to 25 s.
DEFAULT_METHODS = ("retrain", "finetune", "gradient_ascent", "graddiff", "random_label", "salun", "boundary_shrink",
                   "l1_sparse", "bad_teacher", "scrub", "fisher_forgetting", "ssd", "influence",
                   "retrain+similar", "influence+similar")
QUICK_EPOCH_DIVISOR = 3


def split_method(name: str) -> tuple[str, dict[str, Any]]:
    """(registered method, extra ``unlearn`` options) of a study method name.

    ``"x+similar"`` is method ``x`` with ``similar="auto"``; an unknown ``x`` raises, naming the valid methods.
    """
    base = similar_base(name)
    if base is None:
        METHODS.get(name)  # raises listing the valid names
        return name, {}
    if base not in METHODS:
        raise ValueError(f"unknown method {base!r} in {name!r}; valid methods: {', '.join(METHODS.names())}, "
                         f"each also as '<method>{SIMILAR_SUFFIX}'")
    return base, dict(SIMILAR_OPTIONS)


def study_methods(methods: str | Iterable[str] | None) -> list[str]:
    """``original``, ``retrain``, ``oracle`` first (the schema needs them), then the requested methods."""
    requested = as_list(DEFAULT_METHODS if methods is None else methods, "methods", str)
    for name in requested:
        if name not in REFERENCES:
            split_method(name)
    return list(dict.fromkeys(["original", "retrain", "oracle", *requested]))


def check_method_options(method_options: Any) -> dict[str, dict[str, Any]]:
    """``{method: {option: value}}`` checked against the registry (unknown methods or options raise).

    The options apply wherever the method runs, its ``+similar`` row included, e.g. the values
    that ``unlearn-fast tune`` chose.
    """
    if method_options is None:
        return {}
    if not isinstance(method_options, dict):
        raise ValueError(f"method_options must be a dict {{method: {{option: value}}}}, got {type(method_options).__name__}")
    for method, options in method_options.items():
        if not isinstance(options, dict):
            raise ValueError(f"method_options[{method!r}] must be a dict of options, got {type(options).__name__}")
        METHODS.resolve_hyper(method, options)  # unknown method or option raises, naming the valid ones
    return {m: dict(o) for m, o in method_options.items()}


def _run_one_condition(dataset: str, seed: int, copies: int, methods: list[str], metrics: list[str], quick: bool,
                       device: torch.device, dataset_options: dict[str, Any], bar: Any,
                       method_options: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    data = load_dataset(dataset, **{**dataset_options, "copies": copies, "seed": seed})
    recipe = default_recipe(dataset)
    model_name = recipe.pop("model")
    if quick:
        recipe["epochs"] = max(1, recipe["epochs"] // QUICK_EPOCH_DIVISOR)
    torch.manual_seed(seed)
    model = build_model(model_name, data.input_shape, data.num_classes)
    # Per-model bars only where a person watches; in logs the study bar's postfix says enough.
    inner = not bar.disable and sys.stderr.isatty()
    bar.set_postfix_str(f"seed={seed} C={copies} original")
    started = time.perf_counter()
    original = train(model, data, seed=seed, device=device, progress=inner, **recipe)
    seconds = {"original": time.perf_counter() - started}
    bar.update()
    models = {"original": original}
    for name in ["oracle", *[m for m in methods if m not in REFERENCES]]:
        bar.set_postfix_str(f"seed={seed} C={copies} {name}")
        method, options = split_method(name)
        options.update(method_options.get(method, {}))
        started = time.perf_counter()
        models[name] = unlearn(original, data.forget_ids, method, device=device, progress=inner, **options)
        seconds[name] = time.perf_counter() - started
        bar.update()

    evaluations = {name: Evaluation(m, data, device=device) for name, m in models.items()}
    refs = {name: evaluations[name].outputs("targets").loss for name in REFERENCES}
    references = {name: evaluations[name] for name in REFERENCES}
    records = []
    for name in methods:
        ev = evaluations[name]
        ev.reference_target_loss = refs
        ev.references = references
        records.append({
            "schema_version": RESULTS_SCHEMA_VERSION,
            "dataset": dataset, "method": name, "seed": seed, "similar": copies,
            "targets": len(data.forget_ids), "model": model_name,
            # Wall-clock cost, and as a fraction of retraining without the targets in the same condition.
            "seconds": seconds[name], "seconds_vs_retrain": seconds[name] / seconds["retrain"],
            **compute_metrics(ev, metrics),
            # How well the near-duplicate search did, for the "+similar" rows only.
            **expansion_quality(getattr(models[name], "unlearn_fast_similar", None), data.similar),
        })
    return records


def run_study(
    dataset: str = "digits-blockmask",
    methods: Iterable[str] | None = None,
    seeds: int = 3,
    similar: Iterable[int] | None = None,
    quick: bool = False,
    out: str | os.PathLike[str] | None = None,
    device: str | torch.device = "auto",
    progress: bool = True,
    dataset_options: dict[str, Any] | None = None,
    metrics: Iterable[str] = DEFAULT_METRICS,
    method_options: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Run the study and return its records; with ``out``, also write results and report there.

    Args:
        dataset: a registered dataset name.
        methods: methods to compare besides the always-run ``original``, ``retrain`` and ``oracle``
            (default: :data:`DEFAULT_METHODS`); ``"x+similar"`` is method x with ``similar="auto"``.
        seeds: number of seeds (0 .. seeds-1); each seed redraws split, targets, masks and init.
        similar: near-duplicate counts C to run; default the dataset's C and 0 (the control).
        quick: a third of the epochs, for smoke runs.
        out: output folder. Only the study's own files in it are (atomically) replaced.
        dataset_options: passed to :func:`unlearn_fast.load_dataset` (e.g. ``targets``, ``source``).
        method_options: ``{method: {option: value}}`` overriding registered defaults (see
            :func:`check_method_options`), e.g. from :func:`unlearn_fast.tune.load_tuned`.
    """
    options = dict(dataset_options or {})
    if "seed" in options:
        raise ValueError("dataset_options must not set 'seed': the study runs seeds 0 .. seeds-1 (use seeds=N)")
    DATASETS.resolve_hyper(dataset, options)  # unknown dataset or option fails before any training
    seeds = check_positive_int(seeds, "seeds")
    method_names = study_methods(methods)
    tuned = check_method_options(method_options)
    metric_names = as_list(metrics, "metrics", str)
    for name in metric_names:
        METRICS.get(name)
    default_copies = options.pop("copies", DATASETS.get(dataset).defaults["copies"])
    conditions = list(dict.fromkeys(as_list([default_copies, 0] if similar is None else similar, "similar", (int, np.integer))))
    if not conditions:
        raise ValueError("similar is empty; give at least one near-duplicate count C (0 = the control)")
    for c in conditions:
        check_positive_int(c, "similar", minimum=0, hint="each near-duplicate count C must be >= 0")
    out_dir = _prepare_out(out)
    dev = resolve_device(device)

    _warm_up(dataset, options, dev)
    records: list[dict[str, Any]] = []
    total = seeds * len(conditions) * len(method_names)
    with tqdm(total=total, desc=f"study {dataset}", unit="model", disable=not progress) as bar:
        for seed in range(seeds):
            for copies in conditions:
                records += _run_one_condition(dataset, seed, copies, method_names, metric_names, quick, dev, options, bar, tuned)
    if out_dir is not None:
        write_results(out_dir, records)
    return records


def _warm_up(dataset: str, options: dict[str, Any], device: torch.device) -> None:
    """One training step on a throwaway model, so the first timed model does not pay torch's lazy set-up."""
    data = load_dataset(dataset, **{**options, "copies": 0, "seed": 0})
    recipe = default_recipe(dataset)
    model = build_model(recipe.pop("model"), data.input_shape, data.num_classes)
    inputs, labels = as_tensors(data.train)
    n = recipe["batch_size"]
    fit(model, inputs[:n], labels[:n], make_recipe(**{**recipe, "epochs": 1}), "cross_entropy", device=device, progress=False)


def _prepare_out(out: str | os.PathLike[str] | None) -> Path | None:
    if out is None:
        return None
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _json_safe(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_results(out_dir: Path, records: list[dict[str, Any]]) -> None:
    """Write results.json, results.csv and the report (report.md + PNGs).

    All five files are produced in a staging folder first and only then moved into ``out_dir``, so
    a failure (in plotting, say) leaves the earlier results intact.
    """
    from .report import build_report

    safe = [{k: _json_safe(v) for k, v in r.items()} for r in records]
    from .report import REPORT_FILES

    with atomic_io.staged_files(out_dir, ("results.json", "results.csv", *REPORT_FILES)) as staging:
        atomic_io.write_json(staging / "results.json", safe)
        columns = list(dict.fromkeys(k for r in safe for k in r))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(safe)
        atomic_io.write_text(staging / "results.csv", buffer.getvalue())
        build_report(staging, safe)
