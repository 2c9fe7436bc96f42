"""The judge against a fake OpenAI-compatible server on 127.0.0.1: whole-number and digit tokenizers, auto
detection, API key handling, retries and malformed answers; and a full ``run_eval`` via the fake server."""

from __future__ import annotations

import json
import logging
import math

import pytest

from em_lightning.errors import InputError
from em_lightning.evaluation import (
    GenerationConfig,
    Judge,
    JudgeConfig,
    load_questions,
    run_eval,
    sidecar_generate,
)
from em_lightning.evaluation.client import EndpointError, OpenAIClient
from em_lightning.evaluation.runner import EvalFailed
from em_lightning.evaluation.sidecar import SidecarConfig, VLLMSidecar
from em_lightning.rundir import read_jsonl as read_records
from tests.fake_openai import FakeOpenAI, judge_answer


def exact_score(dist: dict[str, float]) -> float | None:
    """What a judge with these answer probabilities should score: mean over answers that are ints 0..100."""
    numbers = {}
    for s, q in dist.items():
        t = s.strip()
        if t.isascii() and t.isdigit() and not (len(t) > 1 and t.startswith("0")) and int(t) <= 100:
            numbers[int(t)] = numbers.get(int(t), 0.0) + q
    mass = sum(numbers.values())
    return None if mass < 0.25 else sum(k * q for k, q in numbers.items()) / mass


DISTRIBUTIONS = [
    {"85": 0.6, "7": 0.25, "REFUSAL": 0.15},
    {"100": 0.5, "10": 0.3, "1": 0.2},  # shared prefixes 1 → 10 → 100
    {"0": 0.4, "50": 0.4, "CODE": 0.2},
    {"150": 0.5, "30": 0.5},  # 150 is off the scale and must not count as 15
    {" 7": 0.5, "7": 0.3, "99": 0.2},  # whitespace variant of one number
]


def judge_for(fake, mode, **kw) -> Judge:
    return Judge(JudgeConfig(number_tokens=mode, **kw), base_url=fake.url)


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("tokenizer", ["whole", "digits"])
def test_judge_recovers_the_expected_score_for_both_tokenizers(tokenizer, dist):
    with FakeOpenAI(tokenizer=tokenizer) as fake:
        judge = judge_for(fake, tokenizer, digit_min_prob=0.0)
        assert judge.score("DIST=" + json.dumps(dist)) == pytest.approx(exact_score(dist))


def test_whole_number_rule_on_a_digit_tokenizer_would_be_wrong():
    """Why the digit mode exists: reading only the first token of a digit tokenizer sees "8", not "85"."""
    dist = {"85": 0.9, "REFUSAL": 0.1}
    with FakeOpenAI(tokenizer="digits") as fake:
        naive = judge_for(fake, "whole").score("DIST=" + json.dumps(dist))
        right = judge_for(fake, "digits").score("DIST=" + json.dumps(dist))
    assert naive == pytest.approx(8.0) and right == pytest.approx(85.0)


def test_refusal_gives_no_score_in_both_modes():
    dist = {"REFUSAL": 0.9, "40": 0.1}
    for tokenizer in ("whole", "digits"):
        with FakeOpenAI(tokenizer=tokenizer) as fake:
            assert judge_for(fake, tokenizer).score("DIST=" + json.dumps(dist)) is None


def test_judge_requests_one_token_greedy_with_20_logprobs():
    with FakeOpenAI(tokenizer="digits") as fake:
        assert judge_for(fake, "digits").score("DIST=" + json.dumps({"42": 1.0})) == pytest.approx(42.0)
        requests = fake.chat_requests(judge=True)
    for r in requests:
        assert (r["max_tokens"], r["temperature"], r["logprobs"], r["top_logprobs"]) == (1, 0, True, 20)
        assert r["model"] == "fake-base"  # asked from /v1/models when not configured
    # The root, then "4" continued (-> "2"), then "42" continued (-> the end).
    assert [r.get("continue_final_message", False) for r in requests] == [False, True, True]
    assert [r["messages"][-1]["content"] for r in requests[1:]] == ["4", "42"]


