"""PNG plots of a `gptqlora analyze` result (matplotlib, an optional extra: pip install 'gptqlora[plots]').

    error_heatmap(analysis, "gptq_error.png")          layers x module types, one panel per bit width
    outlier_plot(analysis, "activation_outliers.png")  outlier dims by layer, max |x| by layer, top dims
"""

from __future__ import annotations

from pathlib import Path


class PlotsUnavailable(RuntimeError):
    pass


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotsUnavailable("matplotlib is not installed (pip install 'gptqlora[plots]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _split(name: str) -> tuple[int, str]:
    """'model.layers.3.self_attn.q_proj' -> (3, 'q_proj')."""
    head, _, leaf = name.rpartition(".")
    parts = head.split(".")
    idx = next(int(p) for p in reversed(parts) if p.isdigit())
    return idx, leaf


def error_heatmap(analysis: dict, path: str | Path) -> Path:
    """Relative output error ||(W-Q)X||^2/||WX||^2 per layer and module, one panel per bit width, on one
    logarithmic colour scale so that the panels compare."""
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    rel = analysis["rel_error"]
    bits = [str(b) for b in analysis["bits"]]
    types: list[str] = []
    for name in rel[bits[0]]:
        leaf = _split(name)[1]
        if leaf not in types:
            types.append(leaf)
    n_layers = analysis["layers"]
    grids = []
    for b in bits:
        grid = [[float("nan")] * len(types) for _ in range(n_layers)]
        for name, v in rel[b].items():
            i, leaf = _split(name)
            grid[i][types.index(leaf)] = max(v, 1e-12)
        grids.append(grid)
    values = [v for g in grids for row in g for v in row if v == v]
    norm = LogNorm(vmin=min(values), vmax=max(values))
    height = max(3.6, 0.32 * n_layers + 2.4)
    fig, axes = plt.subplots(1, len(bits), figsize=(3.6 * len(bits) + 1.2, height), squeeze=False,
                             constrained_layout=True)
    annotate = n_layers <= 16
    for ax, b, grid in zip(axes[0], bits, grids):
        im = ax.imshow(grid, aspect="auto", cmap="magma_r", norm=norm, interpolation="nearest")
        ax.set_title(f"{b}-bit GPTQ", fontsize=12)
        ax.set_xticks(range(len(types)), [t.replace("_proj", "") for t in types], rotation=45, ha="right")
        step = max(1, n_layers // 16)
        ax.set_yticks(range(0, n_layers, step))
        ax.set_xlabel("module")
        if annotate:
            for i, row in enumerate(grid):
                for j, v in enumerate(row):
                    if v == v:
                        dark = norm(v) > 0.55
                        ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7,
                                color="white" if dark else "black")
    axes[0][0].set_ylabel("layer")
    cb = fig.colorbar(im, ax=axes[0].tolist(), shrink=0.9, location="bottom", aspect=40)
    cb.set_label("relative output error  ||(W-Q)X||² / ||WX||²  (log scale)")
    gs = analysis["group_size"]
    fig.suptitle(f"Quantization sensitivity: GPTQ error per layer and module (group size {gs}; darker = worse)",
                 fontsize=12)
    path = Path(path)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def outlier_plot(analysis: dict, path: str | Path) -> Path:
    """Activation outliers (|x| > threshold) at each linear's input: which dims in which layers; the
    largest |x| per layer; the dims seen in most layers."""
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter, ScalarFormatter

    act = analysis["activation_outliers"]
    thr, sites = act["threshold"], act["sites"]
    n_layers = analysis["layers"]
    fig, axes = plt.subplots(1, 3, figsize=(16, max(4.2, 0.18 * n_layers + 2.5)), constrained_layout=True,
                             gridspec_kw={"width_ratios": [1.5, 1, 1]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ax = axes[0]
    any_points = False
    for c, (site, v) in zip(colors, sites.items()):
        xs, ys, sizes = [], [], []
        for entry in v["per_layer"]:
            for d, t in zip(entry["dims"], entry["tokens"]):
                xs.append(d)
                ys.append(entry["layer"])
                sizes.append(12 + 200 * t / max(entry["tokens_seen"], 1))
        if xs:
            any_points = True
            ax.scatter(xs, ys, s=sizes, color=c, alpha=0.7, label=_site_label(site, act), edgecolors="none")
    ax.set_xlabel("input dim")
    ax.set_ylabel("layer")
    ax.set_ylim(-0.5, n_layers - 0.5)
    ax.invert_yaxis()
    ax.set_title(f"dims with |x| > {thr:g} (dot size: share of tokens)")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if any_points:  # legend dots of one size: the plotted sizes mean token shares
        handles = [Line2D([], [], marker="o", ls="", color=c, label=_site_label(site, act))
                   for c, site in zip(colors, sites) if any(e["dims"] for e in sites[site]["per_layer"])]
        ax.legend(handles=handles, fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, f"no activation exceeds |x| > {thr:g}\nat any linear input", ha="center", va="center",
                transform=ax.transAxes, fontsize=12, color="gray")
        ax.set_xlim(0, max((v["dim"] for v in sites.values()), default=1))

    ax = axes[1]
    for c, (site, v) in zip(colors, sites.items()):
        layers = [e["layer"] for e in v["per_layer"]]
        ax.plot([e["max_abs"] for e in v["per_layer"]], layers, "o-", color=c, label=_site_label(site, act), ms=4)
    ax.axvline(thr, color="red", ls="--", lw=1, label=f"threshold {thr:g}")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(-0.5, n_layers - 0.5)
    ax.invert_yaxis()
    ax.set_xlabel("largest |x| at the input (log)")
    ax.set_ylabel("layer")
    ax.set_title("largest activation per layer")
    ax.legend(fontsize=8, loc="best")

    ax = axes[2]
    main_site = max(sites, key=lambda s: sum(len(e["dims"]) for e in sites[s]["per_layer"]), default=None)
    top = sites[main_site]["top"] if main_site else []
    if top:
        labels = [str(t["dim"]) for t in top][::-1]
        ax.barh(labels, [t["n_layers"] for t in top][::-1], color=colors[list(sites).index(main_site) % len(colors)])
        ax.set_xlim(0, n_layers)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(f"layers (of {n_layers}) where the dim exceeds {thr:g}")
        ax.set_ylabel("input dim")
        ax.set_title(f"top dims at {_site_label(main_site, act)}")
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, "no outlier dims", ha="center", va="center", transform=ax.transAxes, fontsize=12,
                color="gray")
    fig.suptitle("Activation outliers at the inputs of the linear layers (LLM.int8 criterion)", fontsize=12)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _site_label(site: str, act: dict) -> str:
    shared = sorted(n.rsplit(".", 1)[-1] for n, s in act.get("shared_inputs", {}).items() if s == site)
    leaf = site.rsplit(".", 1)[-1]
    return "/".join([leaf, *shared]).replace("_proj", "") + " input"
