"""Inverse-curvature CG solves x = (C + δI)⁻¹ b on a trained digits MLP: ours against pyDVL and dattri.

Setting: scikit-learn digits (1797 8×8 images; a stratified 80/20 split, seed 0, keeps N=1437
train samples), inputs flattened to 64 floats in [0, 1]; an MLP 64→256→256→10 (ReLU, P=85 002
parameters, float32) trained for 20 epochs of plain SGD (lr 0.1, batch 64, seed 0, no weight decay)
so that the curvature is that of a trained net; damping δ = 1e-3; one right-hand side b = the
gradient of the MEAN cross-entropy over 10 train samples (a seeded choice), not a random vector.
C is the curvature of the mean loss over the N train samples.

Every entry solves the SAME system (checked in the fixtures: each peer's regularised operator is
compared with our ``CurvatureOperator`` on a random vector) and must reach the SAME achieved
accuracy: ‖b − (C+δI)x‖ / ‖b‖ ≤ BAR = 1e-4, ALWAYS recomputed from the returned x with our
``CurvatureOperator`` (the peers measure their own stopping rules differently, see below). Each
peer's tolerance knob is set to the loosest value whose solution meets that bar (``TUNED``; re-run
the search with ``python benchmarks/tune_cg.py tune``), and that setting is what is timed.
Iterations, the setting, the achieved residual and the distance to a tight (tol 1e-5) solution of
ours go to ``benchmark.extra_info``.

Groups:

1. "CG empirical Fisher" (C = (1/N) Σ g_i g_iᵀ): ours ``solve(curvature="fisher")`` with cg (plain and
   with the ``woodbury`` preconditioner) and with the direct ``woodbury`` solver (exact through the
   [N, N] Gram of per-sample gradients); pyDVL's ``CgInfluence`` in ``SecondOrderMode.GAUSS_NEWTON``
   (which is the empirical Fisher) — the peer; dattri's ``ihvp_cg`` on a function whose Hessian is the
   empirical Fisher (dattri's CG only ever takes the Hessian of a scalar function; see ``_dattri_function``).
2. "CG GGN" (C = (1/N) Σ J_iᵀ H_i J_i): ours ``solve(curvature="ggn")``, plain and with the
   ``nystrom`` and ``woodbury`` preconditioners; dattri's ``ihvp_cg`` on
   the loss of the network linearised at θ* (whose Hessian is exactly the GGN) — the peer. pyDVL has
   no GGN (its "Gauss-Newton" is the empirical Fisher).
3. The exact Hessian: H + δI is indefinite on this net (Lanczos finds λ_min(H) ≈ −0.16 ≪ −δ), so
   no CG converges on it; the test checks that, records it, and skips with the numbers.
4. "reference: retrain" — retraining the MLP (20 epochs) from the same initial weights: context
   for the cost of one solve, in its own group (the peer of that group only).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

from unlearn_fast.influence import CurvatureOperator, solve

FISHER_GROUP = "CG empirical Fisher, digits MLP 64-256-256-10, δ=1e-3"
GGN_GROUP = "CG GGN, digits MLP 64-256-256-10, δ=1e-3"
HESSIAN_GROUP = "CG exact Hessian, digits MLP 64-256-256-10, δ=1e-3"
RETRAIN_GROUP = "reference: retrain digits MLP, 20 epochs"

DAMPING = 1e-3
BAR = 1e-4          # the relative residual every entry must reach, by our CurvatureOperator
N_RHS_SAMPLES = 10  # b = ∇ of the mean loss over this many train samples
EPOCHS, LR, BATCH = 20, 0.1, 64
OURS_MAX_ITER = 1000

# pyDVL's CgInfluence runs its block CG (solve_simultaneously=True) on DataLoader batches of 479 = N/3
# samples: see _pydvl_solve for why both are needed to make it solve our system.
PYDVL_BATCH = 479

# The loosest tolerance setting of each peer whose solution meets BAR, found by `tune` (2 threads,
# torch 2.13.0 CPU). pyDVL: rtol (atol=0), its stopping rule ‖r‖ ≤ rtol²·‖b‖ on its recursive
# residual. dattri: max_iter (dattri 0.3.0's CG ignores `tol` and always runs max_iter iterations),
# searched on a grid of 10; `mode` is the faster of dattri's two autodiff modes for that function.
TUNED = {
    "pydvl_rtol": 1e-2,
    "dattri": {"fisher": {"max_iter": 160, "mode": "rev-fwd"},
               "ggn": {"max_iter": 200, "mode": "rev-rev"}},
}

OURS_ROUNDS = 3
DATTRI_ROUNDS = 3
PYDVL_ROUNDS = 1   # one pyDVL solve takes about a minute on 2 cores
RETRAIN_ROUNDS = 3


# ---------------------------------------------------------------------------------------------
# Setting


def digits_train() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_train, _, y_train, _ = train_test_split(x, digits.target, test_size=0.2, stratify=digits.target, random_state=0)
    return torch.from_numpy(x_train), torch.from_numpy(y_train).long()


def fresh_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def train_mlp(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    """Plain SGD, shuffled batches of 64 from a seeded generator: the recipe of the trained net."""
    generator = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(EPOCHS):
        order = torch.randperm(x.shape[0], generator=generator)
        for s in range(0, x.shape[0], BATCH):
            idx = order[s:s + BATCH]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model


class Setting:
    """The trained model, its data, the right-hand side and our operators for the residual checks."""

    def __init__(self) -> None:
        self.x, self.y = digits_train()
        self.initial = fresh_mlp()
        self.model = train_mlp(copy.deepcopy(self.initial), self.x, self.y).eval()
        self.names = [n for n, _ in self.model.named_parameters()]
        self.shapes = [p.shape for _, p in self.model.named_parameters()]
        self.sizes = [p.numel() for _, p in self.model.named_parameters()]
        self.theta = torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])
        chosen = torch.randperm(self.x.shape[0], generator=torch.Generator().manual_seed(1))[:N_RHS_SAMPLES]
        grads = torch.autograd.grad(F.cross_entropy(self.model(self.x[chosen]), self.y[chosen]), list(self.model.parameters()))
        self.b = torch.cat([g.reshape(-1) for g in grads])
        self.ops = {kind: CurvatureOperator(self.model, "cross_entropy", (self.x, self.y), kind=kind, damping=DAMPING)
                    for kind in ("fisher", "ggn", "hessian")}
        self._reference: dict[str, torch.Tensor] = {}

    def residual(self, kind: str, solution: torch.Tensor) -> float:
        """‖b − (C+δI)x‖/‖b‖ by OUR operator: the one measure every entry is held to."""
        x = solution.reshape(-1).to(self.b.dtype)
        return float((self.b - self.ops[kind](x)).norm() / self.b.norm())

    def reference(self, kind: str) -> torch.Tensor:
        """Our solution at a tight tolerance, to report how far each entry's x is from the answer."""
        if kind not in self._reference:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # float32 may floor just above 1e-5: still far closer than BAR
                self._reference[kind] = solve(self.model, "cross_entropy", (self.x, self.y), self.b, curvature=kind,
                                              damping=DAMPING, tol=1e-5, max_iter=2000).solution
        return self._reference[kind]

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: t.reshape(s) for n, t, s in zip(self.names, torch.split(theta, self.sizes), self.shapes)}


