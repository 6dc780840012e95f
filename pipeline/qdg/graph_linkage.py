"""Average linkage on a sparse kNN graph, and a cut the data chooses: ``cluster.method: knn_average``.

Why this module exists. Average linkage keeps Zipf-sized quanta whole where spectral
clustering and modularity split the largest ones (README "Which clustering"), but scipy's
and sklearn's average linkage need every pairwise distance: N^2 / 2 numbers, 40 GB at
N = 10^5. This module runs average linkage on the kNN graph alone (similarity.mode: knn),
in O(E) memory for E edges.

The linkage. Two clusters are as similar as the mean weight of the kNN edges that join
them; clusters with no edge between them are not compared. When the graph is complete this
is exactly UPGMA on the distance 1 - weight (tests/test_graph_linkage.py checks it against
scipy). Missing edges are left out of the mean rather than counted as 0: a quantum of 5,000
samples has 30 edges per sample inside it, so counting the absent 4,970 as zeros would make
its two halves look unrelated and split it, while the mean over the edges present stays
the within-quantum similarity whatever the quantum's size.

The algorithm: reciprocal nearest neighbours, in rounds. Every cluster finds its most
similar neighbour; every pair that chose each other is merged, all at once, and the edges
are summed into the merged clusters (weight sums and edge counts, so the mean stays exact).
A merged cluster's similarity to any other is a weighted mean of its parts' similarities,
never above the larger of them (the linkage is *reducible*), so merging reciprocal pairs
in any order builds the same tree as merging the single best pair at a time (Murtagh,
"Multidimensional clustering algorithms", 1985; the nearest-neighbour-chain argument).
Each round is one sort of the edge list in numpy, and the graph shrinks as it merges; once
rounds merge few pairs, a heap merges the rest one pair at a time (:func:`average_linkage_tree`).
Written here because neither scipy nor sklearn has it: sklearn's AgglomerativeClustering
with a connectivity matrix weighs the merged parts' similarities by their sizes (not their
edge counts), takes one part's value where only it has an edge, and completes a
disconnected graph from the features (dense).

The cut (:func:`excess_of_mass`). On the tree, a cluster lives from the similarity at
which it separates from the rest to the one at which it splits into two clusters of at
least ``min_cluster_size`` or falls apart; its stability is the sum, over its samples, of
how long (in similarity) each stays in it. The cut keeps the set of clusters, none inside
another, of the largest total stability, and samples in none of them are unassigned (-1).
This is HDBSCAN's excess-of-mass selection (Campello, Moulavi & Sander, 2013), read on the
similarity scale (lambda = the edge weight, 1 for identical gradients, 0 for orthogonal)
rather than HDBSCAN's 1/distance: 1/distance grows without bound as gradients coincide,
so a tight core inside a quantum outweighs the quantum and the cut splits it
(docs/clustering-at-scale.md has the comparison on the planted suite).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import scipy.sparse as sp

from pipeline.core.errors import QuantaError

NO_EDGE_HEIGHT = 1.0  # the distance 1 - weight at which components with no edge between them join


def _best_neighbour(rows: np.ndarray, cols: np.ndarray, sim: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(best (m,), its similarity (m,)): each node's most similar neighbour, -1 where it has none.

    rows ascending, cols ascending within a row (as :func:`_consolidate` leaves them); ties
    go to the smallest neighbour index, so the tree does not depend on edge order.
    """
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    top = np.maximum.reduceat(sim, starts)
    hit = np.flatnonzero(sim == np.repeat(top, np.diff(np.r_[starts, len(rows)])))
    first = hit[np.r_[True, rows[hit[1:]] != rows[hit[:-1]]]]
    best = np.full(m, -1, dtype=np.int64)
    best_sim = np.full(m, -np.inf)
    best[rows[first]] = cols[first]
    best_sim[rows[first]] = sim[first]
    return best, best_sim


def _consolidate(rows: np.ndarray, cols: np.ndarray, wsum: np.ndarray, count: np.ndarray, m: int):
    """Sum duplicate (row, col) edges: weight sums and edge counts add; self-loops go."""
    keep = rows != cols
    rows, cols, wsum, count = rows[keep], cols[keep], wsum[keep], count[keep]
    key = rows * np.int64(m) + cols
    uniq, inv = np.unique(key, return_inverse=True)
    return (uniq // m, uniq % m, np.bincount(inv, weights=wsum, minlength=len(uniq)),
            np.bincount(inv, weights=count, minlength=len(uniq)))


