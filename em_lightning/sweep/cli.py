"""``python -m em_lightning sweep``: train every run of a sweep file, locally or on SLURM; idempotent.

    python -m em_lightning sweep configs/sweeps/tiny.yaml              # train what is not done yet
    python -m em_lightning sweep configs/sweeps/tiny.yaml --dry-run    # what it would do, and the commands
    python -m em_lightning sweep status configs/sweeps/tiny.yaml       # state, step, loss, rate of every run
    python -m em_lightning sweep configs/sweeps/paper_main.yaml --launcher slurm --only 'model=qwen3-8b*'

A second invocation skips finished runs (touching none of their files), resumes unfinished ones from their
newest ``last.ckpt``, and leaves alone runs whose job is alive (its run lock is held, or squeue lists it). A
run dir whose config differs from what the sweep file now gives is an error, not an overwrite.
"""

from __future__ import annotations

import argparse
import fnmatch
from dataclasses import dataclass
from pathlib import Path

import yaml

from em_lightning import rundir
from em_lightning.rundir import DONE
from em_lightning.sweep.launchers import Item, LauncherConfig, alive, kinds, launcher_class
from em_lightning.sweep.resolve import Resolved, config_hash, differences, resolve
from em_lightning.sweep.spec import Sweep, SweepError, load_sweep
from em_lightning.sweep.state import read_state, sweep_lock, write_state


@dataclass
class Plan:
    item: Item
    action: str  # new | resume | skip
    why: str = ""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m em_lightning sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("sweep", help="the sweep file (or `status`, then the sweep file)")
    p.add_argument("file", nargs="?", help=argparse.SUPPRESS)
    p.add_argument(
        "--dry-run", action="store_true", help="resolve every run and print the plan; write nothing"
    )
    p.add_argument(
        "--launcher", metavar="KIND", help=f"override the file's launcher.kind ({', '.join(kinds())})"
    )
    p.add_argument("--out", help="override the file's `out` (runs go to OUT/<name>/<run>)")
    p.add_argument(
        "--only", action="append", metavar="GLOB", help="only runs whose name matches (repeatable)"
    )
    return p


def main(argv: list[str] | None = None) -> dict[str, str]:
    args = parser().parse_args(argv)
    if args.sweep == "status":
        if not args.file:
            raise SweepError(
                "sweep status: give the sweep file (python -m em_lightning sweep status SWEEP.yaml)"
            )
        from em_lightning.sweep.status import print_status

        return print_status(load_sweep(args.file, out=args.out), only=args.only)
    if args.file:
        raise SweepError(f"sweep: unexpected argument {args.file!r} (one sweep file; `status` comes first)")
    sweep = load_sweep(args.sweep, out=args.out)
    outcome = run_sweep(sweep, dry_run=args.dry_run, launcher=args.launcher, only=args.only)
    unfinished = [
        n for n, s in outcome.items() if s != DONE and not s.startswith(("submitted", "alive", "would"))
    ]
    if unfinished:
        print(f"{len(unfinished)} run(s) not finished: {', '.join(unfinished)}")
        raise SystemExit(1)
    return outcome


def run_sweep(
    sweep: Sweep, dry_run: bool = False, launcher: str | None = None, only: list[str] | None = None, log=print
) -> dict[str, str]:
    base = LauncherConfig.build(sweep, {**sweep.launcher, **({"kind": launcher} if launcher else {})})
    runs = [r for r in sweep.runs() if not only or any(fnmatch.fnmatchcase(r.name, g) for g in only)]
    if not runs:
        raise SweepError(f"{sweep.path}: no run matches --only {' '.join(only or [])}")
    if dry_run:
        return _report(sweep, plan(sweep, runs, base), dry_run=True, log=log)
    with sweep_lock(sweep.root):
        plans = plan(sweep, runs, base)
        outcome = _report(sweep, plans, dry_run=False, log=log)
        todo = [p for p in plans if p.action != "skip"]
        for p in todo:
            _prepare(sweep, p)
        by_kind: dict[str, list[Item]] = {}
        for p in todo:
            by_kind.setdefault(p.item.launcher.kind, []).append(p.item)
        for kind, items in by_kind.items():
            outcome.update(launcher_class(kind)().launch(sweep, items, Path.cwd(), log=log))
    return outcome


