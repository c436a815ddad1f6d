"""Module, Parameter, buffers, train/eval and state dicts."""
import contextlib
import re

import numpy as np
import pytest

from ra_kernels import backend, nn, npzfile


class Affine(nn.Module):
    def __init__(self, n, rng):
        super().__init__()
        self.weight = nn.Parameter(rng.standard_normal((n, n)).astype(np.float32))
        self.bias = nn.Parameter(rng.standard_normal(n).astype(np.float32))
        self.register_buffer("calls", np.zeros(1, np.float32))

    def forward(self, x):
        return x @ self.weight.data + self.bias.data


class Net(nn.Module):
    def __init__(self, rng):
        super().__init__()
        self.first = Affine(3, rng)
        self.second = Affine(3, rng)
        self.tied = self.first.weight  # the same parameter under a second name
        self.scale = 2.0  # a plain attribute: not a parameter

    def forward(self, x):
        return self.second(self.first(x)) * self.scale


def test_registration_and_names(rng):
    net = Net(rng)
    names = [n for n, _ in net.named_parameters()]
    # the root's own parameters first, then each child's; the tied weight under its first name
    assert names == ["tied", "first.bias", "second.weight", "second.bias"]
    assert len(net.parameters()) == 4  # the tied weight counts once
    assert [n for n, _ in net.named_buffers()] == ["first.calls", "second.calls"]
    assert all(p.requires_grad for p in net.parameters())
    assert net.scale == 2.0 and net.first.weight is net.tied


def test_reassignment_replaces(rng):
    net = Net(rng)
    net.second = Affine(3, rng)
    net.first.calls = np.ones(1, np.float32)  # replacing a buffer keeps it a buffer
    assert dict(net.named_buffers())["first.calls"][0] == 1.0
    net.scale = nn.Parameter(np.ones(1, np.float32))
    assert "scale" in dict(net.named_parameters())


def test_forward_is_called(rng):
    net = Net(rng)
    x = rng.standard_normal((2, 3)).astype(np.float32)
    expected = ((x @ net.first.weight.data + net.first.bias.data) @ net.second.weight.data
                + net.second.bias.data) * 2.0
    np.testing.assert_allclose(net(x), expected, rtol=1e-6)


def test_train_eval_reach_every_module(rng):
    net = Net(rng)
    assert net.eval() is net
    assert not any(m.training for _, m in net.named_modules())
    net.train()
    assert all(m.training for _, m in net.named_modules())


def test_a_registered_name_refuses_a_value_of_another_kind(rng):
    """A plain array assigned to a parameter's name would silently drop the parameter from
    parameters() and state_dict(): refused, as are non-modules for a submodule and non-arrays
    for a buffer. A Parameter or Module may take any name."""
    net = Net(rng)
    before = net.state_dict()
    for name, value, kind in (("tied", np.zeros((3, 3), np.float32), "parameter"), ("tied", None, "parameter"),
                              ("first", np.zeros(3), "submodule"), ("first.calls", [1.0], "buffer")):
        owner, attr = (net.first, "calls") if name == "first.calls" else (net, name)
        with pytest.raises(TypeError, match=rf"\.{attr} is a {kind}: assign an? \w+, not a {type(value).__name__}"):
            setattr(owner, attr, value)
    assert list(net.state_dict()) == list(before)
    net.first.calls = nn.Parameter(np.ones(1, np.float32))  # a buffer's name taken by a parameter
    assert "first.calls" in dict(net.named_parameters()) and "first.calls" not in dict(net.named_buffers())


def test_sequential_indexes_like_a_list(rng):
    first, second, third = (Affine(3, rng) for _ in range(3))
    seq = nn.Sequential(first, second, third)
    assert seq[0] is first and seq[-1] is third and seq[-3] is first
    assert isinstance(seq[1:], nn.Sequential) and [seq[1:][0], seq[1:][1]] == [second, third]
    with pytest.raises(IndexError):
        seq[3]


def test_evaluating_gives_each_module_back_its_own_mode(rng):
    net = Net(rng)
    net.second.eval()  # frozen inside a training net
    for fails in (False, True):
        with pytest.raises(KeyError) if fails else contextlib.nullcontext():
            with net.evaluating() as inside:
                assert inside is net and not any(m.training for _, m in net.named_modules())
                if fails:
                    raise KeyError("the block fails")
        assert net.training and net.first.training and not net.second.training


def test_state_dict_round_trip_through_npz(rng, tmp_path):
    net, other = Net(rng), Net(rng)
    other.first.calls[...] = 7.0
    path = tmp_path / "net.npz"
    net.save(path)
    assert not (tmp_path / "net.npz.tmp").exists()
    other.load(path)
    for (name, a), (_, b) in zip(net.state_dict().items(), other.state_dict().items()):
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert other.first.calls[0] == 0.0


def test_state_dict_is_a_copy(rng):
    net = Net(rng)
    state = net.state_dict()
    state["first.bias"][...] = 123.0
    assert not np.any(net.first.bias.data == 123.0)


def test_load_checks_names_and_shapes(rng):
    net = Net(rng)
    state = net.state_dict()
    del state["second.bias"]
    state["extra"] = np.zeros(1)
    with pytest.raises(KeyError, match=r"missing 1 \(second.bias\), unexpected 1 \(extra\)"):
        net.load_state_dict(state)
    many = {f"stray{i}": np.zeros(1) for i in range(20)}  # a network's worth of names is listed in part
    with pytest.raises(KeyError, match=r"unexpected 20 \(stray0, .*, stray7 and 12 more\)"):
        net.load_state_dict({**net.state_dict(), **many})
    net.load_state_dict(state, strict=False)
    bad = net.state_dict()
    bad["first.bias"] = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match=r"first.bias has shape \(4,\) in the state, \(3,\) in the module"):
        net.load_state_dict(bad)


