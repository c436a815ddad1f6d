"""Data augmentation: pad, crop, flip and normalise a batch of images."""
import numpy as np


def augment(images, crop_offsets, flips, mean, std, pad=4):
    """float32 (B, H, W, C): out[b, i, j, c] = (padded[b, i + oy, j' + ox, c] / 255 - mean[c]) / std[c].

    images uint8 (B, H, W, C); crop_offsets integer (B, 2), (oy, ox) in [0, 2 * pad]; flips (B,),
    j' = W - 1 - j where flips[b] else j; padded: ``pad`` rows and columns of zeros on each side.
    Each operation in float32, rounded to nearest, as the Triton kernel does, so the two agree bit
    for bit.
    """
    offsets = np.asarray(crop_offsets).astype(np.intp)
    batch, height, width, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    columns = np.where(np.asarray(flips)[:, None] != 0, np.arange(width)[::-1], np.arange(width))
    pixels = padded[np.arange(batch)[:, None, None],
                    (np.arange(height) + offsets[:, :1])[:, :, None],
                    (columns + offsets[:, 1:])[:, None, :]]
    mean, std = (np.asarray(a).astype(np.float32) for a in (mean, std))
    return (pixels.astype(np.float32) / np.float32(255) - mean) / std
