"""Per-sample gradient operations under the one loss convention, without materialising [B, P].

One forward and one backward of Σ_i ℓ_i capture, for every layer with a rule in
:mod:`unlearn_fast.influence.layers`, its input A and output gradient G; all products are then
factored per layer. Parameters of layers without a rule use chunked torch.func materialisation.
:func:`per_sample_grads` materialises everything and is the reference for tests and small models.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import grad, vmap

from ..losses import Loss, check_loss, per_sample_loss, per_sample_loss_at
from ..modes import eval_mode
from ..validation import check_batch, check_finite
from .layers import Rule, rule_for
from .vectors import Vector, as_dict, trainable

Batch = tuple[torch.Tensor, torch.Tensor]
FALLBACK_CHUNK = 64


@dataclass
class LayerCache:
    """A layer's cached factors; ``names`` maps the rule's local parameter names to global ones."""

    module_name: str
    module: nn.Module
    rule: Rule
    a: torch.Tensor
    g: torch.Tensor
    names: dict[str, str]


@dataclass
class Captured:
    losses: torch.Tensor            # [B] per-sample losses (detached)
    layers: list[LayerCache]
    fallback: list[str]             # global names of parameters without a rule


Planned = list[tuple[str, nn.Module, Rule, dict[str, str]]]


def plan_layers(model: nn.Module, params: dict[str, nn.Parameter]) -> tuple[Planned, list[str]]:
    """(module name, module, rule, local → global parameter names) of each module a rule handles, and
    the chosen parameters that fall back (no rule)."""
    covered, planned = set(), []
    for module_name, module in model.named_modules():
        local = {n: f"{module_name}.{n}" if module_name else n for n, p in module.named_parameters(recurse=False)}
        local = {n: full for n, full in local.items() if full in params}
        if not local:
            continue
        rule = rule_for(module)
        if rule is None:
            continue
        planned.append((module_name, module, rule, local))
        covered.update(local.values())
    return planned, [n for n in params if n not in covered]


@contextmanager
def recording(planned: Planned) -> Iterator[tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]]:
    """Within the block, every call of a planned module appends its (detached) input and its output to
    the yielded lists, one list per planned module (forward hooks, removed on exit)."""
    inputs: list[list[torch.Tensor]] = [[] for _ in planned]
    outputs: list[list[torch.Tensor]] = [[] for _ in planned]
    versions: list[list[int]] = [[] for _ in planned]
    handles = []
    for index, (_, module, _, _) in enumerate(planned):
        def hook(mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor, index: int = index) -> None:
            inputs[index].append(args[0].detach())
            outputs[index].append(out)
            versions[index].append(out._version)
        handles.append(module.register_forward_hook(hook))
    try:
        yield inputs, outputs
    finally:
        for handle in handles:
            handle.remove()
    for (module_name, module, _, _), outs, seen in zip(planned, outputs, versions):
        if any(out._version != v for out, v in zip(outs, seen)):
            raise ValueError(f"the output of layer {module_name!r} ({type(module).__name__}) was changed in place after the "
                             "layer returned it (e.g. by ReLU(inplace=True)), so its gradient is no longer the layer's: "
                             "the per-sample factors need it unchanged; make that operation out of place")


def capture(model: nn.Module, loss: Loss, batch: Batch, params: dict[str, nn.Parameter]) -> Captured:
    """Run ``batch`` once forward and backward and cache each covered layer's (A, G)."""
    planned, fallback = plan_layers(model, params)
    with recording(planned) as (inputs, outputs):
        losses = per_sample_loss(model, loss, batch)
    flat_outputs = [o for calls in outputs for o in calls]
    grads = torch.autograd.grad(losses.sum(), flat_outputs, allow_unused=True) if flat_outputs else ()
    layers, cursor = [], 0
    for index, (module_name, module, rule, names) in enumerate(planned):
        a_parts, g_parts = [], []
        for inp, out in zip(inputs[index], outputs[index]):
            g_out = grads[cursor] if grads[cursor] is not None else torch.zeros_like(out)
            cursor += 1
            check_output_grad(g_out, module_name, module)
            a, g = rule.prepare(module, inp, g_out.detach())
            a_parts.append(a)
            g_parts.append(g)
        if not a_parts:  # module not used in this forward
            continue
        layers.append(LayerCache(module_name, module, rule, join_calls(a_parts), join_calls(g_parts), names))
    return Captured(losses.detach(), layers, fallback)