def record(benchmark, setting: Setting, kind: str, solution: torch.Tensor, **info) -> float:
    """Checks the achieved residual against BAR (our operator) and records it with ``info``."""
    residual = setting.residual(kind, solution)
    reference = setting.reference(kind)
    benchmark.extra_info.update(info)
    benchmark.extra_info.update({
        "curvature": kind, "damping": DAMPING, "relative_residual": residual, "bar": BAR,
        "distance_to_reference": float((solution.reshape(-1) - reference).norm() / reference.norm()),
        "rhs": f"gradient of the mean cross-entropy over {N_RHS_SAMPLES} train samples",
    })
    assert residual <= BAR, f"{kind}: relative residual {residual:.3g} above the bar {BAR:g}: re-run `tune`"
    return residual


# ---------------------------------------------------------------------------------------------
# Ours


def ours_solve(setting: Setting, kind: str, solver: str = "cg", preconditioner: str | None = None):
    """One solve; a preconditioner's construction (the Nyström sketch's 32 products; the Woodbury
    preconditioner's factor pass, Gram and Cholesky) is inside the timing."""
    return solve(setting.model, "cross_entropy", (setting.x, setting.y), setting.b, curvature=kind, damping=DAMPING,
                 tol=BAR, max_iter=OURS_MAX_ITER, solver=solver, preconditioner=preconditioner)


