"""A divergence monitor: tells a training loop when its run has died, and which state was last alive.

Step ``t`` (1-based) updates state ``t - 1`` into state ``t``; its metrics (loss, gradient norm)
are those of state ``t - 1``. :meth:`DivergenceMonitor.update` reads them and says:

* **diverged**, at once, when the loss or the gradient norm is not finite (NaN/Inf);
* **suspect** when the state looks dead, on a step with target tokens:

  - *uniform collapse*: ``|loss - ln V| < uniform_tolerance`` (1e-3 nats; ``V`` the vocabulary)
    **and** ``grad_norm < flat_grad_norm`` (1e-6). The model predicts the uniform distribution and
    nothing moves it: the state of ``learning_rate=1e6``, whose saturated activations give an
    exactly flat output. A live model at loss ``ln V`` has a large gradient (the softmax error
    ``1/V - onehot`` is not small), so both conditions together do not happen in healthy training;
  - *zero gradient*: ``grad_norm == 0``: no adapter can learn anything from here;

* **diverged** once ``patience`` (3) consecutive steps are suspect, so that one odd batch cannot
  stop a run;
* **healthy** otherwise, which also proves state ``t - 1`` good: :attr:`last_good_state`.

Steps without target tokens prove nothing and change nothing. A held-out loss that is not finite
(:meth:`check_eval`) diverges at once. The monitor only reads numbers; the caller decides what to
do (the recipe's loop stops, keeps only checkpoints up to :attr:`last_good_state` and never saves
while the monitor is not healthy).
"""

from __future__ import annotations

import dataclasses
import math

__all__ = ["DivergenceMonitor", "Health", "HEALTHY", "SUSPECT", "DIVERGED"]

HEALTHY, SUSPECT, DIVERGED = "healthy", "suspect", "diverged"


@dataclasses.dataclass(frozen=True)
class Health:
    """The monitor's verdict after a step: ``status`` (healthy, suspect or diverged) and why."""

    step: int
    status: str
    reason: str = ""
    # The first step of the suspect streak that ended in divergence (or the diverging step itself).
    since_step: int | None = None

    @property
    def healthy(self) -> bool:
        return self.status == HEALTHY

    @property
    def diverged(self) -> bool:
        return self.status == DIVERGED


class DivergenceMonitor:
    """See the module docstring. ``start_step``: the step the loop starts from (a resumed run's)."""

    def __init__(self, vocab_size: int, *, start_step: int = 0, patience: int = 3, uniform_tolerance: float = 1e-3,
                 flat_grad_norm: float = 1e-6):
        if vocab_size < 2 or patience < 1 or not uniform_tolerance > 0 or not flat_grad_norm > 0:
            raise ValueError("DivergenceMonitor needs vocab_size >= 2, patience >= 1 and positive tolerances")
        self.uniform_loss = math.log(vocab_size)
        self.patience = patience
        self.uniform_tolerance = uniform_tolerance
        self.flat_grad_norm = flat_grad_norm
        # The restored state has not been re-proven, but the states before it have.
        self.last_good_state = start_step - 1
        self._suspect_since: int | None = None
        self._suspect_count = 0

    def _suspicion(self, loss: float, grad_norm: float) -> str | None:
        if abs(loss - self.uniform_loss) < self.uniform_tolerance and grad_norm < self.flat_grad_norm:
            return (f"collapse to the uniform output: loss {loss:.6f} = ln(vocab) {self.uniform_loss:.6f} with a flat "
                    f"gradient (norm {grad_norm:.3g})")
        if grad_norm == 0.0:
            return f"zero gradient norm on the trainable parameters (loss {loss:.6f})"
        return None

    def update(self, step: int, *, loss: float, grad_norm: float, tokens: float) -> Health:
        """The verdict on step ``step`` from its metrics (``tokens``: target tokens of the step)."""
        loss, grad_norm = float(loss), float(grad_norm)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return Health(step, DIVERGED, f"non-finite loss or gradient (loss={loss}, grad_norm={grad_norm})", step)
        if tokens <= 0:
            return Health(step, HEALTHY if self._suspect_count == 0 else SUSPECT, "no target tokens")
        reason = self._suspicion(loss, grad_norm)
        if reason is None:
            self._suspect_since, self._suspect_count = None, 0
            self.last_good_state = step - 1
            return Health(step, HEALTHY)
        if self._suspect_count == 0:
            self._suspect_since = step
        self._suspect_count += 1
        if self._suspect_count >= self.patience:
            return Health(step, DIVERGED, f"{reason}, for {self._suspect_count} steps", self._suspect_since)
        return Health(step, SUSPECT, reason, self._suspect_since)

    def check_eval(self, step: int, eval_loss: float) -> Health:
        """The verdict on state ``step`` from its held-out loss: diverged if it is not finite."""
        if not math.isfinite(eval_loss):
            return Health(step, DIVERGED, f"non-finite held-out loss ({eval_loss}) of the state after step {step}")
        return Health(step, HEALTHY if self._suspect_count == 0 else SUSPECT)

    def confirm_final(self, step: int, eval_loss: float) -> None:
        """A finite held-out loss of the final state ``step``, with no suspicion pending, proves it good."""
        if math.isfinite(eval_loss) and self._suspect_count == 0:
            self.last_good_state = max(self.last_good_state, step)
