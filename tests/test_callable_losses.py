"""A callable loss ``(model, batch) -> [B]`` is handed the model itself on every path (issue 19, item 2).

A Hugging Face causal LM, built from a config, and a loss written as its users write one: it calls the
model by keyword (``input_ids=``, ``attention_mask=``), reads ``model.config.vocab_size`` and returns the
per-sequence mean token cross-entropy over the answer tokens (label −100 ignored). Each path is checked
against plain per-sample backward passes in float64.

``layers=`` leaves out GPT-2's tied input embedding / output head and its position embedding (whose
positions [1, T] are broadcast over the batch): per-sample rules for those are another part of issue 19.
The ``norms_fall_back`` fixture takes LayerNorm's per-layer rule away, so that its parameters go through
the materialised torch.func fallback, the path every module type without a rule (RMSNorm, for one) takes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

transformers = pytest.importorskip("transformers")

import unlearn_fast  # noqa: E402
from helpers import rel_error  # noqa: E402
from unlearn_fast.influence import per_sample  # noqa: E402
from unlearn_fast.influence.curvature import CurvatureOperator  # noqa: E402
from unlearn_fast.influence.per_sample import (  # noqa: E402
    fisher_vp, grad_dots, grad_gram, grad_norms, loss_gradient, per_sample_grads)
from unlearn_fast.influence.vectors import as_flat, trainable  # noqa: E402
from unlearn_fast.losses import per_sample_loss_at  # noqa: E402

PAD = 0
VOCAB = 50
BLOCK = ["transformer.h.0", "transformer.ln_f"]  # every parameter but the tied wte/lm_head and wpe
TOL = 1e-8


def tiny_lm(attention: str = "eager", seed: int = 0) -> nn.Module:
    """A float64 GPT2LMHeadModel (1 layer, width 32, 2 heads, vocab 50, 16 positions) from a config, in train mode."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16,
                                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                                     bos_token_id=None, eos_token_id=None)
    config._attn_implementation = attention
    model = transformers.GPT2LMHeadModel(config).double()
    with torch.no_grad():  # LayerNorms away from their (1, 0) start, so that their gradients are generic
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.add_(0.3 * torch.randn_like(module.weight))
                module.bias.add_(0.3 * torch.randn_like(module.bias))
    return model.train()


def token_batch(n: int = 6, t: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [n, t] right-padded with PAD, labels [n, t]: −100 on the padding and on a 2-token prompt)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, t), generator=gen)
    lengths = torch.randint(4, t + 1, (n,), generator=gen)
    ids[torch.arange(t)[None, :] >= lengths[:, None]] = PAD
    labels = ids.masked_fill(ids == PAD, -100)
    labels[:, :2] = -100
    return ids, labels


class TokenLoss:
    """Per-sequence mean token cross-entropy of a causal LM, computed as a user's loss computes it:
    ``model(input_ids=..., attention_mask=...)`` by keyword, ``model.config.vocab_size``. ``penalty``
    adds ½ penalty ‖ln_f.weight‖² to every sample's loss, read directly from the model's attribute.
    Records (the object it was handed, isinstance GPT2LMHeadModel, its ``training`` flag) per call."""

    def __init__(self, penalty: float = 0.0) -> None:
        self.penalty = penalty
        self.handed: list[tuple[object, bool, bool]] = []

    def __call__(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        self.handed.append((model, isinstance(model, transformers.GPT2LMHeadModel), model.training))
        ids, labels = batch
        logits = model(input_ids=ids, attention_mask=(ids != PAD).long()).logits
        vocab = model.config.vocab_size
        tokens = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1),
                                 ignore_index=-100, reduction="none").reshape(ids.shape[0], -1)
        mask = (labels[:, 1:] != -100).to(tokens.dtype)
        losses = (tokens * mask).sum(1) / mask.sum(1).clamp_min(1)
        if self.penalty:
            losses = losses + 0.5 * self.penalty * model.transformer.ln_f.weight.pow(2).sum()
        return losses

    def check_handed(self, model: nn.Module) -> None:
        """Every call got ``model`` itself, in eval mode (the operations' eval_mode), as a GPT2LMHeadModel."""
        assert self.handed, "the loss was never called"
        for obj, is_lm, training in self.handed:
            assert obj is model, f"the loss was handed {type(obj).__name__}, not the model"
            assert is_lm and not training


