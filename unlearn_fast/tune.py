"""``unlearn-fast tune``: a small seeded search over one method's hyperparameters, scored against the oracle.

The objective is the mean absolute gap to the oracle (:func:`oracle_gap`) over target, near-duplicate,
retain and test accuracy, the loss-threshold MIA and the divergence from the oracle's predictions on
the targets (:data:`TUNE_METRICS`): a method that unlearns too much (target accuracy
under the oracle's, lost test accuracy) scores as badly as one that unlearns too little. Trial 0 is
the registered defaults, the others are seeded draws from :data:`~.methods.search_spaces.SEARCH_SPACES`.

The tuning task is the study's, on seeds of its own (``tune_seeds``, default 1000) rather than the
study's 0 .. S-1, so that the chosen values are not fitted to the seeds they are evaluated on. The
result file records every trial; :func:`load_tuned` turns one or more of them into the
``method_options`` of :func:`unlearn_fast.study.run_study`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import atomic_io
from .data import DATASETS, SimilarDataset, load_dataset
from .evaluate import Evaluation, compute_metrics
from .methods import METHODS, unlearn
from .methods.search_spaces import SEARCH_SPACES, Space
from .study_models import train_original
from .validation import as_list, check_bool, check_positive_int, resolve_device

TUNE_SCHEMA_VERSION = 1
# Accuracy on each split plus membership inference: too little unlearning shows in target/similar
# accuracy and the MIA, too much in those and in retain/test accuracy. Where `original` already has
# the oracle's target accuracy (digits at C=0: both near 0.95), those five cannot see too little
# unlearning at all and the search rewards doing nothing; the Jensen-Shannon divergence of the
# model's predictions on the targets from the oracle's (0 for the oracle, at most ln 2) sees it per
# target, so it is the sixth term.
TUNE_METRICS = ("target_acc", "similar_acc", "retain_acc", "test_acc", "mia_auc", "js_to_oracle_targets")
# Not the study's seeds (0 .. S-1), so the tuned values are not fitted to the evaluation seeds.
DEFAULT_TUNE_SEEDS = (1000,)
DEFAULT_TUNED_DIR = "unlearn-fast-tuned"
# What a trial's method may raise on values that make it diverge (a non-finite Newton step, a
# failed factorisation, an overflow); the trial is then scored +inf and the search goes on.
NUMERIC_FAILURES = (ValueError, RuntimeError, ArithmeticError)


@dataclass
class Trial:
    """One point of the search: its option values, objective (lower is better; +inf: failed),
    per-tune-seed metrics of the model and the oracle (keyed by str(seed)), and the error if it failed."""

    values: dict[str, Any]
    objective: float
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    oracle_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    error: str | None = None


@dataclass
class TuneResult:
    """Every trial of one search, the best one (ties go to the lower index, so the defaults win
    them), and where the result was written (None: not written).

    ``original_objective`` scores ``original`` itself (no unlearning): where it is as low as the best
    trial's, these metrics cannot tell the oracle from the original on this task, and the search
    only guarded against over-unlearning.
    """

    method: str
    dataset: str
    similar: int
    tune_seeds: list[int]
    trials: list[Trial]
    best_index: int
    original_objective: float
    quick: bool = True
    seed: int = 0
    dataset_options: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def best(self) -> Trial:
        return self.trials[self.best_index]

    @property
    def defaults_objective(self) -> float:
        return self.trials[0].objective

    def to_json(self) -> dict[str, Any]:
        """The result file's content (non-finite numbers as null)."""
        return atomic_io.json_safe({
            "schema_version": TUNE_SCHEMA_VERSION, "method": self.method, "dataset": self.dataset,
            "similar": self.similar, "tune_seeds": self.tune_seeds, "quick": self.quick, "seed": self.seed,
            "dataset_options": self.dataset_options,
            "trials": [{"values": t.values, "objective": t.objective, "metrics": t.metrics,
                        "oracle_metrics": t.oracle_metrics, "error": t.error} for t in self.trials],
            "best": {"values": self.best.values, "objective": self.best.objective},
            "defaults_objective": self.defaults_objective, "original_objective": self.original_objective,
        })


