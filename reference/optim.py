"""Optimiser update rules."""


def sgd_step(param, grad, velocity, lr, momentum=0.9, weight_decay=0.0, nesterov=False):
    """One SGD step with momentum, as torch.optim.SGD (dampening 0); returns (new_param, new_velocity).

    g = grad + weight_decay * param; v = momentum * velocity + g;
    step = g + momentum * v if nesterov else v; new_param = param - lr * step.
    The operations run in exactly this order in param's dtype, so a float32 kernel
    doing the same can be compared bit for bit. A zero velocity gives PyTorch's first step.
    """
    if not param.shape == grad.shape == velocity.shape:
        raise ValueError(f"sgd_step: shapes differ: param {param.shape}, grad {grad.shape}, "
                         f"velocity {velocity.shape}")
    # Hyperparameters as scalars of param's dtype: a NumPy float64 scalar would promote a float32 update.
    lr, momentum, weight_decay = (param.dtype.type(v) for v in (lr, momentum, weight_decay))
    g = grad + weight_decay * param
    v = momentum * velocity + g
    step = g + momentum * v if nesterov else v
    return param - lr * step, v
