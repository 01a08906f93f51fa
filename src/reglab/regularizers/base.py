"""What every technique is: its declaration (name, keys, strength) and the hooks through which the loop meets it.

A technique is one class in one file of this package (`l1_l2.py`, `dropout.py`, ...), found by its `name`: the
package collects every `Technique` subclass of its modules (`reglab.regularizers.technique_classes`), the schema
validates `regularizer.<name>.*` against its `keys`, and the report plots its `strength_key`. With the YAML
`conf/regularizer/<name>.yaml` (defaults, a comment per key and the sweep grid) nothing else needs editing to add one
(README: "Add your own technique").

The loop trains a *stack* of K members (one job each, K = 1 for an ordinary run), and every technique holds one
setting per member: the member's config node, or None where that member does not use the technique (a technique
that is off is that member's zero strength, and leaves its arithmetic untouched). A technique overrides the hooks
it needs:

    model        dropout_plan(k)        where member k's dropout layers go                 (dropout)
                 setup(model)           once the model exists: e.g. a weight transform     (spectral norm)
    loss         data_loss(...)         the per-member data loss                           (label smoothing)
                 penalty()              per-member penalty added to it                     (L1, L2)
    optimizer    optimizer_groups(k)    member k's parameters with settings of their own   (L2 impl=torch)
                 group_settings(k)      settings of all of member k's optimizer groups     (SWA: its lr schedule)
                 learning_rate(g, plan) a group's rate for its next epoch, or None         (SWA: SWALR's rates)
    step         refine_gradients(f)    after backward: f() re-runs the batch's forward    (SAM: the gradient
                                        and backward (same dropout masks) at moved weights  at w + ρ·g/‖g‖)
                 before_step(lrs)       between backward and optimizer.step                (L2 coupled/decoupled)
                 after_step(lrs)        after optimizer.step                               (proximal L1, max-norm,
                                                                                            EMA, spectral norm)
    epoch end    end_epoch(k, ...)      may stop member k                                  (early stopping, SWA)
    training end selection(k)           which epoch member k keeps, and its weights        (early stopping)
                 final_weights(k)       the weights member k is evaluated with instead     (SWA, EMA: the average)
                 final_metrics(k, ...)  test metrics of its own                            (MC dropout)
    record       describe(k)            what it does to member k, in words                 (L1, L2)
    resume       state_dict(k)          what a checkpoint must keep to continue exactly    (early stopping)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor, nn

if TYPE_CHECKING:
    from reglab.models import MemberView
    from reglab.regularizers.dropout import DropoutPlan
    from reglab.regularizers.early_stopping import EarlyStopping
    from reglab.specs import Spec


class Technique:
    """No-op hooks; each technique overrides the ones it needs. `settings[k]` is member k's config node or None."""

    # The declaration, read by the schema, the report and the docs: every key of `regularizer.<name>` with its
    # type and allowed values, and the key that measures the technique's strength (the report's x-axis).
    name: ClassVar[str] = ""
    keys: ClassVar[Mapping[str, Spec]] = {}
    strength_key: ClassVar[str | None] = None
    strength_scale: ClassVar[str] = "linear"  # "log" for strengths swept over decades (the report's axis)
    order: ClassVar[int] = 100  # hooks run in this order (then by name): e.g. proximal L1 before max-norm
    # True when the technique uses `refine_gradients`: the loop then keeps each batch's dropout noise for a replay
    second_pass: ClassVar[bool] = False

    @classmethod
    def check(cls, settings: Mapping, cfg: Mapping) -> None:
        """Rules across keys (or with the rest of the config), raising ConfigError; each key alone is checked
        against `keys` first."""

    def __init__(self, settings: list[dict | None], seeds: list[int] | None = None):
        self.settings = settings
        # each member's trainer.seed: a technique that draws random numbers seeds a generator per member from it
        # (and saves its state in `state_dict`), so that a stacked member draws exactly what it would alone
        self.seeds = seeds if seeds is not None else [0] * len(settings)

    def members(self) -> list[int]:
        """The members that use this technique (and have not finished training)."""
        return [k for k, s in enumerate(self.settings) if s is not None]

    def retire(self, member: int) -> None:
        """Member `member` has finished: no hook touches it again."""
        self.settings[member] = None

    def setup(self, model: nn.Module) -> None:
        """Called once the model exists (e.g. to pick the parameters to regularize)."""

    def dropout_plan(self, member: int) -> DropoutPlan | None:
        return None

    def data_loss(self, logits: Tensor, y: Tensor, loss: Tensor) -> Tensor:
        """Per-member data loss [K] from logits [K, B, C] and labels [K, B], given the loss so far."""
        return loss

    def penalty(self) -> Tensor | None:
        """Per-member penalty [K] added to the data loss, or None."""
        return None

    def optimizer_groups(self, member: int) -> list[tuple[list[Tensor], dict]]:
        """(parameters, settings) of member k that the optimizer should treat apart, e.g. its decayed weights with
        the optimizer's own weight_decay; every other parameter gets the optimizer's plain settings."""
        return []

    def group_settings(self, member: int) -> dict:
        """Settings added to every optimizer group of member k (members share a group only when these agree), for
        `learning_rate` to read back."""
        return {}

    def learning_rate(self, group: dict, plan: Callable[[int], float]) -> float | None:
        """The rate of optimizer group `group` for its next epoch (`group["epoch"]`, counted from 0), or None to
        keep the schedule's; `plan(epoch)` is the rate trainer.lr_schedule gives any epoch."""
        return None

    def refine_gradients(self, recompute: Callable[[], None]) -> None:
        """Called after the backward pass, when the members' parameter slices hold their gradients. May move
        member weights, call `recompute()` (the same batch's forward and backward again, with the same dropout
        masks: every training member's slices then hold the new gradients), and must put back the weights and, for
        the members it leaves alone, the first gradients."""

    def before_step(self, lrs: list[float]) -> None: ...

    def after_step(self, lrs: list[float]) -> None: ...

    def end_epoch(self, member: int, metrics: dict[str, float], epoch: int, model: MemberView) -> bool:
        return False

    def selection(self, member: int) -> EarlyStopping | None:
        """The tracker that picks member k's best epoch and the weights it ends with, if this technique decides."""
        return None

    def final_weights(self, member: int) -> dict[str, Tensor] | None:
        """The weights (names as `MemberView.state_dict`) that member k is evaluated with when training ends, in
        place of those it ends with (or early stopping restores); None keeps those."""
        return None

    def describe(self, member: int) -> str | None:
        """What this technique actually does to member k, in words (summary.json, W&B, the run's first line)."""
        return None

    def final_metrics(self, member: int, model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> dict:
        """Test metrics of its own for member k's final model (e.g. Monte Carlo dropout's)."""
        return {}

    def state_dict(self, member: int) -> dict:
        return {}

    def load_state_dict(self, member: int, state: dict) -> None: ...
