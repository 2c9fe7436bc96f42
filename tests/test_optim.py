"""MuonWithAdamW routing and state, LR schedules, and the optimiser errors a config can trigger."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from em_lightning.optim import MuonWithAdamW, ScheduleSpec, check_muon_params, lr_lambda


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(4, 6)), torch.nn.Parameter(torch.randn(6))]


def _step(opt, params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()


def test_muon_with_adamw_routes_by_shape_and_matches_the_pure_optimisers():
    params = _params()
    ref = [p.detach().clone().requires_grad_() for p in params]
    opt = MuonWithAdamW(params, lr=0.02, adamw_lr=1e-3)
    assert [g["kind"] for g in opt.param_groups] == ["muon", "adamw"]
    muon = torch.optim.Muon(ref[:2], lr=0.02)
    adamw = torch.optim.AdamW(ref[2:], lr=1e-3, weight_decay=0.0)
    for seed in range(3):
        _step(opt, params, seed)
        _step(muon, ref, seed)  # sets the same grads on all three reference tensors, steps the matrices
        adamw.step()  # ...and the vector
    for p, r in zip(params, ref):
        assert torch.equal(p.detach(), r.detach())


def test_muon_with_adamw_state_round_trip():
    a, b = _params(), _params()
    opt_a = MuonWithAdamW(a)
    for s in range(2):
        _step(opt_a, a, s)
    opt_b = MuonWithAdamW(b)
    with torch.no_grad():
        for pa, pb in zip(a, b):
            pb.copy_(pa)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as a checkpoint would: no shared buffers
    _step(opt_a, a, 7)
    _step(opt_b, b, 7)
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)


def test_plain_muon_with_a_vector_names_the_config_key():
    named = [("w", torch.zeros(3, 3)), ("norm.weight", torch.zeros(3))]
    with pytest.raises(ValueError, match=r"model\.optimizer.*norm\.weight.*MuonWithAdamW"):
        check_muon_params(named)


def test_module_reports_muon_on_non_2d_parameters():
    from em_lightning.lora import LoRASpec
    from em_lightning.models import ModelSpec
    from em_lightning.module import LoRAFineTune

    module = LoRAFineTune(ModelSpec(name="tiny-qwen3"), LoRASpec(r=2), optimizer=functools.partial(torch.optim.Muon, lr=0.01))
    module.configure_model()
    module.model.get_base_model().model.norm.weight.requires_grad_(True)  # a 1-D trainable parameter
    with pytest.raises(ValueError, match=r"model\.optimizer: torch\.optim\.Muon only takes 2-D"):
        module.configure_optimizers()


@pytest.mark.parametrize("decay", ["constant", "linear", "cosine"])
def test_schedule_shapes(decay):
    total = 20
    f = lr_lambda(ScheduleSpec(warmup_steps=4, decay=decay, min_lr_ratio=0.1), total_steps=total)
    warm = [f(s) for s in range(4)]
    assert warm == sorted(warm) and warm[0] > 0 and warm[-1] < 1
    assert f(4) == pytest.approx(1.0)
    after = [f(s) for s in range(4, total)]  # the steps a run of `total` optimizer steps actually takes
    if decay == "constant":
        assert after == [1.0] * len(after)
    else:
        assert after == sorted(after, reverse=True) and 0.1 < after[-1] < 0.2  # nearly decayed at the last step
        assert f(total) == pytest.approx(0.1)


def test_scheduler_steps_with_the_trainer(run_cli):
    """The LR the optimiser used at each step follows the configured cosine schedule (warm-up, then decay)."""
    from tests.helpers import LRRecorder, find

    steps, lr = 8, 0.01
    cli = run_cli("fit", "--config", "configs/tiny.yaml", "--trainer.max_steps", str(steps),
                  "--model.schedule.warmup_steps", "2", "--model.schedule.decay", "cosine",
                  "--model.optimizer.init_args.lr", str(lr), "--trainer.callbacks+=tests.helpers.LRRecorder")
    used = find(cli.trainer, LRRecorder).lrs
    schedule = lr_lambda(ScheduleSpec(warmup_steps=2, decay="cosine"), total_steps=steps)
    assert list(used) == list(range(steps))
    for step, rates in used.items():
        assert rates == [pytest.approx(schedule(step) * lr)], step


def test_warmup_ratio():
    f = lr_lambda(ScheduleSpec(warmup_ratio=0.5), total_steps=10)
    assert f(4) < 1.0 and f(5) == 1.0


def test_unknown_optimiser_class_path_is_a_config_error(run_cli, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", "--config", "configs/tiny.yaml", "--model.optimizer", "torch.optim.NoSuchOptimizer")
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "model.optimizer" in err and "NoSuchOptimizer" in err


def test_muon_refuses_sharded_weights_before_it_is_built():
    from em_lightning.optim import check_optimizer_params, optimizer_class

    class Sharded(torch.nn.Parameter):  # stands for an FSDP2 DTensor: it has to_local()
        def to_local(self):
            return self

    named = [("lora_A", Sharded(torch.zeros(4, 8)))]
    for cls in (MuonWithAdamW, torch.optim.Muon):
        with pytest.raises(ValueError, match=r"model\.optimizer: Muon .* FSDP2"):
            check_optimizer_params(cls, named)
    check_optimizer_params(torch.optim.AdamW, named)  # elementwise optimisers shard fine
    assert optimizer_class(functools.partial(lambda *a: None, object(), torch.optim.SGD)) is torch.optim.SGD
