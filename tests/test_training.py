"""The training core end to end on the tiny model: every optimiser, checkpoints and resume, adapter export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from em_lightning.tiny import tiny_model
from tests.helpers import LossRecorder, ParamSnapshot, find

OPTIMISERS = ["sgd", "adam", "adamw", "lion", "muon"]


@pytest.mark.parametrize("name", OPTIMISERS)
def test_each_optimiser_trains_lora_only(run_cli, name):
    cli = run_cli(
        "fit", "--config", "configs/tiny.yaml", "--config", f"configs/optim/{name}.yaml",
        "--trainer.max_steps", "3", "--trainer.callbacks+=tests.helpers.ParamSnapshot",
    )
    assert cli.trainer.global_step == 3
    before = find(cli.trainer, ParamSnapshot).before
    after = dict(cli.model.named_parameters())
    fresh = dict(tiny_model("tiny-qwen3").named_parameters())
    lora = [n for n in after if "lora_" in n]
    base = [n for n in after if "lora_" not in n]
    assert len(lora) == 2 * 7 * 2  # A and B, seven projections, two layers
    for n in base:  # bit-identical to a freshly built base model, not just to the pre-fit copy
        key = n.replace("model.base_model.model.", "", 1).replace(".base_layer", "")
        assert torch.equal(after[n], before[n]) and torch.equal(after[n], fresh[key]), n
    for n in lora:
        assert not torch.equal(after[n], before[n]), f"{name} did not update {n}"
    assert all(after[n].abs().sum() > 0 for n in lora if "lora_B" in n)


def test_adapter_dir_loads_in_peft_and_matches(run_cli):
    from peft import PeftModel

    cli = run_cli("fit", "--config", "configs/tiny.yaml", "--trainer.max_steps", "10")
    run_dir = Path(cli.trainer.log_dir)
    assert (run_dir / "config.yaml").exists()
    assert (run_dir / "adapters" / "step-10" / "adapter_model.safetensors").exists()
    final = run_dir / "adapters" / "final"
    assert (final / "adapter_config.json").exists()
    loaded = PeftModel.from_pretrained(tiny_model("tiny-qwen3"), str(final)).eval()
    trained = cli.model.model.eval()
    ids = torch.randint(0, 250, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trained(ids).logits)


def test_checkpoint_holds_adapter_only_and_loads_back(run_cli):
    from em_lightning.module import LoRAFineTune

    cli = run_cli("fit", "--config", "configs/tiny.yaml", "--trainer.max_steps", "10")
    path = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    keys = list(ckpt["state_dict"])
    assert keys and all("lora_" in k for k in keys)
    assert "optimizer_states" in ckpt and "loops" in ckpt
    loaded = LoRAFineTune.load_from_checkpoint(str(path))
    trained = dict(cli.model.named_parameters())
    for n, p in loaded.named_parameters():
        assert torch.equal(p, trained[n]), n


@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_resume_gives_the_uninterrupted_loss(run_cli, optim, tmp_path):
    """Stop after step k, resume from the checkpoint into zeroed adapters, and get step k+1's loss exactly."""
    from em_lightning.cli import EMLightningCLI

    k = 10  # configs/tiny.yaml checkpoints every 10 steps, mid-epoch
    common = ["fit", "--config", "configs/tiny.yaml", "--config", f"configs/optim/{optim}.yaml",
              "--trainer.callbacks+=tests.helpers.LossRecorder"]
    full = run_cli(*common, "--trainer.max_steps", str(k + 1))
    expected = find(full.trainer, LossRecorder).losses[k + 1]

    stopped = run_cli(*common, "--trainer.max_steps", str(k))
    ckpt = Path(stopped.trainer.log_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == k

    from tests.conftest import CONFIGS

    args = [a.replace("configs/", f"{CONFIGS}/", 1) if a.startswith("configs/") else a for a in common]
    resumed = EMLightningCLI(args=[*args[1:], "--trainer.max_steps", str(k + 1)], run=False)
    resumed.model.configure_model()
    with torch.no_grad():  # a silent partial load would leave these zeros and change the loss
        for n, p in resumed.model.named_parameters():
            if "lora_" in n:
                p.zero_()
    resumed.trainer.fit(resumed.model, datamodule=resumed.datamodule, ckpt_path=str(ckpt))
    got = find(resumed.trainer, LossRecorder).losses
    assert list(got) == [k + 1]
    assert got[k + 1] == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_saved_config_reruns_and_validate_runs(run_cli):
    first = run_cli("fit", "--config", "configs/tiny.yaml", "--trainer.max_steps", "2")
    saved = Path(first.trainer.log_dir) / "config.yaml"
    again = run_cli("fit", "--config", str(saved))
    assert again.trainer.global_step == 2
    assert Path(again.trainer.log_dir) != Path(first.trainer.log_dir)  # a new version dir, nothing overwritten
    ckpt = Path(first.trainer.log_dir) / "checkpoints" / "last.ckpt"
    validated = run_cli("validate", "--config", "configs/tiny.yaml", "--ckpt_path", str(ckpt))
    assert "val/loss" in validated.trainer.callback_metrics
