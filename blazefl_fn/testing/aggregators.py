"""Hypothesis strategies and property checks for aggregators, to test your own in a few lines.

Needs hypothesis, a test-only dependency: ``pip install blazefl_fn[testing]``.

The strategies draw parameter trees (`params_trees`), batches of client trees sharing one
structure with non-negative weights (`client_batches`), and batches with some clients replaced
by arbitrary, possibly huge, values (`adversarial_replacements`). Each ``check_*`` function
calls a `blazefl_fn.server.aggregators.Aggregator` on concrete inputs and raises AssertionError with
the entry, index and values when a property fails.

Tolerances: every check compares exactly by default (tensor values equal, as `torch.equal`, so
``-0.0 == 0.0``). ``atol`` adds an absolute slack; ``ulps`` adds ``ulps`` units of the entry
dtype's epsilon, scaled by the largest magnitude among the inputs and outputs at that
coordinate (so cancellation near zero is judged against the inputs' size). For integer entries
``ulps`` counts whole units.

Examples:
    >>> from hypothesis import given, settings
    >>> from blazefl_fn.server import aggregators
    >>> from blazefl_fn.testing import aggregators as testing
    >>> def my_median(trees, weights):  # the aggregator under test
    ...     return aggregators.median(trees, weights)
    >>> @settings(max_examples=10, deadline=None)
    ... @given(testing.client_batches(max_clients=4))
    ... def test_my_median(batch):
    ...     testing.check_structure_preserved(my_median, batch.trees, batch.weights)
    ...     testing.check_permutation_invariance(my_median, batch.trees, batch.weights)
    ...     testing.check_coordinate_bounds(my_median, batch.trees, batch.weights)
    >>> test_my_median()
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal, cast

import attrs
import torch
from hypothesis import strategies as st

from ..server.aggregators import Aggregator
from ..tree import Params, digest

__all__ = [
    "FLOAT_DTYPES",
    "ClientBatch",
    "Corrupted",
    "TreeStructure",
    "adversarial_replacements",
    "check_affine_equivariance",
    "check_coordinate_bounds",
    "check_deterministic",
    "check_honest_bounds",
    "check_identity_on_equal",
    "check_permutation_invariance",
    "check_rejects_all_zero_weights",
    "check_selects_an_input",
    "check_structure_preserved",
    "check_weight_scaling",
    "check_weight_two_equals_two_copies",
    "check_zero_weight_client",
    "client_batches",
    "params_trees",
    "tree_structures",
    "trees_like",
]

FLOAT_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
)
"""The floating dtypes the strategies draw from by default."""

# Hypothesis draws floats of these widths exactly; bfloat16 is drawn as float32 and rounded.
_WIDTHS: dict[torch.dtype, Literal[16, 32, 64]] = {
    torch.float64: 64,
    torch.float32: 32,
    torch.float16: 16,
}


# --------------------------------------------------------------------------------------------
# Strategies


@attrs.frozen
class TreeStructure:
    """The names, shapes and dtypes of a parameter tree, in order.

    Attributes:
        entries: ``(name, shape, dtype)`` per entry.
    """

    entries: tuple[tuple[str, tuple[int, ...], torch.dtype], ...]


@attrs.frozen(eq=False)
class ClientBatch:
    """One round's client trees (one structure) and their weights (``>= 0``, one ``> 0``).

    Attributes:
        trees: the client trees, in client order.
        weights: one weight per tree.
    """

    trees: tuple[dict[str, torch.Tensor], ...]
    weights: tuple[float, ...]

    def positive(self) -> list[int]:
        """Indices of the clients with a positive weight.

        Examples:
            >>> ClientBatch(trees=({}, {}, {}), weights=(0.0, 2.0, 1.0)).positive()
            [1, 2]
        """
        return [i for i, w in enumerate(self.weights) if w > 0.0]


@attrs.frozen(eq=False)
class Corrupted:
    """A batch in which the clients at ``replaced`` hold arbitrary values.

    Attributes:
        batch: the batch after replacement (weights unchanged).
        replaced: the replaced clients' indices, ascending.
    """

    batch: ClientBatch
    replaced: tuple[int, ...]

    def honest(self) -> list[int]:
        """Indices of the positive-weight clients that were not replaced.

        Examples:
            >>> batch = ClientBatch(trees=({}, {}, {}), weights=(1.0, 0.0, 1.0))
            >>> Corrupted(batch=batch, replaced=(0,)).honest()
            [2]
        """
        return [i for i in self.batch.positive() if i not in self.replaced]


def _float_bound(dtype: torch.dtype, max_abs: float | None) -> float:
    """The largest magnitude to draw for ``dtype``: ``max_abs`` (or the dtype's max), rounded
    down to a value exactly representable in the drawing width."""
    finite_max = float(torch.finfo(dtype).max)
    bound = finite_max if max_abs is None else min(float(max_abs), finite_max)
    width_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    as_width = float(torch.tensor(bound, dtype=torch.float64).to(width_dtype))
    while as_width > bound or math.isinf(as_width):
        step = torch.tensor(as_width, dtype=width_dtype)
        as_width = float(torch.nextafter(step, torch.zeros_like(step)))
    return as_width


def _int_bounds(dtype: torch.dtype, max_abs: float | None) -> tuple[int, int]:
    if dtype == torch.bool:
        return 0, 1
    info = torch.iinfo(dtype)
    limit = 2**31 if max_abs is None else math.floor(max_abs)
    return max(info.min, -limit), min(info.max, limit)


def _values(dtype: torch.dtype, max_abs: float | None) -> st.SearchStrategy[float]:
    if dtype.is_floating_point:
        bound = _float_bound(dtype, max_abs)
        width = _WIDTHS.get(dtype, 32)
        return st.floats(-bound, bound, allow_nan=False, allow_infinity=False, width=width)
    low, high = _int_bounds(dtype, max_abs)
    return st.integers(low, high).map(float)


def _tensor(values: Sequence[float], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.float64).reshape(shape).to(dtype)


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


@st.composite
def _structures(
    draw: st.DrawFn,
    dtypes: tuple[torch.dtype, ...],
    max_entries: int,
    max_ndim: int,
    max_side: int,
) -> TreeStructure:
    names = draw(
        st.lists(
            st.from_regex(r"[a-z]{1,3}(\.[a-z0-9]{1,3})?", fullmatch=True),
            min_size=1,
            max_size=max_entries,
            unique=True,
        )
    )
    entries: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    for name in names:
        shape = tuple(draw(st.lists(st.integers(0, max_side), max_size=max_ndim)))
        entries.append((name, shape, draw(st.sampled_from(dtypes))))
    return TreeStructure(entries=tuple(entries))


def tree_structures(
    *,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    max_entries: int = 3,
    max_ndim: int = 2,
    max_side: int = 3,
) -> st.SearchStrategy[TreeStructure]:
    """Tree structures: 1 to ``max_entries`` dotted names, shapes of up to ``max_ndim`` sides in
    ``[0, max_side]`` (empty and 0-d entries included), dtypes from ``dtypes``.

    Raises:
        ValueError: ``dtypes`` is empty or a size limit is negative.

    Examples:
        >>> from hypothesis import given, settings
        >>> @settings(max_examples=5, deadline=None)
        ... @given(tree_structures(max_entries=2))
        ... def test(structure):
        ...     assert 1 <= len(structure.entries) <= 2
        >>> test()
    """
    chosen = tuple(dtypes)
    if not chosen:
        raise ValueError("dtypes must not be empty")
    if min(max_entries - 1, max_ndim, max_side) < 0:
        raise ValueError(
            f"need max_entries >= 1 and max_ndim, max_side >= 0, got "
            f"{max_entries}, {max_ndim}, {max_side}"
        )
    return _structures(chosen, max_entries, max_ndim, max_side)


@st.composite
def _trees_like(
    draw: st.DrawFn, structure: TreeStructure, max_abs: float | None
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, shape, dtype in structure.entries:
        count = _numel(shape)
        values = draw(st.lists(_values(dtype, max_abs), min_size=count, max_size=count))
        out[name] = _tensor(values, shape, dtype)
    return out


def trees_like(
    structure: TreeStructure, *, max_abs: float | None = 1e3
) -> st.SearchStrategy[dict[str, torch.Tensor]]:
    """Trees of ``structure`` with finite values of magnitude at most ``max_abs`` (``None``: the
    dtype's whole finite range). Hypothesis draws each value, so zeros, ``-0.0``, subnormals
    and the bounds all occur and failures shrink.

    Examples:
        >>> from hypothesis import given, settings
        >>> structure = TreeStructure(entries=(("w", (2,), torch.float16),))
        >>> @settings(max_examples=5, deadline=None)
        ... @given(trees_like(structure, max_abs=1.0))
        ... def test(tree):
        ...     assert tree["w"].dtype == torch.float16 and float(tree["w"].abs().max()) <= 1
        >>> test()
    """
    return _trees_like(structure, max_abs)


def params_trees(
    structure: TreeStructure | None = None,
    *,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    max_abs: float | None = 1e3,
) -> st.SearchStrategy[dict[str, torch.Tensor]]:
    """Parameter trees: of ``structure`` if given, else of a drawn `tree_structures`.

    Examples:
        >>> from hypothesis import given, settings
        >>> @settings(max_examples=5, deadline=None)
        ... @given(params_trees(dtypes=[torch.float32]))
        ... def test(tree):
        ...     assert all(t.dtype == torch.float32 for t in tree.values())
        >>> test()
    """
    if structure is not None:
        return trees_like(structure, max_abs=max_abs)
    return tree_structures(dtypes=dtypes).flatmap(lambda s: trees_like(s, max_abs=max_abs))


@st.composite
def _batches(
    draw: st.DrawFn,
    structure: st.SearchStrategy[TreeStructure],
    min_clients: int,
    max_clients: int,
    max_abs: float | None,
    zero_weights: bool,
    integer_weights: bool,
) -> ClientBatch:
    shared = draw(structure)
    count = draw(st.integers(min_clients, max_clients))
    trees = tuple(draw(trees_like(shared, max_abs=max_abs)) for _ in range(count))
    low = 0 if zero_weights else 1
    weight = (
        st.integers(low, 1000).map(float)
        if integer_weights
        else st.floats(1e-3, 1e3) | (st.just(0.0) if zero_weights else st.nothing())
    )
    weights = draw(st.lists(weight, min_size=count, max_size=count))
    if not any(w > 0.0 for w in weights):
        weights[draw(st.integers(0, count - 1))] = 1.0
    return ClientBatch(trees=trees, weights=tuple(weights))


def client_batches(
    *,
    structure: TreeStructure | None = None,
    min_clients: int = 1,
    max_clients: int = 5,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    max_abs: float | None = 1e3,
    zero_weights: bool = True,
    integer_weights: bool = False,
) -> st.SearchStrategy[ClientBatch]:
    """Batches of ``min_clients`` to ``max_clients`` trees of one structure, with weights.

    Args:
        structure: the shared structure; drawn with ``dtypes`` when None.
        min_clients: the fewest clients (>= 1).
        max_clients: the most clients.
        dtypes: dtypes to draw structures from.
        max_abs: the largest magnitude of a value (None: the dtype's finite range).
        zero_weights: whether some weights may be 0 (at least one is always positive).
        integer_weights: draw whole-number weights in ``[0, 1000]`` (like ``num_examples``)
            rather than floats in ``[1e-3, 1e3]``.

    Raises:
        ValueError: ``min_clients < 1`` or ``max_clients < min_clients``.

    Examples:
        >>> from hypothesis import given, settings
        >>> @settings(max_examples=5, deadline=None)
        ... @given(client_batches(min_clients=2, max_clients=3))
        ... def test(batch):
        ...     assert 2 <= len(batch.trees) == len(batch.weights) <= 3
        ...     assert batch.positive() and batch.trees[0].keys() == batch.trees[-1].keys()
        >>> test()
    """
    if min_clients < 1 or max_clients < min_clients:
        raise ValueError(
            f"need 1 <= min_clients <= max_clients, got {min_clients} and {max_clients}"
        )
    shapes = st.just(structure) if structure is not None else tree_structures(dtypes=dtypes)
    return _batches(shapes, min_clients, max_clients, max_abs, zero_weights, integer_weights)


@st.composite
def _adversarial_tree(draw: st.DrawFn, like: Params) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in like.items():
        shape, dtype = tuple(t.shape), t.dtype
        count = _numel(shape)
        mode = draw(st.sampled_from(["extreme", "arbitrary"]))
        if mode == "extreme" and dtype.is_floating_point:
            bound = _float_bound(dtype, None)
            value = draw(st.sampled_from([bound, -bound, bound / 2, -bound / 2]))
            out[name] = torch.full(shape, value, dtype=dtype)
        else:
            values = draw(st.lists(_values(dtype, None), min_size=count, max_size=count))
            out[name] = _tensor(values, shape, dtype)
    return out


@st.composite
def _corrupted(draw: st.DrawFn, batch: ClientBatch, k: int) -> Corrupted:
    count = len(batch.trees)
    how_many = draw(st.integers(0, min(k, count)))
    order = draw(st.permutations(range(count)))
    replaced = tuple(sorted(order[:how_many]))
    trees = list(batch.trees)
    for i in replaced:
        trees[i] = draw(_adversarial_tree(batch.trees[i]))
    return Corrupted(
        batch=ClientBatch(trees=tuple(trees), weights=batch.weights), replaced=replaced
    )


def adversarial_replacements(batch: ClientBatch, k: int) -> st.SearchStrategy[Corrupted]:
    """``batch`` with up to ``k`` clients' trees replaced by arbitrary finite values: per entry
    either a constant at (or half) the dtype's largest magnitude, or values drawn from its whole
    finite range (integers within ``+-2**31``). Weights are kept.

    Use it with ``flatmap``: ``client_batches().flatmap(lambda b: adversarial_replacements(b, 1))``.

    Raises:
        ValueError: ``k < 0``.

    Examples:
        >>> from hypothesis import given, settings
        >>> strategy = client_batches(min_clients=3).flatmap(
        ...     lambda b: adversarial_replacements(b, 1))
        >>> @settings(max_examples=5, deadline=None)
        ... @given(strategy)
        ... def test(corrupted):
        ...     assert len(corrupted.replaced) <= 1
        >>> test()
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return _corrupted(batch, k)


# --------------------------------------------------------------------------------------------
# Checks


def _call(agg: Aggregator, trees: Sequence[Params], weights: Sequence[float]) -> Params:
    result = cast(object, agg(list(trees), list(weights)))
    if not isinstance(result, Mapping):
        raise AssertionError(f"the aggregator returned {type(result).__name__}, not a mapping")
    return cast(Params, result)


def _positive(trees: Sequence[Params], weights: Sequence[float]) -> list[Params]:
    if len(trees) != len(weights):
        raise ValueError(f"got {len(trees)} trees but {len(weights)} weights")
    kept = [t for t, w in zip(trees, weights, strict=True) if w > 0]
    if not kept:
        raise ValueError(f"the checks need a positive weight, got {list(weights)!r}")
    return kept


def _spacing(dtype: torch.dtype, magnitude: torch.Tensor) -> torch.Tensor:
    if dtype.is_floating_point:
        info = torch.finfo(dtype)
        return torch.clamp(magnitude * info.eps, min=info.tiny * info.eps)
    return torch.ones_like(magnitude)


def _magnitude(name: str, trees: Sequence[Params]) -> torch.Tensor:
    return torch.stack([t[name].detach().to(torch.float64).abs() for t in trees]).amax(dim=0)


def _assert_close(
    what: str,
    got: Params,
    want: Params,
    *,
    refs: Sequence[Params],
    atol: float,
    ulps: float,
) -> None:
    if got.keys() != want.keys():
        raise AssertionError(f"{what}: names differ: {sorted(set(got) ^ set(want))}")
    for name in want:
        g, w = got[name], want[name]
        if g.shape != w.shape or g.dtype != w.dtype:
            raise AssertionError(
                f"{what}: entry {name!r} is {g.dtype} {tuple(g.shape)}, "
                f"expected {w.dtype} {tuple(w.shape)}"
            )
        if atol == 0.0 and ulps == 0.0:
            if torch.equal(g, w):
                continue
            ok = g.to(torch.float64) == w.to(torch.float64)
            tol_text = "exact"
        else:
            g64, w64 = g.detach().to(torch.float64), w.detach().to(torch.float64)
            magnitude = torch.maximum(g64.abs(), w64.abs())
            if refs and g.numel():
                magnitude = torch.maximum(magnitude, _magnitude(name, refs))
            tol = atol + ulps * _spacing(w.dtype, magnitude)
            ok = ((g64 - w64).abs() <= tol) | (g64 == w64)
            tol_text = f"atol={atol}, ulps={ulps}"
        if bool(ok.all()):
            continue
        index = tuple(int(i) for i in torch.nonzero(~ok)[0])
        raise AssertionError(
            f"{what}: entry {name!r} at {index}: got {g[index].item()!r}, "
            f"expected {w[index].item()!r} ({tol_text})"
        )


def check_structure_preserved(
    agg: Aggregator, trees: Sequence[Params], weights: Sequence[float]
) -> None:
    """The result has the inputs' names, shapes and dtypes, is made of new tensors (no input
    tensor is returned), and no input was modified.

    Raises:
        AssertionError: naming the offending entry.

    Examples:
        >>> import torch
        >>> from blazefl_fn.server.aggregators import mean
        >>> check_structure_preserved(mean, [{"w": torch.ones(2)}, {"w": torch.zeros(2)}], [1, 1])
    """
    before = [digest(t) for t in trees]
    result = _call(agg, trees, weights)
    for i, tree in enumerate(trees):
        if digest(tree) != before[i]:
            raise AssertionError(f"the aggregator modified its input trees[{i}]")
        if result is tree:
            raise AssertionError(f"the aggregator returned its input trees[{i}] itself")
    reference = trees[0]
    if result.keys() != reference.keys():
        raise AssertionError(
            f"result names differ from the inputs': {sorted(set(result) ^ set(reference))}"
        )
    storages = {
        t.untyped_storage().data_ptr() for tree in trees for t in tree.values() if t.numel()
    }
    for name, expected in reference.items():
        value = cast(object, result[name])
        if not isinstance(value, torch.Tensor):
            raise AssertionError(f"result entry {name!r} is {type(value).__name__}, not a tensor")
        if value.shape != expected.shape or value.dtype != expected.dtype:
            raise AssertionError(
                f"result entry {name!r} is {value.dtype} {tuple(value.shape)}, "
                f"inputs are {expected.dtype} {tuple(expected.shape)}"
            )
        if value.numel() and value.untyped_storage().data_ptr() in storages:
            raise AssertionError(f"result entry {name!r} shares memory with an input tensor")


def check_deterministic(agg: Aggregator, trees: Sequence[Params], weights: Sequence[float]) -> None:
    """Two calls on the same inputs give bitwise-identical results.

    Raises:
        AssertionError: the digests differ.

    Examples:
        >>> import torch
        >>> from blazefl_fn.server.aggregators import median
        >>> check_deterministic(median, [{"w": torch.ones(2)}, {"w": torch.zeros(2)}], [1, 1])
    """
    first, second = digest(_call(agg, trees, weights)), digest(_call(agg, trees, weights))
    if first != second:
        raise AssertionError(f"two calls on the same inputs differ: {first} vs {second}")


def check_identity_on_equal(
    agg: Aggregator,
    tree: Params,
    weights: Sequence[float],
    *,
    atol: float = 0.0,
    ulps: float = 0.0,
) -> None:
    """``len(weights)`` copies of ``tree`` aggregate to ``tree``.

    Raises:
        AssertionError: naming the first differing coordinate.

    Examples:
        >>> import torch
        >>> from blazefl_fn.server.aggregators import mean
        >>> check_identity_on_equal(mean, {"w": torch.tensor([0.1, -3.0])}, [1, 2, 5])
    """
    copies = [{name: t.detach().clone() for name, t in tree.items()} for _ in weights]
    result = _call(agg, copies, weights)
    _assert_close("identity on equal inputs", result, tree, refs=[tree], atol=atol, ulps=ulps)


def check_permutation_invariance(
    agg: Aggregator,
    trees: Sequence[Params],
    weights: Sequence[float],
    *,
    permutations: Sequence[Sequence[int]] | None = None,
    atol: float = 0.0,
    ulps: float = 0.0,
) -> None:
    """Reordering the clients (trees with their weights) does not change the result.

    Args:
        agg: the aggregator.
        trees: the client trees.
        weights: their weights.
        permutations: orders to try; default the reversal and a rotation by one.
        atol: absolute slack.
        ulps: slack in units of the dtype's epsilon (see the module docs).

    Raises:
        AssertionError: naming the permutation and the first differing coordinate.
        ValueError: a permutation is not one of ``range(len(trees))``.

    Examples:
        >>> import torch
        >>> from blazefl_fn.server.aggregators import median
        >>> trees = [{"w": torch.tensor([float(v)])} for v in (3, 1, 2)]
        >>> check_permutation_invariance(median, trees, [1, 1, 1])
    """
    count = len(trees)
    orders = (
        [list(reversed(range(count))), [*range(1, count), 0]]
        if permutations is None
        else [list(p) for p in permutations]
    )
    expected = _call(agg, trees, weights)
    positive = _positive(trees, weights)
    for order in orders:
        if sorted(order) != list(range(count)):
            raise ValueError(f"{order} is not a permutation of range({count})")
        result = _call(agg, [trees[i] for i in order], [weights[i] for i in order])
        _assert_close(f"permuted by {order}", result, expected, refs=positive, atol=atol, ulps=ulps)


def check_honest_bounds(
    agg: Aggregator,
    trees: Sequence[Params],
    weights: Sequence[float],
    honest: Sequence[int],
    *,
    atol: float = 0.0,
    ulps: float = 0.0,
) -> None:
    """Every coordinate of the result lies within the range of the trees at ``honest``.

    The robustness property: with the other clients replaced by anything (e.g. by
    `adversarial_replacements`), a robust aggregator stays within the honest clients' range.

    Raises:
        AssertionError: naming the first coordinate outside the range.
        ValueError: ``honest`` is empty or out of range.

    Examples:
        >>> import torch
        >>> from blazefl_fn.server.aggregators import median
        >>> trees = [{"w": torch.tensor([v])} for v in (1.0, 2.0, 1e30)]
        >>> check_honest_bounds(median, trees, [1, 1, 1], honest=[0, 1])
    """
    if not honest or not all(0 <= i < len(trees) for i in honest):
        raise ValueError(f"honest must be non-empty indices into {len(trees)} trees: {honest}")
    chosen = [trees[i] for i in honest]
    result = _call(agg, trees, weights)
    for name, reference in chosen[0].items():
        if name not in result:
            raise AssertionError(f"result has no entry {name!r}")
        stacked = torch.stack([t[name].detach().to(torch.float64) for t in chosen])
        low, high = stacked.amin(dim=0), stacked.amax(dim=0)
        got = result[name].detach().to(torch.float64)
        magnitude = torch.maximum(stacked.abs().amax(dim=0), got.abs())
        slack = atol + ulps * _spacing(reference.dtype, magnitude)
        ok = (got >= low - slack) & (got <= high + slack)
        if bool(ok.all()):
            continue
        index = tuple(int(i) for i in torch.nonzero(~ok)[0])
        raise AssertionError(
            f"entry {name!r} at {index}: {got[index].item()!r} is outside "
            f"[{low[index].item()!r}, {high[index].item()!r}] of clients {list(honest)}"
        )


def check_coordinate_bounds(
    agg: Aggregator,
    trees: Sequence[Params],
    weights: Sequence[float],
    *,
    atol: float = 0.0,
    ulps: float = 0.0,
) -> None:
    """Every coordinate lies between the positive-weight clients' minimum and maximum.

    Raises:
        AssertionError: naming the first coordinate outside the range.

    Examples:
        >>> import torch
        >>> from blazefl_fn.server.aggregators import mean
        >>> trees = [{"w": torch.tensor([v])} for v in (1.0, 2.0, 1e30)]
        >>> check_coordinate_bounds(mean, trees, [1, 1, 0])
    """
    _positive(trees, weights)
    honest = [i for i, w in enumerate(weights) if w > 0]
    check_honest_bounds(agg, trees, weights, honest, atol=atol, ulps=ulps)


def check_weight_scaling(
    agg: Aggregator,
    trees: Sequence[Params],
    weights: Sequence[float],
    factor: float = 3.0,
    *,
    atol: float = 0.0,
    ulps: float = 0.0,
) -> None:
    """Multiplying every weight by ``factor > 0`` does not change the result.

    Raises:
        AssertionError: naming the first differing coordinate.
        ValueError: ``factor`` is not a finite number > 0.

    Examples:
        >>> import torch
        >>> from blazefl_fn.server.aggregators import mean
        >>> trees = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([4.0])}]
        >>> check_weight_scaling(mean, trees, [1, 2], factor=4.0)
    """
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"factor must be a finite number > 0, got {factor!r}")
    expected = _call(agg, trees, weights)
    result = _call(agg, trees, [w * factor for w in weights])
    _assert_close(
        f"weights scaled by {factor}",
        result,
        expected,
        refs=_positive(trees, weights),
        atol=atol,
        ulps=ulps,
    )


def _far_away(like: Params) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in like.items():
        if t.dtype.is_floating_point:
            value = min(float(torch.finfo(t.dtype).max) / 4, 1e30)
        elif t.dtype == torch.bool:
            value = 1.0
        else:
            value = float(min(torch.iinfo(t.dtype).max, 10**6))
        out[name] = torch.full(t.shape, value, dtype=t.dtype)
    return out


def check_zero_weight_client(
    agg: Aggregator,
    trees: Sequence[Params],
    weights: Sequence[float],
    extra: Params | None = None,
    *,
    atol: float = 0.0,
    ulps: float = 0.0,
) -> None:
    """Adding a client with weight 0 (first, then last) does not change the result.

    Args:
        agg: the aggregator.
        trees: the client trees.
        weights: their weights.
        extra: the zero-weight client's tree; default a tree of huge constants.
        atol: absolute slack.
        ulps: slack in units of the dtype's epsilon.

    Raises:
        AssertionError: naming where the client was added and the differing coordinate.

    Examples:
        >>> import torch
        >>> from blazefl_fn.server.aggregators import median
        >>> trees = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([4.0])}]
        >>> check_zero_weight_client(median, trees, [1, 2])
    """
    outsider = _far_away(trees[0]) if extra is None else extra
    expected = _call(agg, trees, weights)
    refs = _positive(trees, weights)
    for where, new_trees, new_weights in (
        ("first", [outsider, *trees], [0.0, *weights]),
        ("last", [*trees, outsider], [*weights, 0.0]),
    ):
        result = _call(agg, new_trees, new_weights)
        _assert_close(
            f"zero-weight client added {where}", result, expected, refs=refs, atol=atol, ulps=ulps
        )


def check_weight_two_equals_two_copies(
    agg: Aggregator,
    trees: Sequence[Params],
    weights: Sequence[float],
    index: int = 0,
    *,
    atol: float = 0.0,
    ulps: float = 0.0,
) -> None:
    """Doubling client ``index``'s weight equals listing that client twice (right after itself).

    A property of weighted aggregators such as the weighted mean, not of the unweighted robust
    ones.

    Raises:
        AssertionError: naming the first differing coordinate.
        ValueError: ``index`` is out of range.

    Examples:
        >>> import torch
        >>> from blazefl_fn.server.aggregators import mean
        >>> trees = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([4.0])}]
        >>> check_weight_two_equals_two_copies(mean, trees, [1, 3])
    """
    if not 0 <= index < len(trees):
        raise ValueError(f"index must be in [0, {len(trees)}), got {index}")
    doubled = [w * 2 if i == index else w for i, w in enumerate(weights)]
    copied_trees = [*trees[: index + 1], trees[index], *trees[index + 1 :]]
    copied_weights = [*weights[: index + 1], weights[index], *weights[index + 1 :]]
    result = _call(agg, trees, doubled)
    expected = _call(agg, copied_trees, copied_weights)
    _assert_close(
        f"weight of client {index} doubled vs. listed twice",
        result,
        expected,
        refs=_positive(trees, weights),
        atol=atol,
        ulps=ulps,
    )


def check_affine_equivariance(
    agg: Aggregator,
    trees: Sequence[Params],
    weights: Sequence[float],
    a: float,
    b: float,
    *,
    atol: float = 0.0,
    ulps: float = 0.0,
) -> None:
    """``agg(a * x + b) == a * agg(x) + b`` on floating entries (integer entries are skipped).

    Both sides are formed in float64 and rounded to the entries' dtype, so the slack is
    relative to the transformed inputs' magnitude.

    Raises:
        AssertionError: naming the first differing coordinate.
        ValueError: ``a`` or ``b`` is not finite.

    Examples:
        >>> import torch
        >>> from blazefl_fn.server.aggregators import median
        >>> trees = [{"w": torch.tensor([v])} for v in (1.0, 5.0, 2.0)]
        >>> check_affine_equivariance(median, trees, [1, 1, 1], a=-2.0, b=0.5)
    """
    if not (math.isfinite(a) and math.isfinite(b)):
        raise ValueError(f"a and b must be finite, got a={a!r}, b={b!r}")

    def affine(tree: Params) -> dict[str, torch.Tensor]:
        return {
            name: (t.detach().to(torch.float64) * a + b).to(t.dtype)
            for name, t in tree.items()
            if t.dtype.is_floating_point
        }

    floating = [name for name, t in trees[0].items() if t.dtype.is_floating_point]
    transformed = [
        {**{n: t for n, t in tree.items() if n not in floating}, **affine(tree)} for tree in trees
    ]
    got_full = _call(agg, transformed, weights)
    base = _call(agg, trees, weights)
    got = {name: got_full[name] for name in floating}
    want = affine({name: base[name] for name in floating})
    positive = [t for t, w in zip(transformed, weights, strict=True) if w > 0]
    _assert_close(
        f"affine map a={a}, b={b}",
        got,
        want,
        refs=[{n: t[n] for n in floating} for t in positive],
        atol=atol,
        ulps=ulps,
    )


def check_selects_an_input(
    agg: Aggregator, trees: Sequence[Params], weights: Sequence[float]
) -> None:
    """The result is bitwise equal to one of the positive-weight clients' trees (as Krum's).

    Raises:
        AssertionError: the result matches no input.

    Examples:
        >>> import torch
        >>> from blazefl_fn.server.aggregators import krum
        >>> trees = [{"w": torch.tensor([v])} for v in (1.0, 5.0, 2.0)]
        >>> check_selects_an_input(krum(f=0), trees, [1, 1, 1])
    """
    result = digest(_call(agg, trees, weights))
    if result not in {digest(t) for t in _positive(trees, weights)}:
        raise AssertionError("the result is not bitwise equal to any positive-weight input")


def check_rejects_all_zero_weights(agg: Aggregator, trees: Sequence[Params]) -> None:
    """Weights that are all zero raise ValueError.

    Raises:
        AssertionError: the aggregator returned or raised something else.

    Examples:
        >>> import torch
        >>> from blazefl_fn.server.aggregators import mean
        >>> check_rejects_all_zero_weights(mean, [{"w": torch.ones(1)}])
    """
    try:
        agg(list(trees), [0.0] * len(trees))
    except ValueError:
        return
    except Exception as error:
        raise AssertionError(
            f"all-zero weights raised {type(error).__name__}, not ValueError: {error}"
        ) from error
    raise AssertionError("all-zero weights were accepted; expected ValueError")
