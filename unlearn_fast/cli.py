"""`unlearn-fast`: the command line (study, tune, report, list)."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_OUT = "unlearn-fast-results"
ALWAYS_RUN = ("original", "retrain", "oracle")  # the study's references, run whatever --methods says
# The study prints these columns (those present); report.md / report.html hold every metric.
CONSOLE_METRICS = (
    "target_acc", "similar_acc", "test_acc", "mia_auc", "residual_influence", "residual_influence_median",
    "kl_to_oracle_targets", "lira_member_rate_targets", "ulira_accuracy_targets", "seconds_vs_retrain",
)


def _parser() -> argparse.ArgumentParser:
    from .methods import METHODS
    from .methods.expansion import SIMILAR_SUFFIX
    from .methods.search_spaces import SEARCH_SPACES
    from .study import DEFAULT_METHODS, DEFAULT_SHADOWS
    from .tune import DEFAULT_TUNE_SEEDS, DEFAULT_TUNED_DIR

    parser = argparse.ArgumentParser(prog="unlearn-fast", description="Machine unlearning with near-duplicate-aware evaluation.")
    sub = parser.add_subparsers(dest="command", required=True)

    study = sub.add_parser("study", help="train, unlearn and evaluate: the main job",
                           description="For each seed: train `original`, run every method and the `oracle`, evaluate, and write "
                                       "results.json, results.csv, details.json, report.md and report.html (with plots) into --out.")
    _add_data_arguments(study)
    study.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                       help=f"methods to compare; original, retrain and oracle always run. From: "
                            f"{', '.join(n for n in METHODS.names() if n not in ALWAYS_RUN)}; each of these and retrain also as "
                            f"METHOD{SIMILAR_SUFFIX} (the forget set expanded with the near-duplicates found) "
                            f"(default: {' '.join(m for m in DEFAULT_METHODS if m not in ALWAYS_RUN)})")
    study.add_argument("--seeds", type=int, default=3, help="number of seeds (default: %(default)s)")
    study.add_argument("--similar", type=int, nargs="+", default=None, metavar="C",
                       help="near-duplicate copies per target; several values run several conditions "
                            "(default: the dataset's C and 0, the no-near-duplicate control)")
    study.add_argument("--quick", action="store_true", help="a smoke run: a third of the training epochs, no shadow models, no per-model optimising metrics "
                            "(reconstruction SSIM, relearn steps, SVC attack)")
    study.add_argument("--shadows", type=int, default=None, metavar="S",
                       help=f"shadow models per seed and C for the LiRA and U-LiRA metrics; 0 turns them off "
                            f"(default: {DEFAULT_SHADOWS}, 0 with --quick)")
    study.add_argument("--tuned", nargs="+", default=None, metavar="PATH",
                       help="result files of `unlearn-fast tune` (or folders of them): run those methods with the chosen values")
    study.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    _add_run_arguments(study)

    tune = sub.add_parser("tune", help="search a method's hyperparameters for the values closest to the oracle",
                          description="Train the study's `original` and `oracle` on tune seeds of its own, run the method's "
                                      "registered defaults and seeded draws from its search space, and keep the values "
                                      "whose target, near-duplicate, retain and test accuracy, MIA AUC and divergence from the "
                                      "oracle's predictions on the targets are closest to the oracle's. `study --tuned` reads "
                                      "the file it writes.")
    tune.add_argument("--method", required=True, help=f"one of: {', '.join(SEARCH_SPACES)}")
    tune.add_argument("--trials", type=int, default=12, help="trials, the defaults included (default: %(default)s)")
    tune.add_argument("--seed", type=int, default=0, help="seed of the draws (default: %(default)s)")
    tune.add_argument("--tune-seeds", type=int, nargs="+", default=list(DEFAULT_TUNE_SEEDS), metavar="S",
                      help="data/training seeds the objective averages over; keep them apart from the study's 0 .. N-1 "
                           "(default: %(default)s)")
    tune.add_argument("--similar", type=int, default=0, metavar="C",
                      help="near-duplicates per target; 0 makes the oracle retrain, an unambiguous target (default: %(default)s)")
    _add_data_arguments(tune)
    speed = tune.add_mutually_exclusive_group()
    speed.add_argument("--quick", dest="quick", action="store_true", default=False,
                       help="train `original` as `study --quick` does (for `study --quick --tuned`)")
    speed.add_argument("--full", dest="quick", action="store_false", help="train `original` with the full recipe, as `study` (default)")
    tune.add_argument("--out", default=None, metavar="PATH",
                      help=f"result file, or a folder for METHOD.json (default: {DEFAULT_TUNED_DIR}/METHOD.json)")
    _add_run_arguments(tune)

    report = sub.add_parser("report", help="rebuild report.md, report.html and plots from DIR/results.json (and details.json)")
    report.add_argument("dir", help="a study output folder")

    sub.add_parser("list", help="list datasets, models, methods and metrics")
    return parser


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """--dataset, --targets, --source, --download: the task, shared by study and tune."""
    from .data import DATASETS

    parser.add_argument("--dataset", default="digits-blockmask", help=f"one of: {', '.join(DATASETS.names())} (default: %(default)s)")
    parser.add_argument("--targets", type=int, default=None, metavar="K", help="number of forget targets (default: the dataset's)")
    parser.add_argument("--source", default=None, help="local data folder for the HF-backed datasets (mnist, fashion-mnist, cifar10)")
    parser.add_argument("--download", action="store_true", help="allow HF-backed datasets to download once into the HF cache")


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _dataset_options(args: argparse.Namespace) -> dict[str, object]:
    """The load_dataset options given by _add_data_arguments' flags (unset ones left to the dataset)."""
    options: dict[str, object] = {}
    if args.targets is not None:
        options["targets"] = args.targets
    if args.source is not None:
        options["source"] = args.source
    if args.download:
        options["download"] = True
    return options


