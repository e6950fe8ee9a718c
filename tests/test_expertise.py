"""expertise.auroc against scikit-learn, and expertise.select against a plain reimplementation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from lmms_sgm import expertise as E
from lmms_sgm.options import SelectionOptions
from lmms_sgm.profiling import ResponseStore
from lmms_sgm.sites import Site


def sklearn_auroc(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.array([roc_auc_score(y, x[:, j]) for j in range(x.shape[1])])


def check_auroc(x, y, **kwargs) -> torch.Tensor:
    x_before = np.array(x, copy=True)
    got = E.auroc(x, y, **kwargs)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64
    assert got.shape == (x.shape[1],)
    np.testing.assert_allclose(got.numpy(), sklearn_auroc(x_before, np.asarray(y)), atol=1e-6, rtol=0)
    # The caller's scores must not be touched (profiling stores them, reports reuse them).
    np.testing.assert_array_equal(np.asarray(x), x_before)
    assert np.array_equal(np.signbit(np.asarray(x)), np.signbit(x_before))
    return got


def balanced_labels(n, rng):
    y = np.array([0, 1] * (n // 2) + [0] * (n % 2))
    return rng.permutation(y)


# ---------------------------------------------------------------- auroc == sklearn


def test_auroc_float32_many_ties():
    rng = np.random.default_rng(1)
    y = balanced_labels(40, rng)
    x = rng.integers(0, 4, size=(40, 300)).astype(np.float32)  # every column has many ties
    got = check_auroc(x, y)
    assert len(np.unique(got.numpy())) > 20  # not a degenerate all-0.5 result


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_auroc_a_tie_group_at_every_position(dtype):
    """One toxic/non-toxic tie per column, at every sorted position, with distinct values of
    alternating classes around it: the non-toxic examples below a tie group count fully, the tied
    one half (random columns rarely start a tie group right after a lone lowest value)."""
    n = 8
    y = np.array([0] * (n // 2) + [1] * (n // 2))  # rows 0-3 non-toxic, 4-7 toxic
    columns = []
    for first_class in (0, 1):
        classes = [(first_class + p) % 2 for p in range(n)]  # the class at each sorted position
        for start in range(n - 1):  # positions start and start + 1 share one value
            value = [p if p <= start else p - 1 for p in range(n)]
            columns.append([v for c in (0, 1) for v, k in zip(value, classes) if k == c])  # rows follow y
    check_auroc(np.stack(columns, axis=1).astype(dtype), y)


def test_auroc_float32_ties_shifted_columns():
    # Ties, negative values and a column that is all one value (AUROC exactly 0.5).
    rng = np.random.default_rng(2)
    y = balanced_labels(30, rng)
    x = (rng.integers(-3, 3, size=(30, 64)) * 0.25).astype(np.float32)
    x[:, 5] = 7.0
    x[:, 6] = -2.5
    got = check_auroc(x, y)
    assert got[5].item() == 0.5 and got[6].item() == 0.5


def test_auroc_float32_continuous():
    rng = np.random.default_rng(3)
    y = balanced_labels(64, rng)
    x = rng.standard_normal((64, 257)).astype(np.float32)
    x[y == 1, :50] += 1.0  # some informative columns (AUROC far from 0.5)
    x[y == 1, 50:80] -= 2.0
    got = check_auroc(x, y)
    assert got[:50].mean() > 0.7 and got[50:80].mean() < 0.2


@pytest.mark.parametrize("ties", [False, True])
def test_auroc_float64(ties):
    rng = np.random.default_rng(4)
    y = balanced_labels(50, rng)
    if ties:
        x = rng.integers(0, 5, size=(50, 120)).astype(np.float64)
    else:
        x = rng.standard_normal((50, 120))
        x[y == 1, :10] += 1.5
    check_auroc(x, y)
    check_auroc(torch.from_numpy(x), y)  # torch input takes the same path


def test_auroc_signed_zeros():
    rng = np.random.default_rng(5)
    y = balanced_labels(24, rng)
    for dtype in (np.float32, np.float64):
        x = rng.choice(np.array([-0.0, 0.0, 1.0, -1.0], dtype), size=(24, 200))
        assert np.signbit(x[x == 0]).any() and (~np.signbit(x[x == 0])).any()
        check_auroc(x.astype(dtype), y)
        # a column that is only zeros of both signs is one tie group
        z = np.where(rng.random((24, 3)) < 0.5, -0.0, 0.0).astype(dtype)
        assert np.all(E.auroc(z, y).numpy() == 0.5)


@pytest.mark.parametrize("n_pos", [1, 3, 47])
def test_auroc_imbalanced_labels(n_pos):
    rng = np.random.default_rng(6)
    y = np.zeros(50, np.int64)
    y[rng.choice(50, n_pos, replace=False)] = 1
    x = np.concatenate(
        [rng.standard_normal((50, 40)), rng.integers(0, 3, size=(50, 40))], axis=1
    ).astype(np.float32)
    check_auroc(x, y)


@pytest.fixture(scope="module")
def several_blocks():
    rng = np.random.default_rng(7)
    n_cols = 2 * E.BLOCK_NEURONS + 37  # three blocks, the last partial
    y = balanced_labels(30, rng)
    x = rng.standard_normal((30, n_cols)).astype(np.float32)
    # tie columns scattered over every block, so the exact fallback runs in each
    tie_cols = rng.choice(n_cols, 300, replace=False)
    x[:, tie_cols] = rng.integers(0, 3, size=(30, 300)).astype(np.float32)
    assert {c // E.BLOCK_NEURONS for c in tie_cols} == {0, 1, 2}
    x[y == 1, ::7] += 0.8
    return x, y, sklearn_auroc(x, y)


@pytest.mark.parametrize("threads", [None, 1, 3])
def test_auroc_several_blocks(several_blocks, threads):
    x, y, want = several_blocks
    x_before = x.copy()
    got = E.auroc(x, y, threads=threads)
    assert got.shape == (x.shape[1],)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(x, x_before)


@pytest.mark.parametrize(
    "base",
    [1.0, -1.0, 0.3, -0.3, 1234.5, -7.0e5, 1.1754944e-38, -1.1754944e-38, 0.0],
)
@pytest.mark.parametrize("direction", [np.inf, -np.inf])
def test_auroc_values_one_ulp_apart(base, direction):
    """A toxic and a non-toxic value that differ only in the lowest mantissa bit.

    The fast path writes the label into that bit, so such columns must go to the exact fallback.
    """
    rng = np.random.default_rng(abs(hash((base, direction))) % 2**32)
    n = 20
    y = balanced_labels(n, rng)
    x = (rng.standard_normal((n, 64)) * 10 + 100).astype(np.float32)  # far from base
    v = np.float32(base)
    w = np.nextafter(v, np.float32(direction))  # one ulp away (a subnormal when base is 0)
    assert v != w
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    for j in range(64):
        # vary how many of each class sit on v and w, and which side toxic takes
        k = 1 + j % 4
        tox_val, non_val = (v, w) if j % 2 else (w, v)
        x[pos[:k], j] = tox_val
        x[neg[: 1 + (j // 4) % 3], j] = non_val
        if j % 8 == 0:  # plus true ties at the same value
            x[neg[-1], j] = tox_val
    check_auroc(x, y)


def test_auroc_one_ulp_around_zero_with_negative_subnormal():
    # The smallest negative subnormal, with the label bit cleared, is -0.0, which compares equal
    # to +0.0: ties at zero must still be counted as halves.
    d = np.nextafter(np.float32(0), np.float32(-1))
    y = np.array([0, 0, 1, 1, 0, 1])
    cols = [
        [0.0, d, 0.0, 5.0, 1.0, -1.0],
        [d, 0.0, d, 0.0, 0.0, 2.0],
        [0.0, d, d, 0.0, d, 0.0],
        [-0.0, d, 0.0, -d, 0.0, d],
    ]
    check_auroc(np.array(cols, np.float32).T, y)


def test_auroc_fortran_ordered_input():
    """ResponseStore gives [examples, neurons] views of neuron-major arrays (F-ordered)."""
    rng = np.random.default_rng(8)
    y = balanced_labels(20, rng)
    neuron_major = rng.integers(0, 4, size=(50, 20)).astype(np.float32)
    x = neuron_major.T
    assert x.flags.f_contiguous and not x.flags.c_contiguous
    check_auroc(x, y)
    check_auroc(torch.from_numpy(neuron_major).T, y)


@pytest.mark.parametrize("on_disk", [False, True])
def test_expertise_over_store_matches_sklearn(on_disk, tmp_path):
    rng = np.random.default_rng(9)
    y = balanced_labels(22, rng)
    sites = [
        Site("a", "a", "output", 0, "gate_proj", 40),
        Site("b.input", "b", "input", 0, "intermediate", 30),
    ]
    store = ResponseStore(sites, 22, directory=tmp_path if on_disk else None)
    values = {
        "a": rng.integers(0, 3, size=(22, 40)).astype(np.float32),  # ties
        "b.input": rng.standard_normal((22, 30)).astype(np.float32),
    }
    store.write(0, {k: torch.from_numpy(v[:10]) for k, v in values.items()})
    store.write(10, {k: torch.from_numpy(v[10:]) for k, v in values.items()})
    out = E.expertise(store, sites, y.tolist(), progress=False)
    for name, v in values.items():
        np.testing.assert_allclose(out[name].numpy(), sklearn_auroc(v, y), atol=1e-6, rtol=0)
        np.testing.assert_array_equal(store[name], v)  # the store is read, never rewritten
    store.close()


# ---------------------------------------------------------------- auroc errors


def test_auroc_one_class_labels():
    x = np.zeros((4, 3), np.float32)
    for y in ([1, 1, 1, 1], [0, 0, 0, 0]):
        with pytest.raises(ValueError, match="both classes"):
            E.auroc(x, y)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_auroc_non_finite(bad, dtype):
    x = np.arange(12, dtype=dtype).reshape(4, 3)
    x[2, 1] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        E.auroc(x, [0, 1, 0, 1])


@pytest.mark.parametrize("labels", [[0, 1, 2, 1], [0, 1, -1, 1], [0, 1, 0.5, 1], ["a", "b", "a", "b"]])
def test_auroc_labels_other_than_0_1(labels):
    x = np.arange(8, dtype=np.float32).reshape(4, 2)
    with pytest.raises(ValueError):
        E.auroc(x, labels)


def test_auroc_bool_labels_accepted():
    rng = np.random.default_rng(10)
    y = balanced_labels(12, rng)
    x = rng.standard_normal((12, 5)).astype(np.float32)
    np.testing.assert_allclose(E.auroc(x, y.astype(bool)).numpy(), sklearn_auroc(x, y), atol=1e-12)


@pytest.mark.parametrize(
    "shape, n_labels", [((5, 3), 4), ((3, 3), 4), ((4,), 4), ((4, 3, 1), 4)]
)
def test_auroc_shape_mismatch(shape, n_labels):
    x = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match="examples, neurons"):
        E.auroc(x, [0, 1] * (n_labels // 2))


# ---------------------------------------------------------------- select vs a plain reimplementation


def reference_select(aurocs: dict, rule: str, threshold=0.5, top_k=None, damp_factor=0.5, direction="suppress") -> dict:
    """Written from method.md, independently of the package: lists and Python sorts."""
    entries = [(name, j, float(v)) for name, t in aurocs.items() for j, v in enumerate(np.asarray(t).tolist())]
    if rule != "sgm":
        candidates = list(entries)
    else:
        keep_toxic = direction in ("suppress", "both")
        keep_anti = direction in ("amplify", "both")
        candidates = [e for e in entries if (keep_toxic and e[2] > threshold) or (keep_anti and e[2] < 1 - threshold)]
    if top_k is not None:
        # Python's sort is stable: equal scores keep site order, then neuron order.
        score = {"suppress": lambda v: v, "amplify": lambda v: 1 - v, "both": lambda v: abs(v - 0.5)}[direction]
        candidates = sorted(candidates, key=lambda e: -score(e[2]))[:top_k]
    alpha = {name: np.ones(len(np.asarray(t)), np.float64) for name, t in aurocs.items()}
    for name, j, v in candidates:
        alpha[name][j] = {"sgm": 1 - 2 * (v - 0.5), "det0": 0.0, "damp": damp_factor}[rule]
    return {k: v.astype(np.float32) for k, v in alpha.items()}


@pytest.fixture(scope="module")
def aurocs():
    rng = np.random.default_rng(11)
    grid = np.arange(0, 65) / 64  # exact multiples of 1/64: many exact ties, 0.3..0.5 present
    out = {
        "model.layers.0.mlp.gate_proj": torch.from_numpy(rng.choice(grid, 40)),
        "model.layers.0.mlp.down_proj.input": torch.from_numpy(rng.choice(grid, 64)),
        "model.layers.1.mlp.up_proj": torch.from_numpy(rng.uniform(0, 1, 33)),
    }
    out["model.layers.0.mlp.gate_proj"][:4] = torch.tensor([0.5, 1.0, 0.0, 0.3], dtype=torch.float64)
    return out


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rule": "sgm"},
        {"rule": "sgm", "threshold": 0.3},
        {"rule": "sgm", "threshold": 0.7},
        {"rule": "sgm", "threshold": 0.0},
        {"rule": "sgm", "top_k": 10},
        {"rule": "sgm", "threshold": 0.3, "top_k": 50},
        {"rule": "sgm", "top_k": 1000},  # more than there are experts
        {"rule": "det0", "top_k": 1},
        {"rule": "det0", "top_k": 25},
        {"rule": "damp", "top_k": 25},
        {"rule": "damp", "top_k": 7, "damp_factor": 0.1},
        {"rule": "det0", "top_k": 1000},
        {"rule": "sgm", "direction": "amplify"},
        {"rule": "sgm", "direction": "amplify", "threshold": 0.6},
        {"rule": "sgm", "direction": "amplify", "top_k": 9},
        {"rule": "sgm", "direction": "both"},
        {"rule": "sgm", "direction": "both", "top_k": 30},
        {"rule": "sgm", "direction": "both", "threshold": 0.7, "top_k": 5},
    ],
)
def test_select_matches_reference(aurocs, kwargs):
    before = {k: v.clone() for k, v in aurocs.items()}
    got = E.select(aurocs, SelectionOptions(**kwargs))
    want = reference_select(aurocs, **kwargs)
    assert list(got) == list(aurocs)
    for name in aurocs:
        assert got[name].dtype == torch.float32 and got[name].shape == aurocs[name].shape
        np.testing.assert_array_equal(got[name].numpy(), want[name], err_msg=f"{kwargs} {name}")
        assert torch.equal(aurocs[name], before[name])  # input untouched


def test_select_sgm_formula_values(aurocs):
    a = E.select(aurocs, SelectionOptions(rule="sgm"))["model.layers.0.mlp.gate_proj"]
    # AUROC 0.5 is not an expert (strictly above threshold), 1.0 is silenced, 0 and 0.3 untouched
    assert a[:4].tolist() == [1.0, 0.0, 1.0, 1.0]
    a3 = E.select(aurocs, SelectionOptions(rule="sgm", threshold=0.3))["model.layers.0.mlp.gate_proj"]
    assert a3[3].item() == 1.0  # 0.3 is not above 0.3
    amplified = a3[(aurocs["model.layers.0.mlp.gate_proj"] > 0.3) & (aurocs["model.layers.0.mlp.gate_proj"] < 0.5)]
    assert len(amplified) > 0 and bool((amplified > 1).all())  # the precursor's threshold amplifies


def test_select_topk_counts(aurocs):
    for rule in ("det0", "damp"):
        alpha = E.select(aurocs, SelectionOptions(rule=rule, top_k=25))
        changed = sum(int((v != 1).sum()) for v in alpha.values())
        assert changed == 25
    flat = torch.cat(list(aurocs.values()))
    alpha = torch.cat(list(E.select(aurocs, SelectionOptions(rule="det0", top_k=25)).values()))
    # every zeroed neuron has AUROC >= every untouched one
    assert flat[alpha == 0].min() >= flat[alpha == 1].max()


def test_amplify_only_raises_and_both_is_the_union(aurocs):
    amp = E.select(aurocs, SelectionOptions(direction="amplify"))
    sup = E.select(aurocs, SelectionOptions(direction="suppress"))
    both = E.select(aurocs, SelectionOptions(direction="both"))
    for name, a in aurocs.items():
        assert bool((amp[name] >= 1).all()) and bool((amp[name][a < 0.5] > 1).all())
        assert bool((sup[name] <= 1).all())
        union = torch.where(sup[name] != 1, sup[name], amp[name])
        assert torch.equal(both[name], union)


def test_det0_refuses_amplify():
    with pytest.raises(ValueError, match="only suppresses"):
        SelectionOptions(rule="det0", top_k=3, direction="amplify")


@pytest.mark.parametrize("direction", ["suppress", "amplify", "both"])
def test_select_thresholds_are_strict(direction):
    """AUROC exactly at the threshold (or at 1 - threshold) is no expert: 0.75 and 0.25 are exact
    in binary, so the comparison itself decides."""
    aurocs = {"s": torch.tensor([0.25, 0.75, 0.2, 0.8, 0.5], dtype=torch.float64)}
    got = E.select(aurocs, SelectionOptions(rule="sgm", threshold=0.75, direction=direction))["s"]
    want = reference_select(aurocs, "sgm", threshold=0.75, direction=direction)["s"]
    np.testing.assert_array_equal(got.numpy(), want)
    assert got[0] == got[1] == 1.0


def test_nontoxic_mean_is_the_float64_mean_over_the_non_toxic_rows():
    rng = np.random.default_rng(5)
    labels = np.array([1, 0, 0, 1, 0, 1, 0])
    store = {"a": rng.normal(3.0, 1.0, (7, 5)).astype(np.float32), "b": rng.normal(0, 1e3, (7, 2)).astype(np.float32)}
    sites = [Site(name=n, layer=0, module="m", module_path="p", kind="output", width=v.shape[1]) for n, v in store.items()]
    got = E.nontoxic_mean(store, sites, labels)
    for n, v in store.items():
        want = np.array([sum(float(v[i, j]) for i in (1, 2, 4, 6)) / 4 for j in range(v.shape[1])], dtype=np.float32)
        assert got[n].dtype == torch.float32 and np.array_equal(got[n].numpy(), want), n
