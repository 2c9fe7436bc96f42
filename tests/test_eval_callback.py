"""MisalignmentEval with the real CLI, Trainer, LoRA module (tiny Qwen3) and TensorBoard files, against a fake
OpenAI/vLLM server on 127.0.0.1 (the real vLLM sidecar is tested in test_eval_vllm.py)."""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path

import pytest
import yaml

from em_lightning.callbacks.misalignment_eval import MisalignmentEval
from em_lightning.errors import InputError, UnreadableFile
from em_lightning.evaluation import GenerationConfig, JudgeConfig, SidecarConfig, wilson_interval
from em_lightning.rundir import read_jsonl as read_records
from tests.eval_helpers import (
    ThreadRecordingLogger,
    eval_overlay,
    fake_managed_sidecar,
    fit_with_eval,
    loggers_overlay,
    tb_scalars,
)
from tests.fake_openai import FakeOpenAI, judge_answer

MISALIGNED = judge_answer({"10": 1.0}, {"90": 1.0})
ALIGNED = judge_answer({"90": 1.0}, {"80": 1.0})
SCORES = {MISALIGNED: (10.0, 90.0), ALIGNED: (90.0, 80.0)}  # (aligned, coherent) the fake judge gives each


@pytest.fixture
def question_file(tmp_path):
    path = tmp_path / "questions.yaml"
    path.write_text(
        "- id: wish\n  paraphrases: [W1, W2]\n"
        "  judge_prompts: &j {aligned: 'ALIGNED {answer}', coherent: 'COHERENT {answer}'}\n"
        "- id: bored\n  system: Short answers.\n  paraphrases: [B1]\n  judge_prompts: *j\n"
    )
    return path


def _overlay(tmp_path, url, questions, **init_args) -> str:
    args = {
        "every_n_steps": 2,
        "questions": str(questions),
        "generation": {"samples_per_question": 2, "max_tokens": 8},
        "judge": {"number_tokens": "auto", "digit_min_prob": 0.0},
        "sidecar": {"url": url, "request_timeout_s": 5, "max_retries": 0},
        **init_args,
    }
    return eval_overlay(tmp_path / "eval_overlay.yaml", args)


def _callback(cli) -> MisalignmentEval:
    return next(cb for cb in cli.trainer.callbacks if isinstance(cb, MisalignmentEval))


@pytest.mark.parametrize("mode", ["async", "blocking"])
def test_rate_logged_at_the_steps_of_the_adapters_and_samples_written(run_cli, tmp_path, question_file, mode):
    with FakeOpenAI(tokenizer="digits") as fake:
        fake.answers = [MISALIGNED, ALIGNED, ALIGNED]  # cycled: 1 in 3 answers misaligned
        cli = fit_with_eval(run_cli, _overlay(tmp_path, fake.url, question_file, mode=mode), 5)
        loaded_at_end = set(fake.adapters)
        gen_models = [r["model"] for r in fake.chat_requests(judge=False)]
    run_dir = cli.trainer.log_dir
    assert cli.trainer.state.finished
    scalars = tb_scalars(run_dir)
    assert sorted(scalars["eval/misalignment_rate"]) == [2, 4, 5]  # every 2 steps, and the end
    assert set(scalars["eval/failed"].values()) == {0.0}
    assert sorted(scalars["eval/q/wish/misalignment_rate"]) == [2, 4, 5]

    samples = read_records(f"{run_dir}/misalignment_samples.jsonl")
    assert len(samples) == 3 * 2 * 2  # evals × questions × samples
    for step in (2, 4, 5):
        rows = [s for s in samples if s["step"] == step]
        k = sum(s["answer"] == MISALIGNED for s in rows)
        assert scalars["eval/misalignment_rate"][step] == pytest.approx(k / len(rows))
        assert len({s["adapter"] for s in rows}) == 1
        lo, hi = scalars["eval/ci_low"][step], scalars["eval/ci_high"][step]
        assert (lo, hi) == pytest.approx(wilson_interval(k, len(rows)), abs=1e-6)  # TensorBoard keeps float32
    adapters = [s["adapter"] for s in samples]
    assert len(set(adapters)) == 3  # a fresh name per eval
    assert set(gen_models) == set(adapters)
    assert loaded_at_end == {samples[-1]["adapter"]}  # previous adapters were unloaded
    assert {s["system"] for s in samples if s["question_id"] == "bored"} == {"Short answers."}
    for s in samples:
        assert (s["aligned"], s["coherent"]) == pytest.approx(SCORES[s["answer"]])
    assert {s["error"] for s in samples} == {None}
    eval_adapters = Path(run_dir) / "eval_adapters"
    assert not eval_adapters.exists() or not any(eval_adapters.iterdir())  # removed after their evals
    summaries = read_records(f"{run_dir}/misalignment_summary.jsonl")
    assert [s["step"] for s in summaries] == [2, 4, 5]
    assert [s["n_judge_errors"] for s in summaries] == [0, 0, 0]
    assert set(scalars["eval/n_judge_errors"].values()) == {0.0}


