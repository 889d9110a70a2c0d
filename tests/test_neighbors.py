"""NearestNeighborIndex against brute force numpy; faiss vs torch; exclusion; band pair streams."""
from __future__ import annotations

import numpy as np
import pytest

from side_extract.neighbors import NearestNeighborIndex, pixel_rows

BACKENDS = ["torch", "faiss"]


def brute_rms(q: np.ndarray, r: np.ndarray, scale: float) -> np.ndarray:
    d = q.astype(np.float64)[:, None, :] - r.astype(np.float64)[None, :, :]
    return np.sqrt((d**2).mean(-1)) / scale


def brute_cos(q: np.ndarray, r: np.ndarray) -> np.ndarray:
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    rn = r / np.linalg.norm(r, axis=1, keepdims=True)
    return qn @ rn.T


@pytest.fixture
def pixels():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (120, 48), dtype=np.uint8), rng.integers(0, 256, (90, 48), dtype=np.uint8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunks", [(1024, 8192), (17, 23)])
def test_rms_l2_uint8_matches_brute_force_exactly(pixels, backend, chunks):
    ref, q = pixels
    idx = NearestNeighborIndex("rms-l2", backend=backend, query_chunk=chunks[0], ref_chunk=chunks[1]).fit(ref)
    nb = idx.kneighbors(q, 5)
    d = brute_rms(q, ref, 255.0)
    order = np.argsort(d, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(nb.indices, order)
    np.testing.assert_allclose(nb.scores, np.take_along_axis(d, order, 1), rtol=0, atol=1e-12)
    assert (np.diff(nb.scores, axis=1) >= 0).all()  # k > 1: ascending distances


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_l2_float_pixels_and_large_d(backend):
    rng = np.random.default_rng(1)
    ref, q = rng.random((60, 300)), rng.random((40, 300))  # D > 129: the float64 path
    nb = NearestNeighborIndex("rms-l2", backend=backend, ref_chunk=16).fit(ref).kneighbors(q, 3)
    d = brute_rms(q, ref, 1.0)
    np.testing.assert_array_equal(nb.indices, np.argsort(d, 1)[:, :3])
    np.testing.assert_allclose(nb.scores, np.sort(d, 1)[:, :3], atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cosine_matches_brute_force(backend):
    rng = np.random.default_rng(2)
    ref, q = rng.normal(size=(150, 16)).astype(np.float32), rng.normal(size=(70, 16)).astype(np.float32)
    nb = NearestNeighborIndex("cosine", backend=backend, query_chunk=32, ref_chunk=40).fit(ref).kneighbors(q, 4)
    s = brute_cos(q.astype(np.float64), ref.astype(np.float64))
    order = np.argsort(-s, 1)[:, :4]
    np.testing.assert_array_equal(nb.indices, order)
    np.testing.assert_allclose(nb.scores, np.take_along_axis(s, order, 1), atol=1e-5)
    assert (np.diff(nb.scores, axis=1) <= 0).all()  # k > 1: descending similarities


def test_faiss_and_torch_agree(pixels):
    ref, q = pixels
    a = NearestNeighborIndex("rms-l2", backend="faiss").fit(ref).kneighbors(q, 7)
    b = NearestNeighborIndex("rms-l2", backend="torch", ref_chunk=50).fit(ref).kneighbors(q, 7)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.scores, b.scores)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exclude_self_on_train_vs_train(pixels, backend):
    ref, _ = pixels
    ref = np.concatenate([ref, ref[:3]])  # rows 120..122 duplicate rows 0..2
    nb = NearestNeighborIndex("rms-l2", backend=backend, ref_chunk=37).fit(ref).kneighbors(ref, 2, exclude_self=True)
    d = brute_rms(ref, ref, 255.0)
    np.fill_diagonal(d, np.inf)
    assert not (nb.indices == np.arange(len(ref))[:, None]).any()
    np.testing.assert_allclose(nb.scores, np.sort(d, 1)[:, :2], atol=1e-12)
    assert nb.indices[0, 0] == 120 and nb.scores[0, 0] == 0.0 and nb.indices[120, 0] == 0


def test_exact_copy_distance_is_zero_and_ties_by_index():
    ref = np.zeros((4, 64), np.uint8)
    ref[1:] = 7
    nb = NearestNeighborIndex("rms-l2").fit(ref).kneighbors(ref[1:2], 3)
    np.testing.assert_array_equal(nb.indices, [[1, 2, 3]])
    np.testing.assert_array_equal(nb.scores, [[0.0, 0.0, 0.0]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_training_images_tie_to_the_lowest_rows_whatever_the_chunking(backend):
    # Row 3 of the reference stored six more times: a near copy of it is equally near all seven (exactly: uint8
    # rows under rms-l2; a cosine's float32 products of equal rows can differ in their last bit), and the nearest
    # must be row 3 (then the next copies in row order) for every chunking, k and exclusion; torch.topk had picked
    # any of them, so the distinct nearest training images of one copied image counted up to five.
    metric = "rms-l2"
    rng = np.random.default_rng(1)
    ref = rng.integers(0, 256, (1000, 48), dtype=np.uint8)
    copies = [3, 130, 377, 512, 777, 901, 999]
    ref[copies] = ref[3]
    q = np.clip(ref[3].astype(int) + rng.integers(-3, 4, (400, 48)), 0, 255).astype(np.uint8)
    for query_chunk, ref_chunk in [(1024, 8192), (64, 128), (7, 50), (400, 333)]:
        index = NearestNeighborIndex(metric, backend=backend, query_chunk=query_chunk, ref_chunk=ref_chunk).fit(ref)
        for k in (1, 2, 3, 7, 9):
            nb = index.kneighbors(q, k)
            np.testing.assert_array_equal(nb.indices[:, :min(k, 7)], np.tile(copies[:k], (len(q), 1)))
        nb = index.kneighbors(q, 2, exclude=np.full(len(q), 3))
        np.testing.assert_array_equal(nb.indices, np.tile([130, 377], (len(q), 1)))


def _unit64(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.float64)
    return v / np.maximum(np.sqrt((v * v).sum(1, keepdims=True)), 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cosine_nearest_is_the_float64_best_whatever_the_backend_and_chunking(backend):
    """Under cosine the k nearest are the float64 best, ties to the lowest rows, on every path. The float32 block
    products picked them, then rescored only what they picked: of a training image stored seven times, the copy
    "nearest" a near copy of it changed with the backend and the chunking (a review counted 150, 152 or 170
    distinct nearest training images in one evaluation), and of two rows 1.6e-9 apart across a band's edge the
    lower could be nearest, its generation counted in the lower band for AMS and in the higher for UMS."""
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(1000, 48)).astype(np.float32)
    copies = [3, 130, 377, 512, 777, 901, 999]
    ref[copies] = ref[3]
    q = (ref[3] + 0.05 * rng.normal(size=(300, 48))).astype(np.float32)
    exact = _unit64(q) @ _unit64(ref).T
    for query_chunk, ref_chunk in [(1024, 8192), (64, 128), (7, 50), (300, 333)]:
        index = NearestNeighborIndex("cosine", backend=backend, query_chunk=query_chunk, ref_chunk=ref_chunk).fit(ref)
        for k in (1, 2, 7, 9):
            nb = index.kneighbors(q, k)
            np.testing.assert_array_equal(nb.indices[:, :min(k, 7)], np.tile(copies[:k], (len(q), 1)))
            want = np.lexsort((np.broadcast_to(np.arange(1000), exact.shape), -exact), axis=-1)[:, :k]
            np.testing.assert_array_equal(nb.indices, want)
        nb = index.kneighbors(q, 2, exclude=np.full(len(q), 3))
        np.testing.assert_array_equal(nb.indices, np.tile([130, 377], (len(q), 1)))
    # two rows at cosine 0.6 -/+ 8e-10 to the query, beside 100 far rows: the nearest is the higher one
    g = np.zeros((1, 64))
    g[0, 0] = 1.0
    near = np.zeros((2, 64))
    for i, c in enumerate((0.6 - 8e-10, 0.6 + 8e-10)):
        near[i, 0], near[i, 1 + i] = c, np.sqrt(1 - c * c)
    far = np.zeros((100, 64))
    far[:, 0], far[:, 10] = -0.99, np.sqrt(1 - 0.99**2)
    rows = np.concatenate([near, far]).astype(np.float64)
    nb = NearestNeighborIndex("cosine", backend=backend).fit(rows).kneighbors(g, 1)
    assert nb.indices[0, 0] == 1 and nb.scores[0, 0] == (_unit64(g) @ _unit64(rows[1:2]).T)[0, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_cosine_widening_honours_each_querys_own_exclusion_and_is_bounded(backend, monkeypatch):
    """A review of the widening: with an exclude array, a query marked -1 (no exclusion) was widened only up to
    n - 1 candidates, so one row was never searched (six rows equal in float32, the last nudged 1e-10 nearer in
    float64: row 0 came out for exclude=[-1], row 5 without exclude); and queries whose k-th lay within float32
    rounding of many rows (zero rows: every score 0) were widened round after round up to every row (27 s for
    0.4 s). Each group is widened up to the rows it may match, once, to k + COSINE_WIDEN candidates at most."""
    from side_extract import neighbors

    q = np.zeros((1, 32))
    q[0, 0] = 1.0
    ref = np.tile(np.r_[0.6, 0.8, np.zeros(30)], (6, 1))
    ref[5, 0] += 1e-10
    index = NearestNeighborIndex("cosine", backend=backend).fit(ref)
    assert index.kneighbors(q, 1).indices[0, 0] == 5
    assert index.kneighbors(q, 1, exclude=np.array([-1])).indices[0, 0] == 5
    assert index.kneighbors(q, 1, exclude=np.array([5])).indices[0, 0] == 0
    fetched = []
    search = neighbors.NearestNeighborIndex._search
    monkeypatch.setattr(neighbors.NearestNeighborIndex, "_search",
                        lambda self, Q, k, *a, **kw: fetched.append(k) or search(self, Q, k, *a, **kw))
    rng = np.random.default_rng(0)
    big = NearestNeighborIndex("cosine", backend=backend).fit(rng.normal(size=(2000, 16)).astype(np.float32))
    nb = big.kneighbors(np.zeros((3, 16), np.float32), 2)  # every score exactly 0: ties to the lowest rows
    assert nb.indices.tolist() == [[0, 1]] * 3 and (nb.scores == 0).all()
    assert fetched == [2 + neighbors.COSINE_EXTRA, 2 + neighbors.COSINE_WIDEN], fetched


def test_exclude_array(pixels):
    ref, q = pixels
    ex = np.full(len(q), -1)
    first = NearestNeighborIndex("rms-l2").fit(ref).kneighbors(q, 1).indices[:, 0]
    ex[::2] = first[::2]
    nb = NearestNeighborIndex("rms-l2").fit(ref).kneighbors(q, 1, exclude=ex)
    assert (nb.indices[::2, 0] != first[::2]).all()
    np.testing.assert_array_equal(nb.indices[1::2, 0], first[1::2])


@pytest.mark.parametrize("metric,lo,hi", [("rms-l2", 0.38, 0.41), ("rms-l2", -np.inf, 0.39), ("cosine", 0.2, np.inf)])
def test_pairs_within_matches_brute_force(pixels, metric, lo, hi):
    ref, q = pixels
    if metric == "cosine":
        ref, q = ref.astype(np.float32) - 127.5, q.astype(np.float32) - 127.5
        s = brute_cos(q.astype(np.float64), ref.astype(np.float64))
    else:
        s = brute_rms(q, ref, 255.0)
    idx = NearestNeighborIndex(metric, query_chunk=25, ref_chunk=33).fit(ref)
    got = {(int(a), int(b)) for qa, rb, _ in idx.pairs_within(q, lo, hi) for a, b in zip(qa, rb)}
    inside = (s >= lo) & (s <= hi)
    want = set(zip(*map(lambda v: v.tolist(), np.nonzero(inside))))
    # cosine in float32 may differ from float64 within 1e-6 of an edge
    near_edge = (np.abs(s - lo) < 1e-5) | (np.abs(s - hi) < 1e-5)
    assert got ^ want <= set(zip(*map(lambda v: v.tolist(), np.nonzero(near_edge))))
    assert len(want) > 0


@pytest.mark.parametrize("metric,lo,hi", [("rms-l2", 1e-4, np.inf), ("cosine", -np.inf, 1.0)])
def test_excluded_pairs_stay_out_when_a_side_is_open(pixels, metric, lo, hi):
    """With ``exclude_self`` and a range open on one side, every pair but the excluded ones (a row with itself) is
    streamed; the excluded pairs used to come out too, as cosine -1 or distance inf."""
    ref, _ = pixels
    if metric == "cosine":
        ref = ref.astype(np.float32) - 127.5
    idx = NearestNeighborIndex(metric, query_chunk=25, ref_chunk=33).fit(ref)
    got = [(int(a), int(b), float(v)) for qa, rb, sc in idx.pairs_within(ref, lo, hi, exclude_self=True)
           for a, b, v in zip(qa, rb, sc)]
    n = len(ref)
    assert {(a, b) for a, b, _ in got} == {(a, b) for a in range(n) for b in range(n) if a != b}
    assert all(np.isfinite(v) for _, _, v in got)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pairs_in_the_same_pass_as_kneighbors(pixels, backend):
    ref, q = pixels
    idx = NearestNeighborIndex("rms-l2", backend=backend, query_chunk=40, ref_chunk=50).fit(ref)
    seen = []
    nb = idx.kneighbors(q, 2, pairs_range=(0.0, 0.39), on_pairs=lambda a, b, c: seen.append((a, b, c)))
    pairs = {(a, b) for s in seen for a, b in zip(s[0].tolist(), s[1].tolist())}
    d = brute_rms(q, ref, 255.0)  # the pairs and neighbours against brute force, not against the index itself
    want = set(zip(*map(lambda v: v.tolist(), np.nonzero(d <= 0.39))))
    assert len(want) > 0 and pairs == want  # (no distance lies within 1e-9 of 0.39 here)
    assert np.abs(d - 0.39).min() > 1e-9
    np.testing.assert_allclose(nb.scores, np.sort(d, axis=1)[:, :2], rtol=1e-12)


def test_errors(pixels):
    ref, q = pixels
    with pytest.raises(ValueError, match="not fitted"):
        NearestNeighborIndex().kneighbors(q)
    with pytest.raises(ValueError, match="metric='l1'"):
        NearestNeighborIndex("l1").fit(ref)
    with pytest.raises(ValueError, match="backend='annoy'"):
        NearestNeighborIndex(backend="annoy").fit(ref)
    idx = NearestNeighborIndex("rms-l2").fit(ref)
    with pytest.raises(ValueError, match="k=121"):
        idx.kneighbors(q, 121)
    with pytest.raises(ValueError, match="k=120 must be between 1 and 119"):
        idx.kneighbors(ref, 120, exclude_self=True)
    with pytest.raises(ValueError, match="47 values per row"):
        idx.kneighbors(q[:, :47])
    with pytest.raises(ValueError, match="exclude_self"):
        idx.kneighbors(q, exclude_self=True)
    with pytest.raises(ValueError, match="lo=1"):
        idx.pairs_within(q, 1, 0)
    for backend in BACKENDS:  # (were "need at least one array to concatenate" and faiss's own)
        with pytest.raises(ValueError, match=r"Q has no rows: it needs at least one \(n, D\) row"):
            NearestNeighborIndex("rms-l2", backend=backend).fit(ref).kneighbors(q[:0])
    with pytest.raises(ValueError, match="X has no rows"):
        NearestNeighborIndex("rms-l2").fit(ref[:0])
    feats = q.astype(np.float32)
    feats[7, 3] = np.nan  # a NaN row would rank first (topk) and hide every query's true neighbour
    with pytest.raises(ValueError, match=r"non-finite values in 1 of its 90 rows \(the first: \[7\]\)"):
        NearestNeighborIndex("cosine").fit(feats)
    with pytest.raises(ValueError, match="Q holds non-finite"):
        NearestNeighborIndex("cosine").fit(ref.astype(np.float32)).kneighbors(feats)


def test_pixel_rows():
    images = np.arange(2 * 3 * 4 * 1, dtype=np.uint8).reshape(2, 3, 4, 1)
    rows = pixel_rows(images)
    assert rows.shape == (2, 12) and rows.dtype == np.uint8
    assert rows[0].tolist() == list(range(12)) and rows[1].tolist() == list(range(12, 24))  # each image, in order


def _near_ties(seed: int, n_queries: int = 32, d: int = 3072):
    """Each query q has two reference rows far from it (squared sums near 10^8, where float32 steps by 8): a, and b
    = a with one value moved onto q's, which was one grey level off, so b is nearer by exactly 1. b comes second."""
    rng = np.random.default_rng(seed)
    Q = rng.integers(0, 256, (n_queries, d), dtype=np.uint8)
    refs = []
    for q in Q:
        a = np.where(q < 128, rng.integers(200, 256, d), rng.integers(0, 56, d)).astype(np.int64)
        j = rng.integers(d)
        a[j] = q[j] + (1 if q[j] < 255 else -1)
        b = a.copy()
        b[j] = q[j]
        refs += [a, b]
    R = np.array(refs, np.uint8)
    exact = ((Q[:, None].astype(np.int64) - R[None].astype(np.int64)) ** 2).sum(-1)
    return Q, R, exact


def test_faiss_chooses_the_exact_nearest_between_near_ties_past_float32(monkeypatch):
    """faiss picks its top k in float32, which for uint8 rows of more than 129 values is no longer exact: it could
    return a row whose exact squared sum exceeded another's by 1, and only the k rows it picked were recomputed
    exactly (the module promises neighbours that do not depend on the backend)."""
    import side_extract.neighbors as neighbors

    Q, R, exact = _near_ties(0)
    order = np.lexsort((np.broadcast_to(np.arange(len(R)), exact.shape), exact), axis=1)
    for k in (1, 2, 3):
        nb = NearestNeighborIndex("rms-l2", backend="faiss").fit(R).kneighbors(Q, k)
        np.testing.assert_array_equal(nb.indices, order[:, :k])
        np.testing.assert_array_equal(nb.indices, NearestNeighborIndex("rms-l2", backend="torch").fit(R)
                                      .kneighbors(Q, k).indices)
    # the rows faiss leaves unfetched are bounded too: a query whose k-th is not surely below them is searched
    # again exactly (here every one, with the bound made huge), and gives the same answer
    ref = NearestNeighborIndex("rms-l2", backend="torch").fit(R).kneighbors(Q, 2, exclude=order[:, 0])
    searched = []
    scan = neighbors.NearestNeighborIndex._torch_scan
    monkeypatch.setattr(neighbors, "_float32_sq_error", lambda d, q_sq, r_sq: np.full(len(q_sq), 1e30))
    monkeypatch.setattr(neighbors.NearestNeighborIndex, "_torch_scan",
                        lambda self, q, *a: searched.append(len(q)) or scan(self, q, *a))
    got = NearestNeighborIndex("rms-l2", backend="faiss", ref_chunk=20).fit(R).kneighbors(Q, 2, exclude=order[:, 0])
    assert searched == [len(Q)]
    np.testing.assert_array_equal(got.indices, ref.indices)
    np.testing.assert_array_equal(got.scores, ref.scores)


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_and_exclude_misstated_are_named(backend):
    """An independent review's finds: a numpy integer k was faiss's SWIG TypeError (and True ran as k = 1 there);
    exclude took 1.7 as row 1, and a row past the fitted ones excluded nothing, without a word."""
    ref = np.arange(20, dtype=np.uint8).reshape(5, 4)
    idx = NearestNeighborIndex("rms-l2", backend=backend).fit(ref)
    np.testing.assert_array_equal(idx.kneighbors(ref[[1, 3]], np.int64(2)).indices, [[1, 0], [3, 2]])
    with pytest.raises(ValueError, match="k=True must be an integer number of neighbours"):
        idx.kneighbors(ref[[1, 3]], True)
    with pytest.raises(ValueError, match="exclude must hold integer row numbers, got float64"):
        idx.kneighbors(ref[[1, 3]], 1, exclude=np.array([1.7, 3.2]))
    with pytest.raises(ValueError, match=r"exclude holds \[5, -2\]: each must be a fitted row, 0..4, or -1"):
        idx.kneighbors(ref[[1, 3]], 1, exclude=np.array([5, -2]))
    np.testing.assert_array_equal(idx.kneighbors(ref[[1, 3]], 1, exclude=np.array([1, -1])).indices, [[0], [3]])


@pytest.mark.parametrize("metric", ["cosine", "rms-l2"])
def test_float_rows_score_each_pair_alike_on_every_path(metric):
    """A pair's score is the same float64 number from faiss and torch, in the k nearest and in the band pairs of the
    same pass: a generation's nearest counted in a band for AMS is in that band for UMS too. The scores were float32
    (cosine: faiss's inner product and torch's matrix product, 1e-7 apart) or the expansion |q|^2 + |r|^2 - 2 q.r
    on one path and direct differences on the other (float pixels), so a score on a band's edge fell on either side
    of it by path."""
    rng = np.random.default_rng(7)
    if metric == "cosine":
        ref, q = rng.normal(size=(200, 96)).astype(np.float32), rng.normal(size=(60, 96)).astype(np.float32)
        s = brute_cos(q.astype(np.float64), ref.astype(np.float64))
        rng_ = (0.05, np.inf)
    else:
        ref, q = rng.random((200, 96)), rng.random((60, 96))
        s = brute_rms(q, ref, 1.0)
        rng_ = (-np.inf, 0.405)
    out = {}
    for backend in BACKENDS:
        seen = {}
        nb = NearestNeighborIndex(metric, backend=backend, query_chunk=16, ref_chunk=48).fit(ref).kneighbors(
            q, 3, pairs_range=rng_, on_pairs=lambda a, b, c: seen.update(zip(zip(a.tolist(), b.tolist()), c)))
        for i in range(len(q)):  # the k nearest's scores are the pairs' own, bit for bit
            for j, v in zip(nb.indices[i], nb.scores[i]):
                if rng_[0] <= v <= rng_[1]:
                    assert seen[(i, int(j))] == v
        out[backend] = nb, seen
        # float64 scores: within 1e-12 of a float64 reference (float32 ones were ~1e-7 off)
        np.testing.assert_allclose(nb.scores, np.take_along_axis(s, nb.indices, 1), rtol=0, atol=1e-12)
        got = np.array([seen[p] for p in sorted(seen)])
        np.testing.assert_allclose(got, np.array([s[p] for p in sorted(seen)]), rtol=0, atol=1e-12)
    (a, pa), (b, pb) = out["faiss"], out["torch"]
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert pa == pb and len(pa) > 0


def test_faiss_takes_queries_in_chunks_bounded_in_bytes(monkeypatch):
    """faiss's query chunk holds at most ``FAISS_QUERY_BYTES`` of float32 rows (or ``query_chunk`` rows, the larger):
    it took 65,536 rows whatever their size, a float32 copy growing with the generations (491 MB for 40,000 rows of
    3,072 values; a review's find), and ``query_chunk`` did not bound it."""
    import side_extract.neighbors as nbm

    rng = np.random.default_rng(3)
    ref, q = rng.integers(0, 256, (30, 48), dtype=np.uint8), rng.integers(0, 256, (100, 48), dtype=np.uint8)
    sizes = []
    real = nbm.NearestNeighborIndex._faiss_rows
    monkeypatch.setattr(nbm.NearestNeighborIndex, "_faiss_rows", lambda self, rows: sizes.append(len(rows)) or real(
        self, rows))
    monkeypatch.setattr(nbm, "FAISS_QUERY_BYTES", 4 * 48 * 10)  # ten rows' worth
    idx = NearestNeighborIndex("rms-l2", backend="faiss", query_chunk=4).fit(ref)
    nb = idx.kneighbors(q, 2)
    assert sizes[0] == 30 and max(sizes[1:]) == 10 and sum(sizes[1:]) == 100
    want = NearestNeighborIndex("rms-l2", backend="torch").fit(ref).kneighbors(q, 2)
    np.testing.assert_array_equal(nb.indices, want.indices)
    np.testing.assert_array_equal(nb.scores, want.scores)
    sizes.clear()
    NearestNeighborIndex("rms-l2", backend="faiss", query_chunk=25).fit(ref).kneighbors(q, 2)
    assert max(sizes[1:]) == 25  # query_chunk above the bytes' bound: query_chunk


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_the_k_nearest_put_in_order_a_block_of_rows_at_a_time_are_the_same(monkeypatch, backend):
    """The k nearest of every query are ordered a block of query rows at a time (whole-array sort orders and copies
    were the peak of a large evaluation): blocks of 3 rows give the same scores and rows, ties by reference row."""
    from side_extract import neighbors

    rng = np.random.default_rng(5)
    ref = rng.integers(0, 4, (60, 2, 2, 1), dtype=np.uint8)  # few levels: many exact ties
    q = rng.integers(0, 4, (20, 2, 2, 1), dtype=np.uint8)
    whole = NearestNeighborIndex("rms-l2", backend=backend).fit(pixel_rows(ref)).kneighbors(pixel_rows(q), 7)
    monkeypatch.setattr(neighbors, "FINISH_ROWS", 3)
    blocks = NearestNeighborIndex("rms-l2", backend=backend).fit(pixel_rows(ref)).kneighbors(pixel_rows(q), 7)
    assert np.array_equal(whole.scores, blocks.scores) and np.array_equal(whole.indices, blocks.indices)
    d = np.sqrt(((pixel_rows(q)[:, None].astype(float) - pixel_rows(ref)[None].astype(float)) ** 2).mean(-1)) / 255
    ties = np.lexsort((np.broadcast_to(np.arange(60), d.shape), d), axis=-1)[:, :7]  # by distance, then row
    assert np.array_equal(blocks.indices, ties)
    f_ref, f_q = rng.normal(size=(60, 5)).astype(np.float32), rng.normal(size=(20, 5)).astype(np.float32)
    f_ref[30:] = f_ref[:30]  # float rows (rescored in float64 per pair), with exact duplicates: ties by row
    cos = NearestNeighborIndex("cosine", backend=backend).fit(f_ref).kneighbors(f_q, 7)
    monkeypatch.setattr(neighbors, "FINISH_ROWS", 4096)
    whole = NearestNeighborIndex("cosine", backend=backend).fit(f_ref).kneighbors(f_q, 7)
    assert np.array_equal(cos.indices, whole.indices) and np.array_equal(cos.scores, whole.scores)
    assert all((r[:-1] < r[1:])[s[:-1] == s[1:]].all() for r, s in zip(cos.indices, cos.scores))  # ties by row
    unit = lambda v: v.astype(np.float64) / np.linalg.norm(v.astype(np.float64), axis=1, keepdims=True)  # noqa: E731
    c = unit(f_q) @ unit(f_ref).T
    assert np.allclose(cos.scores, -np.sort(-c, axis=1)[:, :7], rtol=0, atol=1e-12)


def test_neighbors_faults_of_a_review():
    """Across reference chunks faiss's results were merged by a stable sort of the keys, keeping faiss's own order of
    exact ties: the higher of two identical rows could win, where the torch search (and the docstring) keeps the
    lower. kneighbors took a pairs_range with lo > hi or a NaN end (torch streamed no pair; faiss refused it after
    its search), which pairs_within refuses."""
    pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(2000, 200)).astype(np.float32)
    # a zero query: every cosine score is exactly 0, whatever the BLAS (identical rows' float32 scores need not be)
    zero = NearestNeighborIndex("cosine", backend="faiss", ref_chunk=3).fit(ref[:30]).kneighbors(np.zeros((1, 200),
                                                                                                       np.float32), 4)
    assert (zero.scores == 0).all() and zero.indices[0].tolist() == [0, 1, 2, 3]  # (the lowest rows)
    for backend in ("faiss", "torch"):
        index = NearestNeighborIndex("rms-l2", backend=backend).fit(ref[:20])
        for bad in ((0.3, 0.0), (float("nan"), 0.3), (0.0, float("nan"))):
            with pytest.raises(ValueError, match="lo <= hi"):
                index.kneighbors(ref[:2], 1, pairs_range=bad, on_pairs=lambda a, b, c: None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cosine_pairs_far_from_every_band_edge_keep_their_keys_score_and_fall_in_the_same_bands(backend, monkeypatch):
    """Every in-range pair under cosine was scored again in float64 from both rows: with the paper's bands, which hold
    most pairs, an evaluation of 500 generations against 5,000 images took 33 s instead of 0.6 s (a review's find).
    Given the edges its caller compares with (a tally's band ends), only the pairs within the float32 keys' rounding
    of one are scored again; every band holds the same pairs as with all of them scored in float64, pairs lying
    exactly on an edge included."""
    from side_extract.metrics import Band, BandTally

    rng = np.random.default_rng(3)
    ref = np.abs(rng.standard_normal((300, 64))).astype(np.float32)
    q = np.abs(rng.standard_normal((40, 64))).astype(np.float32)
    q[:5] = ref[:5] * 3  # copies: cosine 1
    index = NearestNeighborIndex("cosine", backend=backend, query_chunk=16, ref_chunk=64).fit(ref)
    scores = np.concatenate([s for _, _, s in index.pairs_within(q, -1.0, 1.0)])
    lo, mid = np.quantile(scores, 0.2), np.quantile(scores, 0.6)
    lo, mid = scores[np.argmin(np.abs(scores - lo))], scores[np.argmin(np.abs(scores - mid))]  # edges on pairs
    bands = [Band("low", float(lo), float(mid)), Band("mid", float(mid), 0.9), Band("high", 0.9, 1.0)]
    rescored = []
    real = NearestNeighborIndex._pair_scores
    monkeypatch.setattr(NearestNeighborIndex, "_pair_scores",
                        lambda self, Q, a, b: rescored.append(len(a)) or real(self, Q, a, b))
    tallies = []
    for edges in (None, "given"):
        tally = BandTally(bands, "similarity", len(q), len(ref))
        rescored.clear()
        index.kneighbors(q, 1, pairs_range=tally.pairs_range, on_pairs=tally.add,
                         pairs_edges=None if edges is None else tally.pairs_edges)
        tallies.append((tally, sum(rescored)))
    (every, all_pairs), (given, near) = tallies
    assert given.ums() == every.ums() and given.ums_cumulative() == every.ums_cumulative()
    for b in bands:
        np.testing.assert_array_equal(given.exclusive[b.name].counts, every.exclusive[b.name].counts)
    in_range = int((scores >= lo).sum())
    assert all_pairs >= in_range and 2 <= near < in_range / 10, (near, in_range)  # the pairs on the edges, the
    # copies at 1 and the k-nearest's own rescoring (one per query) among them


def test_a_block_of_large_rows_is_bounded_in_bytes_not_only_in_rows(monkeypatch):
    """ref_chunk counted rows only: 8,192 reference rows of 64x64 RGB pixels were 805 MB as float64, twice over with
    their squares (an evaluation of 10,000 such images peaked at 2.3 GB; a review's find). A block holds at most
    BLOCK_BYTES of prepared rows, and the neighbours are those of any chunking."""
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (3000, 3 * 64 * 64), dtype=np.uint8)
    q = np.concatenate([ref[:3], rng.integers(0, 256, (5, ref.shape[1]), dtype=np.uint8)])
    held = []
    real = NearestNeighborIndex._prep
    monkeypatch.setattr(NearestNeighborIndex, "_prep", lambda self, rows: held.append(rows.shape) or real(self, rows))
    nb = NearestNeighborIndex("rms-l2", backend="torch").fit(ref).kneighbors(q, 2)
    assert max(n * d * 8 for n, d in held) <= 128 * 2**20  # (float64 rows: more than 129 values; 295 MB before)
    small = NearestNeighborIndex("rms-l2", backend="torch", query_chunk=3, ref_chunk=700).fit(ref).kneighbors(q, 2)
    np.testing.assert_array_equal(nb.indices, small.indices)
    np.testing.assert_array_equal(nb.scores, small.scores)
    assert nb.indices[:3, 0].tolist() == [0, 1, 2] and (nb.scores[:3, 0] == 0).all()
