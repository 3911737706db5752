"""The params algebra: properties with hypothesis, a golden digest, and no mutation of inputs."""

from __future__ import annotations

import hashlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from blazefl_fn import tree

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.uint8]


@st.composite
def param_trees(draw: st.DrawFn, dtypes: list[torch.dtype] = DTYPES) -> dict[str, torch.Tensor]:
    names = draw(
        st.lists(
            st.from_regex(r"[a-z]{1,3}(\.[a-z0-9]{1,3})?", fullmatch=True),
            min_size=1,
            max_size=4,
            unique=True,
        )
    )
    out: dict[str, torch.Tensor] = {}
    for name in names:
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        dtype = draw(st.sampled_from(dtypes))
        seed = draw(st.integers(0, 2**31))
        generator = torch.Generator().manual_seed(seed)
        values = torch.randn(shape, generator=generator, dtype=torch.float64) * 10
        out[name] = values.to(dtype)
    return out


float_trees = param_trees(dtypes=[torch.float32, torch.float64])


def _snapshot(params: tree.Params) -> str:
    return tree.digest(params)


def test_digest_golden_value() -> None:
    params = {"b": torch.tensor([1.0, 2.0]), "a": torch.arange(3, dtype=torch.int64)}
    assert tree.digest(params) == (
        "5ea4806b448059971f72e9c95222519e0a6824a9f9ceac08d28c5b2cfb39e14a"
    )


def test_digest_follows_the_documented_scheme() -> None:
    params = {"w": torch.tensor([1.0, -2.0]), "b": torch.tensor([7], dtype=torch.int16)}
    h = hashlib.sha256()
    for name in ("b", "w"):
        tensor = params[name]
        header = f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode()
        data = tensor.numpy().tobytes()
        h.update(len(header).to_bytes(8, "little") + header)
        h.update(len(data).to_bytes(8, "little") + data)
    assert tree.digest(params) == h.hexdigest()


@pytest.mark.parametrize(
    "changed",
    [
        {"w": torch.tensor([1.0, 2.5])},  # bytes
        {"v": torch.tensor([1.0, 2.0])},  # name
        {"w": torch.tensor([1.0, 2.0], dtype=torch.float64)},  # dtype
        {"w": torch.tensor([[1.0, 2.0]])},  # shape
        {"w": torch.tensor([1.0, 2.0]), "x": torch.zeros(0)},  # an extra entry
    ],
)
def test_digest_sees_names_dtypes_shapes_and_bytes(changed: dict[str, torch.Tensor]) -> None:
    assert tree.digest({"w": torch.tensor([1.0, 2.0])}) != tree.digest(changed)


@given(param_trees())
def test_digest_ignores_name_order_and_memory_layout(params: dict[str, torch.Tensor]) -> None:
    reordered = dict(reversed(list(params.items())))
    strided = {k: v.t().contiguous().t() if v.dim() == 2 else v for k, v in params.items()}
    assert tree.digest(params) == tree.digest(reordered) == tree.digest(strided)


@given(param_trees())
def test_flatten_roundtrip_is_bitwise_and_aligned(params: dict[str, torch.Tensor]) -> None:
    before = _snapshot(params)
    buffer, spec = tree.flatten(params)
    restored = tree.unflatten(buffer, spec)
    assert list(restored) == list(params)
    assert tree.digest(restored) == before
    assert all(offset % 64 == 0 for offset in spec.offsets)
    assert spec.nbytes == buffer.numel() >= tree.nbytes(params)
    assert _snapshot(params) == before


def test_unflatten_is_a_view_and_checks_the_buffer() -> None:
    buffer, spec = tree.flatten({"w": torch.zeros(3)})
    view = tree.unflatten(buffer, spec)["w"]
    assert view.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    with pytest.raises(ValueError, match="1-D uint8 buffer of 64 bytes"):
        tree.unflatten(torch.zeros(64), spec)
    with pytest.raises(ValueError, match="1-D uint8 buffer of 64 bytes"):
        tree.unflatten(buffer[:10], spec)


