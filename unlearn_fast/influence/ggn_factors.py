"""The GGN in factored form: each layer's input A and the output gradients of every column of the
loss's Hessian root, captured once and reused by every product.

With H_i = L_i L_iᵀ the output Hessian of a named loss (:mod:`.cotangents`: cross_entropy
L = diag(√p) − p √pᵀ, mse √2 I) and R the outputs per sample,

    J_iᵀ H_i J_i = Σ_r g_{i,r} g_{i,r}ᵀ,    g_{i,r} = J_iᵀ L_i e_r,

so the GGN is the empirical Fisher of the N·R pseudo-samples (i, r), and per layer g_{i,r} = G_{i,r}ᵀA_i
with A_i shared by the R of them. One forward and one R-fold batched backward capture G [B, R, T, d_out]
per layer; a product is then c = Σ_layers ⟨g_{i,r}, v_k⟩ → [B, R, K] and Σ_{i,r} c_{i,r,k} g_{i,r}
(the rules' ``multi_dots`` / ``multi_weighted_sum``), without running the model.

Per vector that is 2 GEMMs per layer plus two passes over G, against the 4 GEMMs per layer of the
linearisation (:meth:`.curvature.CurvatureOperator._ggn_linearisation`: forward-mode tangents and a
backward). The passes over G are memory-bound: for one vector they cost about what the two saved GEMMs
cost, and K vectors at once share them, so the operator takes this form for K ≥
``curvature.FACTORED_GGN_MIN_VECTORS`` (Nyström sketches, diagonal probes, several right-hand sides,
the dense ``exact`` solver), where it measured 1.2–2.7× less time per vector (K = 4–32). The price is memory, R
times each layer's output gradients: it is taken only when every chosen parameter has a rule and the
factors of all the data fit the operator's cache (a classifier's 10 classes do; a language model's
vocabulary never does); see :func:`ggn_factor_bytes`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..modes import eval_mode
from .cotangents import hessian_root_times
from ..validation import check_finite
from .per_sample import LayerCache, check_output_grad, join_calls, plan_layers, recording


@dataclass
class GGNFactors:
    """A batch's per-layer A [B, T, ·] and G [B, R, T, ·] (``LayerCache.g`` holds the R axis)."""

    layers: list[LayerCache]
    batch_size: int
    output_shape: tuple[int, ...]  # of one sample's model output z_i

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.a, layer.g))


def hessian_root_columns(loss: str, z: torch.Tensor) -> torch.Tensor:
    """The R = z[0].numel() columns L_i e_r of every sample's output-Hessian root → [R, *z.shape]."""
    r, shape = z[0].numel(), tuple(z.shape[1:])
    eye = torch.eye(r, dtype=z.dtype, device=z.device).reshape(r, 1, *shape).expand(r, z.shape[0], *shape)
    repeated = z.detach().unsqueeze(0).expand(r, *z.shape)
    return hessian_root_times(loss, repeated.reshape(-1, *shape), eye.reshape(-1, *shape)).reshape(r, *z.shape)


def _batched_grads(z: torch.Tensor, outputs: list[torch.Tensor], cotangents: torch.Tensor) -> list[torch.Tensor | None]:
    """∂(cotangent_r · z)/∂output for every r → each [R, *output.shape] (None where z does not depend on it)."""
    try:
        return list(torch.autograd.grad(z, outputs, cotangents, retain_graph=True, allow_unused=True, is_grads_batched=True))
    except RuntimeError:  # an op vmap cannot batch: one backward per column
        rows = [torch.autograd.grad(z, outputs, u, retain_graph=True, allow_unused=True) for u in cotangents]
        return [None if rows[0][i] is None else torch.stack([row[i] for row in rows]) for i in range(len(outputs))]


def capture_ggn_factors(model: nn.Module, loss: str, inputs: torch.Tensor, params: dict[str, nn.Parameter]) -> GGNFactors:
    """One forward of ``inputs`` [B, ...] and one R-fold backward, in eval mode: the factors of every GGN
    product of this batch, for the parameters ``params`` (all of which must have a rule, see
    :func:`ggn_factor_bytes`)."""
    planned, fallback = plan_layers(model, params)
    if fallback:
        raise ValueError(f"the factored GGN needs a per-layer rule for every parameter; {fallback} have none")
    with torch.enable_grad(), eval_mode(model):  # backpropagates even when the caller runs under no_grad
        with recording(planned) as (layer_inputs, layer_outputs):
            z = model(inputs)
        columns = hessian_root_columns(loss, z)
        flat_outputs = [o for calls in layer_outputs for o in calls]
        grads = _batched_grads(z, flat_outputs, columns) if flat_outputs else []
    layers, cursor = [], 0
    for index, (module_name, module, rule, names) in enumerate(planned):
        a_parts, g_parts = [], []
        for inp, out in zip(layer_inputs[index], layer_outputs[index]):
            g_out = grads[cursor]
            cursor += 1
            g_out = torch.zeros(columns.shape[0], *out.shape, dtype=out.dtype, device=out.device) if g_out is None else g_out.detach()
            check_output_grad(g_out, module_name, module, "output gradient of a GGN factor")
            a_parts.append(rule.prepare(module, inp, g_out[0])[0])
            g_parts.append(torch.stack([rule.prepare_grad(module, inp, g) for g in g_out], 1))
        if a_parts:  # the module ran in this forward
            layers.append(LayerCache(module_name, module, rule, join_calls(a_parts), join_calls(g_parts, axis=2), names))
    return GGNFactors(layers, inputs.shape[0], tuple(z.shape[1:]))


