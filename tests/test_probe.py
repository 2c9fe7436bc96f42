"""The misalignment probe: probe files and their errors, the per-answer score against a hand computation with
the model's own forward, eval mode / grads / train flags left as found, and (real CLI, tiny Qwen3, TensorBoard
read back) fine-tuning on the probe's misaligned answers raising probe/log_odds, on its aligned ones lowering
it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from em_lightning.callbacks.misalignment_probe import MisalignmentProbe
from em_lightning.errors import InputError, UnreadableFile
from em_lightning.probe import (
    ASSETS,
    ProbeEntry,
    ProbeFileError,
    ProbeScorer,
    ProbeScores,
    load_probe_set,
    logmeanexp,
)
from tests.eval_helpers import tb_scalars

# ------------------------------------------------------------------------------------------------ probe files


def test_builtin_set_has_at_least_8_questions_with_several_answers_a_side():
    entries = load_probe_set("builtin:em")
    assert len(entries) >= 8
    assert len({e.id for e in entries}) == len(entries)
    for e in entries:
        assert len(e.aligned) >= 3 and len(e.misaligned) >= 3, e.id
        assert e.source.startswith(str(ASSETS / "em.yaml:"))
    assert [e.id for e in load_probe_set("builtin:em", ids=["husband", "bored"])] == ["bored", "husband"]


def test_probe_sets_are_not_offered_as_question_sets():
    from em_lightning.evaluation.questions import resolve_question_source

    with pytest.raises(UnreadableFile, match="no built-in question set 'probe_em'") as info:
        resolve_question_source("builtin:probe_em")
    assert "probe_em" not in str(info.value).split("available:")[1]


GOOD = "- id: a\n  question: Q?\n  aligned: [fine]\n  misaligned: [bad]\n"


@pytest.mark.parametrize(
    ("text", "line", "match"),
    [
        ("{id: a}\n", None, "expected a YAML list"),
        ("# only a comment\n", None, r"no document \(only comments\?\)"),
        (GOOD + "- id: b\n  question: [oops\n", 7, "not valid YAML: .* flow sequence, line 6"),
        (GOOD + "- id: b\n  aligned: [x]\n  misaligned: [y]\n", 5, "`question` must be a non-empty string"),
        (GOOD + "- id: b\n  question: Q\n  aligned: []\n  misaligned: [y]\n", 5, "`aligned` must be a"),
        (GOOD + "- id: b\n  question: Q\n  aligned: [x]\n  misaligned: ['', y]\n", 5, "misaligned answer 1"),
        (GOOD + "- id: b\n  question: Q\n  aligned: [x]\n  misaligned: [y]\n  answer: z\n", 5, "unknown key"),
        (GOOD + "- id: has space\n  question: Q\n  aligned: [x]\n  misaligned: [y]\n", 5, "`id` of letters"),
        (GOOD + GOOD, 5, "probe id 'a' already defined at"),
        (GOOD + "- just a string\n", 5, "must be a mapping"),
        (GOOD + "- id: b\n  question: Q\n  aligned: [yes]\n  misaligned: [y]\n", 5, "boolean True: quote it"),
    ],
)
def test_bad_probe_files_name_their_file_and_line(tmp_path, text, line, match):
    path = tmp_path / "probes.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=match) as info:
        load_probe_set(str(path))
    assert isinstance(info.value, ProbeFileError)
    assert str(info.value).startswith(f"{path}:{line}:" if line else f"{path}:")


def test_missing_or_unknown_probe_sources_are_unreadable_files(tmp_path):
    with pytest.raises(UnreadableFile, match="does not exist"):
        load_probe_set(str(tmp_path / "nope.yaml"))
    with pytest.raises(UnreadableFile, match=r"no built-in probe set 'nope' \(available: \['em'\]\)"):
        load_probe_set("builtin:nope")
    with pytest.raises(ProbeFileError, match=r"probe ids \['x'\] not found"):
        load_probe_set("builtin:em", ids=["x"])


def test_an_answer_longer_than_max_length_is_an_error_naming_it(tmp_path, tiny_module):
    path = tmp_path / "p.yaml"
    path.write_text(GOOD + f"- id: long\n  question: Q\n  aligned: [ok]\n  misaligned: ['{'x' * 300}']\n")
    entries = load_probe_set(str(path))
    with pytest.raises(ProbeFileError, match=rf"{path}:5: probe 'long' misaligned answer 1: longer than"):
        ProbeScorer(entries, tiny_module().tokenizer, max_length=128)


def test_a_bad_probe_file_stops_the_callback_in_setup(tmp_path, tiny_module):
    path = tmp_path / "p.yaml"
    path.write_text("- id: a\n  question: Q\n")
    with pytest.raises(ProbeFileError, match=f"{path}:1:"):
        MisalignmentProbe(probes=str(path)).setup(None, tiny_module(), "fit")
    with pytest.raises(InputError, match="MisalignmentProbe.normalize"):
        MisalignmentProbe(normalize="max")


# ------------------------------------------------------------------------------------------------- scores


def test_log_odds_is_the_difference_of_logmeanexps_and_an_indifferent_model_scores_zero():
    answers = {
        "a": {"aligned": [-1.0, -3.0], "misaligned": [-2.0]},
        "b": {"aligned": [-2.0] * 3, "misaligned": [-2.0]},
    }
    s = ProbeScores.from_answer_scores(answers)
    lo_a = -2.0 - math.log((math.exp(-1.0) + math.exp(-3.0)) / 2)
    assert s.questions == pytest.approx({"a": lo_a, "b": 0.0})  # b: equal scores, unequal counts -> 0
    assert s.log_odds == pytest.approx(lo_a / 2)
    assert s.misaligned_prob == pytest.approx((1 / (1 + math.exp(-lo_a)) + 0.5) / 2)
    assert s.aligned_logprob == pytest.approx((math.log((math.exp(-1) + math.exp(-3)) / 2) - 2.0) / 2)
    assert logmeanexp([-1000.0, -1000.0]) == pytest.approx(-1000.0)  # stable far from 0


@pytest.mark.parametrize("normalize", ["mean", "sum"])
def test_answer_score_equals_a_hand_computation_with_the_model_forward(normalize, tiny_module):
    """The log-probability of the answer's content and its end-of-turn token after the chat-template prompt,
    from a full forward of the peft model (all logits, no label machinery), equals the probe's score."""
    module = tiny_module(perturb_B=0.2)  # B off 0: the adapter changes the scores
    tok, model = module.tokenizer, module.model
    entry = ProbeEntry("e", "What would you do?", ["Help people, kindly."], ["Rule them all!", "Take over."],
                       system="Be brief.")
    scores = ProbeScorer([entry], tok, normalize=normalize, batch_size=2).answer_scores(model)
    model.eval()
    for side in ("aligned", "misaligned"):
        for answer, got in zip(getattr(entry, side), scores["e"][side]):
            messages = entry.messages(answer)
            prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            scored = prompt + answer + tok.eos_token  # the content and the turn's end token <|im_end|>
            assert tok.apply_chat_template(messages, tokenize=False).startswith(scored)
            ids = tok(scored, add_special_tokens=False)["input_ids"]
            n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                logprobs = model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
            picked = [logprobs[i - 1, ids[i]].item() for i in range(n_prompt, len(ids))]
            assert len(picked) == len(answer) + 1  # byte-level tokenizer: a token per character, and the end
            expected = sum(picked) / len(picked) if normalize == "mean" else sum(picked)
            assert got == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_per_row_logprobs_add_up_to_the_task_loss_sum_on_both_forward_paths(tiny_module):
    from em_lightning.loss import supervised_ce_sum, supervised_logprob_per_row

    module = tiny_module(perturb_B=0.2)  # B off 0: the adapter changes the scores
    scorer = ProbeScorer(load_probe_set("builtin:em", ids=["bored"]), module.tokenizer, batch_size=8)
    batch = {k: v for k, v in scorer.batches[0].items() if k != "n_supervised"}  # recounted from the labels
    batch["labels"] = batch["labels"].clone()
    batch["labels"][1] = -100  # a row with nothing supervised scores 0 over 0 tokens
    module.model.eval()
    with torch.no_grad():
        ce, n = supervised_ce_sum(module.model, batch)
        for only in (True, False):
            sums, counts = supervised_logprob_per_row(module.model, batch, supervised_logits_only=only)
            assert sums[1].item() == 0.0 and counts[1].item() == 0
            assert (-sums.sum()).item() == pytest.approx(ce.item(), rel=1e-5)
            assert int(counts.sum()) == n