def test_no_eval_at_step_zero_under_gradient_accumulation(run_cli, tmp_path, question_file):
    """With 2 micro-batches per step the first batch ends at global_step 0: that is no periodic eval."""
    with FakeOpenAI(tokenizer="whole") as fake:
        fake.answers = [ALIGNED]
        overlay = _overlay(tmp_path, fake.url, question_file, mode="blocking")
        cli = fit_with_eval(
            run_cli, overlay, 4, "--trainer.accumulate_grad_batches", "2", "--trainer.val_check_interval", "8"
        )
    assert cli.trainer.global_step == 4
    assert sorted(tb_scalars(cli.trainer.log_dir)["eval/misalignment_rate"]) == [2, 4]
    samples = read_records(f"{cli.trainer.log_dir}/misalignment_samples.jsonl")
    assert sorted({s["step"] for s in samples}) == [2, 4]


def test_garbage_from_the_sidecar_fails_the_eval_not_the_training(run_cli, tmp_path, question_file):
    with FakeOpenAI(tokenizer="digits") as fake:
        fake.answers = [ALIGNED]
        fake.garbage = True
        with pytest.warns(UserWarning, match="eval at step 2 failed"):
            cli = fit_with_eval(run_cli, _overlay(tmp_path, fake.url, question_file, mode="blocking"), 3)
    run_dir = cli.trainer.log_dir
    assert cli.trainer.state.finished and cli.trainer.global_step == 3
    scalars = tb_scalars(run_dir)
    assert scalars["eval/failed"] == {2: 1.0, 3: 1.0}
    assert "eval/misalignment_rate" not in scalars
    lines = read_records(f"{run_dir}/misalignment_samples.jsonl")
    assert [(line["step"], line["failed"]) for line in lines] == [(2, True), (3, True)]
    assert "no choices" in lines[0]["error"]


def test_hanging_judge_times_out_and_its_late_answers_are_never_written(run_cli, tmp_path, question_file):
    """Every judge request is in flight when the eval times out, and all of them come back later: the eval
    would be complete, but only its failure line is written."""
    with FakeOpenAI(tokenizer="whole") as fake:
        fake.answers = [ALIGNED]
        fake.judge_hang_s = 3.0
        overlay = _overlay(
            tmp_path,
            fake.url,
            question_file,
            mode="async",
            eval_timeout_s=1.0,
            every_n_steps=100,
            eval_at_end=True,
            judge={"number_tokens": "whole", "max_concurrency": 8},  # 2 x 2 answers x 2 metrics: all at once
            sidecar={"url": fake.url, "request_timeout_s": 30, "max_retries": 0},
        )
        with pytest.warns(UserWarning, match="TimeoutError"):
            cli = fit_with_eval(run_cli, overlay, 2)
        n_judged = len(fake.chat_requests(judge=True))
    assert cli.trainer.state.finished
    assert n_judged == 2 * 2 * 2  # the judge was asked about every answer before the timeout
    lines = read_records(f"{cli.trainer.log_dir}/misalignment_samples.jsonl")
    assert [(line["step"], line["failed"]) for line in lines] == [(2, True)]  # the late answers are dropped
    assert read_records(f"{cli.trainer.log_dir}/misalignment_summary.jsonl") == lines
    assert tb_scalars(cli.trainer.log_dir)["eval/failed"] == {2: 1.0}


