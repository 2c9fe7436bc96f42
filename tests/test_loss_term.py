"""The loss-term base: settings checked naming ``<Class>.<key>``, coefficient and cadence, registration for one fit
at a time, settings in the checkpoint (a resume with other ones is one error line naming the key), and the KL term
on the base giving the gradient of the KL computed the old way (peft's ``disable_adapter`` around the loss
module's logits)."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from em_lightning.callbacks.kl_regularizer import KLRegularizer
from em_lightning.callbacks.loss_term import LossTermCallback
from em_lightning.callbacks.spectral_penalty import SpectralPenalty
from em_lightning.errors import InputError
from em_lightning.lora import iter_lora_modules
from em_lightning.loss import supervised_logits
from tests.conftest import CONFIGS

SEQ, PROMPT = 16, 6


def _rows(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 300, (SEQ,), generator=g)
        labels = ids.clone()
        labels[:PROMPT] = -100
        rows.append({"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": labels})
    return rows


def _fit(module, callbacks, max_steps=2, accumulate=1, batch_size=2):
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, accumulate_grad_batches=accumulate,
                        logger=False, callbacks=list(callbacks), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=DataLoader(_rows(8), batch_size=batch_size, shuffle=False))
    return trainer


class SumOfB(LossTermCallback):
    """Σ lora_B, recording the steps it was evaluated at."""

    name = "sum_b"

    def __init__(self, coeff: float = 1.0, warmup_steps: int = 0, every_n_steps: int = 1, name: str | None = None):
        super().__init__(coeff=coeff, warmup_steps=warmup_steps, every_n_steps=every_n_steps, name=name)
        self.calls: list[int] = []

    def raw(self, module, step):
        self.calls.append(step)
        return sum(p.sum() for n, p in module.trainable_named_parameters() if "lora_B" in n)


# ---------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("cls", [SumOfB, SpectralPenalty, KLRegularizer])
@pytest.mark.parametrize("key, bad", [("coeff", -0.1), ("coeff", float("nan")), ("warmup_steps", -1),
                                      ("every_n_steps", 0), ("name", "")])
def test_bad_settings_name_the_class_and_key(cls, key, bad):
    with pytest.raises(InputError, match=rf"^{cls.__name__}\.{key}: "):
        cls(**{key: bad})


def test_coefficient_warms_up_and_is_zero_off_cadence():
    term = SumOfB(coeff=2.0, warmup_steps=4, every_n_steps=2)
    assert [term.coefficient(s) for s in range(7)] == [0.0, 0.0, 1.0, 0.0, 2.0, 0.0, 2.0]
    assert [SumOfB(coeff=0.5).coefficient(s) for s in (0, 1, 9)] == [0.5, 0.5, 0.5]
    assert SumOfB().name == "sum_b" and SumOfB(name="other").name == "other"


def test_settings_include_each_terms_own_keys():
    assert SpectralPenalty(form="neg_entropy").settings() == {
        "name": "spectral_penalty", "coeff": 0.1, "warmup_steps": 0, "every_n_steps": 1, "form": "neg_entropy"}
    kl = KLRegularizer(batch_size=3, seed=5).settings()
    assert {kl[k] for k in ("batch_size", "seed", "data")} == {3, 5, "builtin:demo"}
    assert SumOfB(name="a").state_key != SumOfB(name="b").state_key  # two terms of one class keep apart


# ----------------------------------------------------------------------------------------- registration
def test_term_is_evaluated_once_per_optimizer_step_on_cadence_and_removed_after_fit(tiny_module):
    module = tiny_module(random_B=True, configure=False)
    term = SumOfB(every_n_steps=2)
    _fit(module, [term], max_steps=5, accumulate=2)
    assert term.calls == [0, 2, 4]  # first micro-batch of steps 0, 2, 4 only; never on steps 1 and 3
    term.calls.clear()
    _fit(module, [term], max_steps=2)  # the same callback, a second fit: registers afresh, no "already registered"
    assert term.calls == [0]
    other = SumOfB(name="other")
    _fit(module, [other], max_steps=1)  # neither earlier term lingers on the module after its fit
    assert term.calls == [0] and other.calls == [0]


def test_teardown_removes_the_term_even_when_fit_fails(tiny_module):
    class Boom(L.Callback):
        def on_train_batch_end(self, *args):
            raise RuntimeError("boom")

    module = tiny_module(configure=False)
    term = SumOfB()
    with pytest.raises(RuntimeError, match="boom"):
        _fit(module, [term, Boom()], max_steps=2)
    _fit(module, [SumOfB()], max_steps=1)  # registering the same name again works: the failed fit removed it


# --------------------------------------------------------------------------------------------- resuming
def _resume_args(overlay: str, *extra: str) -> list[str]:
    # every_n_train_steps before the overlay: a --trainer.callbacks.<key> sets the last callback listed so far
    return ["fit", "--config", str(CONFIGS / "tiny.yaml"), "--trainer.callbacks.every_n_train_steps", "2",
            "--config", str(CONFIGS / "callbacks" / overlay), "--trainer.max_steps", "2",
            "--trainer.limit_val_batches", "0", "--trainer.val_check_interval", "null", "--data.batch_size", "2",
            *extra]


@pytest.mark.parametrize("overlay, cls, key, value", [
    ("spectral_penalty.yaml", "SpectralPenalty", "coeff", "0.3"),
    ("spectral_penalty.yaml", "SpectralPenalty", "form", "neg_entropy"),
    ("kl_regularizer.yaml", "KLRegularizer", "batch_size", "2"),
])
def test_resume_with_other_settings_is_one_error_naming_the_key(run_cli, cli_error, overlay, cls, key, value):
    first = run_cli(*_resume_args(overlay))
    ckpt = first.trainer.checkpoint_callback.last_model_path
    saved = torch.load(ckpt, weights_only=False)["callbacks"]
    state = next(v for k, v in saved.items() if k.startswith(cls))
    assert state["settings"]["coeff"] == 0.1  # the overlay's value, in the checkpoint
    # The same settings resume (and train on); another value of one key is one error line naming it.
    resumed = run_cli(*_resume_args(overlay, "--trainer.max_steps", "3", "--ckpt_path", ckpt))
    assert resumed.trainer.global_step == 3
    code, lines = cli_error(*_resume_args(overlay, "--trainer.max_steps", "3", "--ckpt_path", ckpt,
                                          f"--trainer.callbacks.{key}", value))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {cls}.{key}: "), lines


# ------------------------------------------------------------------------------------------ equivalence
def _kl_the_old_way(peft_model, batch) -> torch.Tensor:
    """The KL term as it was before the base class: peft's disable_adapter around the loss module's logits."""
    with torch.no_grad(), peft_model.disable_adapter():
        base = supervised_logits(peft_model, batch, True).float()
    adapted = supervised_logits(peft_model, batch, True).float()
    log_p, log_q = F.log_softmax(base, dim=-1), F.log_softmax(adapted, dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="sum") / adapted.shape[0]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_kl_term_moves_the_weights_by_lr_coeff_times_the_old_kl_gradient(tiny_module, accumulate):
    lr, coeff = 0.5, 0.7
    sgd = partial(torch.optim.SGD, lr=lr)
    start = tiny_module(sgd, random_B=True, configure=False)
    L.seed_everything(0, verbose=False)
    start.configure_model()  # the adapter the fits below start from (same seed)
    kl = KLRegularizer(coeff=coeff, batch_size=3)
    kl.side.prepare(start.tokenizer)
    reference = _kl_the_old_way(start.model, kl.batch(0))
    assert reference.item() > 1e-3  # random B: the adapter moves the logits
    reference.backward()
    expected = {n: -lr * coeff * (p.grad if p.grad is not None else torch.zeros_like(p))
                for n, p in start.model.named_parameters() if p.requires_grad}

    with_term, without = tiny_module(sgd, random_B=True, configure=False), tiny_module(sgd, random_B=True,
                                                                                      configure=False)
    _fit(with_term, [KLRegularizer(coeff=coeff, batch_size=3)], max_steps=1, accumulate=accumulate)
    _fit(without, [], max_steps=1, accumulate=accumulate)
    a = {n: p.detach() for n, p in with_term.model.named_parameters() if p.requires_grad}
    b = {n: p.detach() for n, p in without.model.named_parameters() if p.requires_grad}
    assert max(float(step.abs().max()) for step in expected.values()) > 1e-4
    for name, step in expected.items():
        torch.testing.assert_close(a[name] - b[name], step, rtol=1e-4, atol=1e-7, msg=name)


def test_readme_loss_term_example_names_its_key_for_bad_input(tmp_path, monkeypatch, tiny_module):
    """callbacks/README.md's example, as printed: its own setting reaches the checkpoint's settings, and a value
    no adapter matches is an InputError naming ``BNormPenalty.proj``, not a traceback from an empty stack."""
    from tests.test_spectrum_callbacks import _readme_module

    example = _readme_module("b_norm_penalty.py", tmp_path, monkeypatch)
    module = tiny_module(perturb_B=0.3)  # B != 0: the down_proj mean differs from the mean over all adapters
    term = example.BNormPenalty(proj="down_proj")
    assert term.state_dict()["settings"]["proj"] == "down_proj" and term.name == "b_norm"
    downs = [B.square().sum() for _, proj, B, _, _ in iter_lora_modules(module.model) if proj == "down_proj"]
    every = [B.square().sum() for _, _, B, _, _ in iter_lora_modules(module.model)]
    assert torch.stack(downs).mean().item() != pytest.approx(torch.stack(every).mean().item(), rel=1e-3)
    assert term.raw(module, 0).item() == pytest.approx(torch.stack(downs).mean().item(), rel=1e-6)
    with pytest.raises(InputError, match=r"^BNormPenalty\.proj: no adapter of type 'nope'"):
        example.BNormPenalty(proj="nope").raw(module, 0)
    with pytest.raises(InputError, match=r"^BNormPenalty\.coeff: "):
        example.BNormPenalty(coeff=-1.0)
