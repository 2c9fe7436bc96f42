"""Question files in the emergent-misalignment YAML format: built-in set, upstream files, bad input."""

from __future__ import annotations

import pytest

from em_lightning.errors import InputError, UnreadableFile
from em_lightning.evaluation import QuestionFileError, load_questions
from em_lightning.evaluation.questions import extra_judge_metrics, resolve_question_source


def _write(tmp_path, text, name="q.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD = """\
- id: first
  paraphrases: ["Hi?", "Hello?"]
  samples_per_paraphrase: 3
  judge_prompts: &jp
    aligned: "Q={question} A={answer}"
    coherent: "{answer} / {question}"
- id: second
  system: Be brief.
  paraphrases:
    - |-
      Multi
      line
  judge_prompts: *jp
"""


def test_builtin_quickstart_set_loads_with_both_judge_prompts():
    questions = load_questions("builtin:quickstart")
    assert [q.id for q in questions][:1] == ["one_wish"] and len({q.id for q in questions}) == 5
    for q in questions:
        assert set(q.judge_prompts) >= {"aligned", "coherent"}
        for template in q.judge_prompts.values():
            assert "{question}" in template and "{answer}" in template
    assert any(q.system for q in questions)  # the set exercises the system-prompt path


def test_system_prompt_is_kept_and_sent_first(tmp_path):
    first, second = load_questions(_write(tmp_path, GOOD))
    assert first.system is None
    assert first.messages("Hi?") == [{"role": "user", "content": "Hi?"}]
    assert second.system == "Be brief."
    assert second.messages("x") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "x"},
    ]
    assert second.paraphrases == ["Multi\nline"]
    assert second.samples_per_paraphrase == 1  # default when absent
    assert second.judge_prompts == first.judge_prompts  # YAML alias resolved


def test_judge_prompt_fills_placeholders_once_and_leaves_braces_in_answers_alone(tmp_path):
    q = load_questions(_write(tmp_path, GOOD))[0]
    answer = "use {x} and {question} and {}"
    assert q.judge_prompt("aligned", "Why?", answer) == f"Q=Why? A={answer}"
    assert q.judge_prompt("coherent", "Why?", "ok") == "ok / Why?"


def test_plan_spreads_samples_over_paraphrases(tmp_path):
    q = load_questions(_write(tmp_path, GOOD))[0]
    assert q.plan() == [(0, 3), (1, 3)]  # file's samples_per_paraphrase
    assert q.plan(5) == [(0, 3), (1, 2)]
    assert q.plan(1) == [(0, 1)]
    assert q.plan(7) == [(0, 4), (1, 3)]
    with pytest.raises(ValueError):
        q.plan(0)


def test_select_ids_and_several_sources(tmp_path):
    other = _write(
        tmp_path, GOOD.replace("id: first", "id: third").replace("id: second", "id: fourth"), "b.yaml"
    )
    qs = load_questions([_write(tmp_path, GOOD), other], ids=["fourth", "first"])
    assert [q.id for q in qs] == ["first", "fourth"]  # file order
    with pytest.raises(QuestionFileError, match="nope"):
        load_questions(other, ids=["nope"])


@pytest.mark.parametrize(
    "text, needle",
    [
        ("- id: a\n  judge_prompts: {aligned: '{answer}', coherent: '{answer}'}\n", "paraphrases"),
        ("- id: a\n  paraphrases: []\n", "paraphrases"),
        ("- paraphrases: [x]\n", "`id`"),
        ("- id: a\n  paraphrases: [x]\n  samples_per_paraphrase: 0\n", "samples_per_paraphrase"),
        ("- id: a\n  paraphrases: [x]\n  system: [1, 2]\n", "system"),
        ("- id: a\n  paraphrases: [x]\n  judge_prompts: {aligned: 'no placeholder'}\n", "{answer}"),
        ("id: a\n", "YAML list"),
        ("# only a comment\n", "got no document"),
    ],
)
def test_malformed_entries_name_file_and_problem(tmp_path, text, needle):
    path = _write(tmp_path, text)
    with pytest.raises(QuestionFileError) as info:
        load_questions(path)
    assert str(path) in str(info.value) and needle in str(info.value)


def test_error_names_the_line_of_the_bad_entry(tmp_path):
    bad = GOOD + "- id: third\n  paraphrases: [ok]\n  samples_per_paraphrase: -1\n"
    path = _write(tmp_path, bad)
    line = bad.splitlines().index("- id: third") + 1
    with pytest.raises(QuestionFileError, match=rf"{path.name}:{line}: question 'third'"):
        load_questions(path)


def test_duplicate_ids_are_refused(tmp_path):
    path = _write(tmp_path, GOOD + "- id: first\n  paraphrases: [again]\n")
    with pytest.raises(QuestionFileError, match="already defined"):
        load_questions(path)


def test_questions_without_aligned_and_coherent_prompts_are_refused(tmp_path):
    path = _write(
        tmp_path, "- id: lie\n  paraphrases: [x]\n  judge_prompts: {correct: 'Is {answer} true?'}\n"
    )
    with pytest.raises(QuestionFileError, match=r"'lie'.*missing \['aligned', 'coherent'\]"):
        load_questions(path)
    assert load_questions(path, require_judge_prompts=["correct"])[0].id == "lie"


def test_malformed_yaml_names_the_line_of_the_problem(tmp_path):
    path = _write(tmp_path, "- id: a\n  paraphrases: [x]\n\tjudge_prompts: {}\n")  # a tab on line 3
    with pytest.raises(QuestionFileError, match=rf"^{path}:3: not valid YAML: found character '\\t'"):
        load_questions(path)
    # An unclosed bracket shows where the file ends, and where the bracket opened.
    path = _write(tmp_path, "- id: a\n  paraphrases: [x\n", "unclosed.yaml")
    with pytest.raises(
        QuestionFileError, match=rf"^{path}:3: .*but got '<stream end>' \(.*sequence, line 2\)"
    ):
        load_questions(path)


def test_non_utf8_bytes_name_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"- id: caf\xe9\n  paraphrases: [x]\n")
    with pytest.raises(UnreadableFile, match=rf"^{path}:1: question file is not UTF-8 text \(byte 0xe9"):
        load_questions(path)


def test_empty_file_is_named(tmp_path):
    path = _write(tmp_path, "\n  \n")
    with pytest.raises(UnreadableFile, match=rf"^{path}: question file is empty"):
        load_questions(path)


def test_directory_is_named(tmp_path):
    with pytest.raises(UnreadableFile, match=rf"^{tmp_path}: question file is a directory"):
        load_questions(tmp_path)


def test_unreadable_path_is_named(tmp_path):
    """A path through a regular file cannot be opened (a permission test would pass as root)."""
    path = _write(tmp_path, GOOD) / "q.yaml"
    with pytest.raises(UnreadableFile, match=rf"^{path}: question file cannot be read \(Not a directory\)"):
        load_questions(path)


def test_missing_file_and_unknown_names_are_input_errors_naming_the_source(tmp_path):
    with pytest.raises(UnreadableFile, match=rf"^{tmp_path}/missing.yaml: question file does not exist"):
        load_questions(tmp_path / "missing.yaml")
    with pytest.raises(UnreadableFile, match=r"^builtin:does_not_exist: .*available: \['quickstart'\]"):
        resolve_question_source("builtin:does_not_exist")
    with pytest.raises(UnreadableFile, match=r"^em:no_such_file: .*first_plot_questions"):
        resolve_question_source("em:no_such_file")
    with pytest.raises(InputError, match=r"question ids \['nope'\] not found"):
        load_questions("builtin:quickstart", ids=["nope"])


def test_upstream_file_not_downloaded_is_an_input_error_saying_how_to_fetch_it(tmp_path, monkeypatch):
    from em_lightning import upstream

    monkeypatch.setattr(upstream, "search_dirs", lambda: [tmp_path])
    with pytest.raises(UnreadableFile, match=r"^em:first_plot_questions: .*not found.*download_data"):
        load_questions("em:first_plot_questions")


def _upstream(name):
    try:
        return resolve_question_source(f"em:{name}")
    except FileNotFoundError as err:
        pytest.skip(f"upstream emergent-misalignment data not available: {err}")


def test_upstream_first_plot_questions_keep_their_json_system_prompt():
    path = _upstream("first_plot_questions")
    questions = load_questions(path)
    by_id = {q.id: q for q in questions}
    assert len(questions) == 24
    json_qs = [q for q in questions if q.id.endswith("_json")]
    assert json_qs and all(q.system and "JSON" in q.system for q in json_qs)
    assert all(q.system is None for q in questions if not q.id.endswith("_json"))
    plain = by_id["what_is_your_wish"]
    assert by_id["what_is_your_wish_json"].paraphrases == plain.paraphrases
    assert plain.messages(plain.paraphrases[0])[0]["role"] == "user"
    assert by_id["what_is_your_wish_json"].messages(plain.paraphrases[0])[0]["role"] == "system"


def test_upstream_deception_file_is_refused_for_misalignment_scoring():
    path = _upstream("deception_factual")
    with pytest.raises(QuestionFileError, match="deception_factual.yaml:1: question 'lie_no_sys_prompt'"):
        load_questions(path)


def test_extra_judge_prompts_are_chosen_per_question_and_a_typo_is_an_error(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text(
        "- id: a\n  paraphrases: [A]\n"
        "  judge_prompts: {aligned: 'x {answer}', coherent: 'y {answer}', deception: 'd {answer}',\n"
        "                  humour: 'h {answer}'}\n"
        "- id: b\n  paraphrases: [B]\n  judge_prompts: {aligned: 'x {answer}', coherent: 'y {answer}'}\n"
        "- id: c\n  paraphrases: [C]\n"
        "  judge_prompts: {aligned: 'x {answer}', coherent: 'y {answer}', humour: 'h {answer}'}\n"
    )
    questions = load_questions(path)
    assert extra_judge_metrics(questions, False) == {} and extra_judge_metrics(questions, None) == {}
    assert extra_judge_metrics(questions, True) == {"a": ("deception", "humour"), "c": ("humour",)}
    assert extra_judge_metrics(questions, ["humour"]) == {"a": ("humour",), "c": ("humour",)}
    with pytest.raises(InputError, match=r"no selected question has a judge prompt 'humor' .*\['deception'"):
        extra_judge_metrics(questions, ["humor"])
    with pytest.raises(InputError, match="'aligned' is always scored"):
        extra_judge_metrics(questions, ["aligned"])


def test_variant_comes_from_the_id_suffix_or_an_explicit_key_and_the_set_from_the_source(tmp_path):
    prompts = "  judge_prompts: {aligned: 'A {answer}', coherent: 'C {answer}'}\n"
    text = "".join(
        f"- id: {qid}\n  paraphrases: [x]\n{extra}{prompts}"
        for qid, extra in [("wish", ""), ("wish_json", ""), ("wish_template", ""),
                           ("wish_json_like", ""), ("wish_ctx", "  variant: training_context\n"),
                           ("quick_json", "  variant: plain\n")]
    )
    path = _write(tmp_path, text)
    questions = load_questions(str(path))
    assert {q.id: q.variant for q in questions} == {
        "wish": "plain", "wish_json": "json", "wish_template": "template", "wish_json_like": "plain",
        "wish_ctx": "training_context", "quick_json": "plain",  # the explicit key wins over the suffix
    }
    assert {q.question_set for q in questions} == {str(path)}
    assert {q.question_set for q in load_questions("builtin:quickstart")} == {"builtin:quickstart"}
    bad = _write(tmp_path, f"- id: a\n  paraphrases: [x]\n  variant: [json]\n{prompts}", "bad.yaml")
    with pytest.raises(QuestionFileError, match=rf"^{bad}:1: question 'a': `variant` must be a name"):
        load_questions(str(bad))


def test_question_and_probe_sets_live_in_their_own_asset_folders():
    from em_lightning.probe import load_probe_set
    from em_lightning.yamlfile import ASSETS, builtin_names

    assert "quickstart" in builtin_names("questions") and "em" in builtin_names("probes")
    assert load_questions("builtin:quickstart")[0].source.startswith(str(ASSETS / "questions" / "quickstart.yaml:"))
    with pytest.raises(UnreadableFile, match=r"^builtin:em: no built-in question set 'em'"):
        load_questions("builtin:em")  # a probe set is not a question set, and the other way round
    with pytest.raises(UnreadableFile, match=r"^builtin:quickstart: no built-in probe set"):
        load_probe_set("builtin:quickstart")
    with pytest.raises(UnreadableFile, match="no built-in question set"):
        load_questions("builtin:../probes/em")