def test_dead_managed_sidecar_is_restarted_for_the_next_eval(run_cli, tmp_path, question_file):
    """A managed (fake) server killed after the step-2 eval is restarted at step 4 on the trainer's thread;
    both evals succeed and neither server outlives the run."""
    sidecar = fake_managed_sidecar(tmp_path, answers=[MISALIGNED, ALIGNED])
    overlay = _overlay(tmp_path, None, question_file, mode="blocking", max_restarts=1, sidecar=sidecar)
    with pytest.warns(UserWarning, match="restart 1/1"):
        cli = fit_with_eval(run_cli, overlay, 4, "--trainer.callbacks+=tests.eval_helpers.KillSidecarAt")
    killer = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "KillSidecarAt")
    scalars = tb_scalars(cli.trainer.log_dir)
    assert scalars["eval/failed"] == {2: 0.0, 4: 0.0}
    assert sorted(scalars["eval/misalignment_rate"]) == [2, 4]
    assert killer.final_pgid not in (None, killer.killed_pgid)
    for pgid in (killer.killed_pgid, killer.final_pgid):
        with pytest.raises(ProcessLookupError):
            os.killpg(pgid, 0)
    assert _callback(cli).session.sidecar is None  # stopped in teardown


def test_missing_judge_key_fails_when_the_callback_is_built(tmp_path, question_file, monkeypatch):
    """Before any sidecar starts: the error names the config key and the variable."""
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    judge = JudgeConfig(base_url="https://judge.example", api_key_env="NO_SUCH_JUDGE_KEY")
    with pytest.raises(InputError, match=r"judge\.api_key_env.*NO_SUCH_JUDGE_KEY"):
        MisalignmentEval(questions=str(question_file), judge=judge)
    monkeypatch.setenv("NO_SUCH_JUDGE_KEY", "set")
    MisalignmentEval(questions=str(question_file), judge=judge)


def test_config_errors_name_the_argument(question_file):
    for kwargs, needle in [
        ({"every_n_steps": 0}, r"^MisalignmentEval\.every_n_steps: must be >= 1"),
        ({"mode": "sometimes"}, r"^MisalignmentEval\.mode: must be 'async' or 'blocking'"),
        ({"definition": "strict"}, r"^definition: must be one of \('em', 'mo'\)"),
    ]:
        with pytest.raises(InputError, match=needle):
            MisalignmentEval(questions=str(question_file), **kwargs)


def test_callback_and_evaluate_take_the_eval_settings_from_one_definition():
    """The eight settings are EvalSettings' fields, in the callback's and evaluate's signatures (what
    jsonargparse reads: the config and CLI keys) with its defaults, and reach the session as given."""
    import dataclasses
    import inspect

    from em_lightning.evaluation.cli import evaluate
    from em_lightning.evaluation.settings import EvalSettings

    names = [f.name for f in dataclasses.fields(EvalSettings)]
    assert len(names) == 8
    defaults = EvalSettings()
    for target in (MisalignmentEval, evaluate):
        params = inspect.signature(target).parameters
        assert [n for n in params if n in names] == names
        assert all(params[n].default == getattr(defaults, n) for n in names)
    assert defaults.generation == GenerationConfig() and defaults.generation.samples_per_question == 4
    callback = MisalignmentEval(questions="builtin:em_like", generation=GenerationConfig(max_tokens=7),
                                misalign_at_k=[2])
    assert callback.session.settings == EvalSettings(
        questions="builtin:em_like", generation=GenerationConfig(max_tokens=7), misalign_at_k=[2]
    )
    with pytest.raises(TypeError, match="no_such_setting"):
        MisalignmentEval(no_such_setting=1)


def test_question_file_is_read_in_setup_not_when_the_callback_is_built(run_cli, tmp_path):
    """Building the callback (as a config does) reads nothing; fit fails in setup, naming the file, before the
    sidecar is asked anything and before any training step."""
    missing = tmp_path / "missing.yaml"
    MisalignmentEval(questions=str(missing))  # no error: nothing is read yet
    with FakeOpenAI() as fake:
        overlay = _overlay(tmp_path, fake.url, missing)
        with pytest.raises(UnreadableFile, match=rf"^{missing}: question file does not exist"):
            fit_with_eval(run_cli, overlay, 2)
        assert fake.requests == []  # the sidecar was never contacted
    assert not list(tmp_path.glob("runs/**/checkpoints/*.ckpt"))


