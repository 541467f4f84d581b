"""The study: datasets × methods × seeds → flat result records (the main job).

For each seed and each near-duplicate count C, the study builds the dataset, trains ``original``,
runs ``oracle`` (without the targets and their near-duplicates) and every requested method, and
evaluates all of them against the ``original`` and ``oracle`` references. Records are written to
``results.json`` / ``results.csv`` and summarised in ``report.md`` with plots.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from . import atomic_io
from .data import DATASETS, default_recipe, load_dataset
from .data.similar_dataset import as_tensors
from .evaluate import DEFAULT_METRICS, Evaluation, compute_metrics
from .evaluate.registry import shadow_metrics, shadows_needed, skipped_when_quick
from .methods import METHODS, unlearn
from .methods.expansion import SIMILAR_SUFFIX, expansion_quality, similar_base
from .models import build_model
from .report.folder import SET_NAME as STUDY_SET
from .report.folder import write_study_folder
from .report.markdown import RESULTS_NAME
from .report.summary import RESULTS_SCHEMA_VERSION
from .shadows import MAX_SHADOWS
from .shadows import evidence as shadow_evidence, method_phi, shadow_phi, train_shadows
from .study_details import DETAILS_SCHEMA_VERSION, condition_details
from .study_models import QUICK_EPOCH_DIVISOR, study_recipe, train_original  # noqa: F401  (QUICK_EPOCH_DIVISOR: re-exported)
from .train import fit, make_recipe
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
# --quick is a smoke run that must stay within 30 s on 2 CPU cores: besides no shadows, it skips the
# default metrics registered with quick=False, the audits that optimise per model.
QUICK_SKIPPED_METRICS = skipped_when_quick(DEFAULT_METRICS)
# The metrics that need shadow models (each entry's ``shadows`` fact: the fewest it works with).
SHADOW_METRICS = shadow_metrics()
# Shadow models per seed and C for LiRA / U-LiRA (off under --quick). See README for the cost.
DEFAULT_SHADOWS = 8


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


def _shadow_work(methods: list[str], shadows: int) -> int:
    """Progress-bar units of one condition's shadow work: S trainings, then S per method run on them."""
    return shadows * (1 + len(methods)) if shadows else 0


def _run_one_condition(dataset: str, seed: int, copies: int, methods: list[str], metrics: list[str], quick: bool,
                       device: torch.device, dataset_options: dict[str, Any], bar: Any,
                       method_options: dict[str, dict[str, Any]], shadows: int,
                       keep_details: bool) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    data = load_dataset(dataset, **{**dataset_options, "copies": copies, "seed": seed})
    model_name, recipe = study_recipe(dataset, quick)
    # Per-model bars only where a person watches; in logs the study bar's postfix says enough.
    inner = not bar.disable and sys.stderr.isatty()
    bar.set_postfix_str(f"seed={seed} C={copies} original")
    original, train_seconds = train_original(data, dataset, seed, quick, device, progress=inner)
    seconds = {"original": train_seconds}
    bar.update()
    models = {"original": original}
    requests: dict[str, tuple[str, dict[str, Any]]] = {}
    for name in ["oracle", *[m for m in methods if m not in REFERENCES]]:
        bar.set_postfix_str(f"seed={seed} C={copies} {name}")
        method, options = split_method(name)
        options.update(method_options.get(method, {}))
        requests[name] = (method, options)
        started = time.perf_counter()
        models[name] = unlearn(original, data.forget_ids, method, device=device, progress=inner, **options)
        seconds[name] = time.perf_counter() - started
        bar.update()

    evaluations = {name: Evaluation(m, data, device=device) for name, m in models.items()}
    if shadows:
        _attach_shadow_evidence(evaluations, requests, data, model_name, {**recipe, "seed": seed}, shadows, seed, device, bar)
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
            "targets": len(data.forget_ids), "model": model_name, "shadows": shadows,
            # Wall-clock cost, and as a fraction of retraining without the targets in the same condition.
            "seconds": seconds[name], "seconds_vs_retrain": seconds[name] / seconds["retrain"],
            **compute_metrics(ev, metrics),
            # How well the near-duplicate search did, for the "+similar" rows only.
            **expansion_quality(getattr(models[name], "unlearn_fast_similar", None), data.similar),
        })
    details = condition_details(dataset, copies, seed, data, {n: evaluations[n] for n in methods}, metrics) if keep_details else None
    return records, details