def plan(sweep: Sweep, runs, base: LauncherConfig) -> list[Plan]:
    """Resolve every run and decide: new, resume, or skip (done / alive). Conflicts stop everything first."""
    resolved: list[Resolved] = []
    for i, run in enumerate(runs):
        if len(runs) > 20 and i % 20 == 0:
            print(f"resolving configs: {i}/{len(runs)}", flush=True)
        resolved.append(resolve(sweep, run))
    seen: dict[str, str] = {}
    for (
        r
    ) in resolved:  # two runs that train the same thing are a sweep file mistake (a label axis with no rule)
        if r.hash in seen:
            raise SweepError(
                f"{sweep.path}: runs {seen[r.hash]} and {r.run.name} resolve to the same config; an "
                "axis sets nothing (a label axis needs rules)"
            )
        seen[r.hash] = r.run.name
    plans, conflicts, unfinished = [], [], []
    for r in resolved:
        cfg = LauncherConfig.build(sweep, r.run.launcher, path=("launcher",), base=base)
        item = Item(r, cfg)
        state = read_state(r.dir)
        old_config = r.dir / rundir.CONFIG
        if state is None and not old_config.exists():
            plans.append(Plan(item, "new"))
            continue
        old_hash = (state or {}).get("config_hash") or config_hash(
            yaml.safe_load(old_config.read_text()) or {}
        )
        if old_hash != r.hash:
            old = yaml.safe_load(old_config.read_text()) if old_config.exists() else {}
            conflicts.append(f"{r.dir}: ({'; '.join(differences(old, r.config)) or 'hash differs'})")
            continue
        if (state or {}).get("state") == DONE:
            plans.append(Plan(item, "skip", DONE))
            continue
        plans.append(Plan(item, "resume"))
        unfinished.append(r.dir)
    if conflicts:
        raise SweepError(
            f"{sweep.path}: {len(conflicts)} run dir(s) hold another config than the sweep file now "
            f"gives, e.g. {conflicts[0]}; delete them or give the sweep another name or out"
        )
    live = alive(unfinished)
    for p in plans:
        why = live.get(p.item.resolved.dir)
        if p.action == "resume" and why:
            p.action, p.why = "skip", f"alive: {why}"
    return plans


def _prepare(sweep: Sweep, p: Plan) -> None:
    """Write a new run's dir: its config and its state (pending)."""
    r = p.item.resolved
    if p.action != "new":
        return
    r.dir.mkdir(parents=True, exist_ok=True)
    (r.dir / rundir.CONFIG).write_text(r.text, encoding="utf-8")
    write_state(
        r.dir,
        {
            "sweep": sweep.name,
            "sweep_file": str(sweep.path.resolve()),
            "run": r.run.name,
            "values": r.run.values,
            "config_hash": r.hash,
            "state": "pending",
            "attempts": 0,
            "cwd": str(Path.cwd()),
            "history": [],
        },
    )


def _report(sweep: Sweep, plans: list[Plan], dry_run: bool, log) -> dict[str, str]:
    counts: dict[str, int] = {}
    outcome = {}
    for p in plans:
        r = p.item.resolved
        counts[p.action] = counts.get(p.action, 0) + 1
        if p.action == "resume":
            ckpt = rundir.newest_checkpoint(r.dir)
            detail = f"from {ckpt.relative_to(r.dir)}" if ckpt else "from the start (no checkpoint yet)"
        elif p.action == "skip":
            detail = p.why
        else:
            detail = f"{p.item.launcher.kind}"
        if dry_run:
            cmd = f"python -m em_lightning fit --config {r.dir / rundir.CONFIG}"
            log(f"{p.action:<7} {r.run.name}  [{detail}]\n        {cmd}")
            outcome[r.run.name] = f"would {p.action}"
        else:
            log(f"{p.action:<7} {r.run.name}  [{detail}]")
            outcome[r.run.name] = DONE if p.why == DONE else ("alive" if p.action == "skip" else "planned")
    summary = ", ".join(f"{n} {a}" for a, n in counts.items())
    log(f"sweep {sweep.name}: {len(plans)} run(s) in {sweep.root}: {summary}")
    return outcome
