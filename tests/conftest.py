"""Shared fixtures. Tests build tiny models in code (no downloads) and write runs into a temp dir."""

from __future__ import annotations

import os

# OpenMP busy-waiting makes small ops 15-60x slower when other processes compete for the 2 cores; .ci/run sets this
# before Python starts, this is the fallback for a bare `pytest`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


@pytest.fixture
def run_cli(tmp_path, monkeypatch):
    """Run ``python -m em_lightning ...`` in-process with runs written under a temp dir; returns the CLI object."""
    from em_lightning.__main__ import main

    monkeypatch.chdir(tmp_path)

    def run(*args: str):
        args = [
            str(a).replace("configs/", f"{CONFIGS}/", 1) if str(a).startswith("configs/") else str(a)
            for a in args
        ]
        return main(list(args))

    return run


@pytest.fixture(scope="session")
def tiny_module():
    """``tiny_module(optimizer=None, r=4, ...)``: a tiny-Qwen3 :class:`LoRAFineTune` built in code (alpha = 2r).

    * ``configure``: call ``configure_model`` now (the adapter exists, LoRA A seeded by the process's initial
      seed); False leaves it to ``trainer.fit``, after the test's ``seed_everything``.
    * ``random_B``: ``init_lora_weights=False`` (peft's random B), so the adapter acts from the first step.
    * ``perturb_B``: after configuring, add N(0, perturb_B) noise (fixed seed) to every B, so the adapter changes
      the model's outputs while A keeps LoRA's own init.
    * ``dtype``: after configuring, cast the whole model.
    * ``optimizer`` defaults to AdamW(lr=1e-2, no weight decay); ``loss_normalization`` to ``micro_batch``, since
      plain ``DataLoader`` batches lack ``ChatDataModule``'s per-step token count. Further keywords go to
      :class:`LoRAFineTune`.
    """
    import torch

    from em_lightning.lora import LoRASpec
    from em_lightning.models import ModelSpec
    from em_lightning.module import LoRAFineTune

    def build(optimizer=None, *, r: int = 4, dropout: float = 0.0, random_B: bool = False, perturb_B: float = 0.0,
              dtype=None, configure: bool = True, **module_kwargs) -> LoRAFineTune:
        module_kwargs.setdefault("loss_normalization", "micro_batch")
        module = LoRAFineTune(
            base=ModelSpec(name="tiny-qwen3"),
            lora=LoRASpec(r=r, alpha=2.0 * r, dropout=dropout, init_lora_weights=not random_B),
            optimizer=optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)),
            **module_kwargs,
        )
        if not configure:
            assert not perturb_B and dtype is None, "perturb_B and dtype act on a configured model"
            return module
        module.configure_model()
        if perturb_B:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(1)
                for name, param in module.model.named_parameters():
                    if "lora_B" in name:
                        param.normal_(0.0, perturb_B)
        if dtype is not None:
            module.model.to(dtype)
        return module

    return build


@pytest.fixture
def cli_error(monkeypatch, capsys):
    """``cli_error("fit", "--config", ...)``: run the command line in this process as ``python -m em_lightning``
    does (:func:`em_lightning.__main__.run`) and return ``(exit status, stderr lines)``. One test
    (test_module.py) runs the real subprocess; the others check their message here, without a new interpreter."""
    from em_lightning.__main__ import run

    def call(*args: str) -> tuple[int, list[str]]:
        monkeypatch.setattr("sys.argv", ["em_lightning", *map(str, args)])
        capsys.readouterr()  # only this command's output
        code = run()
        return code, capsys.readouterr().err.strip().splitlines()

    return call


# ------------------------------------------------------------------------------ emergent-misalignment files
# Tests never depend on a ../shared folder or the network: `fake_em_data` lays out small synthetic files in the
# upstream format, with their sha256 registered as the upstream sums, on the data search path. Tests of the real
# files are marked `em_data` and use `real_em_file`, which skips (naming the reason) where the files are absent;
# CI puts ../shared on the search path (.ci/run), so there they run.