def _attach_shadow_evidence(evaluations: dict[str, Evaluation], requests: dict[str, tuple[str, dict[str, Any]]],
                            data: Any, model_name: str, recipe: dict[str, Any], count: int, seed: int,
                            device: torch.device, bar: Any) -> None:
    """Train the condition's shadows, run every method on them, and give each evaluation its evidence."""
    bar.set_postfix_str(f"seed={seed} C={data.info.get('copies')} shadows")
    shadow_set = train_shadows(data, model_name, recipe, count, seed, device)
    bar.update(count)
    base = shadow_phi(shadow_set, device)
    for name, ev in evaluations.items():
        bar.set_postfix_str(f"seed={seed} C={data.info.get('copies')} {name} on shadows")
        method, options = requests.get(name, ("original", {}))
        ev.shadows = shadow_evidence(shadow_set, base, method_phi(shadow_set, method, options, device))
        bar.update(count)


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
    metrics: Iterable[str] | None = None,
    method_options: dict[str, dict[str, Any]] | None = None,
    shadows: int | None = None,
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
        metrics: metric names (default: :data:`DEFAULT_METRICS`, plus :data:`SHADOW_METRICS` when
            shadows are on; with ``quick``, without :data:`QUICK_SKIPPED_METRICS`).
        shadows: S shadow models per seed and C for LiRA and U-LiRA (:mod:`unlearn_fast.shadows`);
            0 turns those metrics off. Default :data:`DEFAULT_SHADOWS`, or 0 with ``quick``.
    """
    options = dict(dataset_options or {})
    if "seed" in options:
        raise ValueError("dataset_options must not set 'seed': the study runs seeds 0 .. seeds-1 (use seeds=N)")
    DATASETS.resolve_hyper(dataset, options)  # unknown dataset or option fails before any training
    seeds = check_positive_int(seeds, "seeds")
    method_names = study_methods(methods)
    tuned = check_method_options(method_options)
    needs = {m: shadows_needed(m) for m in SHADOW_METRICS}
    shadows = (0 if quick else DEFAULT_SHADOWS) if shadows is None else check_positive_int(
        shadows, "shadows", minimum=0, hint=f"0 (off) or at least {max(needs.values())} for every shadow-model metric")
    if 0 < shadows < min(needs.values()) or shadows > MAX_SHADOWS:
        raise ValueError(f"shadows={shadows}: the shadow-model metrics need at least {min(needs.values())} shadow models "
                         f"({', '.join(f'{m} {n}' for m, n in needs.items())}), at most {MAX_SHADOWS}; give 0 to turn "
                         "them off")
    default_metrics = [*(m for m in DEFAULT_METRICS if not (quick and m in QUICK_SKIPPED_METRICS)),
                       *(m for m in SHADOW_METRICS if shadows >= needs[m])]
    metric_names = as_list(default_metrics if metrics is None else metrics, "metrics", str)
    needed = max((shadows_needed(m) for m in metric_names), default=0)  # an unknown name raises, listing the valid ones
    if shadows < needed:
        raise ValueError(f"metrics {[m for m in metric_names if shadows_needed(m)]} need shadow models: give "
                         f"shadows >= {needed} (got {shadows})")
    shadows = shadows if needed else 0  # no shadow metric asked for: train none
    default_copies = options.pop("copies", DATASETS.get(dataset).defaults["copies"])
    conditions = list(dict.fromkeys(as_list([default_copies, 0] if similar is None else similar, "similar", (int, np.integer))))
    if not conditions:
        raise ValueError("similar is empty; give at least one near-duplicate count C (0 = the control)")
    for c in conditions:
        check_positive_int(c, "similar", minimum=0, hint="each near-duplicate count C must be >= 0")
    dev = resolve_device(device)
    out_dir = None if out is None else atomic_io.check_writable_folder(out, "--out")

    _warm_up(dataset, options, dev)
    records: list[dict[str, Any]] = []
    details: list[dict[str, Any]] = []
    total = seeds * len(conditions) * (len(method_names) + _shadow_work(method_names, shadows))
    with tqdm(total=total, desc=f"study {dataset}", unit="model", disable=not progress) as bar:
        try:
            for seed in range(seeds):
                for copies in conditions:
                    rows, detail = _run_one_condition(dataset, seed, copies, method_names, metric_names, quick, dev,
                                                      options, bar, tuned, shadows, keep_details=seed == 0)
                    records += rows
                    details += [detail] if detail is not None else []
        except Exception as exc:  # a method that diverged, a bug: the finished conditions are kept
            if records:
                exc.add_note(f"the {len(records)} records of the conditions finished before it are saved in "
                             f"{_save_elsewhere(records)}; `unlearn-fast report` on that folder lists the rows they lack")
            raise
    if out_dir is not None:
        write_results(out_dir, records, {"schema_version": DETAILS_SCHEMA_VERSION, "conditions": details})
    return records


def _warm_up(dataset: str, options: dict[str, Any], device: torch.device) -> None:
    """One training step on a throwaway model, so the first timed model does not pay torch's lazy set-up."""
    data = load_dataset(dataset, **{**options, "copies": 0, "seed": 0})
    recipe = default_recipe(dataset)
    model = build_model(recipe.pop("model"), data.input_shape, data.num_classes)
    inputs, labels = as_tensors(data.train)
    n = recipe["batch_size"]
    fit(model, inputs[:n], labels[:n], make_recipe(**{**recipe, "epochs": 1}), "cross_entropy", device=device, progress=False)


def write_results(out_dir: Path, records: list[dict[str, Any]], details: dict[str, Any] | None = None) -> list[str]:
    """Commit results.json, results.csv, details.json (when given), the reports and manifest.json into
    ``out_dir`` as one set (:func:`unlearn_fast.report.folder.write_study_folder`); returns the names written.

    When the write fails (a full disk, permissions changed during the run, a plotting error), the
    records are saved to a new temporary folder, and the error raised names it: hours of training
    are never lost to a failed write.
    """
    safe = atomic_io.json_safe(records)
    try:
        return write_study_folder(out_dir, safe, details)
    except OSError as exc:
        if atomic_io.pending_commit(out_dir, STUDY_SET):
            raise OSError(f"the study's results are committed in {out_dir} but not all moved into place "
                          f"({exc.strerror or exc}); `unlearn-fast report {out_dir}` finishes them") from exc
        raise OSError(f"could not write the study's results into {out_dir} ({exc.strerror or exc}); the records are "
                      f"saved in {_save_elsewhere(safe)}") from exc
    except Exception as exc:
        exc.add_note(f"the records are saved in {_save_elsewhere(safe)}")
        raise


def _save_elsewhere(records: list[dict[str, Any]]) -> Path:
    """Write ``records`` to results.json in a new temporary folder; `unlearn-fast report` builds a report there."""
    rescue = Path(tempfile.mkdtemp(prefix="unlearn-fast-results-")) / RESULTS_NAME
    atomic_io.write_json(rescue, atomic_io.json_safe(records))
    return rescue