@given(float_trees, st.floats(-4, 4, allow_nan=False))
def test_add_sub_scale_identities(params: dict[str, torch.Tensor], factor: float) -> None:
    before = _snapshot(params)
    zero = tree.scale(params, 0.0)
    assert tree.digest(tree.add(params, zero)) == before
    assert all(torch.equal(v, torch.zeros_like(v)) for v in tree.sub(params, params).values())
    scaled = tree.scale(params, factor)
    assert all(torch.equal(scaled[k], params[k] * factor) for k in params)
    assert _snapshot(params) == before


def test_binary_ops_refuse_different_names() -> None:
    with pytest.raises(ValueError, match=r"differ in names: \['b'\]"):
        tree.add({"a": torch.zeros(1)}, {"a": torch.zeros(1), "b": torch.zeros(1)})


@given(float_trees, st.lists(st.floats(0.0, 100.0), min_size=1, max_size=5))
def test_weighted_mean_of_equal_trees_is_identity(
    params: dict[str, torch.Tensor], weights: list[float]
) -> None:
    if sum(weights) == 0:
        weights = [*weights[:-1], 1.0]
    mean = tree.weighted_mean([params] * len(weights), weights)
    for name, value in params.items():
        assert mean[name].dtype == value.dtype
        torch.testing.assert_close(mean[name], value, rtol=1e-6, atol=1e-6)


