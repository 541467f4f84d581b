"""Curvature-vector products (C + (λ+δ) I) v, the inner step of every influence solver.

Notation: θ ∈ R^P the trainable parameters (``trainable(model, layers)``), N samples, z_i = f(θ, x_i)
∈ R^O the model output of sample i, ℓ_i = ℓ(z_i, y_i) its loss and L(θ) = (1/N) Σ_i ℓ_i the MEAN loss.

    hessian  C = ∇²L  [P, P]                            exact; indefinite in general (deep nets)
    ggn      C = (1/N) Σ_i J_iᵀ H_i J_i                 J_i = ∂z_i/∂θ [O, P], H_i = ∂²ℓ_i/∂z_i² [O, O]
               cross_entropy: H_i = diag(p_i) − p_i p_iᵀ, p_i = softmax(z_i)   (PSD, so C is PSD)
               mse (squared error summed over outputs): H_i = 2 I
    fisher   C = (1/N) Σ_i g_i g_iᵀ                     g_i = ∇_θ ℓ_i [P]   (empirical Fisher, PSD)

The training objective is L(θ) + (λ/2)‖θ‖² (torch SGD's ``weight_decay=λ``), whose curvature adds λ I;
``damping`` δ adds δ I on top. A vector v is flat [P] / [K, P] or a dict name → [*shape] / [K, *shape]
(docs/architecture.md); the K products are computed together (vmapped) and the result has v's form,
shape, dtype and device.

Per batch of B samples and K vectors:
- ggn, K ≥ FACTORED_GGN_MIN_VECTORS: when every chosen parameter has a per-layer rule and R (outputs
  per sample) times the layers' output gradients of all the data fit CACHE_BYTES, the factored form of
  :mod:`.ggn_factors`: A and the R output gradients per layer, captured once per batch, then GEMMs and
  passes over G only. Otherwise, and for fewer vectors (a CG iteration), the linearisation: Jv by forward mode (``jvp``, vmapped over K) → u = H Jv per sample, analytically →
  Jᵀu by one ``vjp`` (vmapped over K), on each batch's saved forward graph; no [B, P] tensor.
- hessian: ∇ℓ with ``create_graph`` then one batched double backward (``is_grads_batched``) for all K.
- fisher: :func:`unlearn_fast.influence.per_sample.factors_fisher_vp` on each batch's factors, captured
  once (:meth:`CurvatureOperator.batch_factors`) and reused by every product.
Only one batch's autograd graph is alive at a time, so memory is bounded by ``batch_size`` × K.
``batch_size=None`` (the default) takes as many samples as keep one batch's forward activations near
BATCH_BYTES, measured on a probe forward of a few samples: a whole small data set in one batch (each
batch costs Python and autograd overhead: the digits MLP's GGN product took 9.5 ms in batches of 512
and 7.5 ms in one of 1,437), a few sequences of a transformer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..data.similar_dataset import as_tensors
from ..losses import NAMED_LOSSES, Loss, check_loss, output_loss, per_sample_loss_at
from ..modes import eval_mode
from ..validation import check_choice, check_number, check_positive_int, resolve_device
from .model_state import content_stamp, counting_activations
from .ggn_factors import GGNFactors, capture_ggn_factors, factored_ggn_problem, ggn_factors_vp
from .vectors import Vector, VectorForm, as_dict, num_params, trainable

CURVATURES = ("ggn", "hessian", "fisher")
# Upper bound on what an operator keeps between products, for each of its two caches: layer factors
# (the Fisher's, the factored GGN's) and GGN forward graphs (the linearisation). Separate budgets, so
# that the factors a Nyström sketch keeps do not push CG's graphs out (found in review: every K = 1
# product then re-ran the forward). Batches beyond it are re-run for every product.
CACHE_BYTES = 1 << 30
# batch_size=None: samples per batch whose forward activations (every module's tensor outputs) take
# about this many bytes, per vector: K vectors multiply it (the Nyström sketch and Hutchinson probes
# use K = 16), and what a module computes inside itself (attention scores) is not seen. 64 MiB holds
# ~16k digits-MLP samples (about 4 KB each); a GPT-2-small sequence of 128 tokens (about 111 MiB of
# module outputs) gets a batch of 1. At most MAX_MEMORY_BATCH samples: the woodbury solver builds its
# Gram per pair of batches, and one [8000, 8000] block took 1.6× the memory and 2× the time of
# blocks of 512 (measured in review).
BATCH_BYTES = 1 << 26
PROBE_SAMPLES = 8
# The factored GGN (module doc) serves products of at least this many vectors at once. On the 2-core CPU
# (digits MLP of benchmarks/test_bench_cg.py, ms per vector, factored / linearised): K = 1 10.3 / 9.0,
# 3: 9.2 / 9.1, 4: 6.7 / 8.0, 8: 6.4 / 8.7, 16: 5.9 / 12.6, 32: 4.7 / 12.9. Its two passes over the R
# output gradients per layer are memory-bound and cost what the GEMMs they replace cost, until K
# vectors share them.
FACTORED_GGN_MIN_VECTORS = 4
MAX_MEMORY_BATCH = 2048

Data = Dataset | tuple[torch.Tensor, torch.Tensor]


def _data_tensors(data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        inputs, labels = data
    elif isinstance(data, Dataset):
        inputs, labels = as_tensors(data)
    else:
        raise ValueError("data must be a torch Dataset of (input, label) or a tuple (inputs, labels) of tensors, "
                         f"got {type(data).__name__}")
    if inputs.shape[0] == 0 or inputs.shape[0] != labels.shape[0]:
        raise ValueError(f"data needs N >= 1 inputs and as many labels, got {inputs.shape[0]} inputs "
                         f"and {labels.shape[0]} labels")
    return inputs, labels


class CurvatureOperator:
    """v ↦ (C + (weight_decay + damping) I) v for one model, loss and data set, built once for many products.

    Built once: validates the arguments, moves the data to ``device`` (cast to the parameters' float
    dtype), snapshots the parameters and buffers (views, no copy on the model's own device). Each
    product re-reads them only when their version counters say they were modified in place.
    ``op(v)`` / ``op.matvec(v)`` take a vector in either form and give it back in the same form.
    The model itself is never modified; it runs in eval mode during products (its modes restored).
    """

    def __init__(self, model: nn.Module, loss: Loss, data: Data, *, kind: str = "ggn", weight_decay: float = 0.0,
                 damping: float = 0.0, batch_size: int | None = None, layers: list[str] | None = None,
                 device: str | torch.device | None = None, progress: bool = False) -> None:
        self.kind = check_choice(kind, CURVATURES, "kind")
        self.loss = check_loss(loss)
        if kind == "ggn" and not isinstance(loss, str):
            raise ValueError(f"kind='ggn' needs a named loss ({', '.join(NAMED_LOSSES)}) to split model output from loss; "
                             "a callable loss has no such split: use kind='fisher' or kind='hessian'")
        self.weight_decay = check_number(weight_decay, "weight_decay")
        self.damping = check_number(damping, "damping")
        self.shift = self.weight_decay + self.damping
        if batch_size is not None:
            check_positive_int(batch_size, "batch_size", hint="or None to size batches by memory")
        self.progress = bool(progress)
        self.model = model
        self.params = trainable(model, layers)
        if not self.params:
            raise ValueError("the model has no parameters that require grad: there is no curvature to take")
        self.num_params = num_params(self.params)
        first = next(iter(self.params.values()))
        self.dtype = first.dtype
        # normalise "cuda" → "cuda:0" so that devices compare equal
        self.device = first.device if device is None else torch.empty(0, device=resolve_device(device)).device
        if kind == "fisher" and self.device != first.device:
            raise ValueError(f"kind='fisher' runs on the model's own device ({first.device}), not {self.device}: "
                             "move the model there or leave device=None")
        inputs, labels = _data_tensors(data)
        self.n = inputs.shape[0]
        self.inputs, self.labels = self.on_device((inputs, labels))
        self._batched_double_backward = True  # falls back to a loop over K if vmap cannot batch a backward op
        self._model_device = first.device
        self._factored_ggn: bool | None = None  # decided on the first GGN product (_ggn_is_factored)
        self._ggn_problem: str | None = None  # why the factored GGN does not apply ("" if it does); None: not probed
        self._ggn_bytes = 0  # GGN factor bytes per sample (probed with _ggn_problem)
        self._stamp: tuple[Any, ...] | None = None
        self._refresh()
        self.batch_size = int(batch_size) if batch_size is not None else self._memory_batch_size()

    def on_device(self, pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) as the operator holds its data: on its device, floats in the parameters' dtype."""
        inputs, labels = pair
        return (inputs.to(device=self.device, dtype=self.dtype if inputs.is_floating_point() else None),
                labels.to(device=self.device, dtype=self.dtype if labels.is_floating_point() else None))

    def _memory_batch_size(self) -> int:
        """Samples per batch whose forward activations take about BATCH_BYTES (module doc)."""
        x, y = self.inputs[:PROBE_SAMPLES], self.labels[:PROBE_SAMPLES]
        # through the loss, as the products call the model (a callable loss may pass it more than x)
        with counting_activations(self.model) as sizes, torch.no_grad(), eval_mode(self.model):
            self._losses(self._values, x, y)
        per_sample = max(1, sum(sizes) // max(1, x.shape[0]))
        return max(1, min(self.n, MAX_MEMORY_BATCH, BATCH_BYTES // per_sample))

    # -- state snapshot ------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        return {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}

    def _refresh(self) -> None:
        """Re-snapshot parameters and buffers if any was modified (or replaced) since the last product.

        Each tensor's version counter and storage catch ordinary updates; sums of its raw bits catch
        in-place changes made through ``.data``, which torch does not count as versions. The content
        check reads every parameter once per product, a small fraction of a product's own cost
        (which reads them once per batch). Not seen: changes whose bit differences cancel in both
        sums, such as swapping two elements within one half of a tensor through ``.data``."""
        tensors = self._tensors()
        stamp = (tuple((n, t._version, t.data_ptr()) for n, t in tensors.items()), content_stamp(tensors))
        if stamp == self._stamp:
            return
        self._stamp = stamp
        state = {n: t.detach().to(self.device) for n, t in tensors.items()}
        self._values = {n: state.pop(n) for n in self.params}  # the variables of the products
        self._fixed = state  # frozen parameters and buffers
        self._factor_cache: dict[tuple[int, int], Any] = {}
        self._ggn_cache: dict[tuple[int, int], Any] = {}
        self._cached_bytes = {"factors": 0, "graphs": 0}  # each cache has its own CACHE_BYTES

    def set_damping(self, damping: float) -> None:
        """δ = ``damping`` from the next product on (cached factors and graphs do not depend on it)."""
        self.damping = check_number(damping, "damping")
        self.shift = self.weight_decay + self.damping

    # -- products ------------------------------------------------------------------------------
    def __call__(self, v: Vector) -> Vector:
        return self.matvec(v)

    def matvec(self, v: Vector) -> Vector:
        """(C + (λ+δ) I) v for v flat [P] / [K, P] or dict name → [*shape] / [K, *shape], in v's form."""
        form = VectorForm(v, self.params)
        vd = {n: t.to(device=self.device, dtype=self.params[n].dtype) for n, t in as_dict(v, self.params).items()}
        bad = [n for n, t in vd.items() if not torch.isfinite(t).all()]
        if bad:
            raise ValueError(f"the vector has non-finite entries in parameter(s) {bad}")
        return form.restore(self._product(vd), self.params)

    def _product(self, v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self._refresh()
        acc = {n: torch.zeros_like(t) for n, t in v.items()}
        step = {"ggn": self._ggn, "hessian": self._hessian, "fisher": self._fisher}[self.kind]
        starts = range(0, self.n, self.batch_size)
        with eval_mode(self.model):
            for s in tqdm(starts, desc=f"{self.kind} product", disable=not self.progress, leave=False):
                part = step(s, v)
                for n in acc:
                    acc[n] += part[n]
        out = {n: acc[n] / self.n + self.shift * v[n] for n in acc}
        bad = [n for n, t in out.items() if not torch.isfinite(t).all()]
        if bad:
            raise ValueError(f"the {self.kind} product is non-finite in parameter(s) {bad}: the model's outputs or "
                             "loss overflow at these parameters (check the model and data, or use float64)")
        return out

    def _forward(self, values: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, {**self._fixed, **values}, (x,))

    def _ggn_linearisation(self, x: torch.Tensor) -> tuple[torch.Tensor, Any, Any]:
        """(outputs, u ↦ Jᵀu, v ↦ Jv) of one batch. Jv is the vjp of the (linear) pullback at u = 0
        ("reverse over reverse"), so both reuse one saved forward graph; the graphs of the batches
        are kept across products while they fit CACHE_BYTES (estimated from the activations)."""
        key = (x.data_ptr(), x.shape[0])
        cached = self._ggn_cache.get(key)
        if cached is not None:
            return cached

        def f(values: dict[str, torch.Tensor]) -> torch.Tensor:
            return self._forward(values, x)

        with counting_activations(self.model) as sizes:
            out, pullback = vjp(f, self._values)
        _, push = vjp(pullback, torch.zeros_like(out))
        entry = (out.detach(), pullback, lambda t: push((t,))[0])
        nbytes = sum(sizes)
        if self._cached_bytes["graphs"] + nbytes <= CACHE_BYTES:
            self._ggn_cache[key] = entry
            self._cached_bytes["graphs"] += nbytes
        return entry

    def _ggn_factor_problem(self) -> str | None:
        """Why this operator has no factored GGN (:mod:`.ggn_factors`) even for one batch, or None."""
        if self.kind != "ggn":
            return f"the factored GGN needs kind='ggn', got kind={self.kind!r}"
        if self.device != self._model_device:
            return (f"the factored GGN runs the model itself, whose parameters are on {self._model_device}, not on the "
                    f"operator's device {self.device}")
        if self._ggn_problem is None:  # probed once, on a few samples
            probe = self.inputs[:PROBE_SAMPLES]
            self._ggn_problem, self._ggn_bytes = factored_ggn_problem(self.model, self.loss, probe, self.params,  # type: ignore[arg-type]
                                                                      self.batch_size, CACHE_BYTES)
        return self._ggn_problem or None

    def _ggn_is_factored(self) -> bool:
        """Whether products of K ≥ FACTORED_GGN_MIN_VECTORS use the factored GGN (module doc): it exists
        here and the factors of all N samples, estimated from a forward of a few, fit CACHE_BYTES."""
        if self._factored_ggn is None:
            self._factored_ggn = self._ggn_factor_problem() is None and self._ggn_bytes * self.n <= CACHE_BYTES
        return self._factored_ggn

    def ggn_batch_factors(self, start: int, *, keep: bool = True) -> GGNFactors:
        """The factored GGN's factors (:class:`.ggn_factors.GGNFactors`) of the batch that begins at sample
        ``start``. ``keep``: store them for later products (of K ≥ FACTORED_GGN_MIN_VECTORS vectors)
        while they fit CACHE_BYTES, as :meth:`batch_factors` does for the Fisher; kept factors are
        reused either way. Raises ValueError, saying why, when this operator has no factored GGN."""
        self._refresh()
        problem = self._ggn_factor_problem()
        if problem is not None:
            raise ValueError(f"{problem}; use preconditioner='nystrom' (products only) or curvature='fisher'")
        return self._ggn_factors(self._batch(start)[0], keep=keep)

    def _ggn_factors(self, x: torch.Tensor, keep: bool = True) -> GGNFactors:
        key = (x.data_ptr(), x.shape[0])
        factors = self._factor_cache.get(key)  # a GGN operator has no Fisher factors to keep there
        if factors is None:
            factors = capture_ggn_factors(self.model, self.loss, x, self.params)  # type: ignore[arg-type]
            if keep and self._cached_bytes["factors"] + factors.nbytes() <= CACHE_BYTES:
                self._factor_cache[key] = factors
                self._cached_bytes["factors"] += factors.nbytes()
        return factors

    def _batch(self, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[start:start + self.batch_size], self.labels[start:start + self.batch_size]

    def _ggn(self, start: int, v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y = self._batch(start)
        k = next(iter(v.values())).shape[0]
        if k >= FACTORED_GGN_MIN_VECTORS and self._ggn_is_factored():
            factors = self._ggn_factors(x)
            if self.loss == "mse" and y[0].numel() != math.prod(factors.output_shape):
                raise ValueError(f"mse needs targets shaped like the model's outputs {factors.output_shape} per sample, "
                                 f"got {tuple(y.shape[1:])}")
            return ggn_factors_vp(factors, v, self.params)
        out, pullback, jvp_fn = self._ggn_linearisation(x)
        single = k == 1  # K = 1 (a CG solve): plain GEMMs, not vmap's bmm
        jv = jvp_fn({n: t[0] for n, t in v.items()}).unsqueeze(0) if single else vmap(jvp_fn)(v)  # [K, B, *out]
        z = out.detach()
        if self.loss == "cross_entropy":
            if z.dim() != 2:
                raise ValueError(f"cross_entropy needs model outputs [B, classes], got {tuple(z.shape)}")
            # p comes free with this batch's forward, so caching it across products would save one softmax
            p = torch.softmax(z.double() if z.dtype == torch.float64 else z.float(), dim=-1).to(jv.dtype)
            u = p * jv - p * (p * jv).sum(dim=-1, keepdim=True)  # (diag(p) − ppᵀ) Jv per sample
        else:
            if y.numel() != z.numel():
                raise ValueError(f"mse needs targets shaped like the model's outputs {tuple(z.shape)}, got {tuple(y.shape)}")
            u = 2.0 * jv
        if single:
            return {n: t.unsqueeze(0) for n, t in pullback(u[0].to(z.dtype))[0].items()}
        return vmap(pullback)(u.to(z.dtype))[0]

    def _losses(self, values: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if isinstance(self.loss, str):
            return output_loss(self.loss, self._forward(values, x), y)
        # a callable loss is handed the model itself, running on these values (losses.per_sample_loss_at)
        return per_sample_loss_at(self.model, self.loss, (x, y), {**self._fixed, **values})

    def _hessian(self, start: int, v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y = self._batch(start)
        names = list(self._values)
        with torch.enable_grad():
            leaves = [self._values[n].detach().requires_grad_() for n in names]
            total = self._losses(dict(zip(names, leaves)), x, y).sum()
            grads = torch.autograd.grad(total, leaves, create_graph=True, allow_unused=True)
            # gradients that do not depend on θ (or are absent) contribute nothing to Hv
            keep = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            if not keep:
                return {n: torch.zeros_like(v[n]) for n in names}
            outs, cots = [grads[i] for i in keep], [v[names[i]] for i in keep]
            hv: tuple[torch.Tensor | None, ...] | None = None
            if self._batched_double_backward:
                try:
                    hv = torch.autograd.grad(outs, leaves, cots, retain_graph=True, allow_unused=True, is_grads_batched=True)
                except RuntimeError:
                    self._batched_double_backward = False
            if hv is None:  # one double backward per vector
                k = next(iter(v.values())).shape[0]
                rows = [torch.autograd.grad(outs, leaves, [c[j] for c in cots], retain_graph=True, allow_unused=True)
                        for j in range(k)]
                hv = tuple(None if rows[0][i] is None else torch.stack([r[i] for r in rows]) for i in range(len(names)))
        return {n: torch.zeros_like(v[n]) if h is None else h.detach() for n, h in zip(names, hv)}

    def batch_factors(self, start: int) -> Any:
        """The Fisher factors (:class:`.per_sample.Factors`) of the batch that begins at sample ``start``.

        Each batch's layer factors (A, G) are captured once and reused by every later product (a CG
        solve makes dozens) and by direct solvers (woodbury), as long as they fit CACHE_BYTES;
        _refresh drops them when the parameters change.
        """
        from .per_sample import capture_factors

        self._refresh()
        x, y = self._batch(start)
        key = (x.data_ptr(), x.shape[0])
        factors = self._factor_cache.get(key)
        if factors is None:
            with torch.enable_grad():  # capture backpropagates even when the caller runs under no_grad
                factors = capture_factors(self.model, self.loss, (x, y), self.params)
            if self._cached_bytes["factors"] + factors.nbytes() <= CACHE_BYTES:
                self._factor_cache[key] = factors
                self._cached_bytes["factors"] += factors.nbytes()
        return factors

    def _fisher(self, start: int, v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from .per_sample import factors_fisher_vp

        return factors_fisher_vp(self.batch_factors(start), v, self.params)


def check_psd_with_shift(op: CurvatureOperator, what: str, needs_shift: str) -> None:
    """Refuse a Hessian operator (indefinite in general) and a zero shift λ + δ for ``what`` (a
    preconditioner that needs C positive semi-definite and A = C + (λ+δ) I invertible: ``needs_shift`` says why)."""
    if op.kind == "hessian":
        raise ValueError(f"{what} needs a positive semi-definite curvature; curvature='hessian' is indefinite in general: "
                         "use curvature='ggn' or 'fisher'")
    if op.shift <= 0:
        raise ValueError(f"{what} needs weight_decay + damping > 0 (got {op.weight_decay:g} + {op.damping:g}): "
                         f"{needs_shift}; raise damping")


def curvature_vp(model: nn.Module, loss: Loss, data: Data, v: Vector, *, kind: str = "ggn", weight_decay: float = 0.0,
                 damping: float = 0.0, batch_size: int | None = None, layers: list[str] | None = None,
                 device: str | torch.device | None = None, progress: bool = False) -> Vector:
    """(C + (weight_decay + damping) I) v, with C the ``kind`` curvature of the mean loss over ``data``.

    ``v``: flat [P] / [K, P] or dict name → [*shape] / [K, *shape] over ``trainable(model, layers)``;
    the result has the same form, shape, dtype and device. For many products with the same model and
    data, build a :class:`CurvatureOperator` once instead.
    """
    op = CurvatureOperator(model, loss, data, kind=kind, weight_decay=weight_decay, damping=damping,
                           batch_size=batch_size, layers=layers, device=device, progress=progress)
    return op(v)


__all__ = ["CURVATURES", "CurvatureOperator", "check_psd_with_shift", "curvature_vp"]