# ---------------------------------------------------------------------------------------------
# pyDVL: CgInfluence, SecondOrderMode.GAUSS_NEWTON
#
# How pyDVL 0.10.0 scales its "Gauss-Newton" (= empirical Fisher) operator: per DataLoader batch it
# computes (1/|batch|) Σ_i g_i g_iᵀ v (per-sample gradients by vmap(grad), materialised [|batch|, P])
# and averages the batches with PointAveraging, which weights each batch by `result.shape[0]` of the
# product — the number of VECTORS, not of samples — and leaves the first batch unweighted:
#     result = T_1;  result += n·T_b for b ≥ 2;  return result / (n_1 + Σ_{b≥2} n)
# with n = the leading size of the product.
# - Default CG (solve_simultaneously=False) multiplies 1-D vectors [P], so n = P: the operator is
#   (T_1/P + Σ_{b≥2} T_b) / n_batches — the first batch is scaled down by P = 85 002. With a single
#   batch of all N samples it is F/P exactly, so the same system needs regularization δ/P and the
#   right-hand side b/P. Its stopping rule is also per component: tol = max(rtol²·|b_0|, atol²),
#   ‖r‖ < tol, where b_0 is the FIRST component of b (norm over dim 0 of a [1, P] matrix) — here
#   b_0 = 0 (pixel 0 of every digit is 0, so ∂ℓ/∂W[0, 0] = 0) and only atol acts. A product costs
#   the same ~0.3 s on either path (per-sample gradients of all N samples, recomputed every time).
# - Block CG (solve_simultaneously=True, used here) multiplies [K=1, P] matrices, so n = 1 for every
#   batch: the operator is the plain mean of the per-batch means, i.e. exactly F = (1/N) Σ g_i g_iᵀ
#   when all batches have the same size. N = 1437 = 3 · 479, so batches of 479; regularization = δ
#   is then added as δ·v (CgOperator._reg_operator_apply): the same system, no rescaling. Its
#   stopping rule is relative: ‖R‖ ≤ max(rtol²·‖b‖, atol²) on the recursive residual R — note
#   rtol SQUARED against ‖b‖ — with atol=0 here. With K = 1, block CG is CG with normalised search
#   directions (an SVD of a [P, 1] matrix per iteration). It starts from x0 = b.
# We time CgInfluence(...).fit(loader) and one application of its fitted block's CgOperator to b
# (influence_factors would solve for per-sample test gradients, not for our one right-hand side).


def _pydvl_influence(setting: Setting, rtol: float):
    from pydvl.influence.torch import CgInfluence
    from pydvl.influence.torch.util import SecondOrderMode
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(setting.x, setting.y), batch_size=PYDVL_BATCH, shuffle=False)
    influence = CgInfluence(setting.model, F.cross_entropy, regularization=DAMPING, rtol=rtol, atol=0.0,
                            maxiter=2000, solve_simultaneously=True, warn_on_max_iteration=True,
                            second_order_mode=SecondOrderMode.GAUSS_NEWTON)
    influence.fit(loader)
    (block,) = influence.block_mapper.composable_block_dict.values()
    return block.op  # pydvl.influence.torch.operator.CgOperator


def _pydvl_solve(setting: Setting, rtol: float) -> tuple[torch.Tensor, int]:
    """One pyDVL solve; returns x and the number of operator products it used (iterations + 1)."""
    cg = _pydvl_influence(setting, rtol)
    inner, count = cg.operator, [0]
    apply = inner.apply

    def counted(v):
        count[0] += 1
        return apply(v)

    inner.apply = counted  # instance attribute: counts products, the computation is pyDVL's own
    return cg.apply(setting.b)[0], count[0]


def _check_pydvl_operator(setting: Setting) -> float:
    cg = _pydvl_influence(setting, TUNED["pydvl_rtol"])
    v = torch.randn(1, setting.b.numel(), generator=torch.Generator().manual_seed(2))
    theirs = cg._reg_operator_apply(v.clone())[0]  # (F + regularization·I) v, as its CG applies it
    ours = setting.ops["fisher"](v[0])
    return float((theirs - ours).norm() / ours.norm())


