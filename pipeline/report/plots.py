"""PNG figures for `dvc plots show`: small, deterministic, one function per figure.

Why PNG rather than Vega-Lite: every figure here overlays data and a fitted curve on
log axes, which a DVC template cannot draw from one CSV; a PNG shows exactly what the
library computed. matplotlib runs on the Agg backend (no display needed), and the files
are written atomically and without a timestamp, so an unchanged input gives an unchanged
file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core import files


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    plt = _plt()
    from matplotlib.ticker import NullFormatter

    for ax in fig.axes:  # minor-tick labels of log axes spanning < 2 decades overprint each other
        if ax.get_xscale() == "log":
            ax.xaxis.set_minor_formatter(NullFormatter())
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)
    return Path(path)


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", wrap=True, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def mean_loss_vs_n(run, path: str | Path) -> Path:
    """Mean loss (nats) against non-embedding parameters N, with the fitted E + A·N^-α_N."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    m = run.metrics.get("mean_loss")
    if not m:
        _note(ax, f"no L(N): {run.metrics.get('skipped', '')}")
    else:
        N = np.asarray(run.suite.n_params)
        L = np.asarray([m["by_model"][k] for k in run.suite.models])
        ax.plot(N, L, "o", label="mean loss")
        f = run.suite.fit.fit if run.suite.fit is not None else None
        if f is not None and f.A is not None:
            x = np.geomspace(N.min(), N.max(), 100)
            ci = m.get("alpha_ci")
            lab = f"E + A·N^-α, α_N = {f.alpha:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
            lab += "" if f.converged else " (not converged)"
            ax.plot(x, f.predict(x), "-", label=lab)
        ax.set_xscale("log")
        ax.set_xlabel("non-embedding parameters N")
        ax.set_ylabel("mean loss (nats)")
        ax.legend(fontsize=7)
    ax.set_title("mean loss vs model size", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def token_examples(run, path: str | Path) -> Path:
    """Example per-token curves, loss against N: monogenic (left) and polygenic (right)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharey=True)
    N = np.asarray(run.suite.n_params) if run.suite.n_params else None
    for ax, kind in zip(axes, ("monogenic", "polygenic")):
        ex = run.examples.get(kind)
        if ex is None or N is None:
            _note(ax, f"no {kind} tokens")
        else:
            for row in ex:
                ax.plot(N, row, "o-", ms=3, lw=1)
            ax.set_xscale("log")
            ax.set_xlabel("non-embedding parameters N")
        frac = (run.metrics.get("kinds") or {}).get(kind)
        ax.set_title(f"{kind}" + (f" ({100 * frac:.2f}% of tokens)" if frac is not None else ""), fontsize=10)
    axes[0].set_ylabel("loss (nats)")
    fig.tight_layout()
    return _save(fig, path)


def learning_curves(run, path: str | Path) -> Path:
    """Mean loss against training step for every model, with each fitted E + A·S^-α_S."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    drawn = False
    for i, (model, c) in enumerate(run.learning_curves.items()):
        if "mean_loss" not in c:
            continue
        color = f"C{i % 10}"
        steps = np.asarray(c["steps"], np.float64)
        ax.plot(steps, c["mean_loss"], "o", ms=3, color=color)
        boot = c.get("_boot")
        lab = model
        if boot is not None and boot.fit.A is not None:
            x = np.geomspace(steps[steps > 0].min(), steps.max(), 100)
            ax.plot(x, boot.fit.predict(x), "-", lw=1, color=color)
            lab += f": α_S = {boot.fit.alpha:.2f}" + ("" if boot.fit.converged else " (n.c.)")
        ax.plot([], [], "o-", color=color, label=lab)
        drawn = True
    if drawn:
        ax.set_xscale("log")
        ax.set_xlabel("training step S")
        ax.set_ylabel("mean loss (nats)")
        ax.legend(fontsize=6)
    else:
        _note(ax, "no learning curves (fewer than 2 stepN revisions)")
    ax.set_title("learning curves", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def emergence(dyn, path: str | Path) -> Path:
    """Each planted quantum's emergence step S_k against 1/p_k, with the OLS line (theory: slope 1)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    em = dyn.emergence
    t = em.per_quantum if em is not None else None
    ok = None if t is None else (t["status"] == "ok") & (t["emergence_step"] > 0)
    if dyn.metrics.get("skipped"):
        _note(ax, f"skipped: {dyn.metrics['skipped']}")
    elif em is None:
        _note(ax, "no planted quanta: emergence vs frequency needs ground truth")
    elif not ok.any():
        _note(ax, f"no quantum emerged within the checkpoints ({em.reason})")
    else:
        x, y = 1.0 / t["p"][ok].to_numpy(), t["emergence_step"][ok].to_numpy()
        ax.plot(x, y, "o", ms=3, label=f"{int(ok.sum())} quanta")
        if em.slope is not None:
            xx = np.geomspace(x.min(), x.max(), 50)
            ax.plot(xx, 10 ** (em.intercept + em.slope * np.log10(xx)), "-", label=f"slope {em.slope:.2f} (theory 1)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("1 / p_k")
        ax.set_ylabel("emergence step S_k")
        ax.legend(fontsize=7)
    ax.set_title(f"emergence vs frequency ({dyn.metrics.get('model')})", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def cluster_rank_frequency(cpl, path: str | Path) -> Path:
    """Cluster size against rank (log-log): one clustering, the sweep's envelope, the MLE tail and the envelope OLS."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    r = np.arange(1, cpl.sizes.size + 1)
    ax.plot(r, cpl.sizes, "o", ms=3, label=f"k = {cpl.metrics['k']}")
    if cpl.envelope is not None and cpl.envelope.size > cpl.sizes.size:
        ax.plot(np.arange(1, cpl.envelope.size + 1), cpl.envelope, ".", ms=2, label="envelope over the sweep")
    f, curve = cpl.report.fit, cpl.tail_curve()
    if curve is not None:
        rr, ss = curve
        ax.plot(rr, ss, "-", label=f"MLE tail: Zipf b = {f.rank_exponent:.2f} (s ≥ {f.xmin})")
    e = cpl.envelope_fit
    if e is not None:
        xr = np.arange(e.rank_lo, e.rank_hi + 1)
        ax.plot(xr, np.exp(e.intercept) * xr ** e.slope, "--", label=f"envelope OLS: slope {e.slope:.3f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rank")
    ax.set_ylabel("cluster size (samples)")
    ax.legend(fontsize=7)
    ax.set_title("cluster sizes: rank-frequency", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def block_average(aff, labels: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """The affinity with rows and columns sorted by label, block-averaged to at most side × side.

    aff: (n, n) dense array (a memmap is read in row blocks) or scipy sparse; labels: (n,)
    cluster of each row. Returns (the (m, m) averaged matrix, the bin positions where the
    label changes, for boundary lines). Bins hold consecutive sorted rows, so a cluster
    boundary falls inside at most one bin.
    """
    import scipy.sparse as sp

    n = len(labels)
    order = np.argsort(labels, kind="stable")
    m = min(side, n)
    bins = np.empty(n, dtype=np.int64)
    bins[order] = np.arange(n) * m // n
    B = sp.csr_matrix((np.ones(n), (np.arange(n), bins)), shape=(n, m))
    if sp.issparse(aff):
        total = (B.T @ aff @ B).toarray()
    else:
        total = np.zeros((m, m))
        step = max(1, 2**25 // max(n, 1))  # ~128 MB of float32 rows at a time
        for i in range(0, n, step):
            rows = np.asarray(aff[i : i + step], dtype=np.float64)  # (rows, n)
            total += B[i : i + step].T @ np.asarray(B.T @ rows.T).T
    counts = np.bincount(bins, minlength=m).astype(np.float64)
    mean = total / np.outer(counts, counts)
    sorted_labels = labels[order]
    change = np.flatnonzero(sorted_labels[1:] != sorted_labels[:-1]) + 1
    return mean, change * m / n


def similarity_matrix(aff, labels: np.ndarray, side: int, path: str | Path, title: str = "") -> Path:
    """The affinity reordered by cluster (largest cluster first), block-averaged, as an image."""
    plt = _plt()
    mean, edges = block_average(aff, labels, side)
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    im = ax.imshow(mean, cmap="viridis", interpolation="nearest")
    if len(edges) <= 150:  # more lines than that hide the matrix
        for x in edges:
            ax.axhline(x - 0.5, color="white", lw=0.3, alpha=0.6)
            ax.axvline(x - 0.5, color="white", lw=0.3, alpha=0.6)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(f"{len(labels):,} samples sorted by cluster ({mean.shape[0]} bins)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, label="mean affinity")
    ax.set_title(title or "similarity matrix, reordered by cluster", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