def average_linkage_tree(graph: sp.spmatrix, progress: bool = False, switch_fraction: float = 0.01) -> np.ndarray:
    """The average-linkage tree of a weighted graph (N, N), in scipy's linkage format (N-1, 4).

    graph: symmetric, weights in (0, 1] (the kNN affinity of pipeline/qdg/similarity.py, or
    :func:`pipeline.qdg.clustering.knn_graph` of a dense one); the diagonal is ignored.
    Row i of the result merges clusters Z[i, 0] and Z[i, 1] (samples are 0..N-1, the
    cluster made by row i is N + i) at the distance Z[i, 2] = 1 - the mean weight of the
    edges between them, into Z[i, 3] samples. Rows are in non-decreasing distance.
    Components with no edge between them are joined last, at distance
    :data:`NO_EDGE_HEIGHT`, the largest first.

    Rounds of reciprocal pairs run while a round merges at least `switch_fraction` of the
    clusters left; then a heap merges the best pair at a time (:func:`_one_pair_at_a_time`).
    Why both: a round costs a pass over every edge, and late in the tree, where one large
    cluster absorbs its neighbours one by one, rounds merge a handful of pairs each (at
    N = 20,000, 700 rounds); a heap pays per merge only for the smaller cluster's edges.
    Both build the same tree (module docstring); ties may be broken differently.
    """
    w = sp.coo_matrix(graph)
    n = w.shape[0]
    if n < 2:
        raise QuantaError(f"average linkage needs at least 2 samples, got {n}")
    data = w.data.astype(np.float64)
    if data.size and (not np.isfinite(data).all() or data.min() < 0 or data.max() > 1 + 1e-6):
        raise QuantaError("the kNN affinity's edge weights must lie in [0, 1]; rebuild cache/qdg/similarity")
    live = data > 0
    rows, cols, wsum, count = _consolidate(w.row[live].astype(np.int64), w.col[live].astype(np.int64),
                                           data[live], np.ones(int(live.sum())), n)
    node = np.arange(n, dtype=np.int64)  # the tree id of each current cluster
    size = np.ones(n, dtype=np.int64)
    height = np.zeros(2 * n - 1)  # per tree id
    merges: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # per round: (a, b, height, size)
    m, next_id = n, n
    bar = _bar(progress, n - 1)
    while len(rows) and m > 1:
        best, best_sim = _best_neighbour(rows, cols, wsum / count, m)
        a = np.flatnonzero((best >= 0) & (best[np.maximum(best, 0)] == np.arange(m)))
        a = a[a < best[a]]  # each reciprocal pair once, its smaller index first
        b = best[a]
        ids = np.arange(next_id, next_id + len(a))
        next_id += len(a)
        # rounding can put a merge a hair below its children's; the tree must not go down
        h = np.maximum(1.0 - best_sim[a], np.maximum(height[node[a]], height[node[b]]))
        height[ids] = h
        merges.append((node[a], node[b], h, size[a] + size[b]))
        # the next round's clusters: each pair becomes one (at a's place), the rest keep their order
        alive = np.ones(m, dtype=bool)
        alive[b] = False
        new_index = np.cumsum(alive) - 1
        into = np.arange(m)
        into[b] = a
        relabel = new_index[into]
        size[a] += size[b]
        node[a] = ids
        node, size = node[alive], size[alive]
        m = len(node)
        rows, cols, wsum, count = _consolidate(relabel[rows], relabel[cols], wsum, count, m)
        if bar is not None:
            bar.update(len(a))
        if len(a) < switch_fraction * m:  # few reciprocal pairs left: one pair at a time is cheaper
            break
    if len(rows):
        next_id = _one_pair_at_a_time(rows, cols, wsum, count, node, size, height, next_id, merges, bar)
        keep = size > 0
        node, size = node[keep], size[keep]
        m = len(node)
    if m > 1:  # components with no edge between them: joined at NO_EDGE_HEIGHT, largest first
        order = np.lexsort((node, -size))
        acc_node, acc_size = node[order[0]], size[order[0]]
        tail_a, tail_b, tail_s = [], [], []
        for j in order[1:]:
            tail_a.append(acc_node)
            tail_b.append(node[j])
            acc_size += size[j]
            tail_s.append(acc_size)
            acc_node = next_id
            next_id += 1
        merges.append((np.array(tail_a), np.array(tail_b), np.full(len(tail_a), NO_EDGE_HEIGHT), np.array(tail_s)))
        if bar is not None:
            bar.update(len(tail_a))
    if bar is not None:
        bar.close()
    return _as_linkage(merges, n)


