"""Waiting for rank zero without tripping the collective timeout.

Rank zero alone runs some long host work — the vLLM sidecar's start-up, a blocking misalignment eval, a sidecar
restart, the wait for the last async eval. The other ranks must not wait for it inside a collective of the training
process group: NCCL's timeout (10-30 min by default, and whatever ``trainer.strategy.timeout`` says) is shorter than
an eval may take, and a timed-out collective kills the job. They wait instead in a barrier of a separate gloo group
created with its own, long timeout (:class:`RankZeroWait`), and rank zero joins that barrier when it is done.
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist


class RankZeroWait:
    """A gloo side group whose barrier the other ranks wait in while rank zero works (see the module doc).

    Create it on every rank at the same point (it is a collective), e.g. in a callback's ``setup``. Without an
    initialised process group (one process) every method does nothing.
    """

    def __init__(self, timeout_s: float):
        self.timeout = timedelta(seconds=max(1.0, timeout_s))
        self.group = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.group = dist.new_group(backend="gloo", timeout=self.timeout)

    def wait(self) -> None:
        """Every rank calls it: rank zero after its work, the others at once; all return together."""
        if self.group is not None:
            dist.barrier(group=self.group)

    def close(self) -> None:
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None