@st.composite
def same_structure(draw: st.DrawFn, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    seed = draw(st.integers(0, 2**31))
    generator = torch.Generator().manual_seed(seed)
    return {
        k: (torch.randn(v.shape, generator=generator, dtype=torch.float64) * 10).to(v.dtype)
        for k, v in template.items()
    }


@given(float_trees, st.data(), st.floats(0.1, 10.0), st.floats(0.1, 10.0))
def test_weighted_mean_properties(
    a: dict[str, torch.Tensor], data: st.DataObject, wa: float, wb: float
) -> None:
    b = data.draw(same_structure(a))
    before = (_snapshot(a), _snapshot(b))
    mean = tree.weighted_mean([a, b], [wa, wb])
    # Scaling all weights by a power of two changes nothing, bit for bit.
    assert tree.digest(tree.weighted_mean([a, b], [wa * 4, wb * 4])) == tree.digest(mean)
    # A zero-weight client changes nothing.
    assert tree.digest(tree.weighted_mean([a, b], [wa, 0.0])) == tree.digest(
        tree.weighted_mean([a], [1.0])
    )
    # Weight 2 equals two copies (to rounding: the sums are formed differently).
    two = tree.weighted_mean([a, b], [2.0, 1.0])
    copies = tree.weighted_mean([a, a, b], [1.0, 1.0, 1.0])
    for name in a:
        torch.testing.assert_close(two[name], copies[name], rtol=1e-6, atol=1e-6)
        # Coordinate-wise bounds: exact for float32 (accumulated in float64), within a few
        # ulps for float64 inputs.
        low = torch.minimum(a[name], b[name])
        high = torch.maximum(a[name], b[name])
        slack = 0.0
        if a[name].dtype == torch.float64 and a[name].numel():
            slack = 4 * torch.finfo(torch.float64).eps * float(high.abs().max().clamp(min=1.0))
        assert bool((mean[name] >= low - slack).all())
        assert bool((mean[name] <= high + slack).all())
    assert (_snapshot(a), _snapshot(b)) == before


def test_weighted_mean_golden_and_integer_rounding() -> None:
    trees = [
        {"w": torch.tensor([0.0, 1.0]), "n": torch.tensor(3)},
        {"w": torch.tensor([4.0, 5.0]), "n": torch.tensor(6)},
    ]
    mean = tree.weighted_mean(trees, [3, 1])
    assert mean["w"].tolist() == [1.0, 2.0]
    assert mean["n"].dtype == torch.int64
    assert int(mean["n"]) == 4  # 3.75 rounds to 4


def test_weighted_sum_is_exactly_the_fixed_order_float64_sum() -> None:
    values = [torch.tensor([0.1], dtype=torch.float32), torch.tensor([0.2]), torch.tensor([0.3])]
    out = tree.weighted_sum([{"w": v} for v in values], [1.0, 2.0, 3.0])
    expected = 0.0
    for v, w in zip(values, [1.0, 2.0, 3.0], strict=True):
        expected += w * float(v)
    assert out["w"].dtype == torch.float64
    assert float(out["w"]) == expected


@pytest.mark.parametrize(
    ("trees", "weights", "match"),
    [
        ([], [], "at least one"),
        ([{"w": torch.zeros(1)}], [1.0, 2.0], "1 trees but 2 weights"),
        ([{"w": torch.zeros(1)}], [-1.0], r"finite and >= 0, got -1.0"),
        ([{"w": torch.zeros(1)}], [float("nan")], "got nan"),
        ([{"w": torch.zeros(1)}], [float("inf")], "got inf"),
        ([{"w": torch.zeros(1)}] * 2, [0.0, 0.0], "weights sum to 0.0"),
    ],
)
def test_weighted_mean_refuses_bad_weights(
    trees: list[dict[str, torch.Tensor]], weights: list[float], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        tree.weighted_mean(trees, weights)


def test_from_module_and_clone_detach_and_copy() -> None:
    module = torch.nn.Linear(2, 2)
    params = tree.from_module(module)
    assert set(params) == {"weight", "bias"}
    assert not params["weight"].requires_grad
    params["weight"].add_(1.0)
    assert not torch.equal(params["weight"], module.weight.detach())
    cloned = tree.clone(params)
    assert cloned["bias"].data_ptr() != params["bias"].data_ptr()
    assert tree.trees_equal(cloned, params)


def test_nbytes_counts_elements_times_size() -> None:
    params = {"a": torch.zeros(3, dtype=torch.float32), "b": torch.zeros(2, 2, dtype=torch.int64)}
    assert tree.nbytes(params) == 3 * 4 + 4 * 8


def test_flatten_into_a_given_buffer() -> None:
    params = {"a": torch.arange(5, dtype=torch.float32), "b": torch.tensor([7], dtype=torch.int64)}
    out = torch.full((200,), 255, dtype=torch.uint8)
    used, spec = tree.flatten(params, out=out)
    assert spec == tree.tree_spec(params)
    assert used.data_ptr() == out.data_ptr()
    assert used.numel() == spec.nbytes == 128
    assert tree.trees_equal(tree.unflatten(out[: spec.nbytes], spec), params)
    assert bool((out[spec.nbytes :] == 255).all())
    with pytest.raises(ValueError, match="at least 128 bytes"):
        tree.flatten(params, out=torch.zeros(64, dtype=torch.uint8))


def test_flatten_writes_the_same_bytes_aligned_or_not_and_keeps_no_graph() -> None:
    weight = torch.arange(6, dtype=torch.float32).reshape(2, 3).requires_grad_()
    params = {
        "w": weight * 1.5,  # carries autograd history
        "t": torch.arange(6, dtype=torch.float64).reshape(2, 3).t(),  # not contiguous
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3, dtype=torch.int64),
        "empty": torch.zeros(0, 4, dtype=torch.float16),
        "h": torch.tensor([1.25, -2.0], dtype=torch.bfloat16),
    }
    reference, spec = tree.flatten(params)
    assert not reference.requires_grad
    # ``out`` starting 3 bytes into its storage cannot be viewed as float32: bytes are copied
    out = torch.zeros(spec.nbytes + 3, dtype=torch.uint8)
    used, _ = tree.flatten(params, out=out[3:])
    assert not used.requires_grad
    assert torch.equal(used, reference)
    restored = tree.unflatten(reference, spec)
    assert tree.trees_equal(restored, {k: v.detach() for k, v in params.items()})
    assert all(v.is_contiguous() for v in restored.values())
    assert [tuple(v.shape) for v in restored.values()] == [tuple(v.shape) for v in params.values()]
    # a view into a larger aligned buffer: the entries are where the spec says
    big = torch.zeros(spec.nbytes + 128, dtype=torch.uint8)
    big[64 : 64 + spec.nbytes] = reference
    assert tree.trees_equal(tree.unflatten(big[64 : 64 + spec.nbytes], spec), restored)