def ggn_factor_bytes(model: nn.Module, params: dict[str, nn.Parameter], probe: torch.Tensor) -> int:
    """Bytes per sample that :func:`capture_ggn_factors` keeps, from one forward of ``probe`` [b, ...]
    (no backward): Σ_layers A + R·G. Raises ValueError naming the chosen parameters without a rule."""
    planned, fallback = plan_layers(model, params)
    if fallback:
        raise ValueError(f"the factored GGN needs a per-layer rule for every parameter; {fallback} have none")
    with torch.no_grad(), eval_mode(model), recording(planned) as (layer_inputs, layer_outputs):
        z = model(probe)
    columns = z[0].numel()
    total = 0
    for index, (_, module, rule, _) in enumerate(planned):
        for inp, out in zip(layer_inputs[index], layer_outputs[index]):
            a, g = rule.prepare(module, inp, out)  # the output stands in for its gradient: same shape
            total += a.numel() * a.element_size() + columns * g.numel() * g.element_size()
    return -(-total // max(1, probe.shape[0]))


def factored_ggn_error(model: nn.Module, loss: str, probe: torch.Tensor, params: dict[str, nn.Parameter],
                       seed: int = 0) -> float:
    """Relative error of the factors against autograd on ``probe``: Σ_{i,r} c_{i,r} g_{i,r} from
    :func:`capture_ggn_factors` against ∇_θ Σ_i ⟨Σ_r c_{i,r} L_i e_r, z_i⟩ by one backward, for seeded
    Gaussian c. The factors assume that each chosen parameter acts only inside its own module's
    hooked call; a weight tied to another module, used through ``F.linear(x, module.weight)`` or a
    module run through ``.forward`` (no hooks) break that, and show up here (measured 0.3–0.6)."""
    factors = capture_ggn_factors(model, loss, probe, params)
    gen = torch.Generator().manual_seed(seed)
    rows = math.prod(factors.output_shape)
    first = next(iter(params.values()))
    c = torch.randn(probe.shape[0], rows, 1, generator=gen, dtype=torch.float64).to(device=first.device, dtype=first.dtype)
    factored = {layer.names[local]: t for layer in factors.layers
                for local, t in layer.rule.multi_weighted_sum(layer.module, layer.a, layer.g, c).items()}
    with torch.enable_grad(), eval_mode(model):
        z = model(probe)
        weights = c[:, :, 0].T.reshape(rows, probe.shape[0], *([1] * (z.dim() - 1)))
        cotangent = (weights * hessian_root_columns(loss, z)).sum(0)
        grads = torch.autograd.grad(z, list(params.values()), cotangent, allow_unused=True)
    diff = total = 0.0
    for (name, p), want in zip(params.items(), grads):
        want = torch.zeros_like(p) if want is None else want
        got = factored[name][0] if name in factored else torch.zeros_like(p)
        diff += float((got.double() - want.double()).pow(2).sum())
        total += float(want.double().pow(2).sum())
    return (diff / total) ** 0.5 if total > 0 else diff ** 0.5


def factored_ggn_problem(model: nn.Module, loss: str, probe: torch.Tensor, params: dict[str, nn.Parameter],
                         batch_size: int, budget: int) -> tuple[str, int]:
    """("", bytes per sample) when the factored GGN applies to ``model`` for batches of ``batch_size``,
    else (why not, bytes per sample or 0). It needs a rule for every chosen parameter, one batch's
    factors within ``budget`` bytes (measured on a forward of ``probe``), and factors that reproduce
    autograd on ``probe`` (:func:`factored_ggn_error` ≤ √eps of the parameters' dtype)."""
    per_sample = 0
    try:
        per_sample = ggn_factor_bytes(model, params, probe)
        if per_sample * batch_size > budget:
            return (f"one batch's GGN factors would take {per_sample * batch_size / 2**30:.1f} GiB (the model's outputs "
                    "per sample times its layers' output gradients), above the operator's cache: lower batch_size"), per_sample
        error = factored_ggn_error(model, loss, probe, params)
    except (ValueError, RuntimeError, KeyError, IndexError) as exc:  # a model the capture cannot take
        return f"the factored GGN does not apply to this model: {exc}", per_sample
    tol = torch.finfo(next(iter(params.values())).dtype).eps ** 0.5
    if not error <= tol:
        return (f"the factored GGN does not reproduce autograd on this model (relative error {error:.2g} > {tol:.2g} on "
                f"{probe.shape[0]} samples): a chosen parameter acts outside its module's own call (a tied weight, "
                "F.linear(x, module.weight), module.forward called directly)"), per_sample
    return "", per_sample


def ggn_factors_vp(factors: GGNFactors, vectors: dict[str, torch.Tensor], params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Σ_i J_iᵀ H_i J_i v_k over the cached batch (unnormalised) → name → [K, *shape]; ``vectors``: name → [K, *shape]."""
    k = next(iter(vectors.values())).shape[0]
    c: torch.Tensor | None = None
    for layer in factors.layers:
        local_v = {local: vectors[full].to(layer.g.dtype) for local, full in layer.names.items()}
        dots = check_finite(layer.rule.multi_dots(layer.module, layer.a, layer.g, local_v), "GGN dot", f"at layer {layer.module_name!r}")
        c = dots if c is None else c + dots
    out: dict[str, torch.Tensor] = {}
    for layer in factors.layers:
        for local, value in layer.rule.multi_weighted_sum(layer.module, layer.a, layer.g, c).items():
            out[layer.names[local]] = check_finite(value, "GGN product", f"at layer {layer.module_name!r}")
    return {name: out[name] if name in out else p.new_zeros(k, *p.shape) for name, p in params.items()}


__all__ = ["GGNFactors", "capture_ggn_factors", "factored_ggn_error", "factored_ggn_problem", "ggn_factor_bytes",
           "ggn_factors_vp", "hessian_root_columns"]