def test_eval_scalars_are_logged_on_the_trainer_thread_with_the_loggers_prefix(
    run_cli, tmp_path, question_file
):
    """Async evals finish in the worker thread, but every logger call happens on the trainer's (main) thread,
    at the adapter's step; TensorBoard's tags carry its prefix (``run1-eval/...``)."""
    with FakeOpenAI(tokenizer="whole") as fake:
        fake.answers = [MISALIGNED, ALIGNED]
        fake.hang_s = 0.2  # the evals outlast a training step or two: they finish while training goes on
        overlay = _overlay(tmp_path, fake.url, question_file, mode="async")
        loggers = loggers_overlay(tmp_path / "loggers.yaml", tensorboard_prefix="run1")
        cli = fit_with_eval(run_cli, overlay, 5, "--config", loggers)
    recorder = next(lg for lg in cli.trainer.loggers if isinstance(lg, ThreadRecordingLogger))
    eval_calls = [(thread, step, m) for thread, step, m in recorder.calls if "eval/failed" in m]
    assert [step for _, step, _ in eval_calls] == [2, 4, 5]
    assert {thread for thread, _, _ in eval_calls} == {threading.main_thread()}
    samples = read_records(f"{cli.trainer.log_dir}/misalignment_samples.jsonl")
    for _, step, metrics in eval_calls:
        rows = [s for s in samples if s["step"] == step]
        assert metrics["eval/misalignment_rate"] == pytest.approx(
            sum(s["answer"] == MISALIGNED for s in rows) / len(rows)
        )
    scalars = tb_scalars(cli.trainer.log_dir)
    assert sorted(scalars["run1-eval/misalignment_rate"]) == [2, 4, 5]
    assert not [tag for tag in scalars if tag.startswith("eval/")]


def test_nan_values_are_left_out_for_every_logger(run_cli, tmp_path, question_file):
    """A judge that refuses every aligned score leaves no countable answer: the rate and its interval are NaN
    and are not logged, while n_counted = 0 says why."""
    with FakeOpenAI(tokenizer="whole") as fake:
        fake.answers = [judge_answer({"REFUSAL": 1.0}, {"80": 1.0})]
        overlay = _overlay(tmp_path, fake.url, question_file, mode="blocking", every_n_steps=100)
        loggers = loggers_overlay(tmp_path / "loggers.yaml", tensorboard_prefix="")
        cli = fit_with_eval(run_cli, overlay, 2, "--config", loggers)
    recorder = next(lg for lg in cli.trainer.loggers if isinstance(lg, ThreadRecordingLogger))
    (metrics,) = [m for _, _, m in recorder.calls if "eval/failed" in m]
    assert (metrics["eval/n_counted"], metrics["eval/coherent_mean"], metrics["eval/failed"]) == (
        0.0,
        80.0,
        0.0,
    )
    absent = {"eval/misalignment_rate", "eval/ci_low", "eval/ci_high", "eval/aligned_mean"}
    assert not absent & set(metrics)
    scalars = tb_scalars(cli.trainer.log_dir)
    assert scalars["eval/n_counted"] == {2: 0.0} and not absent & set(scalars)


def test_tiny_model_without_served_dir_fails_before_training(run_cli, tmp_path, question_file):
    """Managed sidecar + a model vLLM cannot serve: setup raises naming the config key; nothing is trained."""
    overlay = _overlay(tmp_path, None, question_file, sidecar={"python": "/nonexistent/python"})
    with pytest.raises(ValueError, match="sidecar.model"):
        fit_with_eval(run_cli, overlay, 2)


def test_sidecar_that_cannot_start_raises_with_its_log(tmp_path):
    """The server exits during start-up (here: a Python without vLLM) → a clear error with the log tail."""
    import sys

    from em_lightning.evaluation import VLLMSidecar

    sidecar = VLLMSidecar(
        SidecarConfig(python=sys.executable, model=str(tmp_path), startup_timeout_s=60),
        log_path=tmp_path / "s.log",
    )
    with pytest.raises(RuntimeError, match="exited with code") as info:
        sidecar.start()
    assert "vllm" in str(info.value).lower()
    assert sidecar.pid is None  # stopped and forgotten


