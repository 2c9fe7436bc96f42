"""Every shell command in README.md's code blocks runs here, in a cheap form, so the README cannot drift from the
code unnoticed.

The commands are read from the README itself (``bash``/``sh``/``shell``/``console`` blocks, ``\\`` continuations
joined, ``#`` comments dropped), so a command someone adds is picked up by itself. Each one gets the first rule
below that matches: a real run where that is fast (``tiny.yaml`` fits, sweep dry runs), ``--print_config`` where
the real run loads a real model, needs a GPU or a vLLM sidecar, or ``--help`` (every option the README shows must
then be in the help text); or it is skipped, with the reason, in ``SKIP``. A command that no rule knows fails,
saying to give it one. Commands run in-process (as ``python -m em_lightning``) in a temp dir with the repository's
``configs/`` linked in, so runs land there and not in the repository.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, REPO

README = REPO / "README.md"
SHELL_BLOCK = re.compile(r"^```(?:bash|sh|shell|console)\s*$")

# (pattern searched in the command, why it does not run here). Checked before the rules below.
SKIP = [
    (r"^bash scripts/quickstart\.sh\b", (
        "installs into .venv, then trains SmolLM2 for minutes; its training command is the README's "
        "`fit --config configs/quickstart.yaml`, checked below, and tests/test_quickstart.py trains it")),
    (r"^bash scripts/test\.sh\b", "installs the dev extras and the vLLM venv, then runs this whole suite"),
    (r"^sbatch\b", "submits a SLURM job"),
    (r"^python scripts/(signal_separation|mitigation_costs|compare_fsdp2_cpu)\.py\b", (
        "a measurement: up to hours of SmolLM2 training on the EM files on a CPU (tests/test_mitigation_costs.py "
        "runs mitigation_costs on a tiny model)")),
    (r"(^|\s)(\S*\.\.\.\S*)(\s|$)", "a placeholder (`...`) the reader fills in, not a command"),
]

ENTRY = ["python", "-m", "em_lightning"]


@dataclass
class Command:
    line: int  # README.md line where the command starts
    text: str  # as printed, continuations joined, comment dropped
    argv: list[str]

    def __str__(self) -> str:
        return f"README.md:{self.line}: {self.text}"


def readme_commands(path: Path = README) -> list[Command]:
    """The commands of ``path``'s shell code blocks, in order."""
    commands, in_block, pending, start = [], False, "", 0
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not in_block:
            in_block = bool(SHELL_BLOCK.match(line.strip()))
            continue
        if line.strip().startswith("```"):
            in_block = False
            continue
        if not pending:
            start = lineno
        stripped = line.rstrip()
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        argv = shlex.split(text, comments=True)
        if argv:
            commands.append(Command(start, " ".join(argv), argv))
    return commands


COMMANDS = readme_commands()


def test_the_readme_has_commands_to_check():
    # the parser found the blocks (an empty list would pass every test below)
    assert len(COMMANDS) >= 10 and sum(c.argv[:3] == ENTRY for c in COMMANDS) >= 10, COMMANDS


def _skip_reason(command: Command) -> str | None:
    for pattern, reason in SKIP:
        if re.search(pattern, command.text):
            return reason
    return None


# --------------------------------------------------------------------------------------- how each one runs
@dataclass
class Plan:
    argv: list[str]  # what follows `python -m em_lightning`
    how: str  # "run": its real work; "print_config" / "help": exits 0 after printing
    inputs: list[tuple[list[str], str]] | None = None  # (command, file its output goes to): e.g. a saved config


def _option_values(args: list[str], option: str) -> list[str]:
    values = []
    for i, arg in enumerate(args):
        if arg == option and i + 1 < len(args):
            values.append(args[i + 1])
        elif arg.startswith(option + "="):
            values.append(arg.split("=", 1)[1])
    return values


def _saved_config_inputs(args: list[str]) -> list[tuple[list[str], str]]:
    """A config read from a run dir (``runs/<name>/version_N/config.yaml``) exists after a run of
    ``configs/<name>.yaml``: write it as that run would (the resolved config, which is what fit saves)."""
    inputs = []
    for config in _option_values(args, "--config"):
        saved = re.fullmatch(r"runs/([\w-]+)/version_\d+/config\.yaml", config)
        if saved:
            source = Path("configs") / f"{saved.group(1)}.yaml"
            assert (CONFIGS / source.name).is_file(), f"{config}: no {source} to make it from"
            inputs.append((["fit", "--config", str(source), "--print_config"], config))
    return inputs


