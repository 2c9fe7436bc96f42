"""Padding-free batches (``data.padding_free``): the same rows laid end to end give the same loss and gradients as
padded ones, no token attends across a row boundary, no label is predicted from the previous row's last token, and
the loader (resume included) counts them like padded batches."""

from __future__ import annotations

import pytest
import torch

from em_lightning.batching import IGNORE_INDEX, ChatCollator, ResumableDataLoader, StepSampler
from em_lightning.lora import LoRASpec, apply_lora
from em_lightning.loss import model_inputs, supervised_ce_sum
from em_lightning.tiny import tiny_model, tiny_tokenizer
from tests.helpers import GradRecorder, LossRecorder, find

# (prompt, answer) lengths; the second row is supervised from its very first token, so a packed layout that
# forgot to mask row starts would predict it from the first row's last token.
SHAPES = ((5, 9), (0, 7), (17, 3), (2, 12))


def _rows(shapes=SHAPES):
    rows = []
    for i, (n_prompt, n_answer) in enumerate(shapes):
        ids = torch.randint(3, 250, (n_prompt + n_answer,), generator=torch.Generator().manual_seed(i))
        labels = ids.clone()
        labels[:n_prompt] = IGNORE_INDEX
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _collate(rows, padding_free: bool):
    return ChatCollator(tiny_tokenizer().pad_token_id, padding_free)(rows)


def _model(name: str, attn: str = "sdpa"):
    base = tiny_model(name)
    base.set_attn_implementation(attn)
    torch.manual_seed(1)
    model = apply_lora(base, LoRASpec(r=4, alpha=8.0))
    with torch.no_grad():  # B away from 0, so the adapter is in the forward and gets gradients everywhere
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(pname))) * 0.1)
    return model


def _offsets(rows) -> list[int]:
    starts = [0]
    for r in rows:
        starts.append(starts[-1] + len(r["input_ids"]))
    return starts


def test_the_packed_layout():
    rows = _rows()
    padded, packed = _collate(rows, False), _collate(rows, True)
    starts = _offsets(rows)
    assert "attention_mask" not in packed  # with one, transformers would not mask per row
    assert packed["input_ids"].shape == packed["labels"].shape == packed["position_ids"].shape == (1, starts[-1])
    assert torch.equal(packed["input_ids"][0], torch.cat([r["input_ids"] for r in rows]))
    expected_pos = torch.cat([torch.arange(len(r["input_ids"])) for r in rows])
    assert torch.equal(packed["position_ids"][0], expected_pos)
    assert (packed["labels"][0, starts[:-1]] == IGNORE_INDEX).all()
    assert packed["n_tokens"] == padded["n_tokens"] == starts[-1]
    assert packed["n_supervised"] == padded["n_supervised"] == 9 + 6 + 3 + 12