def test_load_takes_the_tensors_of_another_module(rng):
    """load_state_dict(dict(other.named_parameters())): Tensors as values (was 'has shape () in the state')."""
    net, other = Net(rng), Net(rng)
    net.load_state_dict(dict(other.named_parameters()), strict=False)
    for name, p in other.named_parameters():
        np.testing.assert_array_equal(dict(net.named_parameters())[name].data, p.data, err_msg=name)

def test_a_failed_load_changes_nothing(rng):
    net = Net(rng)
    before = net.state_dict()
    other = {name: value + 1 for name, value in before.items()}
    names = list(other)
    other[names[-1]] = np.zeros(7, np.float32)  # the last key is wrong: all before it would fit
    with pytest.raises(ValueError, match=f"{names[-1]} has shape .7,. in the state.*nothing was loaded"):
        net.load_state_dict(other)
    other[names[-1]] = np.array(["x"] * before[names[-1]].size).reshape(before[names[-1]].shape)
    with pytest.raises(TypeError, match=f"{names[-1]} has dtype <U1 in the state"):
        net.load_state_dict(other)
    for name, value in net.state_dict().items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)


@pytest.mark.parametrize("name, where, value, says", [
    ("0.bn.running_var", 2, -0.5, "must be finite and >= 0 \\(a variance\\): 1 of 4 values are not, the first -0.5"),
    ("1.running_var", slice(1, None), np.nan, "must be finite and >= 0 \\(a variance\\): 3 of 4 .* the first nan"),
    ("1.running_var", slice(None), np.nan, "must be .*: 4 of 4 values are not, the first nan"),
    ("1.running_mean", 3, np.inf, "must be finite: 1 of 4 values are not, the first inf")])
def test_a_damaged_batch_norm_state_is_refused(rng, name, where, value, says):
    # (a negative or NaN running variance loaded without a word and made every eval output NaN)
    net = nn.Sequential(nn.ConvBnRelu(3, 4, rng=rng), nn.BatchNorm2d(4))
    before = net.state_dict()
    damaged = {key: array.copy() for key, array in before.items()}
    damaged[name][where] = value
    with pytest.raises(ValueError, match=f"load_state_dict: {re.escape(name)} {says}.*; nothing was loaded"):
        net.load_state_dict(damaged)
    for key, array in net.state_dict().items():
        np.testing.assert_array_equal(array, before[key], err_msg=key)


def test_load_of_a_missing_or_truncated_file_names_it(rng, tmp_path):
    net = Net(rng)
    with pytest.raises(npzfile.UnreadableFile, match=f"{tmp_path / 'missing.npz'} does not exist"):
        net.load(tmp_path / "missing.npz")
    net.save(tmp_path / "net.npz")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes((tmp_path / "net.npz").read_bytes()[:300])
    with pytest.raises(npzfile.UnreadableFile, match=f"cannot read {truncated}: truncated or corrupt"):
        net.load(truncated)


def test_save_into_a_missing_folder_names_the_folder(rng, tmp_path):
    # (the temporary file beside the target, "w.npz.tmp", was the name in the message)
    with pytest.raises(FileNotFoundError, match=f"cannot write {tmp_path / 'no' / 'w.npz'}: {tmp_path / 'no'} "
                                                f"is not a folder \\(it does not exist\\)"):
        Net(rng).save(tmp_path / "no" / "w.npz")
    assert not (tmp_path / "no").exists()


def test_loaded_values_keep_the_module_dtype(rng):
    net = Net(rng)
    state = {k: v.astype(np.float64) for k, v in net.state_dict().items()}
    net.load_state_dict(state)
    assert all(p.dtype == np.float32 for p in net.parameters())


def test_module_without_super_init_is_reported():
    class Forgot(nn.Module):
        def __init__(self):
            self.w = nn.Parameter(np.zeros(1, np.float32))

    with pytest.raises(AttributeError, match=r"Forgot.__init__ must call super\(\).__init__\(\) before assigning .w."):
        Forgot()


@pytest.mark.gpu
def test_state_dict_moves_between_backends(rng):
    cpu = Net(rng)
    with backend.use_backend("cuda"):
        gpu = Net(rng)
        for p in gpu.parameters():
            p.data = backend.asarray(p.data)
        gpu.load_state_dict(cpu.state_dict())
        assert all(backend.memory_of(p.data) == "device" for p in gpu.parameters())
    for (name, a), (_, b) in zip(cpu.state_dict().items(), gpu.state_dict().items()):
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_a_shared_buffer_is_checked_by_every_module_holding_it_and_names_stay_one_kind(rng):
    """load_state_dict asks every module that holds a parameter or buffer (one shared by two
    batch norms is saved under the first one's name), and a buffer cannot take a parameter's or a
    submodule's name (the module held both, and state_dict saved one)."""
    first, second = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
    second.running_var = first.running_var
    net = nn.Sequential(nn.Sequential(first), second)
    checked = []
    for bn in (first, second):
        bn.unloadable = lambda name, value, bn=bn: checked.append((bn, name)) or None
    net.load_state_dict(net.state_dict())
    assert (first, "running_var") in checked and (second, "running_var") in checked
    with pytest.raises(ValueError, match="register_buffer: 'gamma' is already a parameter"):
        first.register_buffer("gamma", np.zeros(4, np.float32))
