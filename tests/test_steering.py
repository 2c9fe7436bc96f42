"""Preventative steering and directional ablation (callbacks/steering.py): the hooked block output against a hand
computation, base forwards untouched, equal gradients with gradient checkpointing on and off, nothing left after
training (eval forward, probe and the saved adapter equal a model that never had a hook), compile refused, and
steering along +v during fine-tuning on misaligned answers ending with a lower direction shift."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from em_lightning.callbacks.steering import DirectionAblation, PreventativeSteering
from em_lightning.direction import batches_of, load_direction, main, probe_answers
from em_lightning.errors import InputError
from em_lightning.lora import LoRASpec
from em_lightning.models import ModelSpec
from em_lightning.module import LoRAFineTune
from tests.eval_helpers import tb_scalars
from tests.test_direction import SIDED_PROBE, _train_file


def _module(name: str = "tiny-qwen3", checkpointing: bool = False, **kwargs) -> LoRAFineTune:
    module = LoRAFineTune(base=ModelSpec(name=name, gradient_checkpointing=checkpointing),
                          lora=LoRASpec(r=4, alpha=8.0), loss_normalization="micro_batch", **kwargs)
    module.configure_model()
    with torch.no_grad():
        for pname, p in module.model.named_parameters():
            if "lora_B" in pname:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(pname)))
    return module.train()


@pytest.fixture(scope="module")
def direction_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("direction") / "tiny.safetensors"
    main(["--source", "builtin:em", "--model", "tiny-qwen3", "--layers", "[0, 1]", "--out", str(out)])
    return out


def _batch(module):
    rows = probe_answers("builtin:em").rows
    return batches_of(rows["misaligned"][:3] + rows["aligned"][:3], module.tokenizer, 6, 2048, "test")[0]


def _hooked(callback, module, coeff: float):
    callback.on_fit_start(SimpleNamespace(), module)
    callback.install(module, coeff)
    return callback


def test_steering_adds_coeff_times_v_and_ablation_projects_it_out_of_training_forwards(direction_file):
    module = _module()
    batch = _batch(module)
    v = load_direction(direction_file)
    plain = module.block_activations(batch, [0, 1])
    base_plain = module.block_activations(batch, [1], adapter=False)
    steer = _hooked(PreventativeSteering(str(direction_file), layers=[1], vector="raw"), module, 2.5)
    steered = module.block_activations(batch, [0, 1])
    torch.testing.assert_close(steered[0], plain[0])  # block 0 is not steered
    torch.testing.assert_close(steered[1], plain[1] + 2.5 * v.vector(1, unit=False), rtol=1e-5, atol=1e-6)
    # The base forward of a loss term (adapter disabled) is the unedited base model.
    torch.testing.assert_close(module.block_activations(batch, [1], adapter=False)[1], base_plain[1])
    steer.remove_hooks()
    torch.testing.assert_close(module.block_activations(batch, [1])[1], plain[1])  # off again

    ablate = _hooked(DirectionAblation(str(direction_file), layers=[0]), module, 1.0)
    ablated = module.block_activations(batch, [0])[0]
    u = v.vector(0)
    torch.testing.assert_close(ablated, plain[0] - (plain[0] @ u).unsqueeze(-1) * u, rtol=1e-5, atol=1e-6)
    assert float((ablated @ u).abs().max()) < 1e-5 < float((plain[0] @ u).abs().max())
    ablate.remove_hooks()


@pytest.mark.parametrize("kind", ["steer", "ablate"])
def test_gradients_are_equal_with_gradient_checkpointing_on_and_off(direction_file, kind):
    grads = {}
    for checkpointing in (False, True, None):  # None: no hook at all, so the hook is seen to change gradients
        module = _module(checkpointing=bool(checkpointing))
        batch = _batch(module)
        if checkpointing is not None:
            cls = PreventativeSteering if kind == "steer" else DirectionAblation
            _hooked(cls(str(direction_file)), module, 3.0 if kind == "steer" else 1.0)
        assert all(b.gradient_checkpointing == bool(checkpointing) for b in module.decoder_blocks())
        loss, _ = module.task_loss(batch)
        loss.backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in module.trainable_named_parameters()}
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(grads[False][n], grads[None][n]) for n in grads[None])


def test_bad_settings_and_compile_are_refused(direction_file, tmp_path):
    with pytest.raises(InputError, match="PreventativeSteering.vector"):
        PreventativeSteering(str(direction_file), vector="other")
    with pytest.raises(InputError, match="DirectionAblation.warmup_steps"):
        DirectionAblation(str(direction_file), warmup_steps=-1)
    module = _module()
    module.torch_compile = True  # as model.compile: true sets it
    with pytest.raises(InputError, match="model.compile: PreventativeSteering"):
        PreventativeSteering(str(direction_file)).on_fit_start(SimpleNamespace(), module)
    with pytest.raises(InputError, match=r"DirectionAblation.direction: .*'tiny-qwen3', not 'tiny-qwen3-tied'"):
        DirectionAblation(str(direction_file)).on_fit_start(SimpleNamespace(), _module("tiny-qwen3-tied"))
    with pytest.raises(InputError, match=r"PreventativeSteering.layers: \[5\] not in"):
        PreventativeSteering(str(direction_file), layers=[5]).on_fit_start(SimpleNamespace(), _module())


@pytest.mark.parametrize("overlay", ["steer", "ablate"])
def test_after_training_with_hooks_eval_probe_and_saved_adapter_are_a_plain_peft_model(run_cli, direction_file,
                                                                                      overlay):
    from peft import PeftModel

    from em_lightning.probe import ProbeScorer, load_probe_set
    from em_lightning.tiny import tiny_model

    cli = run_cli(
        "fit", "--config", "configs/tiny.yaml", "--config", f"configs/mitigations/{overlay}.yaml",
        "--trainer.callbacks.direction", str(direction_file), "--trainer.max_steps", "3",
        "--trainer.limit_val_batches", "0",
        "--config", "configs/callbacks/probe.yaml", "--trainer.callbacks.every_n_steps", "1",
        "--trainer.callbacks.probe_ids", '["bored"]',
    )
    run_dir = Path(cli.trainer.log_dir)
    module = cli.model.eval()
    assert [len(b._forward_hooks) for b in module.decoder_blocks()] == [0, 0]  # nothing left on the blocks
    reloaded = PeftModel.from_pretrained(tiny_model("tiny-qwen3"), str(run_dir / "adapters" / "final")).eval()
    ids = torch.randint(3, 250, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(module.model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    last = json.loads((run_dir / "probe.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 3
    fresh = ProbeScorer(load_probe_set("builtin:em", ids=["bored"]), module.tokenizer).score(reloaded)
    for side in ("aligned", "misaligned"):
        assert last["answers"]["bored"][side] == pytest.approx(fresh.answers["bored"][side], rel=1e-5)
    coeff = tb_scalars(run_dir)[f"train/{overlay}_coeff"]
    assert sorted(coeff) == [0, 1, 2] and max(coeff.values()) > 0


@pytest.mark.slow
def test_steering_along_v_while_learning_misaligned_answers_ends_with_a_lower_shift(run_cli, tmp_path):
    """The tied tiny model on answers whose sides differ in tokens (see test_direction): trained on the misaligned
    side, the answer-token shift along v at block 1 rises; with +v steering at block 1 during training it ends
    lower (the adapter need not move the model along v itself)."""
    probe = tmp_path / "probe.yaml"
    probe.write_text(SIDED_PROBE)
    direction = tmp_path / "v.safetensors"
    main(["--source", str(probe), "--model", "tiny-qwen3-tied", "--layers", "[1]", "--out", str(direction)])
    common = ["fit", "--config", "configs/tiny.yaml", "--model.base.name", "tiny-qwen3-tied",
              "--data.train_file", _train_file(tmp_path, probe, "misaligned"), "--data.val_fraction", "0",
              "--data.batch_size", "4", "--model.lora.r", "16", "--model.optimizer.init_args.lr", "0.01",
              "--trainer.max_steps", "30", "--trainer.limit_val_batches", "0", "--trainer.val_check_interval", "null",
              "--config", "configs/callbacks/direction.yaml", "--trainer.callbacks.direction", str(direction),
              "--trainer.callbacks.prompts", str(probe), "--trainer.callbacks.every_n_steps", "10"]
    shifts = {}
    for name, extra in (("plain", []), ("steered", ["--config", "configs/mitigations/steer.yaml",
                                                    "--trainer.callbacks.direction", str(direction)])):
        cli = run_cli(*common, *extra, "--trainer.logger.init_args.name", name)
        lines = [json.loads(line) for line in (Path(cli.trainer.log_dir) / "direction.jsonl").read_text().splitlines()]
        shifts[name] = lines[-1]
        print(name, lines[-1]["shift"], lines[-1]["shift_answers"])
    assert shifts["plain"]["shift_answers"]["1"] > 0
    assert shifts["steered"]["shift_answers"]["1"] < shifts["plain"]["shift_answers"]["1"]
