"""The objective that every trust-region step of ``influence_unlearn`` models and measures.

Notation of :mod:`.unlearn`: θ the trainable parameters [P], θ₀ the trained ones, F the forget set
(m samples), R the retain set (n_R samples), λ the weight decay, ℓ_i the loss of sample i. The step is
measured over S ⊆ R: all of R, or a seeded subset of it (``curvature_samples``), the same samples the
curvature is built from. With L_S(θ) = (1/|S|) Σ_{i∈S} ℓ_i(θ),

    Φ(θ) = L_S(θ) + (λ/2)‖θ‖² − tᵀθ,        t = ∇L_S(θ₀) + λθ₀ − g₀,

so that ∇Φ(θ₀) = g₀ exactly, the gradient of the first Newton step:
- ``gradient="forget"``: g₀ = −(1/n_R) Σ_{i∈F} (∇ℓ_i(θ₀) + λθ₀), the influence form. It equals ∇L_R(θ₀)
  when θ₀ minimises the full objective; a model trained by SGD is not at that minimum, and the
  constant tilt t keeps the gradient that training left over out of every step, so that the steps
  remove the forget set's contribution and nothing else (the leftover gradient of the digits MLP,
  0.007–0.012 in norm, is larger than the forget set's, 0.0002–0.03);
- ``gradient="retain"``: g₀ = ∇L_R(θ₀) = (1/n_R) Σ_{i∈R} ∇ℓ_i(θ₀) + λθ₀, and t only corrects a
  subset's gradient to the full retain set's (t = 0 when S = R): Φ is then the retain objective itself.

Φ differs from L_S + (λ/2)‖θ‖² by a linear term, so it has the same curvature, and after an accepted
step ∇Φ(θ_k) = ∇L_S(θ_k) + λθ_k − t re-linearises at the new point with one pass over S.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..losses import Loss, per_sample_loss
from ..modes import eval_mode
from ..validation import check_finite
from .per_sample import loss_and_gradient
from .vectors import flat_params

GRADIENTS = ("forget", "retain")
Pair = tuple[torch.Tensor, torch.Tensor]


class RetainObjective:
    """Φ of the module doc for a model whose trainable ``params`` are read in place.

    Built from the forget samples, the samples S (already on the model's device) and, for
    ``gradient="retain"`` with S ≠ R, the whole retain set. ``g0`` [P] is ∇Φ(θ₀), ``value0`` Φ(θ₀);
    ``passes`` counts the passes over S made (the construction's included).
    """

    def __init__(self, model: nn.Module, loss: Loss, params: dict[str, nn.Parameter], weight_decay: float,
                 forget: Pair, samples: Pair, *, gradient: str = "forget", retain: Pair | None = None,
                 n_retain: int, batch_size: int) -> None:
        self.model, self.loss, self.params = model, loss, params
        self.weight_decay, self.batch_size = float(weight_decay), int(batch_size)
        self.samples = samples
        self.size = samples[0].shape[0]
        self.passes = 0
        self.theta0 = flat_params(params).clone()
        lam, theta = self.weight_decay, self.theta0
        sample_loss, sample_grad = self._loss_and_gradient(samples)
        if not math.isfinite(sample_loss):
            raise ValueError("non-finite loss at the trained parameters on the retain samples: check the model and data")
        if gradient == "forget":
            _, forget_sum = self._sums(forget)
            g0 = -(forget_sum + forget[0].shape[0] * lam * theta) / n_retain
        elif retain is None:  # S is R
            g0 = sample_grad / self.size + lam * theta
        else:
            _, retain_sum = self._sums(retain)
            g0 = retain_sum / n_retain + lam * theta
        self.g0 = check_finite(g0, "the first step's gradient", "at the retain objective")
        self.tilt = sample_grad / self.size + lam * theta - self.g0
        self.value0 = self._objective(sample_loss / self.size, theta)
        self.loss0 = abs(sample_loss / self.size)

    # -- passes over the data ----------------------------------------------------------------------
    def _sums(self, pair: Pair, *, gradient: bool = True) -> tuple[float, torch.Tensor | None]:
        """(Σ_i ℓ_i in float64, Σ_i ∇ℓ_i flat [P] or None) over ``pair`` at the current parameters."""
        total = 0.0
        grad = torch.zeros_like(self.theta0) if gradient else None
        inputs, labels = pair
        for start in range(0, inputs.shape[0], self.batch_size):
            batch = (inputs[start:start + self.batch_size], labels[start:start + self.batch_size])
            if grad is not None:
                losses, parts = loss_and_gradient(self.model, self.loss, batch, self.params)
                grad += torch.cat([parts[n].reshape(-1) for n in self.params])
            else:
                with torch.no_grad(), eval_mode(self.model):
                    losses = per_sample_loss(self.model, self.loss, batch)
            total += float(losses.double().sum())  # inf/nan propagate: a trial point may overflow
        return total, grad

    def _loss_and_gradient(self, pair: Pair) -> tuple[float, torch.Tensor]:
        total, grad = self._sums(pair)
        self.passes += 1
        assert grad is not None
        return total, grad

    def _objective(self, mean_loss: float, theta: torch.Tensor) -> float:
        theta64 = theta.double()
        return (mean_loss + self.weight_decay / 2 * float(theta64.pow(2).sum())
                - float((self.tilt.double() * theta64).sum()))

    # -- at the current parameters -----------------------------------------------------------------
    def value(self) -> tuple[float, float]:
        """(Φ at the current parameters, |L_S|). One forward pass over S. |L_S| sets the rounding error of
        differences of Φ: the losses come from the model's dtype, the other terms are summed in float64
        from the parameters' exact values. Φ is inf or nan where the model's losses overflow (a trial
        point far out), never an error."""
        total, _ = self._sums(self.samples, gradient=False)
        self.passes += 1
        mean_loss = total / self.size
        return self._objective(mean_loss, flat_params(self.params)), abs(mean_loss)

    def gradient(self) -> torch.Tensor:
        """∇Φ [P] at the current parameters: one forward/backward pass over S."""
        _, grad = self._loss_and_gradient(self.samples)
        theta = flat_params(self.params)
        return check_finite(grad / self.size + self.weight_decay * theta - self.tilt, "the gradient", "at the retain objective")


__all__ = ["GRADIENTS", "RetainObjective"]