def _one_pair_at_a_time(rows, cols, wsum, count, node, size, height, next_id: int, merges: list, bar) -> int:
    """Merge the most similar pair of clusters until no edge is left; returns the next tree id.

    Updates node, size (a merged-away cluster gets size 0) and height in place and appends
    the merges to `merges`. Each edge's [weight sum, edge count] is one list shared by both
    ends, so an update is made once; a merge moves the edges of the cluster with fewer
    neighbours into the other (small into large: an edge moves O(log N) times), and heap
    entries made stale by a merge are skipped when they come up.
    """
    import heapq

    m = len(node)
    nbr: list = [dict() for _ in range(m)]
    heap = []
    up = rows < cols
    for i, j, w, c in zip(rows[up].tolist(), cols[up].tolist(), wsum[up].tolist(), count[up].tolist()):
        rec = [w, c]
        nbr[i][j] = rec
        nbr[j][i] = rec
        heap.append((-w / c, i, j))
    heapq.heapify(heap)
    out_a, out_b, out_h, out_s = [], [], [], []
    while heap:
        neg, i, j = heapq.heappop(heap)
        links = nbr[i]
        if links is None or nbr[j] is None:
            continue
        rec = links.get(j)
        if rec is None or -rec[0] / rec[1] != neg:
            continue
        keep, gone = (i, j) if len(links) >= len(nbr[j]) else (j, i)
        h = max(1.0 + neg, height[node[keep]], height[node[gone]])
        out_a.append(node[i])
        out_b.append(node[j])
        out_h.append(h)
        out_s.append(size[i] + size[j])
        height[next_id] = h
        kept = nbr[keep]
        del kept[gone]
        for other, r in nbr[gone].items():
            if other == keep:
                continue
            del nbr[other][gone]
            t = kept.get(other)
            if t is None:
                kept[other] = r
                nbr[other][keep] = r
            else:
                t[0] += r[0]
                t[1] += r[1]
                r = t
            heapq.heappush(heap, (-r[0] / r[1], min(keep, other), max(keep, other)))
        nbr[gone] = None
        node[keep] = next_id
        size[keep] += size[gone]
        size[gone] = 0
        next_id += 1
        if bar is not None:
            bar.update(1)
    if out_a:
        merges.append((np.array(out_a), np.array(out_b), np.array(out_h), np.array(out_s)))
    return next_id


def _bar(progress: bool, total: int):
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc="average linkage (kNN graph)", unit="merge", mininterval=2)


def _as_linkage(merges, n: int) -> np.ndarray:
    """Rows ordered by (height, creation), ids renumbered to scipy's N + row.

    A merge is created after its children and sits no lower (the heights are made
    non-decreasing up the tree as they are recorded), so this order keeps every child
    before its parent.
    """
    a = np.concatenate([m[0] for m in merges]).astype(np.int64)
    b = np.concatenate([m[1] for m in merges]).astype(np.int64)
    h = np.concatenate([m[2] for m in merges]).astype(np.float64)
    s = np.concatenate([m[3] for m in merges]).astype(np.float64)
    order = np.lexsort((np.arange(len(a)), h))
    new_id = np.empty(len(a), dtype=np.int64)
    new_id[order] = np.arange(n, n + len(a))
    full = np.concatenate([np.arange(n), new_id])  # creation id -> scipy id
    a, b = full[a[order]], full[b[order]]
    return np.column_stack([np.minimum(a, b), np.maximum(a, b), h[order], s[order]]).astype(np.float64)


# --------------------------------------------------------------------------- the cut


