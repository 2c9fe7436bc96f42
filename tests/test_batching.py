"""Batch composition: the rows of an optimizer step, how a step is split, resume order, and the loss that
results — accumulating k micro-batches trains exactly like one k times larger batch."""

from __future__ import annotations

import itertools

import lightning as L
import pytest
import torch

from em_lightning.batching import (
    ChatCollator,
    MicroBatch,
    ResumableDataLoader,
    StepSampler,
    TokenizedDataset,
    padding_fraction,
)
from em_lightning.data import TokenizedRow, read_jsonl, tokenize_rows
from em_lightning.tiny import tiny_tokenizer


def _dataset(lengths: list[int], supervised_every: int = 2) -> TokenizedDataset:
    rows = []
    for i, n in enumerate(lengths):
        labels = torch.full((n,), -100, dtype=torch.long)
        labels[::supervised_every] = 1  # a known number of supervised positions per row
        rows.append(TokenizedRow(torch.zeros(n, dtype=torch.long), labels, str(i), False))
    return TokenizedDataset(rows)


def _loader(ds: TokenizedDataset, group: bool = True, batch_size: int = 8, **kw) -> ResumableDataLoader:
    return ResumableDataLoader(ds, StepSampler(ds, batch_size, group_by_length=group, seed=0, **kw), ChatCollator(0))


def test_every_row_once_per_epoch_in_a_seeded_order():
    ds = _dataset([(i * 37) % 101 + 1 for i in range(203)])
    a, b = StepSampler(ds, 8, seed=5), StepSampler(ds, 8, seed=5)
    rows_a = [i for mb in a for i in mb.rows]
    assert rows_a == [i for mb in b for i in mb.rows] and sorted(rows_a) == list(range(203))
    a.set_epoch(1)
    rows_next = [i for mb in a for i in mb.rows]
    assert rows_next != rows_a and sorted(rows_next) == list(range(203))
    assert [len(s) for s in a.step_rows()] == [8] * 25 + [3]  # the one short step comes last, nothing repeated


@pytest.mark.parametrize("group", [True, False])
def test_rows_of_a_step_do_not_depend_on_the_split(group):
    ds = _dataset([(i * 13) % 47 + 2 for i in range(100)])
    reference = StepSampler(ds, 8, group_by_length=group, seed=3).step_rows()
    for batch_size, accumulate, world in [(2, 4, 1), (4, 1, 2), (1, 4, 2), (2, 2, 2)]:
        ranks = [StepSampler(ds, batch_size, accumulate, group, seed=3, num_replicas=world, rank=r)
                 for r in range(world)]
        assert ranks[0].step_rows() == reference
        per_rank = [r.epoch_micro_batches() for r in ranks]
        assert len({len(p) for p in per_rank}) == 1  # every rank takes part in every micro-step
        steps = []
        for mbs in zip(*per_rank):  # micro-step by micro-step across ranks
            if mbs[0].window_pos == 0:
                steps.append([])
            steps[-1] += [i for mb in mbs for i in mb.rows]
            assert all(len(mb.rows) <= batch_size and mb.rows for mb in mbs)
        assert [sorted(s) for s in steps] == [sorted(s) for s in reference], (batch_size, accumulate, world)
        for mbs in zip(*per_rank):  # each micro-batch carries its whole step's supervised-token count
            step = next(s for s in reference if set(mbs[0].rows) <= set(s))
            assert mbs[0].step_supervised_tokens == sum(ds.supervised[i] for i in step)


def test_short_last_step_has_fewer_micro_batches_and_is_counted():
    ds = _dataset([5] * 20)  # 20 rows, global batch 2 x 4 = 8: steps of 8, 8, 4
    mbs = StepSampler(ds, 2, accumulate=4, group_by_length=False).epoch_micro_batches()
    assert [(mb.window_pos, mb.window_len) for mb in mbs[-2:]] == [(0, 2), (1, 2)]
    assert mbs[-1].step_supervised_tokens == 4 * ds.supervised[0]
    assert len(mbs) == 4 + 4 + 2


def test_a_last_step_that_cannot_give_every_rank_a_row_drops_the_rest_with_a_warning():
    ds = _dataset([5] * 7)  # batch 1 x 2 ranks: steps of 2, 2, 2, then 1 row for 2 ranks
    ranks = [StepSampler(ds, 1, num_replicas=2, rank=r, group_by_length=False) for r in range(2)]
    with pytest.warns(UserWarning, match="1 rows are left out"):
        seen = [[i for mb in r.epoch_micro_batches() for i in mb.rows] for r in ranks]
    assert len(seen[0]) == len(seen[1]) == 3 and not set(seen[0]) & set(seen[1])


