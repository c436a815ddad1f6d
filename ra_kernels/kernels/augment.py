"""Training augmentation in one pass: pad + crop + horizontal flip + per-channel normalisation.

Reads a batch of uint8 NHWC images and writes the normalised float32 batch;
the padded image is never materialised (a read outside the image is the zero
padding). Memory-bound: 1 byte read and 4 written per element, 786 KB out for
a batch of 64 CIFAR images. A flat 1-D sweep over the output in BLOCK_N-element
tiles (1,024 over 4 warps: 8 contiguous float32 stores per thread); the reads
of one image row are contiguous too, reversed when flipped. The per-image crop
offsets and flip flags are gathered per element from small arrays that stay in
L1. Offsets are int32: fine below 2**31 elements.

Both divisions round to nearest (``div_rn``) in the order of the NumPy version
in ``ra_kernels.data``, so the two agree exactly: Triton's plain ``/`` on float32
is ``div.full.f32`` on NVIDIA GPUs, off by up to 2 ulp.
"""
import numpy as np
import triton.language as tl

from ..backend import asarray, empty, xp
from ..launch import kernel, launch
from .tiles import cdiv, FLAT_BLOCK



@kernel(aot=[dict(images_ptr="*u8", offsets_ptr="*i32", flips_ptr="*i8", mean_ptr="*fp32", std_ptr="*fp32",
                  out_ptr="*fp32", n="i32", pad="i32", H=32, W=32, C=3, BLOCK_N=FLAT_BLOCK)])
def augment_kernel(images_ptr, offsets_ptr, flips_ptr, mean_ptr, std_ptr, out_ptr, n, pad,
                   H: tl.constexpr, W: tl.constexpr, C: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[b, i, j, c] = (padded[b, i + oy, j' + ox, c] / 255 - mean[c]) / std[c] over n = B*H*W*C elements.

    images: uint8 (B, H, W, C); offsets: int32 (B, 2) = (oy, ox); flips: int8 (B,),
    j' = W - 1 - j where flips[b] != 0 else j; padded: the image with ``pad`` zero
    rows and columns on each side; mean, std: float32 (C,); out: float32 (B, H, W, C).
    """
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_bounds = offs < n
    c = offs % C
    j = (offs // C) % W
    i = (offs // (C * W)) % H
    b = offs // (C * W * H)
    oy = tl.load(offsets_ptr + 2 * b, mask=in_bounds, other=0)
    ox = tl.load(offsets_ptr + 2 * b + 1, mask=in_bounds, other=0)
    flip = tl.load(flips_ptr + b, mask=in_bounds, other=0)
    src_i = i + oy - pad
    src_j = tl.where(flip != 0, W - 1 - j, j) + ox - pad
    inside = in_bounds & (src_i >= 0) & (src_i < H) & (src_j >= 0) & (src_j < W)
    pixel = tl.load(images_ptr + ((b * H + src_i) * W + src_j) * C + c, mask=inside, other=0)
    mean = tl.load(mean_ptr + c, mask=in_bounds, other=0.0)
    std = tl.load(std_ptr + c, mask=in_bounds, other=1.0)
    scaled = tl.math.div_rn(pixel.to(tl.float32), 255.0)
    tl.store(out_ptr + offs, tl.math.div_rn(scaled - mean, std), mask=in_bounds)


def augment(images, crop_offsets, flips, mean, std, pad):
    """The augmented, normalised batch: float32 (B, H, W, C), an array of the current backend.

    images: uint8 (B, H, W, C), C-contiguous, of the current backend. crop_offsets
    (int, (B, 2)), flips (bool or int, (B,)), mean and std ((C,)) may be NumPy or
    backend arrays; they are converted to int32, int8 and float32 (a small
    host-to-device copy on cuda when given as NumPy). Arguments are checked by
    ``ra_kernels.data.augment``, the public entry point.
    """
    _, height, width, channels = images.shape
    out = empty(images.shape, np.float32)
    n = images.size
    launch(augment_kernel, (cdiv(n, FLAT_BLOCK),), images, _contiguous(crop_offsets, np.int32),
           _contiguous(flips, np.int8), _contiguous(mean, np.float32), _contiguous(std, np.float32),
           out, n, int(pad), H=height, W=width, C=channels, BLOCK_N=FLAT_BLOCK)
    return out


def _contiguous(a, dtype):
    """``a`` as a C-contiguous array of the current backend with ``dtype`` (no copy when it already is)."""
    return xp().ascontiguousarray(asarray(a, dtype=dtype))