def excess_of_mass(tree: np.ndarray, min_cluster_size: int, max_outlier_score: float = 1.0) -> np.ndarray:
    """Labels (N,) int64 of the excess-of-mass cut of a linkage tree: -1 for unassigned samples.

    tree: scipy's linkage format, distances in [0, 1] (lambda = 1 - distance). A cluster
    of the condensed tree is born when its parent splits into two parts of at least
    `min_cluster_size` samples (the root at lambda 0), loses samples as parts smaller than
    that break off, and ends when it splits or falls apart. Its stability is the sum over
    its samples of (the lambda at which they leave it - its birth lambda). The selected
    clusters are the antichain of largest total stability, the root excluded; a sample's
    label is the selected cluster whose subtree holds it. Labels are not yet ordered by
    size (see :func:`pipeline.qdg.clustering.canonical`).

    max_outlier_score: a sample whose GLOSH outlier score (Campello, Moulavi, Zimek & Sander,
    "Hierarchical density estimates for data clustering, visualization, and outlier
    detection", TKDD 2015) exceeds it is unassigned too. The score is 1 - lambda_p / lambda_max:
    lambda_p the similarity at which the sample left its cluster, lambda_max the largest at
    which any sample of that cluster (or a cluster inside it) did. Why: in a kNN graph two
    tight quanta share no edge, so a stray sample whose edges reach one of them joins it
    at a low similarity before the quanta join each other; the excess-of-mass cut alone
    would count it a member. 1.0 keeps HDBSCAN's labels.
    """
    if min_cluster_size < 2:
        raise QuantaError(f"cluster.min_cluster_size must be >= 2 for a data-chosen cut, got {min_cluster_size}")
    z = np.asarray(tree, dtype=np.float64)
    n = len(z) + 1
    lam = 1.0 - z[:, 2]
    left, right = z[:, 0].astype(np.int64), z[:, 1].astype(np.int64)
    size = np.concatenate([np.ones(n), z[:, 3]]).astype(np.int64)

    # Top-down: each node's condensed cluster; `fallen` nodes have left their cluster.
    owner = np.full(2 * n - 1, -1, dtype=np.int64)
    fallen = np.zeros(2 * n - 1, dtype=bool)
    leave = np.zeros(2 * n - 1)  # for a fallen node: the lambda at which its samples left their cluster
    birth = [0.0]  # per condensed cluster
    parent = [-1]
    stability = [0.0]
    owner[2 * n - 2] = 0
    for i in range(n - 2, -1, -1):
        node = n + i
        c = owner[node]
        l, r = left[i], right[i]
        if fallen[node]:
            owner[l] = owner[r] = c
            fallen[l] = fallen[r] = True
            leave[l] = leave[r] = leave[node]
            continue
        big_l, big_r = size[l] >= min_cluster_size, size[r] >= min_cluster_size
        if big_l and big_r:  # c splits into two new clusters
            stability[c] += size[node] * (lam[i] - birth[c])
            for child in (l, r):
                owner[child] = len(birth)
                birth.append(lam[i])
                parent.append(c)
                stability.append(0.0)
            continue
        for child, big in ((l, big_l), (r, big_r)):
            owner[child] = c
            if not big:  # its samples leave c here
                fallen[child] = True
                leave[child] = lam[i]
                stability[c] += size[child] * (lam[i] - birth[c])
    stab = np.asarray(stability)
    par = np.asarray(parent)
    m = len(stab)
    # Bottom-up (children are created after their parents): keep a cluster when it beats its subtree.
    best = stab.copy()
    child_sum = np.zeros(m)
    selected = np.zeros(m, dtype=bool)
    for c in range(m - 1, 0, -1):
        if child_sum[c] > stab[c]:
            best[c] = child_sum[c]
        else:
            best[c] = stab[c]
            selected[c] = True
        child_sum[par[c]] += best[c]
    # Deselect everything under a selected cluster: walk down from the root.
    chosen = np.full(m, -1, dtype=np.int64)  # the selected ancestor-or-self of each cluster
    for c in range(1, m):
        up = chosen[par[c]] if par[c] > 0 else -1
        chosen[c] = up if up >= 0 else (c if selected[c] else -1)
    leaf_owner = owner[:n]
    labels = chosen[leaf_owner]
    if max_outlier_score < 1.0:
        lam_max = np.full(m, -np.inf)
        np.maximum.at(lam_max, leaf_owner, leave[:n])
        for c in range(m - 1, 0, -1):  # a cluster's densest sample may sit in a cluster inside it
            lam_max[par[c]] = max(lam_max[par[c]], lam_max[c])
        top = lam_max[leaf_owner]
        score = np.where(top > 0, 1.0 - leave[:n] / np.where(top > 0, top, 1.0), 0.0)
        labels = np.where(score > max_outlier_score, -1, labels)
    return labels