def oracle_gap(metrics: Mapping[str, float], oracle_metrics: Mapping[str, float], names: Iterable[str]) -> float:
    """Mean of |metrics[n] − oracle_metrics[n]| over ``names``: 0 when the model scores as the oracle does.

    A metric the oracle leaves undefined (NaN, e.g. ``similar_acc`` without near-duplicates) is
    skipped; one the oracle defines but the model does not (NaN or inf) makes the gap +inf, so a
    broken model never scores well by missing metrics. Raises when no metric is defined for the oracle.
    """
    gaps = []
    for name in names:
        if name not in metrics or name not in oracle_metrics:
            raise ValueError(f"metric {name!r} is missing from the model's or the oracle's metrics")
        value, reference = float(metrics[name]), float(oracle_metrics[name])
        if math.isnan(reference):
            continue
        if not math.isfinite(value):
            return math.inf
        gaps.append(abs(value - reference))
    if not gaps:
        raise ValueError(f"none of the metrics {list(names)} is defined for the oracle; nothing to compare")
    return float(np.mean(gaps))


def search_space(method: str) -> dict[str, Space]:
    """The search space of a registered ``method``; a clear error for unknown or untunable methods."""
    METHODS.get(method)  # unknown: raises, listing the methods
    if method not in SEARCH_SPACES:
        raise ValueError(f"method {method!r} has nothing to tune (no search space); tunable methods: "
                         f"{', '.join(SEARCH_SPACES)}")
    return SEARCH_SPACES[method]


def draw_trials(method: str, trials: int, seed: int) -> list[dict[str, Any]]:
    """The option values of ``trials`` trials: the registered defaults first, then draws from
    ``numpy.random.default_rng(seed)``, option by option in the table's order."""
    space = search_space(method)
    trials = check_positive_int(trials, "trials")
    rng = np.random.default_rng(check_positive_int(seed, "seed", minimum=0))
    defaults = METHODS.get(method).defaults
    points = [{name: defaults[name] for name in space}]
    points += [{name: s.draw(rng) for name, s in space.items()} for _ in range(trials - 1)]
    return points


@dataclass
class _Setup:
    """One tune seed's task: the data, the study's ``original``, the oracle's metrics and the
    original's own gap to them (the objective of unlearning nothing)."""

    seed: int
    data: SimilarDataset
    original: torch.nn.Module
    oracle_metrics: dict[str, float]
    original_gap: float
    oracle_evaluation: Evaluation


def _setup(dataset: str, seed: int, similar: int, quick: bool, options: dict[str, Any], device: torch.device) -> _Setup:
    data = load_dataset(dataset, **{**options, "copies": similar, "seed": seed})
    original, _ = train_original(data, dataset, seed, quick, device)
    oracle = unlearn(original, data.forget_ids, "oracle", device=device, progress=False)
    oracle_ev = Evaluation(oracle, data, device=device)
    oracle_ev.references = {"oracle": oracle_ev}
    oracle_metrics = compute_metrics(oracle_ev, TUNE_METRICS)
    original_ev = Evaluation(original, data, device=device, references={"oracle": oracle_ev})
    original_gap = oracle_gap(compute_metrics(original_ev, TUNE_METRICS), oracle_metrics, TUNE_METRICS)
    return _Setup(seed, data, original, oracle_metrics, original_gap, oracle_ev)


def _run_trial(method: str, values: dict[str, Any], setups: list[_Setup], device: torch.device) -> Trial:
    trial = Trial(values=values, objective=math.inf, oracle_metrics={str(s.seed): s.oracle_metrics for s in setups})
    gaps = []
    try:
        for s in setups:
            # unlearn raises FloatingPointError for a diverged (non-finite) result: a failed trial.
            model = unlearn(s.original, s.data.forget_ids, method, device=device, progress=False, **values)
            ev = Evaluation(model, s.data, device=device, references={"oracle": s.oracle_evaluation})
            trial.metrics[str(s.seed)] = compute_metrics(ev, TUNE_METRICS)
            gaps.append(oracle_gap(trial.metrics[str(s.seed)], s.oracle_metrics, TUNE_METRICS))
    except NUMERIC_FAILURES as exc:
        trial.error = f"{type(exc).__name__}: {exc}"
        return trial
    trial.objective = float(np.mean(gaps))
    return trial


def tuned_path(out: str | os.PathLike[str], method: str) -> Path:
    """Where the result goes: ``out`` itself when it names a .json file, else ``out/<method>.json``."""
    path = Path(out)
    # A folder, existing or not: anything not named *.json (``Path`` drops a trailing slash).
    if path.is_dir() or path.suffix.lower() != ".json":
        return path / f"{method}.json"
    if path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"out={str(path)!r}: {path.parent} is not a folder")
    return path


