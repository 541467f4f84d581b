"""Small assertions shared by several test files."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def same_params(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """True when the two models' state dicts hold bit-identical tensors."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def flat(model: torch.nn.Module) -> torch.Tensor:
    """The model's parameters as one detached flat vector."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def assert_cg_done_in_one_step(op, b: torch.Tensor, preconditioner: str, options: dict) -> None:
    """A preconditioner that inverts the damped curvature exactly: preconditioned CG converges in at most
    two steps (one, up to rounding) where plain CG needs more, and reaches plain CG's solution."""
    from unlearn_fast.influence.solvers import solve_operator

    plain = solve_operator(op, b, tol=1e-10, max_iter=500)
    pre = solve_operator(op, b, tol=1e-10, max_iter=500, preconditioner=preconditioner, preconditioner_options=options)
    assert pre.converged and f"{preconditioner} preconditioner" in pre.message
    assert pre.iterations <= 2 < plain.iterations
    torch.testing.assert_close(pre.solution, plain.solution, rtol=1e-8, atol=1e-8)


LOGISTIC_LAMBDA = 1e-2


def logistic_problem(name: str) -> tuple[torch.nn.Module, torch.utils.data.TensorDataset]:
    """(L2-regularised logistic regression fitted to its optimum, its TensorDataset), float64, on
    scikit-learn's ``"breast_cancer"`` (569 × 30, 2 classes) or ``"digits"`` (1,797 × 64, 10 classes),
    features standardised (constant ones left at 0)."""
    from sklearn.datasets import load_breast_cancer, load_digits

    bunch = {"breast_cancer": load_breast_cancer, "digits": load_digits}[name]()
    spread = bunch.data.std(0)
    x = torch.tensor((bunch.data - bunch.data.mean(0)) / np.where(spread > 0, spread, 1.0), dtype=torch.float64)
    y = torch.tensor(bunch.target, dtype=torch.long)
    torch.manual_seed(0)
    model = fit_logistic_to_optimum(torch.nn.Linear(x.shape[1], int(y.max()) + 1).double(), x, y)
    return model, torch.utils.data.TensorDataset(x, y)


def retrained_logistic(data: torch.utils.data.TensorDataset, forget: list[int]) -> torch.nn.Module:
    """The logistic regression of :func:`logistic_problem` fitted to its optimum without ``forget``."""
    x, y = data.tensors
    keep = torch.tensor(sorted(set(range(len(x))) - set(forget)))
    torch.manual_seed(0)
    return fit_logistic_to_optimum(torch.nn.Linear(x.shape[1], int(y.max()) + 1).double(), x[keep], y[keep])


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


# -- small models shared by the per-sample tests --------------------------------------------------

class TextModel(nn.Module):
    """Embedding (with padding row) → LayerNorm → Linear, mean over real tokens, × a bare scalar Parameter."""

    def __init__(self, vocab: int, d: int, classes: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, classes)
        self.scale = nn.Parameter(torch.ones(()))  # no rule: exercises the torch.func fallback

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != 0).unsqueeze(-1).to(self.fc.weight.dtype)
        h = self.fc(self.ln(self.emb(ids))) * mask
        return h.sum(1) / mask.sum(1).clamp(min=1) * self.scale


class ScaledLinear(nn.Module):
    """Linear(d_in, d_out) times a bare per-output parameter ``scale``, which no per-layer rule covers."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.body, self.scale = nn.Linear(d_in, d_out), nn.Parameter(torch.ones(d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * self.scale


class SharedWeight(nn.Module):
    """Linear 'a' whose weight is also used through F.linear outside its own call, then Linear 'b' (3 → d_out)."""

    def __init__(self, d_out: int) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        return self.b(h + torch.nn.functional.linear(h, self.a.weight))


def padded_ids(b: int, t: int, vocab: int) -> torch.Tensor:
    """[b, t] token ids in [1, vocab), right-padded with 0 to random lengths in [1, t]."""
    ids = torch.randint(1, vocab, (b, t))
    lengths = torch.randint(1, t + 1, (b,))
    ids[torch.arange(t)[None, :] >= lengths[:, None]] = 0
    return ids


class SequenceModel(nn.Module):
    """Linear over [B, T, d_in] positions, then a masked mean: the Linear sees sequences."""

    def __init__(self, d_in: int, d_hidden: int, classes: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_hidden)
        self.head = nn.Linear(d_hidden, classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(x))).mean(1)


def cnn_with_batchnorm(c_in: int, c_out: int, h: int, w: int, kernel: int, stride: int, padding: int,
                       classes: int) -> nn.Sequential:
    """Conv2d → BatchNorm2d (random running statistics, for eval mode) → ReLU → Linear, for [B, c_in, h, w]."""
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding)
    out_h = (h + 2 * padding - kernel) // stride + 1
    out_w = (w + 2 * padding - kernel) // stride + 1
    bn = nn.BatchNorm2d(c_out)
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    return nn.Sequential(conv, bn, nn.ReLU(), nn.Flatten(), nn.Linear(c_out * out_h * out_w, classes))


def tiny_gpt2() -> nn.Module:
    """Embedding (padding row 0, vocab 13) → one transformers GPT2Block (Conv1D layers, width 8) → masked mean → Linear(8, 3)."""
    import transformers
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    config = transformers.GPT2Config(n_embd=8, n_head=2, n_layer=1, n_positions=16, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    config._attn_implementation = "eager"

    class TinyGPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(13, 8, padding_idx=0)
            self.block = GPT2Block(config, layer_idx=0)
            self.head = nn.Linear(8, 3)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            hidden = self.block(self.emb(ids))
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            mask = (ids != 0).unsqueeze(-1).to(hidden.dtype)  # causal block + right padding: pads never reach real tokens
            return self.head((hidden * mask).sum(1) / mask.sum(1))

    return TinyGPT()


def gpt2_ids() -> torch.Tensor:
    """[4, 6] ids for :func:`tiny_gpt2`, two of them right-padded."""
    ids = torch.randint(1, 13, (4, 6))
    ids[0, 4:] = 0
    ids[2, 2:] = 0
    return ids


def forget_report(task, model: nn.Module) -> dict[str, dict[str, float]]:
    """Target loss, target accuracy and test accuracy of ``original``, ``oracle`` and ``model`` on the
    quick task (conftest.quick_task): {"original": {...}, "oracle": {...}, "method": {...}}."""
    from unlearn_fast.evaluate import Evaluation

    out = {}
    for name, m in (("original", task.original), ("oracle", task.oracle), ("method", model)):
        ev = Evaluation(m, task.data, device="cpu")
        targets, similar = ev.outputs("targets"), ev.outputs("similar")
        out[name] = {"target_loss": float(targets.loss.mean()), "target_acc": float(targets.correct.mean()),
                     "similar_loss": float(similar.loss.mean()), "similar_acc": float(similar.correct.mean()),
                     "test_acc": float(ev.outputs("test").correct.mean())}
    return out


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖_F / ‖want‖_F in float64; got must have want's shape and be finite."""
    assert got.shape == want.shape, (got.shape, want.shape)
    assert torch.isfinite(got).all(), "a kernel produced non-finite values from finite inputs"
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def layer_factors(b: int, t: int, d_in: int, d_out: int, dtype: torch.dtype = torch.float32, seed: int = 0,
                  device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random A [B, T, d_in] and G [B, T, d_out] of one layer, rounded to ``dtype``, on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(b, t, d_in, generator=gen).to(dtype)
    g = torch.randn(b, t, d_out, generator=gen).to(dtype)
    return a.to(device), g.to(device)