# ---------------------------------------------------------------------------------------------
# dattri: ihvp_cg(func, max_iter, mode, regularization)((θ,), b) — CG on the Hessian of `func` at θ,
# plus regularization·v, vmapped over the right-hand sides, always max_iter iterations from x0 = b.
# dattri has no Fisher or GGN operator for CG, only "the Hessian of func", so we hand it functions of
# the flat parameters θ whose Hessian at θ* IS the matrix (all products are exact, nothing formed):
#   hessian: L(θ) = (1/N) Σ ℓ_i(θ)
#   ggn:     L_lin(θ) = (1/N) Σ ℓ(z_i(θ*) + J_i (θ − θ*), y_i)       ∇² = (1/N) Σ J_iᵀ H_i J_i at θ*
#   fisher:  q(θ) = (1/2N) Σ ⟨g_i, θ − θ*⟩², ⟨g_i, u⟩ = jvp of ℓ_i   ∇² = (1/N) Σ g_i g_iᵀ everywhere
# The mean over N matches our mean-loss curvature and regularization = δ adds δ·v: the same system.


def _dattri_function(setting: Setting, kind: str):
    model, x, y, theta_star = setting.model, setting.x, setting.y, setting.theta

    def logits(theta):
        return functional_call(model, setting.unflatten(theta), (x,))

    def losses(theta):
        return F.cross_entropy(logits(theta), y, reduction="none")

    if kind == "hessian":
        return lambda theta: losses(theta).mean()
    if kind == "ggn":
        z_star = logits(theta_star).detach()
        return lambda theta: F.cross_entropy(z_star + jvp(logits, (theta_star,), (theta - theta_star,))[1], y)
    if kind == "fisher":
        return lambda theta: 0.5 * jvp(losses, (theta_star,), (theta - theta_star,))[1].pow(2).mean()
    raise ValueError(kind)


def _dattri_solve(setting: Setting, kind: str, max_iter: int, mode: str) -> torch.Tensor:
    from dattri.func.hessian import ihvp_cg

    ihvp = ihvp_cg(_dattri_function(setting, kind), max_iter=max_iter, mode=mode, regularization=DAMPING)
    return ihvp((setting.theta,), setting.b)[0].detach()


def _check_dattri_operator(setting: Setting, kind: str, mode: str) -> float:
    from dattri.func.hessian import hvp_at_x

    hvp = hvp_at_x(_dattri_function(setting, kind), (setting.theta,), mode=mode, regularization=DAMPING)
    v = torch.randn(setting.b.numel(), generator=torch.Generator().manual_seed(2))
    ours = setting.ops[kind](v)
    return float((hvp(v).detach() - ours).norm() / ours.norm())


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module", autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def setting() -> Setting:
    torch.set_num_threads(2)
    return Setting()


def _pedantic(benchmark, fn, rounds: int, warmup: int = 1):
    return benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=warmup)


# ---------------------------------------------------------------------------------------------
# Groups: empirical Fisher (peer: pyDVL) and GGN (peer: dattri; pyDVL has no GGN mode)
GROUPS = {"fisher": FISHER_GROUP, "ggn": GGN_GROUP}


# The empirical Fisher also has an exact direct solve (woodbury: the [N, N] Gram, N = 1437 ≪ P = 85k).
@pytest.mark.parametrize(("kind", "solver", "preconditioner"),
                         [("fisher", "cg", None), ("fisher", "cg", "woodbury"), ("fisher", "woodbury", None), ("ggn", "cg", None),
                          ("ggn", "cg", "nystrom"), ("ggn", "cg", "woodbury")])
def test_ours(benchmark, setting, kind, solver, preconditioner):
    benchmark.group = GROUPS[kind]
    result = _pedantic(benchmark, lambda: ours_solve(setting, kind, solver, preconditioner), OURS_ROUNDS)
    record(benchmark, setting, kind, result.solution, iterations=result.iterations, tol=BAR,
           own_relative_residual=result.relative_residual, solver=solver, preconditioner=preconditioner)
    assert result.converged, result.message


