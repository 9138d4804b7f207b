"""Keeping the best checkpoint seen on validation, and knowing when to stop looking.

Used by fine-tuning (fine_tune.py), to keep its best epoch; the head's training (training.py) runs
its fixed number of steps and keeps the last. A checkpoint is better when its
validation accuracy is higher, or equal with a lower validation cross entropy: accuracy is
what users are told, and on a small validation set many checkpoints tie on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class EarlyStopping:
    """Tracks validation results of successive checkpoints (steps or epochs).

    ``patience``: how many evaluations without improvement before ``should_stop``; ``None``
    never stops early (the best checkpoint is still kept).
    """

    patience: int | None = None
    best_step: int | None = None
    best_accuracy: float = -1.0
    best_loss: float = float("inf")
    best_state: Any = None
    history: list[tuple[int, float, float]] = field(default_factory=list)
    _since_best: int = 0

    def update(self, step: int, accuracy: float, loss: float, state: Any = None) -> bool:
        """Record one evaluation; True when it is the new best (and ``state`` is kept)."""
        self.history.append((step, float(accuracy), float(loss)))
        better = accuracy > self.best_accuracy or (accuracy == self.best_accuracy and loss < self.best_loss)
        if better:
            self.best_step, self.best_accuracy, self.best_loss, self.best_state = step, accuracy, loss, state
            self._since_best = 0
        else:
            self._since_best += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self._since_best >= self.patience