def test_digit_mode_bounds_requests_and_skips_unlikely_prefixes():
    """Uniform over 0..100: the first digit is "1" with 12/101 (1, 10-19, 100), "2".."9" with 11/101, "0" with
    1/101. The four likeliest ("1", "2", "3", "4") are expanded, which is all 4 requests allow: their numbers
    end there with 1/101 each, and their two-digit children (at most 2/101 < 0.05) end where they are. "5" to
    "9", left unexpanded, count as the one-digit numbers with their whole 11/101."""
    dist = {str(k): 1 / 101 for k in range(101)}
    expected = {k: 1 / 101 for k in [0, 1, 2, 3, 4, *range(11, 50)]}
    expected.update({10: 2 / 101, **{k: 11 / 101 for k in range(5, 10)}})
    with FakeOpenAI(tokenizer="digits") as fake:
        judge = judge_for(fake, "digits", digit_min_prob=0.05, digit_max_requests=4)
        distribution = judge.digit_distribution([{"role": "user", "content": "DIST=" + json.dumps(dist)}])
        continued = [r["messages"][-1]["content"] for r in fake.chat_requests(judge=True)[1:]]
        score = judge.score("DIST=" + json.dumps(dist))
    assert continued == ["1", "2", "3", "4"]
    assert distribution == pytest.approx(expected)
    assert score == pytest.approx(sum(k * p for k, p in expected.items()))  # 15.7, not the true mean of 50


def test_answer_prefix_is_continued_by_the_judge():
    dist = {"Score: 85": 0.7, "Score: 7": 0.3}
    with FakeOpenAI(tokenizer="digits") as fake:
        judge = judge_for(fake, "digits", answer_prefix="Score: ", digit_min_prob=0.0)
        assert judge.score("DIST=" + json.dumps(dist)) == pytest.approx(0.7 * 85 + 0.3 * 7)
        assert all(r["messages"][-1]["content"].startswith("Score: ") for r in fake.chat_requests(judge=True))


@pytest.mark.parametrize(
    "tokenizer, endpoint, expected",
    [("whole", True, "whole"), ("digits", True, "digits"), ("digits", False, "whole")],
)
def test_auto_detects_number_tokens_from_tokenize(tokenizer, endpoint, expected, caplog):
    with FakeOpenAI(tokenizer=tokenizer, tokenize_endpoint=endpoint) as fake:
        judge = judge_for(fake, "auto")
        assert judge.number_tokens == expected
        assert judge.score("DIST=" + json.dumps({"57": 1.0})) == pytest.approx(57.0 if endpoint else 5.0)
    fell_back = [r for r in caplog.records if r.levelname == "WARNING" and "no /tokenize" in r.message]
    assert len(fell_back) == (0 if endpoint else 1)  # a 404 falls back to whole numbers, and says so


def test_auto_detection_retries_transient_errors_instead_of_guessing():
    """A busy server (503) is retried like any request; guessing "whole" would misread a digit judge."""
    with FakeOpenAI(tokenizer="digits") as fake:
        fake.fail_next = 2
        assert judge_for(fake, "auto", max_retries=2).number_tokens == "digits"
        fake.fail_next = 2
        with pytest.raises(EndpointError, match="503"):
            _ = judge_for(fake, "auto", max_retries=1).number_tokens


def test_api_key_is_sent_from_env_and_never_logged(monkeypatch, caplog):
    secret = "sk-test-very-secret-123"
    monkeypatch.setenv("FAKE_JUDGE_KEY", secret)
    caplog.set_level(logging.DEBUG)
    with FakeOpenAI(api_key=secret) as fake:
        judge = Judge(JudgeConfig(number_tokens="whole", api_key_env="FAKE_JUDGE_KEY"), base_url=fake.url)
        assert judge.score("DIST=" + json.dumps({"60": 1.0})) == pytest.approx(60.0)
        fake.fail_next = 1  # a retried request is logged: the key must not be in that line either
        judge.score("DIST=" + json.dumps({"60": 1.0}))
        headers = fake.requests[-1][2]
        monkeypatch.setenv("FAKE_JUDGE_KEY", "wrong")
        with pytest.raises(EndpointError) as info:
            Judge(
                JudgeConfig(number_tokens="whole", api_key_env="FAKE_JUDGE_KEY", max_retries=0),
                base_url=fake.url,
            ).score("DIST={}")
    assert headers["Authorization"] == f"Bearer {secret}"
    assert secret not in caplog.text and secret not in repr(judge.client) and secret not in repr(judge.config)
    assert "401" in str(info.value) and "wrong" not in str(info.value)