def _train_plan(args: list[str]) -> Plan:
    if "--print_config" in args or "--help" in args:
        return Plan(args, "print_config" if "--print_config" in args else "help")
    configs = _option_values(args, "--config")
    devices = _option_values(args, "--trainer.devices")
    one_process = not devices or devices[-1] in ("1", "auto")
    if any(c.endswith("tiny.yaml") for c in configs) and one_process:
        # the tiny random model trains in seconds: the real thing, a couple of steps
        return Plan([*args, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0"], "run")
    # a real model (SmolLM2 or larger), a GPU, a vLLM sidecar or several processes: the config must resolve
    return Plan([*args, "--print_config"], "print_config", _saved_config_inputs(args))


def _sweep_plan(args: list[str]) -> Plan:
    if args[1:2] == ["status"]:
        return Plan(args, "run")  # reads the run dirs (here: none yet)
    # Training (or submitting) every run: the dry run instead, which resolves each run's config through the
    # training CLI and prints the plan; of the first run only when the sweep is large (every run of every shipped
    # sweep resolves in test_sweep.py's shipped-sweeps tests).
    dry = args if "--dry-run" in args else [*args, "--dry-run"]
    runs = _sweep_runs(args[1])
    return Plan(dry if len(runs) <= 8 else [*dry, "--only", runs[0]], "run")


def _sweep_runs(path: str) -> list[str]:
    from em_lightning.sweep.spec import load_sweep

    return [run.name for run in load_sweep(REPO / path).runs()]


def _help_plan(args: list[str]) -> Plan:
    """``--help`` in place of the command's own arguments; the options it shows must be in the help."""
    return Plan([args[0], "--help"], "help")


RULES = {
    "fit": _train_plan,
    "validate": _train_plan,
    "test": _train_plan,
    "sweep": _sweep_plan,
    "evaluate": lambda args: Plan(args, "help") if "--help" in args else Plan([*args, "--print_config"],
                                                                               "print_config"),
    # judges the answers in existing run dirs with an LLM judge (an API or a vLLM server): the config must resolve
    "rejudge": lambda args: Plan([*args, "--print_config"], "print_config"),
    # reads a finished sweep's run dirs: the options it is shown with must exist
    "analyze": _help_plan,
    # reads a trained run's adapter and activations
    "direction": _help_plan,
}


def plan_for(command: Command) -> Plan:
    if command.argv[:3] != ENTRY:
        pytest.fail(f"{command}: not a `python -m em_lightning` command and not in SKIP; add it to SKIP in "
                    f"tests/test_readme.py with the reason it cannot run here, or a rule that runs it cheaply")
    args = command.argv[3:]
    rule = RULES.get(args[0] if args else "")
    if rule is None:
        pytest.fail(f"{command}: no rule for `{args[:1]}` in tests/test_readme.py RULES; add one that runs it "
                    "cheaply (--print_config, --help, --dry-run or a short real run), or a SKIP entry with the reason")
    return rule(args)


# ------------------------------------------------------------------------------------------------- running
@pytest.fixture
def readme_dir(tmp_path, monkeypatch):
    """A working dir like the repository's root: ``configs`` linked in, runs written here."""
    (tmp_path / "configs").symlink_to(CONFIGS, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run(argv: list[str], capsys) -> tuple[int, str]:
    """``python -m em_lightning *argv`` in this process: (exit status, stdout; with stderr after it when the status
    is not 0). Bad input raises InputError."""
    from em_lightning.__main__ import main

    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as stop:
        code = 0 if stop.code is None else stop.code
    captured = capsys.readouterr()
    return code, captured.out if code == 0 else captured.out + captured.err


def _make_inputs(plan: Plan, capsys) -> None:
    for argv, output in plan.inputs or []:
        code, out = _run(argv, capsys)
        assert code == 0, (argv, out)
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(out, encoding="utf-8")


def _check_printed_config(command: Command, argv: list[str], printed: str) -> None:
    """The printed config is YAML and holds every ``--key value`` the command sets (a renamed key fails here even
    where the parser would take it as something else)."""
    import yaml

    config = yaml.safe_load(printed)
    assert isinstance(config, dict), f"{command}: --print_config printed no config:\n{printed[:500]}"
    for i, arg in enumerate(argv[1:-1], start=1):
        if not arg.startswith("--") or arg in ("--config", "--ckpt_path", "--print_config") or "=" in arg:
            continue
        node = config
        for part in arg[2:].split("."):
            assert isinstance(node, dict) and part in node, f"{command}: {arg} is not in the printed config"
            node = node[part]
        assert str(node) == argv[i + 1] or node == yaml.safe_load(argv[i + 1]), (command, arg, node)


def _options_shown(text: str) -> list[str]:
    """The ``--options`` a README command uses (``[--signal judge|probe]`` counts as ``--signal``)."""
    return sorted({m.group(1) for m in re.finditer(r"(?<![\w-])(--[\w.-]+)", text)} - {"--help"})


@pytest.mark.parametrize("command", COMMANDS, ids=[f"line{c.line}" for c in COMMANDS])
def test_readme_command_runs(command, readme_dir, capsys):
    reason = _skip_reason(command)
    if reason:
        pytest.skip(f"{command}: {reason}")
    plan = plan_for(command)
    _make_inputs(plan, capsys)
    code, out = _run(plan.argv, capsys)
    assert code == 0, f"{command}: exit status {code} (ran as {plan.argv})\n{out[-3000:]}"
    if plan.how == "print_config":
        _check_printed_config(command, plan.argv, out)
    if plan.how == "help":
        missing = [opt for opt in _options_shown(command.text) if opt.split("=")[0] not in out]
        assert not missing, f"{command}: options not in `{plan.argv[0]} --help`: {missing}"


# ---------------------------------------------------------------------------------- the parser and the rules
def test_the_parser_joins_continuations_and_drops_comments(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(
        "text `python -m x` outside a block\n"
        "```bash\n"
        "python -m em_lightning fit --config a.yaml \\\n"
        "    --trainer.devices 2      # a comment\n"
        "# a whole-line comment\n"
        "\n"
        "bash scripts/test.sh -m \"not slow\"\n"
        "```\n"
        "```python\nprint('not shell')\n```\n"
    )
    got = [(c.line, c.argv) for c in readme_commands(readme)]
    assert got == [
        (3, ["python", "-m", "em_lightning", "fit", "--config", "a.yaml", "--trainer.devices", "2"]),
        (7, ["bash", "scripts/test.sh", "-m", "not slow"]),
    ]


def test_an_unknown_command_fails_asking_for_a_rule_or_a_skip_entry():
    unknown = Command(1, "make everything", ["make", "everything"])
    with pytest.raises(pytest.fail.Exception, match="add it to SKIP in tests/test_readme.py with the reason"):
        plan_for(unknown)
    new_sub = Command(2, "python -m em_lightning frobnicate", [*ENTRY, "frobnicate"])
    with pytest.raises(pytest.fail.Exception, match="no rule for"):
        plan_for(new_sub)


def test_cheap_forms():
    def plan(text):
        return plan_for(Command(1, text, shlex.split(text)))

    tiny = plan("python -m em_lightning fit --config configs/tiny.yaml --trainer.max_steps 3")
    assert tiny.how == "run" and tiny.argv[-4:] == ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "0"]
    two = plan("python -m em_lightning fit --config configs/tiny.yaml --trainer.devices 2")
    assert two.how == "print_config"
    saved = plan("python -m em_lightning fit --config runs/quickstart/version_0/config.yaml")
    assert saved.inputs == [(["fit", "--config", "configs/quickstart.yaml", "--print_config"],
                             "runs/quickstart/version_0/config.yaml")]
    assert plan("python -m em_lightning sweep configs/sweeps/tiny.yaml").argv[-1] == "--dry-run"
    paper = plan("python -m em_lightning sweep configs/sweeps/paper_main.yaml --launcher slurm").argv
    assert paper[-3] == "--dry-run" and paper[-2:] == ["--only", _sweep_runs("configs/sweeps/paper_main.yaml")[0]]
    assert _options_shown("analyze runs/x --out o [--signal judge|probe] [--json]") == ["--json", "--out", "--signal"]
    assert "placeholder" in _skip_reason(Command(1, "python -m em_lightning fit --config ...", []))
