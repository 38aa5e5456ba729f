"""What training a model costs: FLOPs per sample, parameters, activations,
and whether a device can hold it (for the virtual clock and memory checks)."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgesim.devices import Fleet, ProfileError


def module_costs(model: Any, example: Any) -> tuple[float, int, int]:
    """(forward FLOPs per sample, parameter count, activation floats per sample).

    FLOPs are counted with forward hooks on the layers that carry them
    (2 x multiply-accumulates of every Conv1d/Conv2d, Linear and LSTM), which
    is what torch's FlopCounterMode reports for the CNN (a test checks it).
    FlopCounterMode itself costs ~1.5 s on first use, paid by every Ray
    worker; the hooks cost milliseconds.
    """
    import torch
    from torch import nn

    flops, activations = 0.0, 0

    def count(module: nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal flops, activations
        out = output[0] if isinstance(output, tuple) else output
        activations += out[0].numel()
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            kernel = module.in_channels // module.groups * int(np.prod(module.kernel_size))
            flops += 2.0 * kernel * out[0].numel()
        elif isinstance(module, nn.Linear):
            flops += 2.0 * module.in_features * module.out_features * (out[0].numel() // module.out_features)
        elif isinstance(module, nn.LSTM):
            steps = out.shape[1] if module.batch_first else out.shape[0]
            for layer in range(module.num_layers):
                inputs = module.input_size if layer == 0 else module.hidden_size
                # 4 gates, each a matrix-vector product on [x_t, h_{t-1}]
                flops += 2.0 * 4 * (inputs + module.hidden_size) * module.hidden_size * steps

    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children()) or isinstance(m, nn.LSTM)]
    with torch.no_grad():
        model(example)
    for hook in hooks:
        hook.remove()
    return flops, sum(p.numel() for p in model.parameters()), activations


def training_memory_bytes(params: int, activations_per_sample: int, batch_size: int) -> int:
    """Weights, gradients and SGD momentum (3 x params) plus forward activations
    kept for the backward pass, float32."""
    return 4 * (3 * params + 2 * activations_per_sample * batch_size)


def check_memory(
    fleet: Fleet, model_name: str, batch_size: int, costs: tuple[float, int, int],
) -> None:
    """Refuse a fleet whose devices cannot hold the model and a batch;
    ``costs`` is the task's (FLOPs, parameters, activations) per sample."""
    _, params, activations = costs
    need = training_memory_bytes(params, activations, batch_size)
    for name in fleet.mix:
        have = fleet.profiles[name].memory_gb * 1e9
        if need > have and fleet.mix[name] > 0:
            raise ProfileError(
                f"profile '{name}' has {fleet.profiles[name].memory_gb} GB but training "
                f"'{model_name}' with batch {batch_size} needs {need / 1e9:.3f} GB: lower "
                "train.batch_size or drop the profile from devices.mix"
            )