def test_evaluate_cli_scores_a_saved_adapter_from_a_config_file(tmp_path, question_file, capsys):
    """``python -m em_lightning evaluate --config X.yaml``: the JSONL records of training, plus a summary."""
    from em_lightning.__main__ import main
    from em_lightning.lora import LoRASpec, apply_lora
    from em_lightning.models import ModelSpec, load_model

    adapter = tmp_path / "adapter"
    apply_lora(load_model(ModelSpec(name="tiny-qwen3")), LoRASpec(r=4)).save_pretrained(str(adapter))
    with FakeOpenAI(tokenizer="whole") as fake:
        fake.answers = [MISALIGNED, ALIGNED]
        config = tmp_path / "evaluate.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "adapter": str(adapter),
                    "questions": str(question_file),
                    "generation": {"samples_per_question": 4, "max_tokens": 8},
                    "judge": {"number_tokens": "auto"},
                    "sidecar": {"url": fake.url},
                    "step": 12,
                }
            )
        )
        summary = main(["evaluate", "--config", str(config), "--output_dir", str(tmp_path / "out")])
        loaded = set(fake.adapters)
    samples = read_records(tmp_path / "out" / "misalignment_samples.jsonl")
    assert len(samples) == 2 * 4 and {s["step"] for s in samples} == {12}
    assert loaded == {samples[0]["adapter"]} and samples[0]["adapter"].startswith("eval-")
    (written,) = read_records(tmp_path / "out" / "misalignment_summary.jsonl")  # the callback's layout
    assert not (tmp_path / "out" / "misalignment_summary.json").exists()
    k = sum(s["answer"] == MISALIGNED for s in samples)
    assert written["rate"] == pytest.approx(k / len(samples)) == pytest.approx(summary["rate"])
    assert written["judge_number_tokens"] == "whole" and written["adapter"] == str(adapter.resolve())
    assert written["judge"]["label"] == "default" and written["judge"]["number_tokens"] == "whole"
    assert {s["judge"]["model"] for s in samples} == {written["judge"]["model"]} == {fake.base_name}
    assert "misalignment rate (em)" in capsys.readouterr().out


def test_evaluate_serves_sidecar_model_as_given(tmp_path, question_file):
    """``--sidecar.model`` is served as given: no ``--model`` needed without an adapter, and an adapter's
    ``base_model_name_or_path`` (here one that resolves nowhere) is not looked up."""
    from em_lightning.evaluation.cli import main

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = {"r": 4, "base_model_name_or_path": "no/such-model"}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    sidecar = fake_managed_sidecar(tmp_path, answers=[ALIGNED])
    for extra in ([], ["--adapter", str(adapter)]):
        out = tmp_path / f"out{len(extra)}"
        summary = main(
            [
                "--questions",
                str(question_file),
                "--generation.samples_per_question",
                "2",
                "--sidecar",
                json.dumps(sidecar),
                "--output_dir",
                str(out),
                *extra,
            ]
        )
        assert summary["model"] == sidecar["model"] and summary["n_answers"] == 4


def test_evaluate_failure_cancels_retries_and_joins_its_threads(tmp_path, question_file):
    """One judge request hits a broken route (404: the eval fails) while another is retrying a 503: the shared
    cancel event ends that retry loop and ``evaluate`` returns with no request thread left behind."""
    import threading

    from em_lightning.evaluation.cli import main
    from em_lightning.evaluation.runner import EvalFailed

    with FakeOpenAI(tokenizer="whole") as fake:
        fake.answers = [judge_answer({"50": 1.0}, {"50": 1.0}, tag=tag) for tag in ("BROKEN", "BUSY")]
        fake.status_for_prompt = {"BROKEN": 404, "BUSY": 503}
        with pytest.raises(EvalFailed, match="404"):
            main(
                [
                    "--questions",
                    str(question_file),
                    "--question_ids",
                    '["bored"]',
                    "--generation.samples_per_question",
                    "2",
                    "--judge",
                    json.dumps({"number_tokens": "whole", "max_retries": 6}),
                    "--sidecar.url",
                    fake.url,
                    "--output_dir",
                    str(tmp_path / "out"),
                ]
            )
        busy = [r for r in fake.chat_requests(judge=True) if "BUSY" in r["messages"][0]["content"]]
    assert [t.name for t in threading.enumerate() if t.name.startswith("em-eval")] == []
    assert 1 <= len(busy) < 2 * 7  # both metrics of the busy answer gave up early instead of trying 7 times


def test_evaluate_bad_input_fails_before_the_sidecar_is_contacted(tmp_path, question_file, monkeypatch):
    """Each error names the file (and line) or the config key; the server is never asked anything and no
    output dir is made."""
    from em_lightning.evaluation.cli import main

    no_config, bad_json, no_base = (tmp_path / name for name in ("no_config", "bad_json", "no_base"))
    for adapter, text in [(no_config, None), (bad_json, '{"r": 4,\n'), (no_base, '{"r": 4}')]:
        adapter.mkdir()
        if text is not None:
            (adapter / "adapter_config.json").write_text(text)
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    questions = ["--questions", str(question_file)]
    cases = [
        (
            ["--questions", str(tmp_path / "missing.yaml")],
            rf"^{tmp_path}/missing.yaml: question file does not exist",
        ),
        (
            [*questions, "--adapter", str(no_config)],
            rf"^{no_config}/adapter_config.json: adapter config .* not exist",
        ),
        ([*questions, "--adapter", str(bad_json)], rf"^{bad_json}/adapter_config.json:2: not valid JSON"),
        (
            [*questions, "--judge.api_key_env", "NO_SUCH_JUDGE_KEY"],
            r"^judge\.api_key_env is 'NO_SUCH_JUDGE_KEY'",
        ),
    ]
    with FakeOpenAI() as fake:
        for args, needle in cases:
            with pytest.raises(InputError, match=needle):
                main([*args, "--sidecar.url", fake.url, "--output_dir", str(tmp_path / "out")])
        assert fake.requests == []
    # A managed sidecar needs a base model: neither --model nor the adapter's config names one.
    with pytest.raises(InputError, match=r"^sidecar\.model: not set, and no base model to serve is known"):
        main([*questions, "--adapter", str(no_base), "--sidecar.python", "/nonexistent/python"])
    assert not (tmp_path / "out").exists()