def _check_tune_seeds(tune_seeds: Any) -> list[int]:
    seeds = [check_positive_int(s, "tune_seeds", minimum=0) for s in as_list(tune_seeds, "tune_seeds", (int, np.integer))]
    if not seeds:
        raise ValueError("tune_seeds is empty; give at least one seed (default: 1000)")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"tune_seeds has duplicates: {seeds}")
    return seeds


def tune_method(
    method: str,
    *,
    dataset: str = "digits-blockmask",
    trials: int = 12,
    seed: int = 0,
    similar: int = 0,
    tune_seeds: Iterable[int] = DEFAULT_TUNE_SEEDS,
    quick: bool = False,
    device: str | torch.device = "auto",
    progress: bool = True,
    out: str | os.PathLike[str] | None = None,
    dataset_options: dict[str, Any] | None = None,
) -> TuneResult:
    """Search ``method``'s hyperparameters for the values closest to the oracle on the study's task.

    Args:
        method: a registered method with a search space (see :data:`SEARCH_SPACES`).
        dataset: a registered dataset; the task is the study's (its recipe, ``quick`` included).
        trials: number of trials, the registered defaults included (trial 0).
        seed: seeds the draws (same seed, same trials).
        similar: near-duplicates per target, C. With the default 0, the oracle is ``retrain``, an
            unambiguous target; with C > 0 the method is tuned to match the oracle that also drops the copies.
        tune_seeds: dataset/training seeds the objective is averaged over (not the study's 0 .. S-1).
        quick: train ``original`` with the study's ``--quick`` recipe (as ``unlearn-fast study --quick``);
            the default is the full recipe, as the default study's, since ``study --tuned`` refuses a mismatch.
        out: a JSON file, or a folder for ``<method>.json``, written atomically (None: not written).
        dataset_options: passed to :func:`unlearn_fast.load_dataset` (e.g. ``targets``); not
            ``seed`` or ``copies``, which ``tune_seeds`` and ``similar`` set.

    Returns:
        A :class:`TuneResult`. A trial whose method fails numerically is scored +inf and keeps its
        error; if every trial fails, ValueError.
    """
    space_points = draw_trials(method, trials, seed)  # validates method, trials and seed
    similar = check_positive_int(similar, "similar", minimum=0, hint="the number of near-duplicates per target")
    seeds = _check_tune_seeds(tune_seeds)
    quick = check_bool(quick, "quick")
    progress = check_bool(progress, "progress")
    if dataset_options is not None and not isinstance(dataset_options, dict):
        raise ValueError(f"dataset_options must be a dict of load_dataset options, got {type(dataset_options).__name__}")
    options = dict(dataset_options or {})
    clash = sorted({"seed", "copies"} & set(options))
    if clash:
        raise ValueError(f"dataset_options must not set {clash}: tune_seeds sets the seed and similar the copies")
    DATASETS.resolve_hyper(dataset, options)  # unknown dataset or option fails before any training
    path = None if out is None else tuned_path(out, method)
    if path is not None:
        atomic_io.check_writable_folder(path.parent, "--out")
    dev = resolve_device(device)

    results: list[Trial] = []
    with tqdm(total=len(space_points), desc=f"tune {method}", unit="trial", disable=not progress) as bar:
        setups = []
        for s in seeds:
            bar.set_postfix_str(f"original + oracle, seed {s}")
            setups.append(_setup(dataset, s, similar, quick, options, dev))
        for values in space_points:
            results.append(_run_trial(method, values, setups, dev))
            bar.set_postfix_str(f"best {min(t.objective for t in results):.4g}")
            bar.update()

    # min keeps the first of equal objectives: ties go to the lower trial index (the defaults first).
    best = min(range(len(results)), key=lambda i: results[i].objective)
    if not math.isfinite(results[best].objective):
        raise ValueError(f"every trial of {method!r} failed; the first: {results[0].error}")
    original_objective = float(np.mean([s.original_gap for s in setups]))
    result = TuneResult(method, dataset, similar, seeds, results, best, original_objective, quick, int(seed), options, path)
    if path is not None:
        atomic_io.write_json(path, result.to_json())
    return result


