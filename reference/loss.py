"""Softmax cross-entropy loss."""
import numpy as np


def cross_entropy(logits, labels):
    """Mean over the batch of -log softmax(logits)[n, labels[n]]: logits (N, K), integer labels (N,) in [0, K).

    Like F.cross_entropy(logits, labels). Stable for any logit magnitude: softmax
    via log-sum-exp after subtracting each row's max. Returns a 0-d array of
    logits' dtype; saved holds the softmax.
    """
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"cross_entropy: labels must be an integer array, got {labels.dtype}")
    n, classes = logits.shape
    if labels.shape != (n,) or labels.min() < 0 or labels.max() >= classes:
        raise ValueError(f"cross_entropy: labels must have shape ({n},) and values in [0, {classes}), "
                         f"got shape {labels.shape}")
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = -log_probs[np.arange(n), labels].mean()
    return np.asarray(loss, dtype=logits.dtype), (np.exp(log_probs), labels)


def cross_entropy_backward(dloss, saved):
    """dlogits (N, K) = (softmax - onehot(labels)) * dloss / N, dloss a scalar or 0-d array."""
    probs, labels = saved
    n = probs.shape[0]
    dlogits = probs.copy()
    dlogits[np.arange(n), labels] -= 1
    # dloss in probs' dtype: a float64 0-d array would otherwise promote a float32 gradient.
    dlogits *= np.asarray(dloss, dtype=probs.dtype) / n
    return (dlogits,)
