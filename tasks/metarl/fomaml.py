"""First-order MAML (FOMAML), hand-written: one meta-update over a batch of tasks.

Why hand-written: ``learn2learn`` 0.2.0 is only a source distribution with
Cython extensions built against the installed torch (``pip install --dry-run``
here resolves it to ``learn2learn-0.2.0.tar.gz``), and ``higher`` 0.2.1 (a
pure wheel) was last released in 2021 and patches modules for
*second-order* unrolling, which a first-order method does not need. We did not
add either to the shared environment; first-order MAML is the ~30 lines below.

Why first-order: MAML's outer gradient (Finn et al., 2017, eq. 1) is
``d/dtheta L_query(theta - alpha grad L_support(theta))``, which contains the
Hessian of the support loss. Dropping it (Finn et al. §5.2; Nichol et al.
2018, "On First-Order Meta-Learning Algorithms") gives FOMAML: the outer
gradient is the query gradient *at the adapted weights*, applied to the
meta-weights. Finn et al. report nearly the same accuracy at a fraction of
the cost, and a DQN's TD loss with a target network is not a smooth enough
objective to make second-order terms worth their price.

One step, for tasks ``i = 1..T`` with (support, query) losses:

1. ``theta_i = theta``; ``inner_steps`` times: ``theta_i -= alpha * grad L_support_i(theta_i)`` (SGD);
2. ``g_i = grad L_query_i(theta_i)`` (no gradient through step 1: first order);
3. ``theta.grad = mean_i g_i``; the caller's optimiser steps (SGD: ``theta -= beta * mean_i g_i``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

LossFn = Callable[[nn.Module], torch.Tensor]  # a task's loss of a model (a copy of the meta-model)


def fomaml_gradients(model: nn.Module, tasks: Sequence[tuple[LossFn, LossFn]], inner_lr: float,
                     inner_steps: int) -> dict[str, float]:
    """Write the FOMAML meta-gradient into ``model``'s ``.grad`` (steps 1-3 above, before the optimiser).

    Parameters
    ----------
    model : torch.nn.Module
        The meta-model (its weights are not changed here).
    tasks : sequence of (support_loss, query_loss)
        Each a callable ``model -> scalar loss`` evaluated on a copy of ``model``.
    inner_lr : float
        ``alpha``, the inner SGD step size.
    inner_steps : int
        Inner SGD steps per task (>= 0; 0 makes this plain multi-task SGD).

    Returns
    -------
    dict
        ``support_loss`` (before adaptation) and ``query_loss`` (after), means over tasks.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    meta_grads = [torch.zeros_like(p) for p in params]
    support_total = query_total = 0.0
    for support_loss, query_loss in tasks:
        fast = copy.deepcopy(model)  # theta_i starts at theta
        inner = torch.optim.SGD(fast.parameters(), lr=inner_lr)
        for step in range(inner_steps):
            inner.zero_grad()
            loss = support_loss(fast)
            support_total += float(loss.detach()) if step == 0 else 0.0
            loss.backward()
            inner.step()
        fast_params = [p for p in fast.parameters() if p.requires_grad]
        query = query_loss(fast)
        query_total += float(query.detach())
        grads = torch.autograd.grad(query, fast_params, allow_unused=True)  # at theta_i, first order
        for total, grad in zip(meta_grads, grads):
            if grad is not None:
                total += grad
    for param, total in zip(params, meta_grads):
        param.grad = total / len(tasks)
    return {"support_loss": support_total / len(tasks), "query_loss": query_total / len(tasks)}