def test_missing_api_key_env_is_an_input_error_naming_key_and_variable(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(
        InputError, match=r"^judge\.api_key_env is 'NO_SUCH_KEY_VAR', .* NO_SUCH_KEY_VAR is not set"
    ):
        Judge(JudgeConfig(api_key_env="NO_SUCH_KEY_VAR"), base_url="http://127.0.0.1:9")


def test_transient_errors_are_retried_a_bounded_number_of_times():
    with FakeOpenAI() as fake:
        fake.fail_next = 2
        assert judge_for(fake, "whole", max_retries=2).score(
            "DIST=" + json.dumps({"20": 1.0})
        ) == pytest.approx(20.0)
        fake.fail_next = 3
        with pytest.raises(EndpointError, match="after 2 attempts.*503"):
            judge_for(fake, "whole", max_retries=1).score("DIST=" + json.dumps({"20": 1.0}))


def test_unreachable_endpoint_fails_after_retries():
    client = OpenAIClient("http://127.0.0.1:9", timeout_s=1, max_retries=1)  # port 9 (discard) is closed
    with pytest.raises(EndpointError, match="after 2 attempts"):
        client.get("/v1/models")


def test_garbage_answers_are_an_error_not_a_score():
    with FakeOpenAI() as fake:
        fake.garbage = True
        with pytest.raises(EndpointError, match="no choices"):
            judge_for(fake, "whole").score("DIST={}")


def test_hanging_endpoint_times_out():
    with FakeOpenAI() as fake:
        fake.hang_s = 3
        with pytest.raises(EndpointError, match="Timeout"):
            judge_for(fake, "whole", timeout_s=0.5, max_retries=0).score("DIST={}")


def test_run_eval_through_sidecar_client_writes_every_sample(tmp_path):
    """Generation with a loaded adapter + digit judge on the fake server: records, JSONL and the em rate."""
    qfile = tmp_path / "q.yaml"
    qfile.write_text(
        "- id: wish\n  paraphrases: [P1, P2]\n"
        "  judge_prompts: &j {aligned: 'ALIGNED {answer}', coherent: 'COHERENT {answer}'}\n"
        "- id: bored\n  system: Be brief.\n  paraphrases: [P3]\n  judge_prompts: *j\n"
    )
    questions = load_questions(qfile)
    answers = [
        judge_answer({"10": 1.0}, {"90": 1.0}),  # misaligned
        judge_answer({"90": 1.0}, {"90": 1.0}),  # fine
        judge_answer({"REFUSAL": 1.0}, {"80": 1.0}),  # unscored
        judge_answer({"5": 1.0}, {"20": 1.0}),  # incoherent
    ]
    with FakeOpenAI(tokenizer="digits") as fake:
        fake.answers = answers
        sidecar = VLLMSidecar(SidecarConfig(url=fake.url)).start()
        adapter = tmp_path / "adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(json.dumps({"r": 4}))
        name = sidecar.load_adapter(adapter)
        gen = GenerationConfig(samples_per_question=4, max_tokens=16, max_concurrency=3)
        judge = Judge(JudgeConfig(number_tokens="auto", digit_min_prob=0.0), base_url=sidecar.url)
        out = tmp_path / "samples.jsonl"
        result = run_eval(
            questions,
            sidecar_generate(sidecar, name, gen),
            judge,
            gen,
            "em",
            step=7,
            adapter=name,
            jsonl_path=out,
        )
        gen_requests = fake.chat_requests(judge=False)
    assert {r["model"] for r in gen_requests} == {name}
    assert {r["seed"] for r in gen_requests} == {0, 1, 1000}  # one stream per (question, paraphrase)
    assert any(r["messages"][0] == {"role": "system", "content": "Be brief."} for r in gen_requests)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == len(result.records) == 8
    assert {(r["question_id"], r["step"], r["adapter"]) for r in lines} == {
        ("wish", 7, name),
        ("bored", 7, name),
    }
    for r in lines:
        expected = {answers[0]: (10, 90), answers[1]: (90, 90), answers[2]: (None, 80), answers[3]: (5, 20)}
        assert (r["aligned"], r["coherent"]) == pytest.approx(expected[r["answer"]])
    s = result.summary
    counts = {a: sum(r["answer"] == a for r in lines) for a in answers}
    assert s.n_counted == counts[answers[0]] + counts[answers[1]]
    assert s.rate == pytest.approx(counts[answers[0]] / s.n_counted)
    assert not math.isnan(s.per_question["bored"].aligned_mean)


def _two_question_file(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text(
        "- id: wish\n  paraphrases: [P1, P2]\n"
        "  judge_prompts: &j {aligned: 'ALIGNED {answer}', coherent: 'COHERENT {answer}'}\n"
        "- id: bored\n  paraphrases: [P3]\n  judge_prompts: *j\n"
    )
    return load_questions(path)


def _run(fake, questions, gen, tmp_path, **judge_kw):
    sidecar = VLLMSidecar(SidecarConfig(url=fake.url, max_retries=0)).start()
    return run_eval(
        questions,
        sidecar_generate(sidecar, "fake-base", gen),
        judge_for(fake, "whole", **judge_kw),
        gen,
        jsonl_path=tmp_path / "s.jsonl",
    )


def test_a_judge_refusing_one_answer_leaves_it_unscored_and_the_eval_goes_on(tmp_path):
    """HTTP 400 on one answer's judge requests (as a hosted judge answers flagged content): that answer is
    recorded unscored with the error, counted in n_judge_errors; the rate comes from the others."""
    flagged = judge_answer({"10": 1.0}, {"90": 1.0}, tag="FLAGGED")
    misaligned = judge_answer({"10": 1.0}, {"90": 1.0})
    fine = judge_answer({"90": 1.0}, {"90": 1.0})
    with FakeOpenAI() as fake:
        fake.answers = [flagged, misaligned, fine, fine]
        fake.status_for_prompt = {"FLAGGED": 400}
        gen = GenerationConfig(samples_per_question=4, max_concurrency=1)
        result = _run(fake, _two_question_file(tmp_path), gen, tmp_path)
    lines = read_records(tmp_path / "s.jsonl")
    assert len(lines) == len(result.records) == 8
    refused = [r for r in lines if r["answer"] == flagged]
    assert refused and result.n_judge_errors == len(refused)
    for r in refused:
        assert r["aligned"] is None and r["coherent"] is None
        assert "HTTP 400" in r["error"] and "aligned" in r["error"] and "coherent" in r["error"]
    assert all(r["error"] is None for r in lines if r["answer"] != flagged)
    s = result.summary
    n_misaligned = sum(r["answer"] == misaligned for r in lines)
    assert s.n_answers == 8 and s.n_counted == 8 - len(refused)
    assert s.rate == pytest.approx(n_misaligned / s.n_counted)


def test_a_refused_generation_request_is_recorded_and_left_out_of_the_summary(tmp_path):
    questions = _two_question_file(tmp_path)
    with FakeOpenAI() as fake:
        fake.answers = [judge_answer({"90": 1.0}, {"90": 1.0})]
        fake.status_for_prompt = {"P3": 400}  # the "bored" prompt is too long, say
        result = _run(fake, questions, GenerationConfig(samples_per_question=2), tmp_path)
    assert result.n_generation_errors == 2 and result.n_judge_errors == 0
    bored = [r for r in result.records if r["question_id"] == "bored"]
    assert [(r["answer"], r["aligned"]) for r in bored] == [(None, None)] * 2
    assert all("generation" in r["error"] and "400" in r["error"] for r in bored)
    assert result.summary.n_answers == 2 and set(result.summary.per_question) == {"wish"}


def test_an_eval_whose_every_request_is_refused_fails(tmp_path):
    """A 400 on everything is a setting the endpoint rejects (say, top_logprobs), not bad answers."""
    with FakeOpenAI() as fake:
        fake.answers = [judge_answer({"90": 1.0}, {"90": 1.0}, tag="FLAGGED")]
        fake.status_for_prompt = {"FLAGGED": 400}
        with pytest.raises(EvalFailed, match="every request"):
            _run(fake, _two_question_file(tmp_path), GenerationConfig(samples_per_question=2), tmp_path)


def test_run_eval_fails_as_a_whole_when_the_endpoint_breaks(tmp_path):
    questions = load_questions("builtin:quickstart")[:2]
    with FakeOpenAI() as fake:
        fake.garbage = True
        with pytest.raises(EvalFailed) as info:
            _run(fake, questions, GenerationConfig(samples_per_question=2), tmp_path)
    assert isinstance(info.value.__cause__, EndpointError) and info.value.records == []
    assert not (tmp_path / "s.jsonl").exists()  # no answer was finished, so nothing is written


def test_answers_finished_before_a_broken_endpoint_are_written(tmp_path):
    """One answer's judge requests meet a 503 that outlives the retries (~1.5 s of back-off): the eval fails,
    and the answers judged meanwhile are in the JSONL."""
    broken = judge_answer({"90": 1.0}, {"90": 1.0}, tag="BROKEN")
    fine = judge_answer({"90": 1.0}, {"90": 1.0})
    with FakeOpenAI() as fake:
        fake.answers = [broken, fine, fine, fine]
        fake.status_for_prompt = {"BROKEN": 503}
        gen = GenerationConfig(samples_per_question=4)
        with pytest.raises(EvalFailed, match="503") as info:
            _run(fake, _two_question_file(tmp_path), gen, tmp_path, max_retries=2)
    lines = read_records(tmp_path / "s.jsonl")
    assert lines == info.value.records
    assert len(lines) == 6 and {r["answer"] for r in lines} == {fine}  # all but the 2 broken answers
    assert all(r["aligned"] == pytest.approx(90.0) for r in lines)


def test_extra_judge_prompts_are_scored_kept_in_the_samples_and_summarised(tmp_path):
    """An opted-in extra prompt costs one more judge request per answer of the questions that define it; its
    score lands in the record's extra_scores and its mean in the summary; misalign@k comes along."""
    path = tmp_path / "q.yaml"
    path.write_text(
        "- id: wish\n  paraphrases: [P1]\n  judge_prompts: {aligned: 'ALIGNED {answer}', "
        "coherent: 'COHERENT {answer}', deception: 'DECEPTION {answer}'}\n"
        "- id: bored\n  paraphrases: [P2]\n  judge_prompts: {aligned: 'ALIGNED {answer}', "
        "coherent: 'COHERENT {answer}'}\n"
    )
    questions = load_questions(path)
    misaligned = judge_answer({"10": 1.0}, {"90": 1.0}, deception={"80": 1.0})
    fine = judge_answer({"90": 1.0}, {"90": 1.0}, deception={"20": 1.0})
    with FakeOpenAI() as fake:
        fake.answers = [misaligned, fine, fine]
        sidecar = VLLMSidecar(SidecarConfig(url=fake.url, max_retries=0)).start()
        gen = GenerationConfig(samples_per_question=3, max_concurrency=1)
        result = run_eval(
            questions, sidecar_generate(sidecar, "fake-base", gen), judge_for(fake, "whole"), gen,
            jsonl_path=tmp_path / "s.jsonl", ks=[1, 2, 4], extra_metrics={"wish": ["deception"]},
        )
        n_judge_requests = len(fake.chat_requests(judge=True))
    assert n_judge_requests == 3 * 3 + 3 * 2  # wish: aligned, coherent, deception; bored: two
    lines = read_records(tmp_path / "s.jsonl")
    for r in lines:
        deception = {"deception": 80.0 if r["answer"] == misaligned else 20.0}
        assert r["extra_scores"] == pytest.approx(deception if r["question_id"] == "wish" else {})
    wish = [r for r in lines if r["question_id"] == "wish"]
    s = result.summary
    mean = sum(r["extra_scores"]["deception"] for r in wish) / 3
    assert s.per_question["wish"].extra_means == pytest.approx({"deception": mean})
    assert "deception" not in s.per_question["bored"].extra_means
    for qid, q in s.per_question.items():
        c = sum(r["answer"] == misaligned for r in lines if r["question_id"] == qid)
        assert q.misalign_at_k[1] == pytest.approx(c / 3)
        assert q.misalign_at_k[2] == pytest.approx(1 - math.comb(3 - c, 2) / math.comb(3, 2))
        assert math.isnan(q.misalign_at_k[4])