def n_big_by_cut(tree: np.ndarray, min_size: int) -> np.ndarray:
    """big[m] = the number of clusters of >= min_size samples when the tree is cut into m clusters.

    Undoing the merges from the last one down splits one cluster into two at every step,
    so the count is updated in O(1) per cut instead of relabelling all N samples.
    """
    n = len(tree) + 1
    size = np.concatenate([np.ones(n), tree[:, 3]])
    big = np.zeros(n + 1, dtype=np.int64)
    big[1] = int(n >= min_size)
    for m in range(2, n + 1):
        row = tree[n - m]  # the merge undone to go from m - 1 to m clusters
        big[m] = big[m - 1] - (size[n + n - m] >= min_size) + (size[int(row[0])] >= min_size) + (size[int(row[1])] >= min_size)
    return big


def cut_by_merges(tree: np.ndarray, m: int) -> np.ndarray:
    """Labels (N,) int64 of the m clusters left by the first N - m merges of the tree.

    Not scipy's fcluster(maxclust): that cuts at a height, and where merges tie in height
    (two quanta joined to a third by one edge each) no height gives m clusters.
    """
    z = np.asarray(tree)
    n = len(z) + 1
    first_above = n - m  # rows >= this are undone
    label = np.full(2 * n - 1, -1, dtype=np.int64)
    next_label = 0
    for i in range(n - 2, -1, -1):
        for child in (int(z[i, 0]), int(z[i, 1])):
            if i >= first_above:  # the parent is undone: a child below the cut roots a cluster
                if child < n or child - n < first_above:
                    label[child] = next_label
                    next_label += 1
            else:
                label[child] = label[n + i]
    if m == 1:
        label[:n] = 0
    return label[:n]


def cut_at_k(tree: np.ndarray, k: int, min_size: int) -> np.ndarray:
    """Labels (N,) int64 with k clusters of at least `min_size` samples, the rest -1.

    The tree is cut at the fewest clusters that hold k clusters of `min_size`; where no cut
    holds k, the cut with the most of them. The k largest are kept; samples of smaller ones
    are unassigned rather than forced into a cluster they do not belong to.
    """
    big = n_big_by_cut(tree, max(min_size, 1))
    reach = np.flatnonzero(big >= k)
    cut = int(reach[0]) if len(reach) else int(np.argmax(big))
    raw = cut_by_merges(tree, cut)
    sizes = np.bincount(raw)
    keep = np.argsort(-sizes, kind="stable")[:k]
    keep = keep[sizes[keep] >= min_size]
    out = np.full(len(raw), -1, dtype=np.int64)
    kept = np.isin(raw, keep)
    out[kept] = np.searchsorted(np.sort(keep), raw[kept])
    return out


def slow_reference_tree(graph: np.ndarray) -> list[tuple[frozenset, frozenset, float]]:
    """The same linkage by its definition, one best pair at a time: [(cluster, cluster, distance)].

    O(N^3) on a dense array of edge weights (0: no edge); for tests on small inputs only.
    """
    g = np.asarray(graph, dtype=np.float64)
    clusters = {i: frozenset([i]) for i in range(len(g))}
    out = []
    while True:
        best: Optional[tuple[float, int, int]] = None
        keys = sorted(clusters)
        for x in range(len(keys)):
            for y in range(x + 1, len(keys)):
                a, b = clusters[keys[x]], clusters[keys[y]]
                block = g[np.ix_(sorted(a), sorted(b))]
                present = block > 0
                if present.any():
                    mean = float(block[present].mean())
                    if best is None or mean > best[0] + 1e-12:
                        best = (mean, keys[x], keys[y])
        if best is None:
            return out
        mean, i, j = best
        out.append((clusters[i], clusters[j], 1.0 - mean))
        clusters[i] = clusters[i] | clusters.pop(j)
