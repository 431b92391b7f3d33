"""Unrolled GAN's look-ahead (Metz et al. 2017, "Unrolled Generative Adversarial Networks", section 2.2).

G's loss is taken against ``θ_D^K``, the parameters D would have after K more steps of its own optimizer from
where it stands, ``θ_D^{k+1} = θ_D^k + η^k · dθ_D`` (eq. 5-6), and G's gradient flows through those steps (the
paper's surrogate keeps the ``dθ_D^K/dθ_G`` term, eq. 8). The steps are functional: they start from copies of
D's parameters, buffers (BatchNorm statistics) and optimizer state, so D's real parameters and optimizer are
exactly as they were. The update rules are those of ``torch.optim.Adam`` and ``torch.optim.RMSprop`` written
differentiably (the optimizers D trains with; the authors' code unrolls Adam as well).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from torch.func import functional_call

Params = dict[str, torch.Tensor]


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """√x with a finite derivative at 0 (a parameter that never had a gradient has x = 0 exactly; √ there would
    put an infinite factor into the second backward). Values below 1e-30 differ by < 1e-15, far under ε."""
    return x.clamp_min(1e-30).sqrt()


def _optimizer_state(optimizer: torch.optim.Optimizer, module: nn.Module) -> tuple[dict, dict[str, dict]]:
    """The optimizer's hyperparameters (one group) and its per-parameter state keyed by parameter name."""
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer wraps the real one
    if len(inner.param_groups) != 1:
        raise ValueError("unrolled GAN: D's optimizer must have one parameter group")
    group = inner.param_groups[0]
    by_tensor = {id(p): name for name, p in module.named_parameters()}
    state = {by_tensor[id(p)]: inner.state.get(p, {}) for p in group["params"] if id(p) in by_tensor}
    return group, state


def optimizer_step(
    kind: str, group: dict, state: dict, param: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, dict]:
    """One differentiable step of ``torch.optim.Adam`` (no weight decay, no amsgrad) or ``RMSprop`` (no
    momentum, not centred) from ``state``; returns the new parameter and state (the inputs are not changed)."""
    if kind == "adam":
        b1, b2 = group["betas"]
        t = float(state.get("step", 0)) + 1
        m = state.get("exp_avg", torch.zeros_like(param)) * b1 + grad * (1 - b1)
        v = state.get("exp_avg_sq", torch.zeros_like(param)) * b2 + grad.square() * (1 - b2)
        denom = _sqrt(v) / (1 - b2**t) ** 0.5 + group["eps"]
        return param - group["lr"] / (1 - b1**t) * m / denom, {"step": t, "exp_avg": m, "exp_avg_sq": v}
    if kind == "rmsprop":
        a = group["alpha"]
        v = state.get("square_avg", torch.zeros_like(param)) * a + grad.square() * (1 - a)
        return param - group["lr"] * grad / (_sqrt(v) + group["eps"]), {"step": state.get("step", 0), "square_avg": v}
    raise ValueError(f"unrolled GAN: no differentiable step for optimizer {kind!r}")


@dataclass
class LookaheadD:
    """D with the look-ahead's parameters (and its own copies of D's buffers), called as ``D_K(img, c)``."""

    module: nn.Module
    params: Params
    buffers: Params

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return functional_call(self.module, {**self.params, **self.buffers}, args, kwargs)


def lookahead(
    D: nn.Module,
    optimizer: torch.optim.Optimizer,
    kind: str,
    d_loss: Callable[[Callable[..., torch.Tensor]], torch.Tensor],
    steps: int,
) -> LookaheadD:
    """D after ``steps`` functional steps of its optimizer on ``d_loss``, as a callable ``D_K(img, c)``.

    ``d_loss(D_k)`` computes D's loss with the callable it is given; the graph of every step is kept
    (``create_graph``), so a loss of ``D_K`` differentiates through the look-ahead into whatever ``d_loss`` read
    (G's fakes). D's own parameters, buffers and ``optimizer`` are left untouched."""
    group, states = _optimizer_state(optimizer, D)
    params: Params = {n: p.detach().requires_grad_(True) for n, p in D.named_parameters()}
    D_k = LookaheadD(D, params, {n: b.clone() for n, b in D.named_buffers()})  # BatchNorm updates the copies
    for _ in range(steps):
        names = list(params)
        grads = torch.autograd.grad(d_loss(D_k), [params[n] for n in names], create_graph=True, allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                params[n], states[n] = optimizer_step(kind, group, states[n], params[n], g)
    return D_k
