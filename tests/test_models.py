"""The Residual Attention Network family: sizes, backends agreeing, gradients, modes, checkpoints, masks."""
import contextlib
import json

import numpy as np
import pytest
import triton.language as tl
from triton.runtime import interpreter

import reference
from reference._windows import windows
from ra_kernels import backend, launch, models, npzfile
from ra_kernels import functional as F
from ra_kernels import autograd
from ra_kernels.autograd import Tensor
from ra_kernels.models import AttentionModule
from ra_kernels.nn import BatchNorm2d, Conv2d, ConvBnRelu, Linear

TINY = dict(modules_per_stage=1, stem=4, widths=(8, 16, 32), num_classes=5)


def tiny(**kwargs):
    return models.ResidualAttentionNet(**{**TINY, **kwargs})


def n_params(model):
    return sum(int(np.prod(p.shape)) for p in model.parameters())


@pytest.mark.parametrize("name, paper", [("attention92", 1.96e6), ("attention236", 5.2e6)])
def test_parameter_counts_match_the_layout(name, paper):
    count = n_params(models.MODELS[name](num_classes=10))
    print(f"{name}: {count:,} parameters")
    assert abs(count - paper) <= 0.03 * paper


def test_every_constructor_builds_and_prints_its_size():
    for name, build in models.MODELS.items():
        for classes in (10, 100):
            model = build(num_classes=classes)
            assert model.classifier.weight.shape == (256, classes)
            print(f"{name} ({classes} classes): {n_params(model):,} parameters")


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="attention must be one of"):
        tiny(attention="temporal")
    with pytest.raises(ValueError, match="widths must name 3 stages"):
        tiny(widths=(8, 16))
    with pytest.raises(ValueError, match=r"at least 4 channels .* got widths \(8, 3, 8\)$"):
        tiny(widths=(8, 3, 8))  # a bottleneck of 3 // 4 = 0 channels (was a ZeroDivisionError in the init)
    for option, value, says in (("modules_per_stage", 1.7, "an integer >= 0, got 1.7"),
                                ("num_classes", 2.5, "an integer >= 2, got 2.5"),
                                ("num_classes", None, "an integer >= 2, got None"),
                                ("widths", (8, "16", 32), "each of widths must be an integer >= 1, got '16'"),
                                ("residual_attention", "no", "True or False, got 'no'"),
                                ("seed", -1, "an integer >= 0, got -1")):
        with pytest.raises(ValueError, match=f"ResidualAttentionNet: .*{says}"):
            tiny(**{option: value})
    with pytest.raises(ValueError, match="ImageNetAttentionNet: each of modules_per_stage must be an integer >= 1"):
        models.ImageNetAttentionNet((1, 0.5, 1))
    assert tiny(widths=(4, 4, 4)).config["widths"] == (4, 4, 4)


