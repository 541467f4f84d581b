"""Small assertions shared by several test files."""

from __future__ import annotations

import torch


def same_params(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """True when the two models' state dicts hold bit-identical tensors."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def flat(model: torch.nn.Module) -> torch.Tensor:
    """The model's parameters as one detached flat vector."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


LOGISTIC_LAMBDA = 1e-2


def fit_logistic_to_optimum(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.nn.Module:
    """Minimise mean CE + (λ/2)‖θ‖² (λ = LOGISTIC_LAMBDA) to machine precision with L-BFGS in float64."""
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-15,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        objective = torch.nn.functional.cross_entropy(model(x), y) + LOGISTIC_LAMBDA / 2 * sum(p.pow(2).sum() for p in model.parameters())
        objective.backward()
        return objective

    for _ in range(5):
        opt.step(closure)
    return model
