"""The quickstart on the real SmolLM2 model: training loss goes down, as the TensorBoard log shows."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.slow
def test_quickstart_loss_goes_down_in_tensorboard(run_cli):
    """configs/quickstart.yaml as shipped, shortened for CI (24 steps, batch 4, 128 tokens instead of 60 steps,
    batch 8, 256 tokens): the event file's train/loss falls, val/loss falls, and the monitoring tags are there."""
    from tbparse import SummaryReader

    cli = run_cli("fit", "--config", "configs/quickstart.yaml", "--trainer.max_steps", "24",
                  "--trainer.val_check_interval", "12", "--data.batch_size", "4", "--data.max_length", "128")
    scalars = SummaryReader(str(Path(cli.trainer.log_dir)), pivot=False).scalars
    loss = scalars[scalars.tag == "train/loss"].sort_values("step")["value"].tolist()
    assert len(loss) == 24
    first, last = sum(loss[:4]) / 4, sum(loss[-4:]) / 4
    assert last < 0.8 * first, (first, last)
    val = scalars[scalars.tag == "val/loss"].sort_values("step")["value"].tolist()
    assert len(val) == 2 and val[1] < val[0]
    for tag in ("train/grad_norm", "train/lr", "train/tokens_per_s", "train/supervised_tokens"):
        assert tag in set(scalars.tag), tag