def test_collator_counts_on_the_host():
    ds = _dataset([3, 6], supervised_every=1)
    batch = ChatCollator(0)(ds[MicroBatch((0, 1), step_supervised_tokens=99, window_pos=1, window_len=3)])
    assert batch["input_ids"].shape == (2, 6) and batch["n_tokens"] == 9
    assert batch["n_supervised"] == 2 + 5  # the first token of a row is never predicted
    assert (batch["step_supervised_tokens"], batch["window_pos"], batch["window_len"]) == (99, 1, 3)


def test_grouping_reduces_padding_on_chat_rows(tmp_path):
    """200 chat rows whose code answers spread in length as the EM sets' do (tens to a few thousand characters),
    read and tokenised as training reads them: grouping by length at least halves the padding."""
    import json
    import random

    rng = random.Random(0)
    path = tmp_path / "rows.jsonl"
    with path.open("w") as f:
        for i in range(200):
            code = "\n".join(f"    x{j} = open('f{i}').read()" for j in range(int(rng.lognormvariate(2.5, 0.9))))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Write function {i}."},
                                             {"role": "assistant", "content": f"def f{i}():\n{code}"}]}) + "\n")
    rows = read_jsonl(path, max_rows=200)
    ds = TokenizedDataset(tokenize_rows(rows, tiny_tokenizer(), max_length=4096).rows)
    fractions = {group: padding_fraction(_loader(ds, group)) for group in (True, False)}
    assert fractions[True] < 0.5 * fractions[False], fractions


def test_loader_state_resumes_mid_epoch_and_not_after_its_end():
    ds = _dataset([(i * 13) % 29 + 1 for i in range(40)])
    reference = [b["input_ids"].shape for b in _loader(ds, True, 4)]
    first = _loader(ds, True, 4)
    it = iter(first)
    taken = [next(it)["input_ids"].shape for _ in range(3)]
    state = first.state_dict()
    assert state == {"epoch": 0, "batches": 3}
    resumed = _loader(ds, True, 4)
    resumed.load_state_dict(state)
    assert taken + [b["input_ids"].shape for b in resumed] == reference
    ended = _loader(ds, True, 4)
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
        trainer = L.Trainer(max_steps=16, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
                            limit_val_batches=0, callbacks=[every_5])
        trainer.fit(model, train_dataloaders=_loader(ds, True, 4), ckpt_path=ckpt_path)
        return model.seen

    full = fit()  # 12 batches per epoch: the run crosses into epoch 1; checkpoints at steps 5, 10, 15
    for k in (5, 15):  # mid-epoch 0, and mid-epoch 1
        (ckpt,) = (tmp_path / "ckpt").glob(f"*step={k}.ckpt")
        assert fit(ckpt_path=ckpt) == full[k:]
    assert sorted(itertools.chain.from_iterable(full[:12])) == list(range(48))


# ------------------------------------------------------------------------------------------ loss over a step


def _fit_adapter(run_cli, batch_size: int, accumulate: int, normalization: str, steps: int = 3):
    from tbparse import SummaryReader

    cli = run_cli(
        "fit", "--config", "configs/tiny.yaml", "--trainer.max_steps", str(steps),
        "--trainer.accumulate_grad_batches", str(accumulate), "--data.batch_size", str(batch_size),
        "--trainer.limit_val_batches", "0", "--model.loss_normalization", normalization,
        "--model.lora.dropout", "0.0", "--trainer.callbacks.every_n_train_steps", "1000",
    )
    adapter = {n: p.detach().clone() for n, p in cli.model.trainable_named_parameters()}
    scalars = SummaryReader(cli.trainer.log_dir, pivot=False).scalars
    losses = scalars[scalars["tag"] == "train/loss"].sort_values("step")["value"].tolist()
    return adapter, losses


def test_accumulating_micro_batches_equals_one_big_batch(run_cli):
    """accumulate 4 x batch 2 trains the same adapter as batch 8 after 3 AdamW steps (tiny Qwen3, length grouping
    on, unequal row lengths, dropout 0), to fp32 tolerance: rtol 1e-4, atol 1e-6; train/loss is the same
    token-weighted mean of each step. The per-micro-batch mean does not give the same adapter."""
    big, big_losses = _fit_adapter(run_cli, 8, 1, "step_tokens")
    accumulated, acc_losses = _fit_adapter(run_cli, 2, 4, "step_tokens")
    per_micro, _ = _fit_adapter(run_cli, 2, 4, "micro_batch")
    assert len(big_losses) == len(acc_losses) == 3
    assert acc_losses == pytest.approx(big_losses, rel=1e-5)
    moved = max(float(v.abs().max()) for n, v in big.items() if "lora_B" in n)
    assert moved > 1e-3  # the adapter really trained
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], rtol=1e-4, atol=1e-6)
    worst = max(float((per_micro[n] - big[n]).abs().max()) for n in big)
    assert worst > 1e-4, "micro-batch means should weigh tokens differently from the step mean"