def _tuned_files(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not items:
        raise ValueError("no tuned files given; give result files of `unlearn-fast tune` or a folder of them")
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(path.glob("*.json"))
            if not found:
                raise ValueError(f"tuned folder {path} holds no .json files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"tuned file {path} does not exist")
    return files


def _read_tuned(path: Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(method, chosen values, the whole file) of one result file; ValueError naming the file on anything malformed."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"tuned file {path}: cannot be read as JSON ({exc})") from None
    # ValueError, not TypeError, for a wrong JSON type too: every input error is one the CLI reports (exit 2).
    if not isinstance(doc, dict):
        raise ValueError(f"tuned file {path}: expected a JSON object written by `unlearn-fast tune`")  # noqa: TRY004
    if doc.get("schema_version") != TUNE_SCHEMA_VERSION:
        raise ValueError(f"tuned file {path}: schema_version {doc.get('schema_version')!r}, this version "
                         f"reads {TUNE_SCHEMA_VERSION}; run `unlearn-fast tune` again")
    method, best = doc.get("method"), doc.get("best")
    if not isinstance(best, dict) or not isinstance(best.get("values"), dict):
        raise ValueError(f"tuned file {path}: no 'best': {{'values': {{option: value}}}} entry")  # noqa: TRY004
    try:
        METHODS.resolve_hyper(method, best["values"])  # unknown method or option raises, naming the valid ones
    except ValueError as exc:
        raise ValueError(f"tuned file {path}: {exc}") from None
    return method, dict(best["values"]), doc


def _check_task(path: Path, doc: dict[str, Any], dataset: str | None, quick: bool | None, seeds: Iterable[int] | None) -> None:
    """Values tuned on another task, or on the seeds they are to be evaluated on, are refused."""
    for field_name, expected in (("dataset", dataset), ("quick", quick)):
        if expected is not None and doc.get(field_name) != expected:
            hint = " (run `unlearn-fast tune` with --full or --quick to match the study)" if field_name == "quick" else ""
            raise ValueError(f"tuned file {path}: tuned with {field_name}={doc.get(field_name)!r}, the study runs "
                             f"{field_name}={expected!r}{hint}")
    if seeds is not None:
        shared = sorted(set(doc.get("tune_seeds") or []) & set(seeds))
        if shared:
            raise ValueError(f"tuned file {path}: tune seeds {shared} are also study seeds; tune on other seeds "
                             "(--tune-seeds) so the values are not fitted to the seeds that evaluate them")


def load_tuned(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], *, dataset: str | None = None,
               quick: bool | None = None, seeds: Iterable[int] | None = None) -> dict[str, dict[str, Any]]:
    """``{method: {option: value}}`` from result files of :func:`tune_method` (or folders of them).

    The output is what :func:`unlearn_fast.study.run_study` takes as ``method_options``. Raises
    ValueError, naming the file, for a malformed file, another schema version, an unknown method
    or option, or two files for one method. Given the study's ``dataset``, ``quick`` and ``seeds``,
    it also refuses values tuned on another dataset or recipe, or on one of those seeds.
    """
    chosen: dict[str, dict[str, Any]] = {}
    source: dict[str, Path] = {}
    seeds = None if seeds is None else list(seeds)
    for path in _tuned_files(paths):
        method, values, doc = _read_tuned(path)
        _check_task(path, doc, dataset, quick, seeds)
        if method in chosen:
            raise ValueError(f"two tuned files for method {method!r}: {source[method]} and {path}; give one")
        chosen[method], source[method] = values, path
    return chosen


def _show(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def format_result(result: TuneResult) -> str:
    """A plain-text table of the trials (objective and values; * marks the chosen one) and the choice."""
    names = list(result.trials[0].values)
    rows = [["trial", "objective", *names]]
    for i, t in enumerate(result.trials):
        label = f"{i}{'*' if i == result.best_index else ''}{' (defaults)' if i == 0 else ''}"
        rows.append([label, _show(t.objective) if t.error is None else "failed", *(_show(t.values[n]) for n in names)])
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines += [f"trial {i} failed: {t.error}" for i, t in enumerate(result.trials) if t.error is not None]
    chosen = ", ".join(f"{n}={_show(result.best.values[n])} (default {_show(result.trials[0].values[n])})" for n in names)
    summary = (f"objective {_show(result.best.objective)} (defaults {_show(result.defaults_objective)}, no unlearning "
               f"{_show(result.original_objective)}; mean |metric - oracle| over {', '.join(TUNE_METRICS)}; "
               f"tune seeds {result.tune_seeds}, C={result.similar})")
    lines += ["", f"{result.method}: {chosen}", summary]
    return "\n".join(lines)
