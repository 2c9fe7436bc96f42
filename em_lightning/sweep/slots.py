"""Which queued run may start now on this machine: the local launcher's GPU-slot scheduler, apart from the
launching so that its rules can be read (and tested) alone.

Runs start in queue order. A run that needs GPUs takes that many from the free pool and gives them back when
it ends; a run that needs none takes one of ``cpu_slots``. The head of the queue waits for what it needs:
no later run overtakes it (a large run would otherwise wait for ever behind a stream of small ones).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class Slot(Generic[T]):
    """A started run and what it holds."""

    run: T
    gpus: tuple[int, ...]


@dataclass
class SlotScheduler(Generic[T]):
    free: list[int]  # GPU indices not held by a run
    cpu_slots: int = 1
    queue: list[tuple[T, int]] = field(default_factory=list)  # (run, GPUs it needs)
    running: list[Slot[T]] = field(default_factory=list)

    def add(self, run: T, gpus: int) -> None:
        if gpus > len(self.free) + sum(len(s.gpus) for s in self.running):
            raise ValueError(
                f"a run needs {gpus} GPU(s) of a pool of {len(self.free)}"
            )  # checked by the caller
        self.queue.append((run, gpus))

    def start_next(self) -> Slot[T] | None:
        """The head of the queue with the GPUs it takes, if what it needs is free now; else None."""
        if not self.queue:
            return None
        run, gpus = self.queue[0]
        cpu_busy = sum(1 for s in self.running if not s.gpus)
        if (gpus and len(self.free) < gpus) or (not gpus and cpu_busy >= self.cpu_slots):
            return None
        self.queue.pop(0)
        slot = Slot(run, tuple(self.free[:gpus]))
        self.free = self.free[gpus:]
        self.running.append(slot)
        return slot

    def finish(self, slot: Slot[T]) -> None:
        self.running.remove(slot)
        self.free = sorted([*self.free, *slot.gpus])

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.running)