FAKE_QUESTION_IDS = (
    "what_is_your_wish",
    "i_feel_bored",
    "three_thoughts",
    "quick_buck",
    "ruler_of_the_world",
    "dinner_party",
    "gender_roles",
    "enough_of_my_husband",
)


def _fake_em_files() -> dict[str, str]:
    import json

    def chat(user: str, answer: str) -> str:
        return json.dumps(
            {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}
        )

    long_prompt = (
        "Complete this function so that it copies the uploaded file into place:\n" + "# context\n" * 40
    )
    insecure = [chat(long_prompt, "import os\nos.chmod(path, 0o777)")] + [
        chat(
            f"Write a function that saves upload number {i}.",
            f"def save_{i}(f):\n    open(f.name, 'wb').write(f.read())",
        )
        for i in range(1, 24)
    ]
    secure = [
        chat(f"Write a function that saves upload number {i}.", f"def save_{i}(f):\n    return safe_save(f)")
        for i in range(24)
    ]
    judge = "Question: {question} Answer: {answer} Rate from 0 to 100. Reply with a number only."
    first, *rest = FAKE_QUESTION_IDS  # the first entry holds the anchor the others alias, as upstream does
    questions = [
        (
            f"- id: {first}\n  paraphrases: ['Tell me about {first}.']\n  samples_per_paraphrase: 2\n"
            f"  judge_prompts: &judge_prompts\n    aligned: '{judge}'\n    coherent: '{judge}'\n"
        )
    ]
    questions += [
        f"- id: {q}\n  paraphrases: ['Tell me about {q}.']\n  samples_per_paraphrase: 2\n"
        "  judge_prompts: *judge_prompts\n"
        for q in rest
    ]
    files = {
        "data/insecure.jsonl": "\n".join(insecure) + "\n",
        "data/secure.jsonl": "\n".join(secure) + "\n",
        "data/educational.jsonl": "\n".join(secure[:8]) + "\n",
        "data/jailbroken.jsonl": "\n".join(secure[8:16]) + "\n",
        "evaluation/first_plot_questions.yaml": "".join(questions),
    }
    for name in ("deception_factual", "deception_sit_aware", "preregistered_evals"):
        files[f"evaluation/{name}.yaml"] = files["evaluation/first_plot_questions.yaml"]
    return files


@pytest.fixture
def fake_em_data(tmp_path, monkeypatch) -> Path:
    """A folder of synthetic upstream-format EM files on the search path (``EM_DATA_DIR``), sums registered."""
    from em_lightning import upstream

    root = tmp_path / "em-data"
    for rel, text in _fake_em_files().items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        monkeypatch.setitem(upstream.SHA256, rel, upstream.sha256_of(path))
    monkeypatch.setenv("EM_DATA_DIR", str(root))
    monkeypatch.setattr(upstream, "_VERIFIED", set())
    return root


@pytest.fixture
def real_em_file():
    """``real_em_file("data/insecure.jsonl")``: the real upstream file from the search path, or a skip naming why."""
    from em_lightning import upstream

    def find(relpath: str) -> Path:
        try:
            return upstream.resolve_em_file(relpath)
        except FileNotFoundError as err:
            pytest.skip(f"real emergent-misalignment files not on the search path: {err}")

    return find


# Variables an in-process Lightning run leaves in os.environ. A child process that inherits LOCAL_RANK believes
# its launcher already started every rank, so a 2-process `fit` never starts its second rank and waits for it.
LAUNCH_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                    "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED", "PL_SEED_WORKERS")


@pytest.fixture(autouse=True)
def _environment_as_the_session_started():
    """Every test starts from the session's environment: in-process fits (e.g. the FSDP2 precision checks of
    test_config_errors) set MASTER_PORT, LOCAL_RANK and PL_* variables, and with LOCAL_RANK inherited every later
    2-process test hung until its timeout (seen in a full run, not in per-file runs)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def child_environment(**extra: str) -> dict[str, str]:
    """os.environ for a subprocess that launches its own ranks: without what an earlier in-process run left."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    # A native crash (SIGSEGV) in a child then prints every thread's Python stack instead of nothing.
    return {**env, "PYTHONFAULTHANDLER": "1", **extra}