def reference_grads(model: nn.Module, loss: TokenLoss, batch, params: dict[str, nn.Parameter]) -> torch.Tensor:
    """[B, P] per-sample gradients by one plain backward per sample (eval mode, the model's own parameters)."""
    ids, labels = batch
    was = model.training
    model.eval()
    rows = []
    for i in range(ids.shape[0]):
        value = loss(model, (ids[i:i + 1], labels[i:i + 1]))[0]
        grads = torch.autograd.grad(value, list(params.values()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    model.train(was)
    loss.handed.clear()
    return torch.stack(rows)


@pytest.fixture
def norms_fall_back(monkeypatch):
    """LayerNorm has no per-layer rule within the test: its parameters take the fallback path."""
    original = per_sample.rule_for
    monkeypatch.setattr(per_sample, "rule_for", lambda m: None if isinstance(m, nn.LayerNorm) else original(m))


def test_per_sample_grads_hand_the_model_itself():
    """per_sample_grads (torch.func over every chosen parameter) runs a keyword-calling, config-reading
    loss; a parameter the loss reads directly (the penalty) is the one being differentiated."""
    model, batch = tiny_lm(), token_batch()
    params = trainable(model, BLOCK)
    loss = TokenLoss(penalty=0.7)
    want = reference_grads(model, loss, batch, params)
    got = per_sample_grads(model, loss, batch, layers=BLOCK)
    assert rel_error(torch.cat([got[n].reshape(want.shape[0], -1) for n in params], 1), want) < TOL
    loss.check_handed(model)
    assert model.training  # the model's mode is restored


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_grad_ops_through_rules_and_fallback(norms_fall_back, attention):
    """grad_dots, grad_norms, grad_gram, fisher_vp and loss_gradient with a callable loss: the Conv1D
    layers through their rules, the LayerNorms through the fallback. SDPA attention checks its mask
    with data-dependent control flow, which vmap cannot batch: the fallback then runs sample by sample."""
    model, batch = tiny_lm(attention), token_batch()
    other = token_batch(4, 6, seed=2)
    params = trainable(model, BLOCK)
    loss = TokenLoss(penalty=0.7)
    ref, ref_other = reference_grads(model, loss, batch, params), reference_grads(model, loss, other, params)
    gen = torch.Generator().manual_seed(3)
    vectors = {n: torch.randn(3, *p.shape, generator=gen, dtype=torch.float64) for n, p in params.items()}
    v = as_flat(vectors, params)

    assert rel_error(grad_dots(model, loss, batch, vectors, layers=BLOCK), ref @ v.T) < TOL
    assert rel_error(grad_norms(model, loss, batch, layers=BLOCK), ref.norm(dim=1)) < TOL
    assert rel_error(grad_gram(model, loss, batch, other, layers=BLOCK), ref @ ref_other.T) < TOL
    fisher = as_flat(fisher_vp(model, loss, batch, vectors, params), params)
    assert rel_error(fisher, (ref @ v.T).T @ ref) < TOL
    total = as_flat({n: g.unsqueeze(0) for n, g in loss_gradient(model, loss, batch, params).items()}, params)
    assert rel_error(total[0], ref.sum(0)) < TOL
    loss.check_handed(model)


def test_fisher_curvature_with_a_callable_loss(norms_fall_back):
    """CurvatureOperator(kind="fisher") products, (1/N) Σ_i g_i g_iᵀ v + λ v, with a callable loss."""
    model, batch = tiny_lm(), token_batch()
    params = trainable(model, BLOCK)
    loss = TokenLoss(penalty=0.7)
    ref = reference_grads(model, loss, batch, params)
    v = torch.randn(2, ref.shape[1], generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    op = CurvatureOperator(model, loss, batch, kind="fisher", weight_decay=0.01, layers=BLOCK, batch_size=4)
    assert rel_error(op(v), (ref @ v.T).T @ ref / ref.shape[0] + 0.01 * v) < TOL
    loss.check_handed(model)


def test_hessian_curvature_with_a_callable_loss():
    """CurvatureOperator(kind="hessian") products with a callable loss, against the double backward of
    the mean loss on the model itself. Eager attention: torch has no double backward for SDPA on CPU."""
    model, batch = tiny_lm("eager"), token_batch()
    params = trainable(model, BLOCK)
    loss = TokenLoss(penalty=0.7)
    v = torch.randn(2, sum(p.numel() for p in params.values()), generator=torch.Generator().manual_seed(5),
                    dtype=torch.float64)
    model.eval()
    grads = torch.autograd.grad(loss(model, batch).mean(), list(params.values()), create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    want = torch.stack([torch.cat([h.reshape(-1) for h in torch.autograd.grad(flat @ v[k], list(params.values()),
                                                                               retain_graph=True)])
                        for k in range(v.shape[0])])
    model.train()
    loss.handed.clear()
    op = CurvatureOperator(model, loss, batch, kind="hessian", weight_decay=0.01, layers=BLOCK, batch_size=4)
    assert rel_error(op(v), want + 0.01 * v) < TOL
    loss.check_handed(model)


def test_influence_unlearn_with_a_callable_loss(norms_fall_back):
    """influence_unlearn over a data set of (input_ids, labels) with a callable loss and the Fisher:
    one undamped Newton step, solved directly (woodbury), equals −(F + λI)⁻¹ g₀ from per-sample gradients."""
    model = tiny_lm()
    ids, labels = token_batch(10, 8, seed=6)
    layers = ["transformer.h.0.ln_2", "transformer.h.0.attn.c_proj", "transformer.ln_f"]
    params = trainable(model, layers)
    loss, lam, forget = TokenLoss(penalty=0.7), 0.05, [1, 4]
    retain = [i for i in range(10) if i not in forget]
    ref = reference_grads(model, loss, (ids, labels), params)
    theta0 = torch.cat([p.detach().reshape(-1) for p in params.values()])
    n = len(retain)
    g0 = -(ref[forget].sum(0) + len(forget) * lam * theta0) / n
    curvature = ref[retain].T @ ref[retain] / n + lam * torch.eye(theta0.numel(), dtype=torch.float64)
    want = -torch.linalg.solve(curvature, g0)

    report = unlearn_fast.influence_unlearn(
        model, forget, data=TensorDataset(ids, labels), loss=loss, weight_decay=lam, curvature="fisher",
        solver="woodbury", damping=0.0, steps=1, trust_region=False, layers=layers, tol=1e-12,
        preconditioner=None, device="cpu", progress=False)
    step = torch.cat([p.detach().reshape(-1) for p in params.values()]) - theta0
    assert report.accepted_steps == 1
    assert rel_error(step, want) < 1e-7
    loss.check_handed(model)


def test_per_sample_loss_at_hands_the_model_at_the_given_state():
    """The one helper every path uses: the loss gets the model itself, running on ``state``, called by
    keyword, with its config, its class and its mode; the model's own tensors are back afterwards."""
    model, batch = tiny_lm(), token_batch(3, 6)
    model.eval()
    name = "transformer.ln_f.weight"
    own = model.transformer.ln_f.weight
    doubled = (2 * own).detach()
    seen = {}

    def loss(m, b):
        seen.update(same=m is model, config=m.config.vocab_size, cls=isinstance(m, transformers.GPT2LMHeadModel),
                    training=m.training, weight=m.transformer.ln_f.weight, named=dict(m.named_parameters())[name])
        return TokenLoss()(m, b)

    got = per_sample_loss_at(model, loss, batch, {name: doubled})
    assert seen["same"] and seen["config"] == VOCAB and seen["cls"] and not seen["training"]
    assert seen["weight"] is doubled and seen["named"] is doubled
    assert model.transformer.ln_f.weight is own  # restored
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(2)
    want = TokenLoss()(model, batch)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