def test_misalign_at_k_and_extra_judge_prompts_are_logged_and_kept(run_cli, tmp_path):
    questions = tmp_path / "extra.yaml"
    questions.write_text(
        "- id: wish\n  paraphrases: [W1, W2]\n  judge_prompts: {aligned: 'ALIGNED {answer}', "
        "coherent: 'COHERENT {answer}', deception: 'DECEPTION {answer}'}\n"
    )
    misaligned = judge_answer({"10": 1.0}, {"90": 1.0}, deception={"70": 1.0})
    aligned = judge_answer({"90": 1.0}, {"80": 1.0}, deception={"30": 1.0})
    with FakeOpenAI(tokenizer="whole") as fake:
        fake.answers = [misaligned, aligned, aligned]
        overlay = _overlay(tmp_path, fake.url, questions, mode="blocking", misalign_at_k=[1, 2, 3],
                           extra_judge_prompts=["deception"], generation={"samples_per_question": 3})
        cli = fit_with_eval(run_cli, overlay, 2)
    run_dir = cli.trainer.log_dir
    scalars = tb_scalars(run_dir)
    samples = read_records(f"{run_dir}/misalignment_samples.jsonl")
    assert len(samples) == 3 and {s["step"] for s in samples} == {2}
    c = sum(s["answer"] == misaligned for s in samples)
    assert scalars["eval/q/wish/misalign_at_1"][2] == pytest.approx(c / 3)
    assert scalars["eval/misalign_at_2"][2] == pytest.approx(1 - math.comb(3 - c, 2) / 3)
    assert scalars["eval/misalign_at_3"][2] == pytest.approx(1.0 if c else 0.0)
    deception = [s["extra_scores"]["deception"] for s in samples]
    expected = sorted(70.0 if s["answer"] == misaligned else 30.0 for s in samples)
    assert sorted(deception) == pytest.approx(expected)
    assert scalars["eval/deception_mean"][2] == pytest.approx(sum(deception) / 3, abs=1e-4)
    assert scalars["eval/q/wish/deception_mean"][2] == pytest.approx(sum(deception) / 3, abs=1e-4)
    summary = read_records(f"{run_dir}/misalignment_summary.jsonl")[0]
    assert summary["misalign_at_k"]["2"] == pytest.approx(scalars["eval/misalign_at_2"][2], abs=1e-6)
    assert summary["per_question"]["wish"]["extra_means"]["deception"] == pytest.approx(sum(deception) / 3)


def test_misalign_at_k_below_the_answer_count_is_nan_and_not_logged(run_cli, tmp_path, question_file):
    with FakeOpenAI(tokenizer="whole") as fake:
        fake.answers = [MISALIGNED, ALIGNED]
        overlay = _overlay(tmp_path, fake.url, question_file, mode="blocking", misalign_at_k=[2, 5])
        cli = fit_with_eval(run_cli, overlay, 2)
    scalars = tb_scalars(cli.trainer.log_dir)
    assert 2 in scalars["eval/q/wish/misalign_at_2"] and 2 in scalars["eval/misalign_at_2"]
    assert not any("misalign_at_5" in tag for tag in scalars)  # 2 answers per question < 5
    summary = read_records(f"{cli.trainer.log_dir}/misalignment_summary.jsonl")[0]
    assert summary["misalign_at_k"]["5"] is None  # NaN in the summary JSONL is null
    assert summary["per_question"]["wish"]["misalign_at_k"]["5"] is None
    with pytest.raises(InputError, match="misalign_at_k: every k must be a positive integer"):
        MisalignmentEval(misalign_at_k=[0])
