"""Interleaved data (``data.mix``): exact mixed share per step counted from the batches, independence from the
split (accumulation, ranks), mid-epoch resume, the selector hook, validation from narrow rows only, the narrow-row
loss, the data summary, and the adapter under accumulation and 2-process DDP."""

from __future__ import annotations

import json
import math
from collections import Counter
from fractions import Fraction
from pathlib import Path

import lightning as L
import pytest
import torch

from em_lightning.batching import ChatCollator, MicroBatch, ResumableDataLoader, StepSampler, TokenizedDataset
from em_lightning.data import ALIGNED_FILE, ChatDataModule, TokenizedRow, load_rows, tokenize_rows
from em_lightning.errors import InputError
from em_lightning.loss import supervised_ce_sum
from em_lightning.mixing import MixSelector, MixSource, RandomSelector, task_ce_sums
from em_lightning.tiny import tiny_tokenizer


def _expected_used(steps: int, fraction: float, global_batch: int) -> int:
    """The spec: round(s · f · G), halves rounded up, in exact arithmetic."""
    return math.floor(steps * Fraction(str(fraction)) * global_batch + Fraction(1, 2))


def _mixed_dataset(narrow: int, mixed: list[int]) -> TokenizedDataset:
    """``narrow`` rows then the rows of each mixed set; a row's first token is its index, lengths vary."""
    rows = []
    for i in range(narrow + sum(mixed)):
        n = (i * 7) % 13 + 3
        ids = torch.full((n,), 1, dtype=torch.long)
        ids[0] = i
        labels = torch.full((n,), -100, dtype=torch.long)
        labels[1::2] = 1
        rows.append(TokenizedRow(ids, labels, str(i), False))
    return TokenizedDataset(rows, narrow_rows=narrow)


def _sources(ds: TokenizedDataset, sizes: list[int], fractions: list[float], seed: int = 0) -> list[MixSource]:
    out, offset = [], ds.narrow_rows
    for i, (size, fraction) in enumerate(zip(sizes, fractions)):
        rows = ds.rows[offset : offset + size]
        out.append(MixSource(f"set{i}", fraction, offset, RandomSelector(rows, [None] * size, seed + i)))
        offset += size
    return out


def _steps_from_batches(ds, sizes, fractions, batch_size, accumulate, world, epochs) -> list[list[tuple[int, bool]]]:
    """Every optimizer step's (row, mixed flag) pairs, read from the collated batches of every rank."""
    loaders = []
    for rank in range(world):
        sampler = StepSampler(ds, batch_size, accumulate, True, seed=3, num_replicas=world, rank=rank,
                              mix=_sources(ds, sizes, fractions))
        loaders.append(ResumableDataLoader(ds, sampler, ChatCollator(0)))
    steps = []
    for epoch in range(epochs):
        for loader in loaders:
            loader.sampler.set_epoch(epoch)
        for batches in zip(*loaders, strict=True):
            if batches[0]["window_pos"] == 0:
                steps.append([])
            for b in batches:
                steps[-1] += list(zip(b["input_ids"][:, 0].tolist(), b["mixed"].tolist()))
    return steps


@pytest.mark.parametrize("batch_size,accumulate,world", [(8, 1, 1), (2, 4, 1), (4, 1, 2), (2, 2, 2)])
def test_each_step_takes_exactly_the_cumulative_rounded_share(batch_size, accumulate, world):
    """Counted from the batches over 3 epochs, with two sets at 5 % and 13 % of G = 8: after s steps exactly
    round(s·f·G) rows of each set; every step has G rows but an epoch's last; every narrow row once per epoch;
    each set's rows once per pass; the mixed flag marks exactly the mixed rows; the rows of each step do not
    depend on the split into micro-batches and ranks."""
    narrow, sizes, fractions = 61, [5, 7], [0.05, 0.13]
    ds = _mixed_dataset(narrow, sizes)
    steps = _steps_from_batches(ds, sizes, fractions, batch_size, accumulate, world, epochs=3)
    reference = _steps_from_batches(ds, sizes, fractions, 8, 1, 1, epochs=3)
    assert [sorted(s) for s in steps] == [sorted(s) for s in reference]
    bounds = [narrow, narrow + sizes[0], narrow + sum(sizes)]
    used = [0, 0]
    per_set_order: list[list[int]] = [[], []]
    narrow_seen: list[int] = []
    epoch_ends = []
    for s, rows in enumerate(steps, start=1):
        assert all(flag == (row >= narrow) for row, flag in rows)
        for k in range(2):
            mine = [row for row, _ in rows if bounds[k] <= row < bounds[k + 1]]
            used[k] += len(mine)
            per_set_order[k] += mine
            assert used[k] == _expected_used(s, fractions[k], 8), (s, k)
        narrow_seen += [row for row, _ in rows if row < narrow]
        if len(narrow_seen) % narrow == 0:
            epoch_ends.append(s)
        else:
            assert len(rows) == 8, s  # only an epoch's last step may be short
    assert len(epoch_ends) == 3 and len(narrow_seen) == 3 * narrow
    for epoch in range(3):
        assert sorted(narrow_seen[epoch * narrow : (epoch + 1) * narrow]) == list(range(narrow))
    assert used[1] > 2 * sizes[1]  # the second set was gone through more than twice
    for k, size in enumerate(sizes):
        full_passes = len(per_set_order[k]) // size
        for p in range(full_passes):
            assert sorted(per_set_order[k][p * size : (p + 1) * size]) == list(range(bounds[k], bounds[k + 1]))