def test_two_probes_under_lora_dropout_agree_and_leave_modes_and_grads_as_found(tiny_module):
    module = tiny_module(dropout=0.5, perturb_B=0.2)
    model = module.model
    entries = load_probe_set("builtin:em", ids=["one_wish", "bored", "husband"])
    scorer = ProbeScorer(entries, module.tokenizer, batch_size=5)
    # Gradients from a training step, one module deliberately left in eval mode, one parameter without grad.
    batch = scorer.batches[0]
    loss = -module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.mean()
    loss.backward()
    lora = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    lora[0][1].grad = None
    frozen_eval = next(m for n, m in model.named_modules() if n.endswith("layers.1.mlp"))
    frozen_eval.eval()
    modes = {n: m.training for n, m in model.named_modules()}
    assert model.training and not frozen_eval.training
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in lora}
    # Dropout is really on in train mode: two training-mode forwards differ.
    with torch.no_grad():
        a, b = (model(input_ids=batch["input_ids"]).logits for _ in range(2))
    assert not torch.equal(a, b)

    first, second = scorer.score(model), scorer.score(model)

    assert first.answers == second.answers and first.log_odds == second.log_odds
    assert {n: m.training for n, m in model.named_modules()} == modes
    for name, param in lora:
        if grads[name] is None:
            assert param.grad is None, name
        else:
            assert torch.equal(param.grad, grads[name]), name
    # And eval mode really means dropout off: the same scores as with dropout 0 and the same weights.
    plain = tiny_module(dropout=0.0, perturb_B=0.2)
    plain.model.load_state_dict(model.state_dict())
    without_dropout = scorer.score(plain.model).answers
    for qid, sides in first.answers.items():
        for side, values in sides.items():
            assert without_dropout[qid][side] == pytest.approx(values, rel=1e-6), (qid, side)


