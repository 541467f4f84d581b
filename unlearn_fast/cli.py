"""`unlearn-fast`: the command line (study, report, list)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

DEFAULT_OUT = "unlearn-fast-results"


def _parser() -> argparse.ArgumentParser:
    from .data import DATASETS
    from .methods import METHODS
    from .methods.expansion import SIMILAR_SUFFIX
    from .study import DEFAULT_METHODS

    parser = argparse.ArgumentParser(prog="unlearn-fast", description="Machine unlearning with near-duplicate-aware evaluation.")
    sub = parser.add_subparsers(dest="command", required=True)

    study = sub.add_parser("study", help="train, unlearn and evaluate: the main job",
                           description="For each seed: train `original`, run every method and the `oracle`, evaluate, and write "
                                       "results.json, results.csv and report.md (with plots) into --out.")
    study.add_argument("--dataset", default="digits-blockmask", help=f"one of: {', '.join(DATASETS.names())} (default: %(default)s)")
    study.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                       help=f"methods besides original/retrain/oracle; from: {', '.join(METHODS.names())}, each also as "
                            f"METHOD{SIMILAR_SUFFIX} (the forget set expanded with the near-duplicates found) "
                            f"(default: {' '.join(DEFAULT_METHODS)})")
    study.add_argument("--seeds", type=int, default=3, help="number of seeds (default: %(default)s)")
    study.add_argument("--similar", type=int, nargs="+", default=None, metavar="C",
                       help="near-duplicate copies per target; several values run several conditions "
                            "(default: the dataset's C and 0, the no-near-duplicate control)")
    study.add_argument("--targets", type=int, default=None, metavar="K", help="number of forget targets (default: the dataset's)")
    study.add_argument("--source", default=None, help="local data folder for the HF-backed datasets (mnist, fashion-mnist, cifar10)")
    study.add_argument("--download", action="store_true", help="allow HF-backed datasets to download once into the HF cache")
    study.add_argument("--quick", action="store_true", help="a third of the training epochs, for a smoke run")
    study.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    study.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: %(default)s)")
    study.add_argument("--no-progress", action="store_true", help="hide progress bars")

    report = sub.add_parser("report", help="rebuild report.md and plots from DIR/results.json")
    report.add_argument("dir", help="a study output folder")

    sub.add_parser("list", help="list datasets, models, methods and metrics")
    return parser


def _study(args: argparse.Namespace) -> int:
    from .report import format_table, summarize
    from .study import run_study

    options: dict[str, object] = {}
    if args.targets is not None:
        options["targets"] = args.targets
    if args.source is not None:
        options["source"] = args.source
    if args.download:
        options["download"] = True
    records = run_study(dataset=args.dataset, methods=args.methods, seeds=args.seeds, similar=args.similar,
                        quick=args.quick, out=args.out, device=args.device, progress=not args.no_progress,
                        dataset_options=options)
    print(format_table(summarize(records)))
    print(f"\nwrote {Path(args.out) / 'results.json'}, results.csv and report.md")
    return 0


def _list() -> int:
    from .data import DATASETS
    from .evaluate import METRICS
    from .methods import METHODS
    from .methods.expansion import SIMILAR_SUFFIX
    from .models import MODELS

    for title, registry in (("datasets", DATASETS), ("models", MODELS), ("methods", METHODS), ("metrics", METRICS)):
        print(f"{title}:")
        for entry in registry:
            defaults = ", ".join(f"{k}={v!r}" for k, v in entry.defaults.items())
            print(f"  {entry.name:24s} {entry.description}" + (f"  [{defaults}]" if defaults else ""))
        if registry is METHODS:
            print(f"  {'original':24s} (study reference, not a method) the model trained on everything")
            print(f"  {'METHOD' + SIMILAR_SUFFIX:24s} (study only) METHOD after adding the targets' near-duplicates, "
                  "as unlearn(..., similar='auto')")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "study":
            return _study(args)
        if args.command == "report":
            from .report import build_report

            print(f"wrote {build_report(Path(args.dir))}")
            return 0
        return _list()
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"unlearn-fast: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("unlearn-fast: interrupted; files written earlier are intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