def check_output_grad(g_out: torch.Tensor, module_name: str, module: nn.Module, what: str = "output gradient") -> None:
    if not torch.isfinite(g_out).all():
        raise ValueError(f"non-finite {what} at layer {module_name!r} ({type(module).__name__}): the model's outputs "
                         "or loss overflow at these parameters (check the model and data, or use float64)")


def join_calls(parts: list[torch.Tensor], axis: int = 1) -> torch.Tensor:
    """A module called several times sums its contributions: the calls join the position axis (no copy for one call)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, axis)


def fallback_grads(model: nn.Module, loss: Loss, batch: Batch, names: list[str]) -> dict[str, torch.Tensor]:
    """Materialised per-sample gradients [B, *shape] of ``names`` by torch.func, in chunks of samples.

    The loss is handed ``model`` itself (:func:`unlearn_fast.losses.per_sample_loss_at`), run on one
    sample [1, ...] at a time, vmapped over the chunk; a model that vmap cannot batch (data-dependent
    control flow, such as the attention-mask checks of transformers' SDPA attention) is run sample by sample.
    """
    fixed = {n: p.detach() for n, p in model.named_parameters()}
    fixed.update({n: b for n, b in model.named_buffers()})

    def sample_loss(chosen: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return per_sample_loss_at(model, loss, (x.unsqueeze(0), y.unsqueeze(0)), {**fixed, **chosen})[0]

    chosen = {n: fixed[n] for n in names}
    batched, parts = True, []
    for s in range(0, batch[0].shape[0], FALLBACK_CHUNK):
        x, y = batch[0][s:s + FALLBACK_CHUNK], batch[1][s:s + FALLBACK_CHUNK]
        if batched:
            try:
                parts.append(vmap(grad(sample_loss), in_dims=(None, 0, 0))(chosen, x, y))
                continue
            except RuntimeError:  # vmap could not batch the model: one sample at a time from here on
                batched = False
        rows = [grad(sample_loss)(chosen, x[i], y[i]) for i in range(x.shape[0])]
        parts.append({n: torch.stack([r[n] for r in rows]) for n in names})
    return {n: torch.cat([p[n] for p in parts]) for n in names}


def per_sample_grads(model: nn.Module, loss: Loss, batch: Batch, layers: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Reference: every per-sample gradient ∇ℓ_i materialised, name → [B, *shape] (torch.func)."""
    params = trainable(model, layers)
    with eval_mode(model):
        return fallback_grads(model, loss, batch, list(params))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[B, *shape] → [B, prod(shape)], scalars (shape ()) included."""
    return t.reshape(t.shape[0], -1)


def grad_dots(model: nn.Module, loss: Loss, batch: Batch, vectors: Vector, layers: list[str] | None = None) -> torch.Tensor:
    """⟨∇ℓ_i, v_k⟩ for each sample i of ``batch`` and each of K parameter-space vectors → [B, K].

    ``vectors``: flat [P] / [K, P] or dict name → [*shape] / [K, *shape] over the trainable
    parameters (restricted to ``layers`` when given).
    """
    params = trainable(model, layers)
    v = as_dict(vectors, params)
    if batch[0].shape[0] == 0:
        return torch.zeros(0, next(iter(v.values())).shape[0], dtype=next(iter(v.values())).dtype)
    return factors_dots(capture_factors(model, loss, batch, params), v)


def grad_norms(model: nn.Module, loss: Loss, batch: Batch, layers: list[str] | None = None) -> torch.Tensor:
    """‖∇ℓ_i‖ (L2 over the trainable parameters, or those of ``layers``) for each sample → [B]."""
    params = trainable(model, layers)
    if batch[0].shape[0] == 0:
        return torch.zeros(0, dtype=next(iter(params.values())).dtype)
    return factors_sq_norms(capture_factors(model, loss, batch, params)).sqrt()


@dataclass
class Factors:
    """A batch's cached per-layer (A, G) plus materialised fallback gradients: enough for any number
    of Fisher products without re-running the model."""

    captured: Captured
    fallback: dict[str, torch.Tensor]
    batch_size: int

    def nbytes(self) -> int:
        tensors = [t for layer in self.captured.layers for t in (layer.a, layer.g)] + list(self.fallback.values())
        return sum(t.numel() * t.element_size() for t in tensors)


# Models (and their chosen parameter names) whose factors matched autograd once: checked once each.
_VERIFIED: weakref.WeakKeyDictionary[nn.Module, set[tuple[str, ...]]] = weakref.WeakKeyDictionary()


def capture_factors(model: nn.Module, loss: Loss, batch: Batch, params: dict[str, nn.Parameter]) -> Factors:
    """One forward/backward of ``batch``: the factors every Fisher product of this batch needs.

    The first capture for a model and set of parameters also checks that the factors reproduce
    autograd's batch gradient, Σ_i g_i (one more backward, once): the rules see a parameter only
    inside its own module's hooked call, so a tied weight, ``F.linear(x, module.weight)`` or a module
    run through ``.forward`` would otherwise give silently wrong per-sample gradients."""
    with eval_mode(model):
        cap = capture(model, loss, batch, params)
        fallback = fallback_grads(model, loss, batch, cap.fallback) if cap.fallback else {}
    factors = Factors(cap, fallback, batch[0].shape[0])
    key = tuple(params)
    if factors.batch_size and key not in _VERIFIED.get(model, ()):
        _check_against_autograd(model, loss, batch, params, factors)
        _VERIFIED.setdefault(model, set()).add(key)
    return factors


def _check_against_autograd(model: nn.Module, loss: Loss, batch: Batch, params: dict[str, nn.Parameter],
                            factors: Factors) -> None:
    ones = torch.ones(factors.batch_size, 1, dtype=factors.captured.losses.dtype, device=factors.captured.losses.device)
    summed = factors_weighted_sum(factors, ones, params)
    with torch.enable_grad():
        want = loss_gradient(model, loss, batch, params)
    diff = sum(float((summed[n][0].double() - want[n].double()).pow(2).sum()) for n in params)
    total = sum(float(want[n].double().pow(2).sum()) for n in params)
    error = (diff / total) ** 0.5 if total > 0 else diff ** 0.5
    tol = torch.finfo(next(iter(params.values())).dtype).eps ** 0.5
    if not error <= tol:
        raise ValueError(f"the per-sample gradient factors do not reproduce autograd's gradient on this model (relative "
                         f"error {error:.2g} > {tol:.2g}): a chosen parameter acts outside its module's own call (a tied "
                         "weight, F.linear(x, module.weight), module.forward called directly), which the per-layer rules "
                         "cannot see; restrict layers= to modules that own their parameters, or use curvature='ggn'")


def factors_sq_norms(factors: Factors) -> torch.Tensor:
    """‖g_i‖² [B] from a batch's cached factors (ghost forms per layer, materialised fallback rows)."""
    cap = factors.captured
    total = torch.zeros(factors.batch_size, dtype=cap.losses.dtype, device=cap.losses.device)
    for layer in cap.layers:
        total += check_finite(layer.rule.sq_norms(layer.module, layer.a, layer.g), "gradient norm", f"at layer {layer.module_name!r}")
    for name, g in factors.fallback.items():
        total += check_finite(_rows(g).pow(2).sum(1), "gradient norm", f"at parameter {name!r}")
    return total


def factors_dots(factors: Factors, vectors: dict[str, torch.Tensor]) -> torch.Tensor:
    """⟨g_i, v_k⟩ for each sample of the cached batch → [B, K]; ``vectors``: name → [K, *shape]."""
    cap = factors.captured
    total = torch.zeros(factors.batch_size, next(iter(vectors.values())).shape[0], dtype=cap.losses.dtype, device=cap.losses.device)
    for layer in cap.layers:
        local_v = {local: vectors[full].to(layer.g.dtype) for local, full in layer.names.items()}
        total += check_finite(layer.rule.dots(layer.module, layer.a, layer.g, local_v), "gradient dot", f"at layer {layer.module_name!r}")
    for name, g in factors.fallback.items():
        total += check_finite(_rows(g) @ _rows(vectors[name]).to(g.dtype).T, "gradient dot", f"at parameter {name!r}")
    return total


def factors_weighted_sum(factors: Factors, c: torch.Tensor, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Σ_i c_{i,k} g_i over the cached batch for weights c [B, K] → name → [K, *shape], as (diag(c)G)ᵀA per layer."""
    cap = factors.captured
    out: dict[str, torch.Tensor] = {}
    for layer in cap.layers:
        for local, value in layer.rule.weighted_sum(layer.module, layer.a, layer.g, c.to(layer.g.dtype)).items():
            out[layer.names[local]] = check_finite(value, "weighted gradient sum", f"at layer {layer.module_name!r}")
    for name, g in factors.fallback.items():
        out[name] = (c.to(g.dtype).T @ _rows(g)).reshape(c.shape[1], *g.shape[1:])
    # a module unused by this batch's forward has zero gradients
    return {name: out[name] if name in out else p.new_zeros(c.shape[1], *p.shape) for name, p in params.items()}


def factors_fisher_vp(factors: Factors, vectors: dict[str, torch.Tensor], params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Σ_i ⟨g_i, v_k⟩ g_i over the cached batch → name → [K, *shape]: c = Σ_layers dots, then (diag(c)G)ᵀA."""
    if factors.batch_size == 0:
        return {name: torch.zeros_like(vectors[name]) for name in params}
    return factors_weighted_sum(factors, factors_dots(factors, vectors), params)


def factors_gram(first: Factors, second: Factors, dtype: torch.dtype | None = None) -> torch.Tensor:
    """⟨g_i, g_j⟩ for sample i of ``first`` and j of ``second`` → [B1, B2].

    Both must be captured with the same model and parameters. Each layer's block comes from its
    rule's ``cross_dots`` in the factors' dtype; the blocks are summed in ``dtype`` (default: the
    factors' dtype), so a float64 Gram of a float32 model costs no float64 contraction.
    """
    cap = first.captured
    out = torch.zeros(first.batch_size, second.batch_size, dtype=dtype or cap.losses.dtype, device=cap.losses.device)
    if first.batch_size == 0 or second.batch_size == 0:
        return out
    others = {layer.module_name: layer for layer in second.captured.layers}
    for layer in cap.layers:
        other = others.get(layer.module_name)
        if other is None:  # the module did not run on the second batch: its gradients there are zero
            continue
        block = layer.rule.cross_dots(layer.module, layer.a, layer.g, other.a, other.g)
        out += check_finite(block, "gradient Gram", f"at layer {layer.module_name!r}")
    for name, g in first.fallback.items():
        out += check_finite(_rows(g) @ _rows(second.fallback[name]).T, "gradient Gram", f"at parameter {name!r}")
    return out


def grad_gram(model: nn.Module, loss: Loss, batch: Batch, other: Batch | None = None,
              layers: list[str] | None = None) -> torch.Tensor:
    """⟨∇ℓ_i, ∇ℓ_j⟩ for sample i of ``batch`` and j of ``other`` → [B1, B2] (``other=None``: ``batch``
    with itself, [B, B], symmetric), over the trainable parameters (or those of ``layers``).

    One forward/backward per batch; per layer the ghost form or chunks of built gradients, whichever
    is cheaper (see :mod:`.layers`); parameters without a rule use chunked torch.func gradients.
    """
    check_loss(loss)
    params = trainable(model, layers)
    first = check_batch(batch, "batch")
    second = first if other is None else check_batch(other, "other")
    if first[0].shape[0] == 0 or second[0].shape[0] == 0:
        return torch.zeros(first[0].shape[0], second[0].shape[0], dtype=next(iter(params.values())).dtype)
    factors = capture_factors(model, loss, first, params)
    return factors_gram(factors, factors if other is None else capture_factors(model, loss, second, params))


def fisher_vp(model: nn.Module, loss: Loss, batch: Batch, vectors: dict[str, torch.Tensor],
              params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Σ_i ⟨g_i, v_k⟩ g_i over the batch (the empirical-Fisher product, unnormalised) → name → [K, *shape].

    Factored per layer as c = grad_dots(v), then (diag(c)G)ᵀA, so no [B, P] is built.
    """
    if batch[0].shape[0] == 0:
        return {name: torch.zeros_like(vectors[name]) for name in params}
    return factors_fisher_vp(capture_factors(model, loss, batch, params), vectors, params)


def loss_gradient(model: nn.Module, loss: Loss, batch: Batch, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Σ_i ∇ℓ_i over the batch, name → [*shape] (one ordinary backward)."""
    return loss_and_gradient(model, loss, batch, params)[1]


def loss_and_gradient(model: nn.Module, loss: Loss, batch: Batch,
                      params: dict[str, nn.Parameter]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(per-sample losses [B], detached; Σ_i ∇ℓ_i over the batch, name → [*shape]) from one forward and backward."""
    with torch.enable_grad(), eval_mode(model):
        losses = per_sample_loss(model, loss, batch)
        grads = torch.autograd.grad(losses.sum(), list(params.values()), allow_unused=True)
    out = {}
    for (name, p), g in zip(params.items(), grads):
        out[name] = check_finite(g if g is not None else torch.zeros_like(p), "gradient", f"at parameter {name!r}")
    return losses.detach(), out
