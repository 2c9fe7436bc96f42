"""``python -m em_lightning analyze``: run dirs (or a tidy table) → table.csv, figures, report.md,
summary.json.

    python -m em_lightning analyze runs/sweeps/tiny --out runs/analysis/tiny
    python -m em_lightning analyze runs/sweeps/paper_main/* --out analysis/main --json
    python -m em_lightning analyze runs/sweeps/paper_main --out analysis/main-smol --judge smol
    python -m em_lightning analyze --table analysis/main/table.csv --out analysis/main-again

``--signal auto`` (default) analyses the judge where the runs have a judge eval, else the probe, else the
direction shift, and the report's first line says which; ``--signal judge`` the misalignment eval's
``aligned_mean`` and ``misalignment_rate``; ``--signal probe`` the in-process probe's ``probe_log_odds`` and
``probe_misaligned_prob``; ``--signal direction`` the activation shift along the misalignment direction (a
signal no run has is an error naming the ones they have). Rates of different judges are never pooled: runs
scored by different judges, or rejudged by several, need ``--judge LABEL``; where several judges scored the
answers, the report compares them (``--judges A,B`` to choose). ``--json`` prints the headline numbers
(``n_runs, n_rows, r2_loss, r2_loss_optimizer, partial_r2_optimizer, anova, optimizer_rate_ratio``, ...) to
stdout; they are always in ``OUT/summary.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

from em_lightning.analysis.table import AnalysisError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m em_lightning analyze",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dirs", nargs="*", help="run dirs, or folders of them (a sweep's folder)")
    p.add_argument("--out", required=True, help="where table.csv, report.md, summary.json and figures/ go")
    p.add_argument("--table", help="start from this tidy table (CSV) instead of run dirs")
    p.add_argument(
        "--signal",
        choices=("auto", "judge", "probe", "direction"),
        default="auto",
        help="the alignment signal (auto: the judge where the runs have one, else the probe, else the direction)",
    )
    p.add_argument(
        "--judge",
        metavar="LABEL",
        help="the judge whose rates to analyse, where runs carry several (rejudged) or were scored differently",
    )
    p.add_argument(
        "--judges",
        metavar="A,B",
        help="judges to compare answer by answer (default: every judge the runs' samples have, when several)",
    )
    p.add_argument("--json", action="store_true", help="print the headline numbers as JSON")
    p.add_argument("--loss-window", type=int, default=10, help="train_loss: mean over this many last steps")
    p.add_argument("--bins", type=int, default=10, help="fractions of training for the along-training fits")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the rate ratio")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    missing = [
        m for m in ("matplotlib", "pandas", "statsmodels", "tbparse") if importlib.util.find_spec(m) is None
    ]
    if missing:  # the extra, checked before any work
        raise AnalysisError(
            f"analyze needs the analysis extra ({', '.join(missing)} missing): "
            "pip install 'em-lightning[analysis]'"
        )
    from em_lightning.analysis.agreement import judges_to_compare, load_answers
    from em_lightning.analysis.report import analyze
    from em_lightning.analysis.stats import choose_signal
    from em_lightning.analysis.table import (
        build_table,
        check_judges,
        final_judge_rates,
        read_table,
        require_runs,
    )

    if bool(args.table) == bool(args.run_dirs):
        raise AnalysisError("analyze: give run dirs or --table FILE (one of them)")
    if args.loss_window < 1 or args.bins < 1 or args.bootstrap < 1:
        raise AnalysisError("analyze: --loss-window, --bins and --bootstrap take positive integers")
    if args.table and args.judges:
        raise AnalysisError("analyze: --judges compares answers: give run dirs (a table holds no answers)")
    out = Path(args.out)
    errors: dict[str, str] = {}
    answers, judges, judge_finals = None, [], None
    if args.table:
        table = read_table(args.table)
        available = sorted(table["judge"].dropna().astype(str).unique())
    else:
        table, runs = build_table(args.run_dirs, loss_window=args.loss_window, judge=args.judge)
        errors = {r.name: r.state.get("error") or "" for r in runs}
        available = sorted({label for r in runs for label in r.judges})
        answers = load_answers([r.dir for r in runs], [r.name for r in runs])
        judge_finals = final_judge_rates(runs)
        judges = judges_to_compare(answers, args.judges)
    require_runs(table, args.table or ", ".join(args.run_dirs), errors)
    if args.judge is not None and args.judge not in available:
        check_judges(table, args.judge, available)  # the error naming the judges the runs have
    signal, choice = choose_signal(table, args.signal)
    judge = None
    if signal.name == "judge":  # rates of different judges are never pooled
        table = check_judges(table, args.judge, available)
        judge = args.judge or next(iter(table["judge"].dropna().astype(str).unique()), None)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "table.csv", index=False)
    summary = analyze(
        table,
        signal,
        out,
        bins=args.bins,
        n_boot=args.bootstrap,
        loss_window=args.loss_window,
        errors=errors,
        signal_choice=choice,
        judge=judge,
        answers=answers,
        judges=judges,
        judge_finals=judge_finals,
    )
    if args.json:
        keys = (
            "n_runs",
            "n_rows",
            "signal",
            "signal_choice",
            "judge",
            "response",
            "r2_loss",
            "r2_loss_optimizer",
            "partial_r2_optimizer",
            "r2_interaction",
            "anova",
            "anova_dropped",
            "question_a",
            "judge_agreement",
            "validation",
            "mitigations",
            "optimizer_rate_ratio",
            "excluded_runs",
        )
        print(json.dumps({k: summary[k] for k in keys}, indent=1))
    else:
        print(
            f"wrote {out / 'report.md'}, {out / 'table.csv'}, {out / 'summary.json'} and "
            f"{len(summary['figures'])} figures in {out / 'figures'}"
        )
    return summary