def _study(args: argparse.Namespace) -> int:
    from .report import format_table, summarize
    from .report.findings import headline
    from .report.summary import ordered_metrics
    from .study import run_study
    from .tune import load_tuned

    tuned = None if args.tuned is None else load_tuned(args.tuned, dataset=args.dataset, quick=args.quick,
                                                         seeds=range(max(args.seeds, 0)))
    records = run_study(dataset=args.dataset, methods=args.methods, seeds=args.seeds, similar=args.similar,
                        quick=args.quick, out=args.out, device=args.device, progress=not args.no_progress,
                        dataset_options=_dataset_options(args), method_options=tuned,
                        shadows=args.shadows)
    summary = summarize(records)
    every = ordered_metrics(summary)
    top = headline(summary)
    if top:
        print(f"Headline. {top.replace('`', '')}\n")
    print(format_table(summary, metrics=[m for m in CONSOLE_METRICS if m in every]))
    print(f"\n{_wrote(Path(args.out))} (all {len(every)} metrics there; here {sum(m in every for m in CONSOLE_METRICS)})")
    return 0


def _wrote(folder: Path) -> str:
    """One line naming every file of the study folder's committed set, and the one to open."""
    from .report.folder import MANIFEST_NAME, read_manifest
    from .report.markdown import HTML_NAME

    names = [*(read_manifest(folder) or {}), MANIFEST_NAME]
    return f"wrote {folder}/: {', '.join(names)}; open {folder / HTML_NAME}"


def _tune(args: argparse.Namespace) -> int:
    from .tune import DEFAULT_TUNED_DIR, format_result, tune_method

    out = args.out if args.out is not None else Path(DEFAULT_TUNED_DIR) / f"{args.method}.json"
    result = tune_method(args.method, dataset=args.dataset, trials=args.trials, seed=args.seed, similar=args.similar,
                         tune_seeds=args.tune_seeds, quick=args.quick, device=args.device, progress=not args.no_progress,
                         out=out, dataset_options=_dataset_options(args))
    print(format_result(result))
    print(f"\nwrote {result.path}; use it with `unlearn-fast study --tuned {result.path}`")
    return 0


def _list() -> int:
    from .data import DATASETS
    from .evaluate import METRICS
    from .methods import METHODS
    from .methods.expansion import SIMILAR_SUFFIX
    from .models import MODELS

    for title, registry in (("datasets", DATASETS), ("models", MODELS), ("methods", METHODS), ("metrics", METRICS)):
        rows = [(entry.name, entry.description + (f"  [{', '.join(f'{k}={v!r}' for k, v in entry.defaults.items())}]"
                                                  if entry.defaults else "")) for entry in registry]
        if registry is METHODS:
            rows += [("original", "(study reference, not a method) the model trained on everything"),
                     ("METHOD" + SIMILAR_SUFFIX, "(study only) METHOD after adding the targets' near-duplicates, as "
                                                 "unlearn(..., similar='auto')")]
        width = max(len(name) for name, _ in rows) + 2
        print(f"{title}:")
        for name, text in rows:
            print(f"  {name:<{width}}{text}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    # Everything, the parser's imports of torch included, runs inside the handlers: an interrupt at any
    # point ends with one line and exit code 130, and a user error with one line and exit code 2.
    try:
        args = _parser().parse_args(argv)
        if args.command == "study":
            return _study(args)
        if args.command == "tune":
            return _tune(args)
        if args.command == "report":
            from .report.folder import rebuild_report

            folder = Path(args.dir)
            rebuild_report(folder)
            print(_wrote(folder))
            return 0
        return _list()
    except (ValueError, OSError, ImportError, ArithmeticError) as exc:
        # ArithmeticError: a method that diverged (FloatingPointError, naming it and its options).
        message = " ".join([str(exc), *getattr(exc, "__notes__", [])])
        print(f"unlearn-fast: error: {' '.join(message.split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("unlearn-fast: interrupted; the output folder holds its earlier files, or the complete new set",
              file=sys.stderr)
        return 130


def console_main() -> int:
    """The `unlearn-fast` command: :func:`main`, then SIGINT ignored for the rest of the process. Python
    puts SIGINT back to its default action while it shuts down (torch and matplotlib teardown takes a
    moment), and an interrupt there killed the process with no message and exit code -2 although the
    work had finished; ignoring it keeps the exit code and message that main gave."""
    code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return code


if __name__ == "__main__":
    sys.exit(console_main())