def test_initialisation_is_reproducible_and_he_scaled():
    a, b, c = tiny(seed=3), tiny(seed=3), tiny(seed=4)
    for (name, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        np.testing.assert_array_equal(pa.data, pb.data, err_msg=name)
    assert not np.array_equal(a.stem.weight.data, c.stem.weight.data)
    w = models.attention56().stage1[1].trunk[0].spatial.conv.weight.data   # 3x3, 16 -> 16
    assert abs(w.std() / np.sqrt(2.0 / (3 * 3 * 16)) - 1) < 0.05              # N(0, 2 / fan_out)
    bn = a.stage2[1].mask_head[0]
    assert np.all(bn.gamma.data == 1) and np.all(bn.beta.data == 0)


def test_summary_lists_layers_params_and_mult_adds():
    model = tiny()
    frozen = model.stage1[0].pre
    frozen.eval()  # a batch norm frozen inside a training model stays frozen
    before = model.state_dict()
    table = model.summary()
    assert model.training and not frozen.training  # the modes are restored, and nothing was changed
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    assert f"{n_params(model):,}" in table.splitlines()[-1]
    stem_row = next(line for line in table.splitlines() if line.startswith("stem "))
    assert "32x32x4" in stem_row and f"{32 * 32 * 27 * 4:,}" in stem_row     # 3x3x3 -> 4 at 32x32
    print(models.attention56().summary())


@contextlib.contextmanager
def _kinks(monkeypatch, relu_masks=None, pool_winners=None):
    """Record the branches a forward takes at the network's kinks, in call order.

    Yields a dict: ``masks``, the side of zero of each ReLU input of batch_norm, conv_bn_relu
    and conv_chain (from the output > 0; inside a chain on the kernel backends, where no
    activation is written, from the saved z and the (4, C) statistics as the kernels' own
    ``affine_relu`` computes it, z * scale + shift in float32, so the recorded side is the one
    the kernels took, bit for bit); ``winners``, the first maximum of each max-pool window.
    Given the ``relu_masks`` of another forward of the same network, the ReLUs take those
    branches instead (a conv_chain runs as its input's batch_norm, its conv_bn_relu layers and a
    conv2d, plus the skip or x, which is what reference.conv_chain computes): the op runs without
    ReLU and its output is gated by the mask
    (``attention_mix(mask, z, residual=False, from_logits=False)`` is mask * z), so that both
    forwards differentiate the same piece of the piecewise-smooth network; ``pre`` then holds
    each ReLU's pre-activations (see ``_forced_distance``). Given the ``pool_winners`` of another forward, each
    max-pool window passes on that tap instead of its own maximum (and its gradient goes there);
    ``pool_inputs`` holds each max-pool's input and ``pool_gaps`` its window maxima less the values
    passed on.
    """
    kinks = dict(masks=[], winners=[], pre=[], pool_inputs=[], pool_gaps=[])

    def relu_side(op, relu_by_default):
        def recorded(*args, **kwargs):
            relu = kwargs.pop("relu", relu_by_default)
            if not relu:
                return op(*args, relu=False, **kwargs)
            if relu_masks is None:
                out = op(*args, relu=True, **kwargs)
                kinks["masks"].append(backend.to_numpy(out.data) > 0)
                return out
            z = op(*args, relu=False, **kwargs)
            mask = relu_masks[len(kinks["pre"])]
            pre = backend.to_numpy(z.data)
            kinks["pre"].append(pre)
            gate = Tensor(backend.asarray(mask.astype(pre.dtype)))
            return F.attention_mix(gate, z, residual=False, from_logits=False)
        return recorded

    def chain_side(x, layers, momentum=0.1, eps=1e-5, skip=None, input_bn=None, residual=False):
        if relu_masks is None:
            out = conv_chain(x, layers, momentum, eps, skip, input_bn, residual)
            # kernels/conv.py saves (weights, layers, [(input, stats of the BN before it)], has_skip,
            # residual): the input of conv j + 1 is z of conv j (of conv 0, x, with input_bn), and the
            # ReLU after it is relu(z * scale + shift)
            _, _, inputs, _, _ = out.node.ctx.op_saved
            for z, stats in inputs:
                if stats is not None:
                    z, stats = backend.to_numpy(z), backend.to_numpy(stats)
                    kinks["masks"].append(z * stats[2] + stats[3] > 0)
            return out
        y = x if input_bn is None else F.batch_norm(x, *input_bn, training=True, momentum=momentum, eps=eps,
                                                    relu=True)
        for w, stride, padding, bn in layers[:-1]:
            y = F.conv_bn_relu(y, w, *bn, stride, padding, training=True, momentum=momentum, eps=eps)
        w, stride, padding, _ = layers[-1]
        y = F.conv2d(y, w, stride, padding)
        skip = x if residual else skip
        return y if skip is None else F.add(y, skip)

    def pool_winner(x, kernel_size=3, stride=2, padding=1):
        window_max, (argmax, *_) = reference.max_pool2d(backend.to_numpy(x.data), kernel_size, stride, padding)
        kinks["winners"].append(argmax)
        if pool_winners is None:
            return max_pool2d(x, kernel_size, stride, padding)
        winners = pool_winners[len(kinks["pool_gaps"])]

        def max_pool_at_winners(x, kernel_size, stride, padding, ceil_mode=False):
            # (N, OH, OW, KH, KW, C) taps -> the tap each window's winner names
            taps = windows(x, (kernel_size, kernel_size), stride, padding, pad_value=-np.inf, ceil_mode=ceil_mode)
            taps = taps.reshape(*taps.shape[:3], kernel_size * kernel_size, taps.shape[-1])
            y = np.take_along_axis(taps, winners[:, :, :, None, :].astype(np.intp), axis=3)[:, :, :, 0]
            return y, (winners, x.shape, kernel_size, stride, padding)

        with monkeypatch.context() as patch:
            patch.setattr(reference, "max_pool2d", max_pool_at_winners)
            out = max_pool2d(x, kernel_size, stride, padding)
        kinks["pool_inputs"].append(backend.to_numpy(x.data))
        kinks["pool_gaps"].append(window_max - backend.to_numpy(out.data))
        return out

    batch_norm, conv_bn_relu, conv_chain, max_pool2d = F.batch_norm, F.conv_bn_relu, F.conv_chain, F.max_pool2d
    with monkeypatch.context() as patch:
        patch.setattr(F, "conv_chain", chain_side)
        patch.setattr(F, "batch_norm", relu_side(batch_norm, False))
        patch.setattr(F, "conv_bn_relu", relu_side(conv_bn_relu, True))
        patch.setattr(F, "max_pool2d", pool_winner)
        yield kinks


def _forced_distance(mask, pre):
    """The largest |pre-activation| where the ReLU side ``mask`` contradicts the sign of ``pre``
    (0 where none does): how far a forward forced by ``_kinks`` was moved past zero."""
    return np.abs(pre[mask != (pre > 0)]).max(initial=0)


def _outputs(model, x, labels, monkeypatch, relu_masks=None, pool_winners=None):
    """Logits, loss, every parameter gradient and every buffer after one training step, as
    float64 host arrays keyed by name; and the forward's kinks (see ``_kinks``)."""
    with _kinks(monkeypatch, relu_masks, pool_winners) as kinks:
        logits = model(Tensor(backend.asarray(x)))
    loss = F.cross_entropy(logits, backend.asarray(labels))
    loss.backward()
    out = {"logits": logits.data, "loss": loss.data}
    out.update((f"grad {n}", p.grad) for n, p in model.named_parameters())
    out.update((f"buffer {n}", b) for n, b in model.named_buffers())
    return {k: backend.to_numpy(v).astype(np.float64) for k, v in out.items()}, kinks


@pytest.mark.parametrize("variant", [dict(), dict(residual_attention=False), dict(attention="channel"),
                                     dict(attention="spatial")], ids=["ARL", "NAL", "channel", "spatial"])
def test_tiny_network_kernels_match_numpy_backend(triton_backend, rng, variant, monkeypatch):
    """Same weights, same batch, training mode: the Triton kernels against the numpy backend.

    Both run in float32 (IEEE products), so both are measured against the numpy backend in
    float64 on the same instance: the kernels must be as accurate as float32 reference
    arithmetic is there, error <= 10 x the numpy float32 error + 1e-5 of the scale. A wrong
    kernel or wiring gives errors of the order of the values themselves. The images are 16x16
    (every layer and mask level still there, the deepest mask at 2x2): at 32x32 the interpreter
    took about 100 s per variant, and the suite has to stay under 10 minutes on 2 cores.

    Kinks (measured at 32x32, ~300k ReLU inputs; 16x16 has a quarter): the one nearest zero typically lies
    1e-6 (sometimes 1e-7) from it, within float32's rounding of a pre-activation. Measured
    over 40 batches per variant, float32 NumPy puts some ReLU input on the other side of zero
    than float64 in 30-60% of them, and the kernels do too (CI once: seed 2524011824, 3.3e-7
    where float64 has <= 0). Gradients are then those of another piece of the function and
    differ by ~1e-2 of their scale. So the float64 and float32 NumPy forwards take the
    kernels' ReLU branches (``_kinks``), which is checked to move only pre-activations within
    1e-3 of their std from zero (float32 NumPy's own contradictions reach 3.3e-5 over 32
    batches, in channel attention): a wrong kernel contradicts float64 far from any kink. A
    max-pool window whose winner differs (~4% of batches: near ties) is not forced; that
    batch is redrawn, at most 5 draws.
    """
    state = tiny(**variant).state_dict()
    for draw in range(5):
        x = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
        labels = rng.integers(0, 5, 2)
        kernels, kinks = _outputs(tiny(**variant).load_state_dict(state), x, labels, monkeypatch)
        with backend.use_backend("numpy"):
            truth, truth_kinks = _outputs(tiny(**variant).load_state_dict(state).astype(np.float64),
                                          x.astype(np.float64), labels, monkeypatch, kinks["masks"])
            numpy32, numpy_kinks = _outputs(tiny(**variant).load_state_dict(state), x, labels, monkeypatch,
                                            kinks["masks"])
        forced = max(_forced_distance(mask, pre) / (pre.std() or 1.0)  # 1: a constant input
                     for mask, pre in zip(kinks["masks"], truth_kinks["pre"]))
        assert forced <= 1e-3, f"a ReLU of the kernels contradicts float64 {forced:.1e} std from zero"
        apart = sum(int(np.sum(k != t)) + int(np.sum(k != n)) for k, t, n in
                    zip(kinks["winners"], truth_kinks["winners"], numpy_kinks["winners"]))
        assert apart <= 4, f"{apart} max-pool windows pick another winner than float64 or float32 NumPy"
        if apart == 0:
            break
        print(f"draw {draw}: {apart} max-pool window(s) within rounding of a tie; redrawing")
    else:
        pytest.fail("five batches in a row put a max-pool window within float32 rounding of a tie")
    groups = {"logits": ["logits"], "loss": ["loss"],
              "gradients": [k for k in truth if k.startswith("grad ")],
              "buffers": [k for k in truth if k.startswith("buffer ")]}
    for group, keys in groups.items():
        scale = max(np.abs(truth[k]).max() for k in keys)
        numpy_error = max(np.abs(numpy32[k] - truth[k]).max() for k in keys)
        errors = {k: np.abs(kernels[k] - truth[k]).max() for k in keys}
        worst = max(errors, key=errors.get)
        bound = 10 * numpy_error + 1e-5 * scale
        print(f"{group}: kernels {errors[worst] / scale:.1e}, numpy float32 {numpy_error / scale:.1e} of scale")
        assert errors[worst] <= bound, (f"{worst}: kernel error {errors[worst]:.3e} > {bound:.3e} "
                                        f"(numpy float32 error {numpy_error:.3e}, scale {scale:.3e})")


BF16_U = backend.BFLOAT16_ROUNDOFF


def _truncating_cast(cast_impl):
    """The interpreter's casts with float32 -> bfloat16 rounding toward zero (what triton 3.6's
    interpreter does unmended), biased by 2**-9 on average where ``.to(tl.bfloat16)`` rounds to
    nearest: a wrong bfloat16 store for the test below."""
    def cast(builder, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle((src.data.view(np.uint32) >> 16).astype(np.uint16), tl.bfloat16)
        return cast_impl(builder, src, dst_type)
    return cast


def _unsaturated_state(variant, seed, x):
    """The tiny network's state with its classifier scaled by a power of two so that the float64
    eval-mode logits of x lie within +-2. With batch norm on its initial running statistics
    (mean 0, variance 1), eval mode normalises nothing and activations grow through the residual
    stack: logits reached hundreds, the softmax saturated, and the gradients, of size
    exp(-logit gap), moved by exp(absolute logit error): 300% from float64 on one draw. Running
    statistics taken from the batch instead would normalise, but then a deep channel's variance
    over 8 values can be tiny beside its mean, and bfloat16's rounding of x - mean is amplified
    without bound."""
    with backend.use_backend("numpy"):
        model = tiny(**variant, seed=seed)
        state = model.state_dict()
        logits = model.astype(np.float64).eval()(Tensor(x.astype(np.float64))).data
    scale = 2.0 ** -max(0, int(np.ceil(np.log2(np.abs(logits).max() / 2))))
    return dict(state, **{k: state[k] * np.float32(scale) for k in ("classifier.weight", "classifier.bias")})


@contextlib.contextmanager
def _bfloat16_stores(monkeypatch):
    """Round to nearest bfloat16, as the bf16 kernels' stores do, every activation (NHWC, 4-D) an
    op returns and every activation gradient its backward passes on to another op, while the
    arithmetic stays what the backend does (float64 on numpy). Parameter gradients (to leaves) stay
    unrounded, as the kernels keep them in float32. The op boundaries are not exactly the kernels'
    stores (a fused chain stores inside one op), but the roundings are of the same number and size."""
    def rounded(a):
        return a.astype(backend.BFLOAT16).astype(a.dtype)

    def rounding_backward(function, inputs):
        def backward(ctx, *grad_outputs):
            grads = function.backward(ctx, *grad_outputs)
            for tensor, g in zip(inputs, grads if isinstance(grads, tuple) else (grads,)):
                if g is not None and tensor is not None and tensor.node is not None and g.ndim == 4:
                    g[...] = rounded(g)  # in place: the engine knows a gradient added into its buffer by identity
            return grads
        return type(function.__name__, (function,), dict(backward=staticmethod(backward)))

    apply = autograd.Function.apply.__func__

    def rounding_apply(cls, *args, **kwargs):
        outputs = apply(cls, *args, **kwargs)
        each = outputs if isinstance(outputs, tuple) else (outputs,)
        for out in each:
            if out.ndim == 4 and np.issubdtype(out.dtype, np.floating):
                out.data = rounded(out.data)
        node = each[0].node  # one node for all the outputs of a call, or none
        if node is not None:
            node.function = rounding_backward(node.function, node.inputs)
        return outputs

    with monkeypatch.context() as patch:
        patch.setattr(autograd.Function, "apply", classmethod(rounding_apply))
        yield


def _bfloat16_errors(variant, rng, monkeypatch):
    """One eval-mode step of the tiny network (16x16, batch 2) with bfloat16 activations on the
    interpret kernels, and the same step in float64 on the numpy backend. Returns, for the logits
    and for every parameter gradient together, (the kernels' relative L2 error against float64, the
    yardstick's: the float64 step with the weights rounded to bfloat16 and every activation and
    activation gradient rounded where an op stores it, ``_bfloat16_stores``); for the loss, (its
    error, the bound its logits' errors allow); and under ``kinks``, how far float64 had to be
    moved to the kernels' side of a ReLU or max-pool window (``_kink_reach``)."""
    seed = int(rng.integers(1 << 30))
    x = rng.standard_normal((2, 16, 16, 3)).astype(backend.BFLOAT16).astype(np.float32)  # the input cast: exact
    labels = rng.integers(0, 5, 2)
    state = _unsaturated_state(variant, seed, x)
    rounded = {k: v.astype(backend.BFLOAT16).astype(np.float32) if k.endswith("weight") else v
               for k, v in state.items()}
    with backend.use_precision("bf16"):
        kernels, kinks = _outputs(tiny(**variant).load_state_dict(state).eval(), x, labels, monkeypatch)
    with backend.use_backend("numpy"):
        def float64_step(state):
            return _outputs(tiny(**variant).load_state_dict(state).astype(np.float64).eval(), x.astype(np.float64),
                            labels, monkeypatch, kinks["masks"], kinks["winners"])

        truth, truth_kinks = float64_step(state)
        with _bfloat16_stores(monkeypatch):
            yardstick, yardstick_kinks = float64_step(rounded)
    groups = {"logits": ["logits"], "gradients": [k for k in truth if k.startswith("grad ")]}

    def error(side, keys):
        return np.sqrt(sum(np.sum((side[k] - truth[k]) ** 2) for k in keys) / sum(np.sum(truth[k] ** 2) for k in keys))

    errors = {g: (error(kernels, keys), error(yardstick, keys)) for g, keys in groups.items()}
    # The mean cross-entropy moves by at most 2 max|logit change| (log-sum-exp and the picked logit
    # are each 1-Lipschitz in the max norm); plus its float32 evaluation, a few ulp of the logits.
    logits_change = np.abs(kernels["logits"] - truth["logits"]).max()
    errors["loss"] = (abs(float(kernels["loss"] - truth["loss"])),
                      2 * logits_change + 1e-6 * np.abs(truth["logits"]).max())
    errors["kinks"] = _kink_reach(kinks["masks"], truth_kinks, yardstick_kinks)
    return errors


def _kink_reach(masks, truth, yardstick):
    """How far float64 was forced onto the bfloat16 kernels' side of a ReLU (past zero) or a
    max-pool window (below its maximum), the largest over the network, in units of how far
    bfloat16's roundings move that op's input: the yardstick's largest difference from float64
    there. ``truth`` and ``yardstick`` are the ``_kinks`` of the two float64 steps, both forced
    onto the kernels' ``masks`` and winners, so their arrays match element for element."""
    forced = [(_forced_distance(mask, pre), np.abs(rounded_pre - pre).max())
              for mask, pre, rounded_pre in zip(masks, truth["pre"], yardstick["pre"])]
    forced += [(gap.max(), np.abs(rounded_x - x).max())
               for gap, x, rounded_x in zip(truth["pool_gaps"], truth["pool_inputs"], yardstick["pool_inputs"])]
    with np.errstate(divide="ignore"):  # forced past a kink that no rounding moved: inf, and the check fails
        return max((distance / reach if distance else 0.0 for distance, reach in forced), default=0.0)


#: The bfloat16 network's logits and gradients are within BF16_FACTOR x max(yardstick, BF16_U) of
#: float64 (relative L2). Measured 2026-12-03 with these functions over chosen seeds: correct
#: kernels 0.73-1.53x (logits) and 0.72-1.63x (gradients) over 31 draws of all four attention
#: variants; truncating stores 8.5-52x and 8.7-42x over 10 draws.
BF16_FACTOR = 3.0
#: Where float64 is made to take the bfloat16 kernels' side of a ReLU or a max-pool window, it is at
#: most BF16_KINK x as far from the kink as bfloat16's roundings move that op's input
#: (``_kink_reach``). Measured 2026-12-03: 0.51-1.67 over 32 draws of correct kernels (all four
#: variants), and 1.7-3.0 with truncating stores (which the logits fail anyway). It was once in stds
#: of the input: that reached 1.06 std on a draw (seed 3432512053, a serial CI-like run) whose
#: yardstick was 7% off, where bfloat16 moves deep activations by whole stds, and 0.03 on
#: well-conditioned draws.
BF16_KINK = 4.0


def _check_bfloat16(errors):
    """The bounds of test_tiny_network_in_bfloat16_against_float64 on ``_bfloat16_errors``."""
    assert errors["kinks"] <= BF16_KINK, (f"a ReLU or max-pool of the kernels contradicts float64 "
                                          f"{errors['kinks']:.2f}x as far from its kink as bfloat16 reaches")
    error, bound = errors["loss"]
    print(f"loss: kernels {error:.1e}, bound from the logits {bound:.1e}")
    assert error <= bound, f"loss: bfloat16 kernels {error:.2e} from float64, past {bound:.2e}"
    for group in ("logits", "gradients"):
        error, yardstick = errors[group]
        bound = BF16_FACTOR * max(yardstick, BF16_U)
        print(f"{group}: kernels {error:.1e}, yardstick {yardstick:.1e}, bound {bound:.1e}")
        assert error <= bound, f"{group}: bfloat16 kernels {error:.2e} from float64, past {bound:.2e}"


def test_tiny_network_in_bfloat16_against_float64(triton_backend, rng, monkeypatch):
    """Precision "bf16" end to end: input cast, every op's bfloat16 kernels, float32 logits, loss and
    parameter gradients, against float64 from the same (bfloat16) input and float32 weights.

    The bound is relative to what bfloat16 does to this network. One rounding is BF16_U = 2**-8;
    how far it carries depends on the instance, so a yardstick measures it: the same float64 step
    with bfloat16's roundings put in (the weights, and every activation and activation gradient an
    op stores, rounded to nearest: ``_bfloat16_stores``). Correct kernels differ from it only in
    float32 arithmetic and in where exactly a fused kernel stores, and came out 0.7-1.6x of it
    (see BF16_FACTOR): hence BF16_FACTOR x max(yardstick, BF16_U). The loss is held to what its
    logits allow: a relative bound would not do, since a confident network's loss is near zero
    and its relative error large.

    Two things made this test fail 1 run in 8 (CI-like runs, 2026-12-02; seed 4236520348: the
    gradients 2.75 from float64, relative L2, against a bound of 0.89) and a third made it fragile;
    all are now controlled. Kinks (see also BF16_KINK): bfloat16 puts ReLU inputs and max-pool
    near-ties (bfloat16 ties exactly) on the other side from float64, and each such element moves a
    gradient by a whole dy; so both float64 steps take the kernels' ReLU sides and max-pool winners
    (``_kinks``), and the kernels are checked to lie within reach of bfloat16's rounding of each
    kink they were given. Saturation: the logits of this untrained eval-mode network reached
    hundreds (see ``_unsaturated_state``). The yardstick: it used to round the weights alone, and
    the kernels' 40-odd roundings of activations on the longest path made them 0.6-4.1x of it over
    29 draws, too wide a spread for a bound of 5x (in the deep layers, whose gradients here are a
    few 1e-4 of the total, one draw was ~100% off for the kernels and 20-30% for the weights-only
    yardstick).

    Batch norm runs on its running statistics (eval mode), as bench.step's dry run does: in
    training mode, at these sizes (2 images, the deepest batch norms over 8 values), rounding the
    weights alone moved the float64 gradients by 50-120% (relative L2, batch 2 to 16): a training
    step's gradients here are not a well-conditioned function of anything bfloat16 rounds, and no
    bound would mean much. The training kernels in bfloat16 are held one by one against float64
    (test_conv_bn_kernels.py, test_pool_resize_kernels.py, test_attention_kernels.py: statistics
    and sums in float32 within float32 bounds), and captured against eager in test_graph.py. A
    biased rounding of every store fails this check
    (test_a_biased_bfloat16_rounding_fails_the_network_check).

    The mixed-attention (ARL) network only: NAL, channel and spatial attention passed the same bound
    (see BF16_FACTOR) but cost 40 s each in the interpreter, and what they add, their own kernels in
    bfloat16, is held kernel by kernel (test_attention_kernels.py)."""
    _check_bfloat16(_bfloat16_errors({}, rng, monkeypatch))


def test_a_biased_bfloat16_rounding_fails_the_network_check(rng, monkeypatch):
    """The check above can fail: with every bfloat16 store truncated instead of rounded to nearest,
    the logits came out 8.5-52x their yardstick and the gradients 8.7-42x over 10 draws
    (BF16_FACTOR is 3; correct kernels gave at most 1.5x and 1.6x). This used to demand twice the
    bound on the logits alone, which 2 runs in 8 missed: it now asks only what it says, that the
    check fails."""
    with backend.use_backend("interpret"):
        launch._fix_interpreter_bfloat16()  # mended first, so that the mutation replaces the mend
        monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl",
                            _truncating_cast(interpreter.InterpreterBuilder.cast_impl))
        errors = _bfloat16_errors({}, rng, monkeypatch)
    print(errors)
    with pytest.raises(AssertionError):
        _check_bfloat16(errors)


# --------------------------------------------------------------------------- the ImageNet networks

#: Counted from the official prototxts (fwang91/residual-attention-network, imagenet_model/
#: Attention-{56,92}-deploy.prototxt), layer by layer, and by hand per block (docs/design.md §9):
#: conv weights (no conv has a bias) + classifier weights and bias + batch norm's scale and shift,
#: and the conv and classifier multiply-adds of one 224x224 image.
PROTOTXT_COUNTS = {"attention56": (29_689_024 + 2_048_000 + 1_000 + 72_704, 6_270_836_736),
                   "attention92": (50_283_712 + 2_048_000 + 1_000 + 133_632, 10_533_789_696)}


@pytest.mark.parametrize("name", list(models.IMAGENET_MODELS))
def test_imagenet_networks_have_the_prototxts_counts(name):
    """Parameters and multiply-adds as summary() prints them (one 224x224 forward on the numpy
    backend), equal to the prototxt's: the same layers, shapes and strides (a stride on the first
    1x1 of a transition unit, or floor-mode pooling, would change the multiply-adds; a conv bias
    the parameters)."""
    with backend.use_backend("numpy"):
        model = models.IMAGENET_MODELS[name]()
        table = model.summary()
    params, macs = PROTOTXT_COUNTS[name]
    total = table.splitlines()[-1].split()
    assert (int(total[-2].replace(",", "")), int(total[-1].replace(",", ""))) == (params, macs), table
    stem_row = next(line for line in table.splitlines() if line.startswith("stem "))
    assert "conv7x7" in stem_row and "112x112x64" in stem_row
    print(table.splitlines()[-1])


@pytest.mark.parametrize("size", [64, 96])
def test_imagenet_network_pools_as_caffe_and_its_masks_follow_the_input(rng, monkeypatch, size):
    """Every max-pool of Attention-56 (the stem's and the masks' 6) is Caffe's 3x3/2 without
    padding in ceil mode, and the masks have their stage's size for any multiple of 32: S/4, S/8
    and S/16 at 256, 512 and 1024 channels, values in (0, 1)."""
    pools, max_pool2d = [], F.max_pool2d

    def recorded(x, kernel_size=3, stride=2, padding=1, ceil_mode=False):
        pools.append((kernel_size, stride, padding, ceil_mode, tuple(x.shape[1:3])))
        return max_pool2d(x, kernel_size, stride, padding, ceil_mode)

    monkeypatch.setattr(F, "max_pool2d", recorded)
    with backend.use_backend("numpy"):
        masks = models.imagenet_attention56(num_classes=7, seed=int(rng.integers(1 << 30))).attention_masks(
            rng.standard_normal((2, size, size, 3)).astype(np.float32))
    assert [p[:4] for p in pools] == [(3, 2, 0, True)] * 7
    s = size // 2  # the stem conv's output, then the stem pool's input, then each mask level's
    assert [p[4] for p in pools] == [(s, s), (s // 2, s // 2), (s // 4, s // 4), (s // 8, s // 8),
                                     (s // 4, s // 4), (s // 8, s // 8), (s // 8, s // 8)]
    shapes = [m.shape for m in masks.values()]
    assert shapes == [(2, size // 4, size // 4, 256), (2, size // 8, size // 8, 512), (2, size // 16, size // 16, 1024)]
    assert all(((m > 0) & (m < 1)).all() for m in masks.values())


def _imagenet_small(seed):
    return models.imagenet_attention56(num_classes=5, seed=seed)


@pytest.mark.parametrize("network, image", [(tiny, 32), (_imagenet_small, 64)], ids=["cifar-tiny", "imagenet56"])
def test_whole_loss_against_finite_differences(rng, network, image):
    """float64 on the numpy backend: backward against central differences of the loss,
    for a random sample of parameters of every layer type; the CIFAR tiny network and the whole
    ImageNet Attention-56 at 64x64 (31.8M parameters, its 7x7 stem, ceil-mode pools and
    2048-channel tail; 0.15 s a forward)."""
    model = network(seed=int(rng.integers(1 << 30))).astype(np.float64)
    x = rng.standard_normal((2, image, image, 3))
    labels = rng.integers(0, 5, 2)
    running = [b.copy() for _, b in model.named_buffers()]

    def loss_value():
        # Training-mode outputs ignore the running statistics; restore them anyway.
        for (_, b), saved in zip(model.named_buffers(), running):
            b[...] = saved
        return float(F.cross_entropy(model(Tensor(x)), labels).data)

    def backward():
        loss_value()
        model.zero_grad()
        F.cross_entropy(model(Tensor(x)), labels).backward()

    backward()
    kinds = {Conv2d: "conv", ConvBnRelu: "conv_bn_relu", BatchNorm2d: "batch_norm", Linear: "linear"}
    by_kind = {}
    for name, module in model.named_modules():
        kind = kinds.get(type(module))
        if kind and not name.endswith((".conv.", ".bn.")):  # a ConvBnRelu's parts count as it
            by_kind.setdefault(kind, []).extend(p for _, p in module.named_parameters())
    assert sorted(by_kind) == sorted(kinds.values())
    def differences(p, index, h):
        """(right, left, central) difference quotients of the loss in p[index] at step h."""
        keep = p.data[index]
        here = loss_value()
        p.data[index] = keep + h
        up = loss_value()
        p.data[index] = keep - h
        down = loss_value()
        p.data[index] = keep
        return (up - here) / h, (here - down) / h, (up - down) / (2 * h)

    # The loss is piecewise smooth: every ReLU and max-pool downstream of a parameter is a kink of
    # it, and a stage-1 weight feeds millions of them. Where a kink lies within h of the point,
    # the difference quotient measures it, not the derivative. The right and left quotients
    # tell: with the slope jumping by D at distance d < h, they differ by D (1 - d / h) and the
    # central quotient is off by half that, so a point is checked only where the two agree to
    # the tolerance (then the kink's share of the central quotient's error is at most half of it).
    # Where they disagree the check moves: the element is shifted by up to 1e-3 and backward runs
    # again there (drawing another element instead failed for a batch norm's gamma of 2 channels,
    # seed 380496001: both lay near a kink). Comparing central quotients at h and h / 2 instead
    # missed kinks much nearer than h, both quotients then off by about D / 2 (in the ImageNet
    # network's stem: seed 939666657, 1.8e-7 off a gradient of 9.9e-3; seed 1020919263, 3.0e-3
    # off 18.8). The step shrinks with the gradient's size: a large one (18.8 there, a stem channel
    # of small variance) means every pre-activation downstream moves fast and kinks lie densely
    # (no point among 20 had none within 1e-7); any step makes a valid check, this one keeps them rare.
    # Rounding moves the float64 loss by about 2e-15 (measured on both networks: the spread about a
    # quadratic fit of the loss at 12 points 1e-9 apart; 5e-15 at most), so at h = 1e-7 a one-sided
    # quotient carries up to ~7e-8 of it and the central one ~4e-8 (times |gradient| where the step
    # shrinks, against a tolerance that grows with it); truncation, O(h^2), is far below.
    # Three parameters of each kind; one in the ImageNet network, whose forward takes 60x longer.
    h, per_kind = 1e-7, 3 if image == 32 else 1
    for kind, params in by_kind.items():
        for p in (params[i] for i in rng.choice(len(params), min(per_kind, len(params)), replace=False)):
            for attempt in range(20):
                index = tuple(int(rng.integers(s)) for s in p.shape)
                if attempt:
                    p.data[index] += rng.uniform(-1e-3, 1e-3)
                    backward()
                step = h / max(1.0, abs(float(p.grad[index])))
                right, left, numeric = differences(p, index, step)
                # the guard's bound must admit the one-sided quotients' rounding (above); the check's
                # error is then at most half of it from a kink plus the central quotient's rounding
                tolerance = 1e-5 * abs(numeric) + 1e-7
                if abs(right - left) <= tolerance:
                    break
            else:
                pytest.fail(f"{kind} {p.shape}: no element without a kink within {step:.1e} in 20 draws")
            assert abs(p.grad[index] - numeric) <= tolerance, \
                f"{kind} {p.shape}{index}: backward {p.grad[index]}, finite differences {numeric}"


def test_eval_uses_and_keeps_running_statistics(rng):
    model = tiny()
    x = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    model(Tensor(x))  # one training step's statistics, so running stats differ from 0 / 1
    before = model.state_dict()
    model.eval()
    a = model(Tensor(x)).data
    b = model(Tensor(x[:1])).data  # eval output of a sample does not depend on the batch
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    np.testing.assert_allclose(b, a[:1], rtol=1e-5, atol=1e-6)


def test_checkpoint_round_trip_gives_identical_logits(rng, tmp_path):
    model = tiny(seed=5)
    x = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    model(Tensor(x))
    model.eval()
    model.save(tmp_path / "tiny.npz")
    restored = tiny(seed=6).load(tmp_path / "tiny.npz").eval()
    np.testing.assert_array_equal(restored(Tensor(x)).data, model(Tensor(x)).data)


@pytest.mark.parametrize("attention, residual", [("channel", True), ("spatial", True), ("mixed", False)])
def test_weights_load_only_into_the_same_architecture(tmp_path, attention, residual):
    # The same parameter names and shapes, another meaning: an error naming both, nothing loaded.
    tiny(seed=1).save(tmp_path / "mixed.npz")
    other = tiny(attention=attention, residual_attention=residual, seed=2)
    before = other.state_dict()
    with pytest.raises(ValueError, match=r"holds the weights of ResidualAttentionNet\(.*attention='mixed'\), "
                                         rf"this module is ResidualAttentionNet\(.*attention='{attention}'\)"):
        other.load(tmp_path / "mixed.npz")
    for name, value in other.state_dict().items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)


def test_version_1_checkpoints_still_load(tmp_path):
    # The training checkpoints written before weights and checkpoints shared one format:
    # the same members, a meta record of another format name with the config under model_config.
    model = tiny(seed=3)
    arrays = {f"model/{name}": value for name, value in model.state_dict().items()}
    meta = dict(format="ra_kernels.train.cifar checkpoint", version=1, epoch=1, batch=0,
                model_config=dict(model.config, seed=3))
    np.savez(tmp_path / "old.npz", **arrays, train_totals=np.zeros(3, np.float32), meta=np.array(json.dumps(meta)))
    restored = tiny(seed=4).load(tmp_path / "old.npz")
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(restored.state_dict()[name], value, err_msg=name)
    read_meta, _ = npzfile.read(tmp_path / "old.npz", meta_only=True)
    assert read_meta["kind"] == "training checkpoint" and read_meta["model"]["config"] == json.loads(
        json.dumps(model.config))


@pytest.mark.parametrize("meta", [{"kind": "weights"}, {"kind": "weights", "model": {"class": "X"}},
                                  {"kind": "notes", "model": {"class": "X", "config": None}}, ["not", "a", "dict"]])
def test_a_damaged_meta_record_is_named(tmp_path, meta):
    record = dict(meta, format="ra_kernels", version=2) if isinstance(meta, dict) else meta
    np.savez(tmp_path / "damaged.npz", meta=np.array(json.dumps(record)))
    with pytest.raises(npzfile.UnreadableFile, match=f"{tmp_path / 'damaged.npz'} "):
        tiny().load(tmp_path / "damaged.npz")


def test_numpy_numbers_in_the_configuration_save(tmp_path):
    model = tiny(stem=np.int64(4), widths=np.array([8, 16, 32]), residual_attention=np.bool_(True))
    model.save(tmp_path / "w.npz")
    restored = tiny(seed=9).load(tmp_path / "w.npz")  # the same architecture, in Python numbers
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(restored.state_dict()[name], value, err_msg=name)


@pytest.mark.parametrize("attention", ["mixed", "channel", "spatial"])
def test_attention_masks_have_trunk_shapes(rng, attention):
    """...and leave a model in training mode as it was: its batch norms use the batch's statistics,
    and their running statistics are put back after (a forward in training mode updates them)."""
    model = tiny(attention=attention)
    x = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    before = model.state_dict()
    masks = model.attention_masks(x)
    after = model.state_dict()
    assert all(np.array_equal(after[name], value) for name, value in before.items()) and model.training
    with model.evaluating():  # the running statistics of an untrained model: other masks
        assert any(not np.array_equal(mask, masks[name]) for name, mask in model.attention_masks(x).items())
    assert list(masks) == [name.rstrip(".") for name, _ in model.attention_modules()]
    sizes = {"stage1": 32, "stage2": 16, "stage3": 8}
    for name, mask in masks.items():
        stage = name.split(".")[0]
        width = dict(stage1=8, stage2=16, stage3=32)[stage]
        assert mask.shape == (2, sizes[stage], sizes[stage], width)
        assert np.all(np.isfinite(mask))
        if attention != "channel":  # sigmoid masks, mixed or spatial
            assert mask.min() > 0 and mask.max() < 1
    assert all(m.mask is None and not m.keep_mask for _, m in model.attention_modules())
    assert isinstance(model.stage1[1], AttentionModule)


def test_a_frozen_layer_of_a_branch_keeps_its_running_statistics(rng):
    # A unit in training mode takes its branch as one conv_chain; a layer frozen in eval mode (a
    # common fine-tuning setup) sends the branch through the layers one by one, each in its own mode.
    unit = models.ResidualUnit(8, 8, rng=np.random.default_rng(0)).train()
    unit.reduce.eval()
    before = unit.reduce.bn.running_mean.copy(), unit.spatial.bn.running_mean.copy()
    unit(rng.standard_normal((2, 4, 4, 8)).astype(np.float32))
    np.testing.assert_array_equal(unit.reduce.bn.running_mean, before[0])
    assert not np.array_equal(unit.spatial.bn.running_mean, before[1])