def test_fisher_pydvl_peer(benchmark, setting):
    pytest.importorskip("pydvl.influence.torch", reason="pyDVL with its influence extra (pip install 'pydvl[influence]')")
    benchmark.group = FISHER_GROUP
    benchmark.extra_info["peer"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # pyDVL's own deprecation notices on import
        mismatch = _check_pydvl_operator(setting)
    assert mismatch < 1e-5, f"pyDVL's operator differs from ours by {mismatch:.3g}: not the same system"
    solution, products = _pedantic(benchmark, lambda: _pydvl_solve(setting, TUNED["pydvl_rtol"]), PYDVL_ROUNDS, warmup=0)
    record(benchmark, setting, "fisher", solution, iterations=products - 1, operator_products=products,
           rtol=TUNED["pydvl_rtol"], atol=0.0, solve_simultaneously=True, batch_size=PYDVL_BATCH,
           regularization=DAMPING, operator_mismatch=mismatch)


@pytest.mark.parametrize("kind", list(GROUPS))
def test_dattri(benchmark, setting, kind):
    pytest.importorskip("dattri.func.hessian", reason="dattri (pip install dattri)")
    benchmark.group = GROUPS[kind]
    if kind == "ggn":
        benchmark.extra_info["peer"] = True
    tuned = TUNED["dattri"][kind]
    mismatch = _check_dattri_operator(setting, kind, tuned["mode"])
    assert mismatch < 1e-5, f"dattri's operator differs from ours by {mismatch:.3g}: not the same system"
    solution = _pedantic(benchmark, lambda: _dattri_solve(setting, kind, **tuned), DATTRI_ROUNDS)
    record(benchmark, setting, kind, solution, iterations=tuned["max_iter"], max_iter=tuned["max_iter"],
           mode=tuned["mode"], regularization=DAMPING, operator_mismatch=mismatch)


# ---------------------------------------------------------------------------------------------
# Group 3: the exact Hessian (indefinite: checked, recorded, skipped)


def hessian_lambda_min(setting: Setting) -> tuple[float, float]:
    """λ_min of the undamped Hessian by Lanczos (ARPACK) on our products, and the Rayleigh quotient
    of its Ritz vector under H + δI recomputed by one more product: a certificate when negative."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    op = CurvatureOperator(setting.model, "cross_entropy", (setting.x, setting.y), kind="hessian")
    size = setting.b.numel()

    def matvec(v):
        return op(torch.from_numpy(np.asarray(v, dtype=np.float32).reshape(-1))).double().numpy()

    values, vectors = eigsh(LinearOperator((size, size), matvec=matvec, dtype=np.float64), k=1, which="SA",
                            tol=1e-3, ncv=40, maxiter=200, v0=np.ones(size))
    v = torch.from_numpy(vectors[:, 0]).float()
    rayleigh = float(v @ setting.ops["hessian"](v) / (v @ v))
    return float(values[0]), rayleigh


def test_hessian_indefinite(benchmark, setting):
    """No CG entry can be timed on H + δI: it is indefinite. Record why, then skip."""
    benchmark.group = HESSIAN_GROUP
    lam, rayleigh = hessian_lambda_min(setting)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # our SolverWarning: the negative curvature is the point here
        ours = ours_solve(setting, "hessian")
    assert rayleigh < 0 and not ours.converged
    detail = (f"H + {DAMPING:g}·I is indefinite: Lanczos λ_min(H) = {lam:.3g}, Rayleigh quotient of its Ritz vector "
              f"under H + δI = {rayleigh:.3g} < 0; ours stops: {ours.message}")
    benchmark.extra_info.update({"lambda_min_hessian": lam, "rayleigh_damped": rayleigh, "ours_message": ours.message})
    try:
        import dattri.func.hessian  # noqa: F401
    except ImportError:
        pass
    else:
        tuned = TUNED["dattri"]["ggn"]
        x = _dattri_solve(setting, "hessian", tuned["max_iter"], "rev-rev")
        residual = setting.residual("hessian", x)
        benchmark.extra_info["dattri_residual"] = residual
        detail += f"; dattri ihvp_cg after {tuned['max_iter']} iterations: relative residual {residual:.3g}"
    pytest.skip(detail)


# ---------------------------------------------------------------------------------------------
# Group 4: retraining, for scale


def test_retrain_reference(benchmark, setting):
    benchmark.group = RETRAIN_GROUP
    benchmark.extra_info["peer"] = True  # the peer of its own group only; the CG groups have theirs
    benchmark.extra_info["recipe"] = f"{EPOCHS} epochs SGD lr {LR}, batch {BATCH}, N={setting.x.shape[0]}"
    _pedantic(benchmark, lambda: train_mlp(copy.deepcopy(setting.initial), setting.x, setting.y), RETRAIN_ROUNDS)