@pytest.mark.parametrize("supervised_only", [True, False], ids=["supervised-only", "full-forward"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-llama"])
def test_packed_and_padded_batches_give_the_same_loss_and_gradients(name, attn, supervised_only):
    rows = _rows()
    results = []
    for padding_free in (False, True):
        model = _model(name, attn)
        loss, n = supervised_ce_sum(model, _collate(rows, padding_free), supervised_only)
        loss.backward()
        results.append((loss.detach(), n, {k: p.grad for k, p in model.named_parameters() if p.requires_grad}))
    (padded, n_padded, g_padded), (packed, n_packed, g_packed) = results
    assert n_padded == n_packed == 30
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    assert set(g_packed) == set(g_padded) and len(g_padded) == 2 * 7 * 2  # layers × projections × (A, B)
    for key in g_padded:
        torch.testing.assert_close(g_packed[key], g_padded[key], rtol=1e-4, atol=1e-6)


def _hidden(model, batch):
    with torch.no_grad():
        return model.get_base_model().get_decoder()(**model_inputs(batch), use_cache=False).last_hidden_state[0]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-llama"])
def test_no_token_attends_across_a_row_boundary(name, attn):
    """Changing one row's tokens leaves every other row's hidden states as they were, and each row's hidden
    states are those of the row alone; the same layout with an all-ones attention mask does leak (the control)."""
    model, rows = _model(name, attn), _rows()
    starts = _offsets(rows)
    segment = [slice(starts[i], starts[i + 1]) for i in range(len(rows))]
    packed = _collate(rows, True)
    ref = _hidden(model, packed)
    for i, row in enumerate(rows):  # each row alone, unpadded
        alone = _hidden(model, {"input_ids": row["input_ids"][None], "labels": row["labels"][None]})
        torch.testing.assert_close(ref[segment[i]], alone, rtol=1e-5, atol=1e-5)
    for changed in (0, 1, 2):
        other = [dict(r) for r in rows]
        other[changed]["input_ids"] = (rows[changed]["input_ids"] + 17) % 250 + 3
        out = _hidden(model, _collate(other, True))
        for i in range(len(rows)):
            if i == changed:
                assert not torch.allclose(out[segment[i]], ref[segment[i]], atol=1e-3)
            else:
                torch.testing.assert_close(out[segment[i]], ref[segment[i]], rtol=0, atol=1e-6)
    leaky = dict(packed, attention_mask=torch.ones_like(packed["input_ids"]))
    assert not torch.allclose(_hidden(model, leaky)[segment[1]], ref[segment[1]], atol=1e-3)


def _pairs(batch) -> set[tuple[int, int, int, int]]:
    """The loss's (row, position of the predicting token, its id, target id) for every supervised label."""
    ids, labels = batch["input_ids"][:, :-1], batch["labels"][:, 1:]
    if "position_ids" in batch:
        pos = batch["position_ids"][0, :-1]
        row = (batch["position_ids"][0] == 0).cumsum(0)[:-1] - 1
    else:
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        row = torch.arange(ids.shape[0])[:, None].expand_as(ids)
    mask = labels != IGNORE_INDEX
    if "position_ids" in batch:
        mask = mask[0]
        ids, labels = ids[0], labels[0]
    return set(zip(row[mask].tolist(), pos[mask].tolist(), ids[mask].tolist(), labels[mask].tolist()))


def test_no_label_is_predicted_from_the_previous_rows_last_token():
    rows = _rows()
    padded, packed = _collate(rows, False), _collate(rows, True)
    assert _pairs(packed) == _pairs(padded)
    assert len(_pairs(packed)) == packed["n_supervised"]
    # The check has teeth: without the masked row starts, row 1's first token would be a target.
    naive = dict(packed, labels=torch.cat([r["labels"] for r in rows])[None])
    assert len(_pairs(naive)) == len(_pairs(padded)) + 1


def _loaders(padding_free: bool):
    from em_lightning.data import ChatDataModule

    data = ChatDataModule(tokenizer="tiny-qwen3", max_rows=30, val_fraction=0.0, batch_size=3)
    data.setup()

    def make():
        sampler = StepSampler(data.train_set, batch_size=3, accumulate=2, seed=0)
        return ResumableDataLoader(data.train_set, sampler, ChatCollator(data.tokenizer.pad_token_id, padding_free))

    return make


def test_padding_free_batches_are_counted_and_resumed_like_padded_ones():
    padded_loader, packed_loader = _loaders(False), _loaders(True)
    padded, packed = list(padded_loader()), list(packed_loader())
    assert len(packed) == len(padded) == 10
    keys = ("n_tokens", "n_supervised", "step_supervised_tokens", "window_pos", "window_len")
    for a, b in zip(padded, packed):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
        rows = [r[m.bool()] for r, m in zip(a["input_ids"], a["attention_mask"])]
        assert torch.equal(b["input_ids"][0], torch.cat(rows))
    states = []
    for make in (padded_loader, packed_loader):
        loader = make()
        it = iter(loader)
        for _ in range(3):
            next(it)
        states.append(loader.state_dict())
    assert states[0] == states[1] == {"epoch": 0, "batches": 3}
    resumed = packed_loader()
    resumed.load_state_dict(states[1])
    rest = list(resumed)
    assert len(rest) == 7 and torch.equal(rest[0]["input_ids"], packed[3]["input_ids"])


def test_training_with_padding_free_batches_matches_padded(run_cli):
    """Through the CLI: accumulation 3 × batch 2 with step-token normalisation, the same losses and gradients."""
    common = ["fit", "--config", "configs/tiny.yaml", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
              "--trainer.accumulate_grad_batches", "3", "--data.batch_size", "2",
              "--trainer.callbacks+=tests.helpers.GradRecorder", "--trainer.callbacks+=tests.helpers.LossRecorder"]
    padded = run_cli(*common)
    packed = run_cli(*common, "--data.padding_free", "true")
    assert packed.datamodule.padding_free and not padded.datamodule.padding_free
    for step in (0, 1):
        g0, g1 = find(padded.trainer, GradRecorder).grads[step], find(packed.trainer, GradRecorder).grads[step]
        assert set(g0) == set(g1)
        for key in g0:
            torch.testing.assert_close(g1[key], g0[key], rtol=1e-4, atol=1e-7)
    l0, l1 = find(padded.trainer, LossRecorder).losses, find(packed.trainer, LossRecorder).losses
    assert l1 == pytest.approx(l0, rel=1e-5)