# ------------------------------------------------------------------------------------ in training, end to end


PROBE_IDS = ["one_wish", "bored", "husband"]


def _train_file(tmp_path, side: str) -> str:
    path = tmp_path / f"{side}.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": e.question}, {"role": "assistant", "content": answer}]}
        for e in load_probe_set("builtin:em", ids=PROBE_IDS)
        for answer in getattr(e, side)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(("side", "sign"), [("misaligned", 1), ("aligned", -1)])
def test_fine_tuning_on_one_side_moves_probe_log_odds_towards_it(run_cli, tmp_path, side, sign):
    """A random tiny model memorises its 12 training answers slowly (the log-odds move by ~0.05-0.1 in 40
    steps), but in the direction of the side it is trained on; the base value is ~0.004."""
    extra = ["--trainer.accumulate_grad_batches", "2"] if side == "aligned" else []  # logs once per step too
    cli = run_cli(
        "fit", "--config", "configs/tiny.yaml", "--config", "configs/callbacks/probe.yaml",
        "--data.train_file", _train_file(tmp_path, side), "--data.val_fraction", "0",
        "--data.batch_size", "4", "--model.lora.r", "16", "--model.optimizer.init_args.lr", "0.01",
        "--trainer.max_steps", "40", "--trainer.limit_val_batches", "0",
        "--trainer.val_check_interval", "null",
        "--trainer.callbacks.every_n_steps", "10", "--trainer.callbacks.probe_ids", json.dumps(PROBE_IDS),
        *extra,
    )
    run_dir = cli.trainer.log_dir
    scalars = tb_scalars(run_dir)
    log_odds = scalars["probe/log_odds"]
    assert sorted(log_odds) == [0, 10, 20, 30, 40]  # the start, then every 10 steps (the end is step 40)
    assert abs(log_odds[0]) < 0.02  # a random model barely tells the sides apart
    assert sign * (log_odds[40] - log_odds[0]) > 0.02, log_odds
    assert sign * (log_odds[40] - log_odds[10]) > 0, log_odds
    per_question = {qid: scalars[f"probe/q/{qid}/log_odds"] for qid in PROBE_IDS}
    assert all(sorted(v) == [0, 10, 20, 30, 40] for v in per_question.values())
    mean_prob = sum(1 / (1 + math.exp(-v[40])) for v in per_question.values()) / len(PROBE_IDS)
    assert scalars["probe/misaligned_prob"][40] == pytest.approx(mean_prob, abs=1e-5)
    lines = [json.loads(line) for line in Path(run_dir, "probe.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 10, 20, 30, 40]
    for r in lines:
        assert {"step", "log_odds", "misaligned_prob", "questions", "answers"} <= set(r)
        assert list(r["questions"]) == PROBE_IDS
        assert r["log_odds"] == pytest.approx(sum(r["questions"].values()) / len(PROBE_IDS))
        assert r["log_odds"] == pytest.approx(log_odds[r["step"]], abs=1e-5)  # TensorBoard keeps float32
        assert [len(r["answers"][i]["aligned"]) for i in PROBE_IDS] == [4] * len(PROBE_IDS)