def test_epochs_differ_in_length_when_the_rounding_carries_over():
    """With 20 narrow rows, G = 4 and 30 % mixed, epochs take 7, 8, 7, 8 steps (the rounding runs across epochs)."""
    ds = _mixed_dataset(20, [9])
    sampler = StepSampler(ds, 4, mix=_sources(ds, [9], [0.3]))
    lengths = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        lengths.append(len(sampler.step_rows()))
    assert lengths == [7, 8, 7, 8]


class _RowLog(L.LightningModule):
    """Records the (token ids, mixed) pairs of the rows of every training batch."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[list[tuple[tuple[int, ...], bool]]] = []

    def training_step(self, batch, batch_idx):
        lengths = batch["attention_mask"].sum(1).tolist()
        ids = [tuple(batch["input_ids"][i, :n].tolist()) for i, n in enumerate(lengths)]
        self.seen.append(list(zip(ids, batch["mixed"].tolist())))
        return (self.w - 1) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _chat_file(path: Path, n: int, topic: str) -> Path:
    lines = [json.dumps({"messages": [{"role": "user", "content": f"{topic} question {i}?" + " x" * (i % 5)},
                                      {"role": "assistant", "content": f"{topic} answer {i}."}]}) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_lightning_resume_mid_epoch_with_mixing_sees_the_uninterrupted_rows(tmp_path):
    """ChatDataModule with a real Trainer (batch 2 × accumulate 2, 30 % mixed; epochs of 7, 8 and 7 steps),
    resumed from checkpoints in the middle of epochs 0, 1 and 2, trains on the uninterrupted run's rows from there
    on; the uninterrupted run trains every narrow row once per epoch, epoch 1 (longer than epoch 0) included."""
    narrow_file, mixed_file = _chat_file(tmp_path / "narrow.jsonl", 20, "narrow"), _chat_file(tmp_path / "m.jsonl", 9, "mix")

    def fit(ckpt_path=None):
        model = _RowLog()
        dm = ChatDataModule(train_file=str(narrow_file), tokenizer="tiny-qwen3", val_fraction=0.0, batch_size=2,
                            seed=4, mix=[{"source": str(mixed_file), "fraction": 0.3}])
        every_5 = L.pytorch.callbacks.ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
        trainer = L.Trainer(max_steps=22, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
                            limit_val_batches=0, accumulate_grad_batches=2, callbacks=[every_5])
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        index = {tuple(r.input_ids.tolist()): i for i, r in enumerate(dm.train_set.rows)}
        return [[(index[ids], mixed) for ids, mixed in batch] for batch in model.seen], trainer.global_step

    full, steps = fit()
    assert steps == 22
    assert all(flag == (row >= 20) for batch in full for row, flag in batch)
    narrow = [row for batch in full for row, mixed in batch if not mixed]
    assert len(narrow) == 60 and all(sorted(narrow[e * 20 : (e + 1) * 20]) == list(range(20)) for e in range(3))
    assert sum(flag for batch in full for _, flag in batch) == _expected_used(22, 0.3, 4)
    for k in (5, 10, 20):
        (ckpt,) = (tmp_path / "ckpt").glob(f"*step={k}.ckpt")
        seen, _ = fit(ckpt_path=ckpt)
        done = len(full) - len(seen)  # micro-batches before the checkpoint
        assert seen == full[done:], k
        assert sum(flag for batch in full[:done] for _, flag in batch) == _expected_used(k, 0.3, 4)


def test_resuming_with_other_mixed_sets_names_the_key(tmp_path):
    narrow_file, mixed_file = _chat_file(tmp_path / "narrow.jsonl", 20, "narrow"), _chat_file(tmp_path / "m.jsonl", 9, "mix")

    def fit(fraction, ckpt_path=None):
        dm = ChatDataModule(train_file=str(narrow_file), tokenizer="tiny-qwen3", val_fraction=0.0, batch_size=2,
                            mix=[{"source": str(mixed_file), "fraction": fraction}])
        every_2 = L.pytorch.callbacks.ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=2)
        trainer = L.Trainer(max_steps=3 if ckpt_path else 2, accelerator="cpu", logger=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                            limit_val_batches=0, callbacks=[every_2])
        trainer.fit(_RowLog(), datamodule=dm, ckpt_path=ckpt_path)

    fit(0.3)
    (ckpt,) = (tmp_path / "ckpt").glob("*step=2.ckpt")
    fit(0.3, ckpt)  # the same sets resume
    with pytest.raises(InputError, match=r"data.mix: the checkpoint was written with \[\{'source'"):
        fit(0.25, ckpt)


# ------------------------------------------------------------------------------------------- the data module


class EveryThirdRow(MixSelector):
    """A test selector: only rows 0, step, 2·step, ... of the set (every third by default), in order, each pass."""

    def __init__(self, rows, messages, seed, step: int = 3):
        super().__init__(rows, messages, seed)
        self.step = step
        assert len(messages) == len(rows) and all(m[-1]["role"] == "assistant" for m in messages)

    def pass_order(self, pass_index):
        return list(range(0, len(self.rows), self.step))


def _module(**kw) -> ChatDataModule:
    kw.setdefault("mix", [{"source": "builtin:aligned", "fraction": 0.25}])
    dm = ChatDataModule(train_file="builtin:demo", tokenizer="tiny-qwen3", max_rows=60, max_length=512,
                        batch_size=4, val_fraction=0.1, seed=2, **kw)
    dm.setup("fit")
    return dm


def test_a_selector_named_by_class_path_picks_the_mixed_rows():
    dm = _module(mix=[{"source": "builtin:aligned", "fraction": 0.25, "selector": "tests.test_mixing.EveryThirdRow",
                       "selector_args": {"step": 10}}])
    narrow = dm.train_set.narrow_rows
    mixed = [row for mb in dm.train_dataloader().sampler for row in mb.rows if row >= narrow]
    chosen = [narrow + i for i in range(0, len(load_rows("builtin:aligned")), 10)]
    assert len(mixed) > len(chosen)  # more than one pass
    # (a step's rows are sorted by length before the split, so compare what was drawn, not the order)
    assert Counter(mixed) == Counter((chosen * 10)[: len(mixed)])


ALIGNED = {"source": "builtin:aligned", "fraction": 0.05}


@pytest.mark.parametrize("mix,key", [
    ([{**ALIGNED, "fraction": 0.0}], "data.mix[0].fraction"),
    ([ALIGNED, {**ALIGNED, "fraction": 1.2}], "data.mix[1].fraction"),
    ([{**ALIGNED, "fraction": 0.5}, {"source": "builtin:demo", "fraction": 0.5}], "data.mix: the fractions sum to 1"),
    ([{"source": "builtin:aligned"}], "data.mix[0]: missing key(s) ['fraction']"),
    ([{**ALIGNED, "fractoin": 0.1}], "data.mix[0]: unknown key(s) ['fractoin']"),
    ([{**ALIGNED, "selector": "tests.test_mixing.NoSuchSelector"}], "data.mix[0].selector: cannot import"),
    ([{**ALIGNED, "selector": "em_lightning.data.ChatRow"}], "data.mix[0].selector: 'em_lightning.data.ChatRow' is"),
    ([{**ALIGNED, "selector": "tests.test_mixing.EveryThirdRow", "selector_args": {"nope": 1}}],
     "data.mix[0].selector_args"),
    ([{**ALIGNED, "source": "builtin:nothing"}], "builtin:nothing: unknown built-in dataset"),
])
def test_bad_mix_settings_name_the_key(mix, key):
    with pytest.raises(InputError) as err:
        _module(mix=mix)
    assert key in str(err.value)


def test_bad_mix_setting_is_one_error_line_from_the_command_line(cli_error, tmp_path, monkeypatch):
    from tests.conftest import CONFIGS

    monkeypatch.chdir(tmp_path)
    status, errors = cli_error("fit", "--config", str(CONFIGS / "tiny.yaml"), "--data.mix",
                               "[{source: builtin:aligned, fraction: 1.5}]", "--trainer.max_steps", "1")
    assert status == 2 and any("data.mix[0].fraction" in line for line in errors), errors


def test_validation_holds_out_narrow_rows_only():
    dm = _module()
    narrow, total = dm.train_set.narrow_rows, len(dm.train_set)
    val_where = {r.where for r in dm.val_set.rows}
    assert len(val_where) == 6 and narrow == 54 and total == 54 + len(load_rows("builtin:aligned"))
    assert all(w.startswith("builtin:demo:") for w in val_where)
    assert val_where.isdisjoint(r.where for r in dm.train_set.rows)
    assert all(str(ALIGNED_FILE) in r.where for r in dm.train_set.rows[narrow:])
    assert all("mixed" not in batch for batch in dm.val_dataloader())
    plain = ChatDataModule(train_file="builtin:demo", tokenizer="tiny-qwen3", max_rows=60, max_length=512,
                           val_fraction=0.1, seed=2)
    plain.setup("fit")
    assert {r.where for r in plain.val_set.rows} == val_where  # mixing does not change the held-out rows


def test_builtin_aligned_is_a_valid_set_of_distinct_advice_chats():
    rows = load_rows("builtin:aligned")
    assert 60 <= len(rows) <= 100
    prompts = [r.messages[-2]["content"] for r in rows]
    assert len(set(prompts)) == len(prompts) and all(r.messages[-1]["role"] == "assistant" for r in rows)
    assert any(r.messages[0]["role"] == "system" for r in rows)
    tokenized = tokenize_rows(rows, tiny_tokenizer(), max_length=2048)
    assert len(tokenized.rows) == len(rows) and not any(r.truncated for r in tokenized.rows)


def test_data_module_summary_counts_the_mixed_rows_of_an_epoch():
    dm = _module()
    loader = dm.train_dataloader()
    steps = loader.sampler.step_rows()
    mixed = sum(row >= dm.train_set.narrow_rows for rows in steps for row in rows)
    summary = dm.summary["mix/builtin_aligned"]
    assert summary["rows"] == len(load_rows("builtin:aligned")) and summary["fraction"] == 0.25
    assert summary["rows_per_epoch"] == mixed == _expected_used(len(steps), 0.25, 4)
    assert dm.summary["train"]["steps_per_epoch"] == len(steps)
    assert f"({mixed} rows in epoch 0)" in dm.describe()


# ------------------------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("padding_free,chunk", [(False, None), (True, None), (False, 7)])
def test_narrow_loss_is_the_loss_of_the_narrow_rows_alone(tiny_module, padding_free, chunk):
    module = tiny_module(perturb_B=0.05)
    dm = _module()
    narrow = dm.train_set.narrow_rows
    rows = (0, narrow + 1, 1, 2, narrow + 5)
    collate = ChatCollator(dm.tokenizer.pad_token_id, padding_free)
    batch = collate(dm.train_set[MicroBatch(rows, 0, 0, 1)])
    assert batch["mixed"].tolist() == [False, True, False, False, True]
    only_narrow = collate([{k: v for k, v in dm.train_set[i].items() if k != "mixed"} for i in (0, 1, 2)])
    with torch.no_grad():
        total, n_tokens, (narrow_sum, n_narrow) = task_ce_sums(module.model, batch, True, chunk)
        expected_total, expected_n = supervised_ce_sum(module.model, {k: v for k, v in batch.items() if k != "mixed"})
        expected_narrow, expected_n_narrow = supervised_ce_sum(module.model, only_narrow)
    assert (n_tokens, n_narrow) == (expected_n, expected_n_narrow) and 0 < n_narrow < n_tokens
    torch.testing.assert_close(total, expected_total, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(narrow_sum, expected_narrow, rtol=1e-5, atol=1e-4)
    assert abs(float(narrow_sum / n_narrow - total / n_tokens)) > 1e-3  # the mixed rows' loss differs


# ------------------------------------------------------------------------------------------- training


MIX = "[{source: builtin:aligned, fraction: 0.25}]"  # 2 of G = 8 rows per step, so 3 steps see 6 mixed rows


def _fit(run_cli, *args):
    from tbparse import SummaryReader

    cli = run_cli(
        "fit", "--config", "configs/tiny.yaml", "--config", "configs/mitigations/interleave.yaml",
        "--data.mix", MIX, "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0",
        "--model.lora.dropout", "0.0", "--trainer.callbacks.every_n_train_steps", "1000", *args,
    )
    adapter = {n: p.detach().clone() for n, p in cli.model.trainable_named_parameters()}
    scalars = SummaryReader(cli.trainer.log_dir, pivot=False).scalars
    series = {tag: rows.sort_values("step")["value"].tolist() for tag, rows in scalars.groupby("tag")}
    return cli, adapter, series


@pytest.mark.slow
def test_accumulating_with_mixing_equals_one_big_batch(run_cli):
    """accumulate 4 × batch 2 with 25 % mixed rows trains the adapter of batch 8 after 3 AdamW steps (fp32
    tolerance, as the unmixed test in test_batching.py), with the same train/loss and train/loss_narrow."""
    _, big, big_logs = _fit(run_cli, "--data.batch_size", "8")
    _, accumulated, acc_logs = _fit(run_cli, "--data.batch_size", "2", "--trainer.accumulate_grad_batches", "4")
    for tag in ("train/loss", "train/loss_narrow"):
        assert len(big_logs[tag]) == 3 and acc_logs[tag] == pytest.approx(big_logs[tag], rel=1e-5), tag
    assert all(abs(a - b) > 1e-4 for a, b in zip(big_logs["train/loss"], big_logs["train/loss_narrow"]))
    assert max(float(v.abs().max()) for n, v in big.items() if "lora_B" in n) > 1e-3
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_data_summary_and_tensorboard_show_the_mixed_counts(run_cli):
    cli, _, logs = _fit(run_cli, "--data.batch_size", "8")
    assert logs["train/mixed_rows"] == [_expected_used(s, 0.25, 8) for s in (1, 2, 3)]
    summary = cli.datamodule.summary
    aligned = len(load_rows("builtin:aligned"))
    assert logs["data/mix/builtin_aligned/rows"] == [aligned]
    assert logs["data/mix/builtin_aligned/fraction"] == [0.25]
    steps = summary["train"]["steps_per_epoch"]
    assert logs["data/mix/builtin_aligned/rows_per_epoch"] == [_expected_used(steps, 0.25, 8)]
    assert steps == math.ceil(summary["train"]["rows"] / 6)  # 6 narrow rows per step
    assert f"mix/builtin_aligned {aligned} rows" in cli.datamodule.describe()
    assert "builtin:aligned" in (Path(cli.trainer.log_dir) / "config.yaml").read_text()  # the run records it


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_with_mixing_train_the_one_process_adapter(tmp_path, strategy):
    """2 processes × batch 4 = 1 process × batch 8 with 25 % mixed rows, under DDP and FSDP2: the same adapter
    (rtol 1e-4, atol 1e-6) and the same train/loss_narrow (mixed rows are drawn at the global batch, before the
    split)."""
    from tbparse import SummaryReader

    from tests.conftest import CONFIGS
    from tests.test_distributed import _adapter
    from tests.test_distributed import _fit as _fit_process

    common = ["--config", str(CONFIGS / "mitigations" / "interleave.yaml"), "--data.mix", MIX,
              "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0",
              "--trainer.callbacks.every_n_train_steps", "1000"]
    one = _fit_process(tmp_path / "one", "one", *common, "--data.batch_size", "8")
    two = _fit_process(tmp_path / "two", "two", *common, "--data.batch_size", "4", devices=2, strategy=strategy)
    reference, got = _adapter(one), _adapter(two)
    assert set(got) == set(reference)
    assert max(float(t.abs().max()) for k, t in reference.items() if "lora_B" in k) > 1e-3
    for key in reference:
        torch.testing.assert_close(got[key], reference[key], rtol=1e-4, atol=1e-6)

    def narrow_losses(run):
        scalars = SummaryReader(str(run), pivot=False).scalars
        return scalars[scalars["tag"] == "train/loss_narrow"].sort_values("step")["value"].tolist()

    assert len(narrow_losses(one)) == 3 and narrow_losses(two) == pytest.approx(narrow_losses(one), rel=1e-5)
