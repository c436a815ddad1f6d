"""Bad input gets a clear error naming the op and what was wrong, before anything runs."""
import numpy as np
import pytest

from ra_kernels import backend
from ra_kernels import functional as F
from ra_kernels.autograd import Tensor


def f32(*shape):
    return np.random.default_rng().standard_normal(shape).astype(np.float32)


def bn_params(c):
    return f32(c), f32(c), np.zeros(c, np.float32), np.ones(c, np.float32)


def read_only_statistics(params):
    gamma, beta, mean, var = params
    mean.flags.writeable = False
    return gamma, beta, mean, var


@pytest.mark.parametrize("call, error, message", [
    # wrong rank
    (lambda: F.conv2d(f32(2, 8, 8), f32(3, 3, 8, 4)), ValueError,
     r"conv2d: x must be 4-D NHWC .* got shape \(2, 8, 8\)"),
    (lambda: F.conv2d(f32(1, 8, 8, 3), f32(3, 8, 4)), ValueError, r"conv2d: w must be 4-D HWIO"),
    (lambda: F.max_pool2d(f32(8, 8)), ValueError, r"max_pool2d: x must be 4-D"),
    (lambda: F.global_avg_pool(f32(2, 3)), ValueError, r"global_avg_pool: x must be 4-D"),
    (lambda: F.linear(f32(2, 3, 1), f32(3, 4), f32(4)), ValueError, r"linear: x must be 2-D"),
    (lambda: F.cross_entropy(f32(4), np.zeros(4, np.int64)), ValueError, r"cross_entropy: logits must be 2-D"),
    # channel and shape mismatches
    (lambda: F.conv2d(f32(1, 8, 8, 3), f32(3, 3, 4, 8)), ValueError, r"conv2d: x has 3 channels .* Cin = 4"),
    (lambda: F.batch_norm(f32(1, 4, 4, 3), *bn_params(5)), ValueError, r"batch_norm: gamma has 5 channels, x has 3"),
    (lambda: F.conv_bn_relu(f32(1, 4, 4, 3), f32(1, 1, 3, 8), *bn_params(3)), ValueError,
     r"conv_bn_relu: gamma has 3 channels, the conv's output \(w's Cout\) has 8"),
    (lambda: F.add(f32(2, 3), f32(3, 2)), ValueError,
     r"add: inputs must have the same shape, got a \(2, 3\), b \(3, 2\)"),
    (lambda: F.conv_chain(f32(1, 4, 4, 3), [(f32(1, 1, 3, 8), 1, 0, bn_params(8)), (f32(1, 1, 4, 2), 1, 0, None)]),
     ValueError, r"conv_chain: layer 1 w .* expects Cin = 4, its input has 8 channels"),
    (lambda: F.conv_chain(f32(1, 4, 4, 3), [(f32(1, 1, 3, 8), 1, 0, bn_params(8)),
                                            (f32(1, 1, 8, 2), 1, 0, bn_params(2))]),
     ValueError, r"conv_chain: every layer but the last takes bn .* layer 1 has one"),
    (lambda: F.conv_chain(f32(1, 4, 4, 3), [(f32(1, 1, 3, 8), 1, 0, bn_params(5)), (f32(1, 1, 8, 2), 1, 0, None)]),
     ValueError, r"conv_chain: layer 0 bn gamma has 5 channels, layer 0's output \(its w's Cout\) has 8"),
    (lambda: F.conv_chain(f32(1, 4, 4, 3), [(f32(1, 1, 3, 8), 1, 0, bn_params(8)), (f32(1, 1, 8, 2), 1, 0, None)],
                          skip=f32(1, 4, 4, 3)), ValueError,
     r"conv_chain: skip must have the output's shape \(1, 4, 4, 2\)"),
    (lambda: F.conv_chain(f32(1, 4, 4, 3), [(f32(1, 1, 3, 8), 1, 0, None)]), ValueError,
     r"conv_chain: layers must list at least 2 convolutions"),
    (lambda: F.conv_chain(f32(1, 1, 1, 3), [(f32(1, 1, 3, 8), 1, 0, bn_params(8)), (f32(1, 1, 8, 2), 1, 0, None)]),
     ValueError, r"conv_chain: layer 0's batch norm needs more than 1 value per channel"),
    (lambda: F.conv_chain(f32(1, 4, 4, 3), [(f32(1, 1, 3, 8), 1, 0, bn_params(8)), (f32(1, 1, 8, 3), 1, 0, None)],
                          input_bn=bn_params(8)), ValueError, r"conv_chain: input_bn gamma has 8 channels, x has 3"),
    (lambda: F.conv_chain(f32(1, 4, 4, 3), [(f32(1, 1, 3, 8), 1, 0, bn_params(8)), (f32(1, 1, 8, 3), 1, 0, None)],
                          input_bn=bn_params(3)[:2]), ValueError, r"conv_chain: input_bn must be \(gamma, beta, "),
    (lambda: F.conv_chain(f32(1, 4, 4, 3), [(f32(1, 1, 3, 8), 1, 0, bn_params(8)), (f32(1, 1, 8, 2), 1, 0, None)],
                          residual=True), ValueError,
     r"conv_chain: residual adds x, so the output must have x's shape"),
    (lambda: F.conv_chain(f32(1, 4, 4, 3), [(f32(1, 1, 3, 8), 1, 0, bn_params(8)), (f32(1, 1, 8, 3), 1, 0, None)],
                          residual=True, skip=f32(1, 4, 4, 3)), ValueError, r"conv_chain: give skip or residual"),
    (lambda: F.conv_chain(f32(1, 4, 4, 3), [(f32(1, 1, 3, 8), 1, 0, bn_params(8)), (f32(1, 1, 8, 3), 1, 0, None)],
                          residual=1), ValueError, r"conv_chain: residual must be True or False, got 1"),
    (lambda: F.attention_mix(f32(1, 4, 4, 2), f32(1, 4, 4, 3)), ValueError,
     r"attention_mix: inputs must have the same shape"),
    (lambda: F.linear(f32(2, 3), f32(4, 5), f32(5)), ValueError, r"linear: .* do not fit"),
    (lambda: F.upsample_bilinear(f32(1, 4, 4, 2), (8, 8), skip=f32(1, 8, 8, 3)), ValueError,
     r"upsample_bilinear: skip must have shape \(1, 8, 8, 2\)"),
    (lambda: F.upsample_bilinear(f32(1, 4, 4, 2), (8, 0)), ValueError, r"upsample_bilinear: OW of size must be an "
     r"integer >= 1, got 0"),
    (lambda: F.cross_entropy(f32(4, 10), np.zeros(3, np.int64)), ValueError,
     r"cross_entropy: labels must be integers of shape \(4,\), got int64 of shape \(3,\)"),
    (lambda: F.cross_entropy(f32(4, 10), np.array([0, 1, 10, 2])), ValueError, r"labels must lie in \[0, 10\)"),
    # hyperparameters
    (lambda: F.conv2d(f32(1, 8, 8, 3), f32(3, 3, 3, 4), stride=0), ValueError,
     r"conv2d: stride must be an integer >= 1"),
    (lambda: F.conv2d(f32(1, 2, 2, 3), f32(3, 3, 3, 4)), ValueError,
     r"conv2d: input size 2 with kernel 3, stride 1, padding 0 gives an empty output"),
    (lambda: F.max_pool2d(f32(1, 8, 8, 3), kernel_size=3, padding=2), ValueError,
     r"max_pool2d: padding 2 must be at most"),
    (lambda: F.max_pool2d(f32(1, 8, 8, 3), ceil_mode=1), ValueError, r"max_pool2d: ceil_mode must be True or False"),
    (lambda: F.batch_norm(f32(1, 4, 4, 3), *bn_params(3), momentum=1.5), ValueError,
     r"batch_norm: momentum must be a finite number in \[0, 1\]"),
    (lambda: F.batch_norm(f32(2, 4, 4, 3), *read_only_statistics(bn_params(3))), ValueError,
     r"batch_norm: running_mean is read-only, and training updates it in place"),
    (lambda: F.conv_chain(f32(1, 4, 4, 3), [(f32(1, 1, 3, 8), 1, 0, read_only_statistics(bn_params(8))),
                                            (f32(1, 1, 8, 2), 1, 0, None)]),
     ValueError, r"conv_chain: layer 0 bn running_mean is read-only"),
    # dtypes
    (lambda: F.relu(np.arange(6).reshape(2, 3)), TypeError,
     r"relu: x must be float32 or float64 on the numpy backend, got int64"),
    (lambda: F.add(f32(2, 3), f32(2, 3).astype(np.float64)), TypeError,
     r"add: b is float64 but must be float32, since the other inputs are float32"),
    (lambda: F.cross_entropy(f32(4, 10), f32(4)), ValueError,
     r"cross_entropy: labels must be integers of shape \(4,\), got float32"),
    (lambda: F.relu(f32(2, 3).astype(">f4")), TypeError,
     r"relu: x is float32 in the other byte order \(>f4\); convert it with x.astype"),
    (lambda: F.sigmoid([1.0, 2.0]), TypeError, r"sigmoid: x must be a NumPy or CuPy array or a Tensor, got list"),
    # layout
    (lambda: F.conv2d(f32(1, 8, 8, 3).transpose(0, 2, 1, 3), f32(3, 3, 3, 4)), ValueError,
     r"conv2d: x must be C-contiguous"),
    (lambda: F.relu(f32(4, 6)[:, ::2]), ValueError, r"relu: x must be C-contiguous"),
    (lambda: F.cross_entropy(f32(4, 10), np.zeros((4, 2), np.int64)[:, 0]), ValueError,
     r"cross_entropy: labels must be C-contiguous"),
])
def test_bad_input_on_numpy_backend(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_float64_is_refused_by_triton_backends(triton_backend):
    x = backend.asarray(f32(2, 3).astype(np.float64))
    with pytest.raises(TypeError, match=f"relu: x must be float32 or bfloat16 on the {triton_backend} backend, "
                                        f"got float64"):
        F.relu(x)


def test_bfloat16_activations_take_float32_parameters(triton_backend):
    """The storage rule of precision "bf16": activations bfloat16, everything else float32."""
    def bf16(*shape):
        return backend.asarray(f32(*shape).astype(backend.BFLOAT16))

    x, w = bf16(2, 4, 4, 3), backend.asarray(f32(3, 3, 3, 4))
    with pytest.raises(TypeError, match=f"conv2d: w must be float32 on the {triton_backend} backend, got bfloat16"):
        F.conv2d(x, bf16(3, 3, 3, 4))
    gamma, beta, mean, var = (backend.asarray(a) for a in bn_params(4))
    with pytest.raises(TypeError, match="conv_bn_relu: gamma must be float32 .* got bfloat16"):
        F.conv_bn_relu(x, w, bf16(4), beta, mean, var, padding=1)
    with pytest.raises(TypeError, match="add: b is float32 but must be bfloat16, since the other inputs are bfloat16"):
        F.add(bf16(2, 3), backend.asarray(f32(2, 3)))
    with pytest.raises(TypeError, match=f"cross_entropy: logits must be float32 on the {triton_backend} backend, "
                                        f"got bfloat16"):
        F.cross_entropy(bf16(2, 3), backend.asarray(np.zeros(2, np.int64)))
    with pytest.raises(TypeError, match=f"cast: the {triton_backend} backend stores activations as float32 or "
                                        f"bfloat16, not float16"):
        F.cast(x, np.float16)
    assert F.conv_bn_relu(x, w, gamma, beta, mean, var, padding=1).dtype == backend.BFLOAT16


def test_parameters_take_the_type_of_float64_activations_on_numpy():
    with pytest.raises(TypeError, match="conv2d: w is float32 but must be float64, since the activations are float64"):
        F.conv2d(f32(1, 4, 4, 3).astype(np.float64), f32(3, 3, 3, 4))


def test_bfloat16_on_the_numpy_backend_names_the_backends_that_take_it():
    hint = r"bfloat16 \(precision 'bf16'\) runs on the cuda and interpret backends"
    with pytest.raises(TypeError, match=r"relu: x must be float32 or float64 on the numpy backend, got bfloat16; "
                                        + hint):
        F.relu(f32(2, 3).astype(backend.BFLOAT16))
    with pytest.raises(TypeError, match=r"cast: the numpy backend stores activations as float32 or float64, "
                                        r"not bfloat16; " + hint):
        F.cast(f32(2, 3), backend.BFLOAT16)
    with backend.use_precision("bf16"), pytest.raises(TypeError, match=hint):
        F.to_precision(f32(2, 3))
    x = f32(2, 3)
    assert F.to_precision(x) is x and F.cast(x, np.float32) is x  # float32 stays as it is: no copy


def test_tensor_arguments_are_checked_too():
    with pytest.raises(TypeError, match="relu: x must be float32 or float64 on the numpy backend, got int32"):
        F.relu(Tensor(np.zeros(3, np.int32)))


@pytest.mark.gpu
def test_arrays_of_the_wrong_backend():
    import cupy
    with pytest.raises(TypeError, match="add: b is a CuPy array but the backend is 'numpy'"):
        F.add(f32(2), cupy.zeros(2, cupy.float32))
    with backend.use_backend("cuda"), pytest.raises(TypeError, match="a is a NumPy array but the backend is 'cuda'"):
        F.add(f32(2), cupy.zeros(2, cupy.float32))


def test_host_arrays_are_refused_on_a_fake_gpu_backend(monkeypatch):
    # Without a GPU, pretend: the check itself must refuse NumPy arrays on 'cuda'.
    monkeypatch.setitem(backend._selected, "backend", "cuda")
    with pytest.raises(TypeError, match="add: a is a NumPy array but the backend is 'cuda', which takes CuPy"):
        F.add(f32(2), f32(2))


def test_nchw_images_are_named_as_such():
    # An NCHW batch reaching the NHWC stem conv: the error says which layout was expected.
    with pytest.raises(ValueError, match=r"x has 32 channels .* Cin = 3 \(x is NHWC \(N, H, W, C\); its shape "
                                         r"\(2, 3, 32, 32\) looks like NCHW: "
                                         r"transpose it with x.transpose\(0, 2, 3, 1\)\)"):
        F.conv2d(f32(2, 3, 32, 32), f32(3, 3, 3, 16), padding=1)
    with pytest.raises(ValueError, match="x has 3 channels") as raised:
        F.conv2d(f32(1, 8, 8, 3), f32(3, 3, 4, 8))
    assert "NCHW" not in str(raised.value)  # no hint where the shape does not suggest it
