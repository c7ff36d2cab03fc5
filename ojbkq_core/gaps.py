"""Exact optimality gaps of every decoder on sub-problems cut from real layers (docs/formulation.md §7).

A model is calibrated exactly as `ojbkq quantize` does it (statistics, objective, grid, damping and the
recipe's decoder); for the layers of the sampled blocks, the engine's `group_decoded` event hands over the
layer's statistics and the decoder's full solution (`collect`, `WindowCollector`). From each, windows of `c` consecutive columns `S` (decoding order)
of sampled rows are cut. With every other column `F` held at the recipe's values `q_F`, a row's objective
as a function of `q_S` is, up to a constant,

    f(q_S) = (t_S − q_S) H_SS (t_S − q_S)ᵀ,     t_S = g_S H_SS⁻¹,     g_S = (W M)_S − q_F H_FS

(undamped: the quantity reported), a BILS problem in `c` codes on the recipe's grid and box. Every
decoder solves it in the quantizer's form (`H_SS + λ I` with the layer's damping `λ`, candidates chosen
by `f`), `exact` finds `f* = min f` over the same codes, and the gap is `(f − f*) / f*`.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .calibrate import Events, Group
from .decoders import Exact
from .errors import InputError
from .grid import INTEGERS, Alphabet, Grid
from .linalg import inverse_cholesky
from .objectives import RowScore
from .problem import WorkingProblem
from .spec import RunSpec, load_spec

log = logging.getLogger("ojbkq")

DEFAULT_DECODERS = "babai,klein:k=4,klein:k=16,klein:k=64,successive,beam:width=4,beam:width=16"
OPTIMAL = 1e-9          # a relative gap at most this counts as optimal (float64 evaluation of f)


class Singular(Exception):
    """`H_SS` of a window is not positive definite: `t_S` and `f*` are undefined."""


@dataclass
class Window:
    """The sub-problems of one window: columns `j … j+c−1` (decoding order) of rows `rows` of a layer.

    `H` `(c, c)` float64, undamped (dead columns as the quantizer treats them: `H_jj = 1`, `w_j = 0`);
    `lam` the layer's damping `δ · mean(diag H_layer)`; `g` `(r, c)` the conditioned linear term
    `(W M)_S − q_F H_FS`; `w` `(r, c)` the weights; `scale`, `zero` `(r, c)` the recipe's grid on these
    columns; `q` `(r, c)` the recipe's values; codes lie in `[0, maxq]` and index `alphabet`.
    """

    layer: str
    kind: str
    j: int
    rows: np.ndarray
    H: torch.Tensor
    lam: float
    g: torch.Tensor
    w: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    q: torch.Tensor
    maxq: int
    alphabet: Alphabet = INTEGERS

    def target(self) -> torch.Tensor:
        """`t_S = g_S H_SS⁻¹` `(r, c)`; raises `Singular` when `H_SS` is not positive definite."""
        L, info = torch.linalg.cholesky_ex(self.H)
        if int(info):
            raise Singular(f"{self.layer} columns {self.j}..{self.j + self.H.shape[0] - 1}")
        return torch.cholesky_solve(self.g.T, L).T

    def value(self, Q: torch.Tensor) -> torch.Tensor:
        """`f(q_S) = (t_S − q_S) H_SS (t_S − q_S)ᵀ` per row `(r,)` of values `Q` `(r, c)`."""
        E = self.target() - Q
        return ((E @ self.H) * E).sum(-1)

    def problem(self, lam: float) -> WorkingProblem:
        """The window as a decoder sees it, with `H_SS + lam I` (`lam = 0`: the undamped problem `exact`
        solves). Target `T = (g + lam w)(H_SS + lam I)⁻¹`, written also as successive rounding's
        `T = w + G U` with `G = (g − w H_SS) Uᵀ`; candidates are scored by `f`. Raises `Singular`."""
        c = self.H.shape[0]
        t = self.target()
        U, _, delta = inverse_cholesky(self.H + lam * torch.eye(c, dtype=self.H.dtype), 0.0)
        if delta:                                      # the undamped factorisation needed damping after all
            raise Singular(f"{self.layer} columns {self.j}..{self.j + c - 1}")
        T = (self.g + lam * self.w) @ (U.T @ U)
        G = (self.g - self.w @ self.H) @ U.T
        lower = torch.zeros(c, dtype=self.H.dtype)
        upper = torch.full((c,), float(self.maxq), dtype=self.H.dtype)
        score = RowScore(self.g, self.H, (self.g * t).sum(-1))
        return WorkingProblem(U, T, Grid(lower, upper, self.scale, self.zero, alphabet=self.alphabet), base=self.w,
                              inject=G, score=score)


def cut(layer: str, kind: str, H: torch.Tensor, WM: torch.Tensor, W: torch.Tensor, Q: torch.Tensor,
        scale: torch.Tensor, zero: torch.Tensor, lam: float, maxq: int, c: int, rows: int, windows: int,
        rng: np.random.Generator, alphabet: Alphabet = INTEGERS) -> list[Window]:
    """`windows` windows of `c` consecutive columns, each of `rows` rows drawn from `rng`, from one layer in
    decoding order: `H` `(n, n)` (dead columns set to 1), `WM` `(m, n)`, weights `W`, the recipe's values
    `Q` and grid `scale`, `zero`, all `(m, n)` float64."""
    m, n = W.shape
    if c > n:
        raise InputError(f"--columns {c}: layer {layer} has only n={n} input columns")
    out = []
    for _ in range(windows):
        j = int(rng.integers(0, n - c + 1))
        r = np.sort(rng.choice(m, size=min(rows, m), replace=False))
        S = slice(j, j + c)
        q = Q[r]
        g = WM[r, S] - q @ H[:, S] + q[:, S] @ H[S, S]          # (W M)_S − q_F H_FS
        out.append(Window(layer, kind, j, r, H[S, S].clone(), lam, g, W[r, S].clone(), scale[r, S].clone(),
                          zero[r, S].clone(), q[:, S].clone(), maxq, alphabet))
    return out


# --- collecting the layers inside a calibration ----------------------------------------------------

def layer_kind(relative: str) -> str:
    """A module's type from its name inside the block: `self_attn.q_proj` → `q`, `mlp.down_proj` → `down`."""
    last = relative.rsplit(".", 1)[-1]
    return last[:-5] if last.endswith("_proj") else last


def windows_of(name: str, kind: str, W: torch.Tensor, stats, objective, res, maxq: int, c: int, rows: int,
               windows: int, rng: np.random.Generator) -> list[Window]:
    """Windows cut from a layer: weights `W` `(m, n)`, its statistics and (drawn) objective, and the
    `LayerResult` of `quantize_layer` (codes in `[0, maxq]`, grid, decoding order `perm` and the damping
    it used)."""
    dd = torch.float64
    H, M = (x.to(dd).cpu() for x in objective.quadratic(stats))        # undamped, natural order
    W = W.to(dd).cpu().clone()
    dead = H.diagonal() == 0                                            # as the quantizer: H_jj = 1, w_j = 0
    H.diagonal()[dead] = 1
    W[:, dead] = 0
    lam = float(res.report["damp"] * H.diagonal().mean())
    perm, g_idx = res.perm, res.g_idx
    scale = res.scales.to(dd)[:, g_idx][:, perm]
    zero = res.zeros.to(dd)[:, g_idx][:, perm]
    Q = scale * (res.alphabet.value(res.codes.to(dd)[:, perm]) - zero)   # the grid points in float64, as exact's
    return cut(name, kind, H[perm][:, perm], (W @ M)[:, perm], W[:, perm], Q, scale, zero, lam, maxq, c, rows,
               windows, rng, res.alphabet)


class WindowCollector(Events):
    """The calibration's events for `collect`: as each group is decoded, the windows of its wanted
    layers are cut (the modules still hold their original weights); the run stops once every wanted
    layer was seen."""

    def __init__(self, wanted: set, c: int, rows: int, windows: int, seed: int, progress: bool):
        self.wanted, self.c, self.rows, self.windows, self.seed, self.progress = wanted, c, rows, windows, seed, progress
        self.out: list[Window] = []

    def group_decoded(self, group: Group, results: dict) -> None:
        for t in group.tasks:
            if t.full not in self.wanted:
                continue
            W = group.adapter.weight(group.block.get_submodule(t.name)).detach()
            self.out.extend(windows_of(t.full, layer_kind(t.name), W, group.stats[t.name], t.objective, results[t.name],
                                       group.settings.grid.maxq, self.c, self.rows, self.windows,
                                       np.random.default_rng([self.seed, t.index])))
            self.wanted.discard(t.full)
            if self.progress:
                log.info("gaps: %s (%s) %d×%d: %d windows", t.full, layer_kind(t.name), *W.shape, self.windows)

    def stop_requested(self) -> bool:
        return not self.wanted


def collect(spec: RunSpec, blocks: Optional[Sequence[int]], c: int, rows: int, windows: int, seed: int,
            progress: bool = True) -> tuple[list[Window], dict]:
    """Calibrate the spec's model (loaded fresh) as `quantize` does, up to the last layer of `blocks`
    (default: the first, middle and last block), and cut the windows of every layer of those blocks from
    its statistics and its quantization. Returns the windows and facts about the run."""
    from .model import find_adapter
    from .pipeline import calibrate_model, load_model
    if spec.objective.score is not None:
        raise InputError("objective.score: gaps measure the decoded objective itself; remove objective.score")
    model, tokenizer = load_model(spec.model.path, spec.dtype, spec.model.trust_remote_code)
    adapter = find_adapter(model, spec.model.adapter)
    nblocks = len(adapter.blocks())
    blocks = sorted({0, nblocks // 2, nblocks - 1} if blocks is None else set(blocks))
    bad = [b for b in blocks if not 0 <= b < nblocks]
    if bad:
        raise InputError(f"--blocks {','.join(map(str, blocks))}: the model has blocks 0..{nblocks - 1}")
    path = adapter.blocks_path()
    wanted = {name for name in adapter.layer_names() if int(name[len(path) + 1:].split(".", 1)[0]) in blocks}
    collector = WindowCollector(wanted, c, rows, windows, seed, progress)
    t0 = time.perf_counter()
    calibrate_model(model, tokenizer, spec, progress=False, events=collector)
    if collector.wanted:
        raise InputError(f"layers {sorted(collector.wanted)} were never quantized (quant.skip?); choose other --blocks")
    facts = {"model": spec.model.path, "architecture": type(model).__name__, "device": spec.target,
             "calibration_seconds": time.perf_counter() - t0, "blocks": blocks}
    return collector.out, facts


# --- solving the windows --------------------------------------------------------------------------

@dataclass
class Entry:
    """A solver of the windows: `label` for tables, `name` and `params` of the decoder, and `on`:
    `sub-problem` (the decoder run on the window) or `layer` (the recipe's full-layer solution restricted
    to the window, no decoder run). `damped`: the decoder sees `H_SS + λ I` as in the layer quantizer;
    otherwise the undamped window (`λ = 0`), which isolates the search from the damping."""

    label: str
    name: str
    params: dict
    on: str = "sub-problem"
    decoder: object = None
    damped: bool = True


def parse_decoders(text: str) -> list[tuple[str, dict]]:
    """`babai,klein:k=16,beam:width=4:expand=2` → `[(name, params), …]`."""
    from .config import parse_value
    out = []
    for item in text.split(","):
        name, *pairs = item.strip().split(":")
        params = {}
        for p in pairs:
            if "=" not in p:
                raise InputError(f"--decoders {text!r}: {p!r} in {item!r} is not KEY=VALUE (e.g. klein:k=16)")
            k, v = p.split("=", 1)
            params[k] = parse_value(v)
        if not name:
            raise InputError(f"--decoders {text!r}: empty decoder name")
        out.append((name, params))
    return out


def label_of(name: str, params: dict) -> str:
    return " ".join([name, *(f"{k}={v}" for k, v in params.items())])


def solve(windows: Sequence[Window], entries: Sequence[Entry], recipe: Entry, max_nodes: int, seed: int,
          progress: bool = True) -> tuple[list[dict], dict]:
    """`f*` by `exact` on each window's undamped problem, row by row, and `f` of every entry: the
    decoders run on the damped problem (decoder seed from `seed` and the window's index) and the recipe's
    own values. Windows with a singular `H_SS` and rows whose exact search passes `max_nodes` are skipped
    and counted. Returns one dict per (solver, window row) — label, layer, kind, f, fstar, seconds (per
    sub-problem) — and the skip counts."""
    out: list[dict] = []
    skipped = {"singular_windows": 0, "rows_past_max_nodes": 0}
    exact = Exact(max_nodes=max_nodes)
    t_last = time.perf_counter()
    for wi, win in enumerate(windows):
        try:
            E, P = win.problem(0.0), win.problem(win.lam)
        except Singular:
            skipped["singular_windows"] += 1
            continue
        r = len(win.rows)
        best = win.q.clone()
        t_exact = np.zeros(r)
        solved = np.ones(r, dtype=bool)
        for i in range(r):
            t0 = time.perf_counter()
            try:
                one = exact.decode(E.rows(slice(i, i + 1)))
                best[i] = E.grid.dequantize(one.codes, one.scale, one.zero)[0]
            except InputError:
                solved[i] = False
            t_exact[i] = time.perf_counter() - t0
        skipped["rows_past_max_nodes"] += int((~solved).sum())
        fstar = win.value(best)
        found = {"exact": (fstar, t_exact), recipe.label: (win.value(win.q), np.full(r, np.nan))}
        dseed = int(np.random.SeedSequence([seed, wi]).generate_state(1)[0])
        for e in entries:
            t0 = time.perf_counter()
            res = e.decoder.decode(P if e.damped else E, seed=dseed)
            found[e.label] = (win.value(E.grid.dequantize(res.codes, res.scale, res.zero)), np.full(r, (time.perf_counter() - t0) / r))
        for label, (f, sec) in found.items():
            for i in np.flatnonzero(solved):
                out.append({"label": label, "layer": win.layer, "kind": win.kind, "f": float(f[i]),
                            "fstar": float(fstar[i]), "seconds": float(sec[i])})
        if progress and time.perf_counter() - t_last > 15:
            log.info("gaps: %d/%d windows solved", wi + 1, len(windows))
            t_last = time.perf_counter()
    if any(skipped.values()):
        log.warning("gaps: skipped %d windows with a singular H_SS and %d rows past max_nodes=%d",
                    skipped["singular_windows"], skipped["rows_past_max_nodes"], max_nodes)
    return out, skipped


def relative_gaps(f: np.ndarray, fstar: np.ndarray) -> np.ndarray:
    """`(f − f*) / f*`, 0 where `f = f* = 0`; tiny negative differences of float64 evaluation clipped."""
    diff = np.maximum(f - fstar, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(diff == 0, 0.0, diff / fstar)


def summarize(rows: Sequence[dict], entries: Sequence[Entry], meta: dict) -> list[dict]:
    """Records per (solver, layer type) and per solver over all layer types (`layer: all`)."""
    records = []
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    for e in entries:
        mine = [r for r in rows if r["label"] == e.label]
        for kind in [*kinds, "all"]:
            sel = [r for r in mine if kind in ("all", r["kind"])]
            if not sel:
                continue
            f = np.array([r["f"] for r in sel])
            fstar = np.array([r["fstar"] for r in sel])
            gap = relative_gaps(f, fstar)
            sec = np.array([r["seconds"] for r in sel])
            records.append({
                "decoder": e.name, "params": e.params, "solved_on": e.on, "damping": "layer" if e.damped else "none",
                "bits": meta["bits"], "layer": kind,
                "optimal_fraction": float(np.mean(gap <= OPTIMAL)), "gap_mean": float(gap.mean()),
                "gap_p95": float(np.percentile(gap, 95)), "gap_max": float(gap.max()), "count": len(sel),
                "below_exact": int(np.sum(f < fstar * (1 - OPTIMAL))),
                "seconds_per_problem": None if np.isnan(sec).all() else float(np.nanmean(sec)),
                **meta,
            })
    return records


def _name(r: dict) -> str:
    return (label_of(r["decoder"], r["params"]) + (" (layer)" if r["solved_on"] == "layer" else "")
            + (" λ=0" if r["damping"] == "none" and r["decoder"] != "exact" else ""))


def table(records: Sequence[dict]) -> str:
    """Two text tables: every solver over all layers, and optimal fraction / mean gap per layer type."""
    allrec = [r for r in records if r["layer"] == "all"]
    head = (f"{'bits':>4} {'solver':<26} {'optimal':>8} {'mean gap':>10} {'p95 gap':>10} {'max gap':>10} "
            f"{'ms/problem':>10} {'count':>6}")
    lines = [head, "-" * len(head)]
    for r in allrec:
        ms = "-" if r["seconds_per_problem"] is None else f"{1e3 * r['seconds_per_problem']:.2f}"
        lines.append(f"{r['bits']:>4} {_name(r):<26} {r['optimal_fraction']:>8.1%} {r['gap_mean']:>10.3g} "
                     f"{r['gap_p95']:>10.3g} {r['gap_max']:>10.3g} {ms:>10} {r['count']:>6}")
    kinds = list(dict.fromkeys(r["layer"] for r in records if r["layer"] != "all"))
    head = f"{'bits':>4} {'solver':<26} " + " ".join(f"{k:>14}" for k in kinds)
    lines += ["", "optimal fraction, mean gap per layer type", head, "-" * len(head)]
    cell = {(r["bits"], _name(r), r["layer"]): r for r in records}
    for r in allrec:
        m = [cell.get((r["bits"], _name(r), k)) for k in kinds]
        lines.append(f"{r['bits']:>4} {_name(r):<26} " + " ".join(
            f"{x['optimal_fraction']:>5.0%} {x['gap_mean']:>8.2g}" if x else f"{'-':>14}" for x in m))
    return "\n".join(lines)


def plot(rows_by_bits: dict[int, list[dict]], labels: Sequence[str], path: str, title: str) -> None:
    """The distribution of relative gaps per solver: one panel per bit width, the fraction of sub-problems
    whose gap is at most x (x on a symmetric-log axis, so the optimal ones show at 0)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    bits = sorted(rows_by_bits)
    fig, axes = plt.subplots(1, len(bits), figsize=(6.5 * len(bits), 4.5), squeeze=False, sharey=True)
    for ax, b in zip(axes[0], bits):
        for label in labels:
            sel = [r for r in rows_by_bits[b] if r["label"] == label]
            if not sel:
                continue
            gap = np.sort(relative_gaps(np.array([r["f"] for r in sel]), np.array([r["fstar"] for r in sel])))
            ax.step(np.concatenate([[0.0], gap]), np.arange(len(gap) + 1) / len(gap), where="post", label=label)
        ax.set_xscale("symlog", linthresh=1e-3)
        ax.set_xlabel("relative gap (f − f*) / f*")
        ax.set_title(f"{b} bits")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("fraction of sub-problems with gap ≤ x")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def _atomic(path: str, write: Callable[[str], None]) -> None:
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise InputError(f"{path}: directory {d} does not exist")
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def run(config: str, overrides: Sequence[str] = (), bits: Sequence[int] = (), blocks: Optional[Sequence[int]] = None,
        c: int = 16, rows: int = 8, windows: int = 4, decoders: str = DEFAULT_DECODERS, undamped: str = "",
        max_nodes: int = 2_000_000,
        seed: int = 0, output: str = "gaps.json", png: Optional[str] = None, progress: bool = True) -> list[dict]:
    """`ojbkq gaps`: for each bit width (the config's when `bits` is empty), calibrate, cut and solve the
    windows of the layers of `blocks` (default: first, middle and last), then write the records (JSON) and
    the gap distributions (PNG). The decoders of `undamped` are also run on the undamped windows.
    Returns the records."""
    from .registry import get_registry
    for key, v in (("--columns", c), ("--rows", rows), ("--windows", windows), ("--max-nodes", max_nodes)):
        if v < 1:
            raise InputError(f"{key} {v}: must be a positive integer")
    for path in (output, png):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise InputError(f"{path}: directory {os.path.dirname(os.path.abspath(path))} does not exist")
    if png:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise InputError(f"--plot {png}: drawing the gap distributions needs matplotlib "
                             f"(pip install 'ojbkq[plots]'), or pass --plot ''") from None
    base = load_spec(config, overrides)
    reg = get_registry()
    entries = [Entry(label_of(n, p), n, p, decoder=reg.decoder(n, p, device="cpu")) for n, p in parse_decoders(decoders)]
    entries += [Entry(label_of(n, p) + " λ=0", n, p, decoder=reg.decoder(n, p, device="cpu"), damped=False)
                for n, p in (parse_decoders(undamped) if undamped else [])]
    dec = base.decoder
    recipe = Entry(f"{label_of(dec.name, dec.options)} (layer)", dec.name, dec.options, on="layer")
    exact = Entry("exact", "exact", {"max_nodes": max_nodes}, damped=False)
    solvers = [*entries, recipe, exact]
    records, rows_by_bits = [], {}
    for b in bits or [base.quant.bits]:
        spec = base.with_overrides({"quant.bits": b})
        t0 = time.perf_counter()
        wins, facts = collect(spec, blocks, c, rows, windows, seed, progress)
        found, skipped = solve(wins, entries, recipe, max_nodes, seed, progress)
        q, cal = spec.quant, spec.calibration
        meta = {"bits": b, "c": c, "rows": rows, "windows_per_layer": windows, "seed": seed,
                "model": facts["model"], "architecture": facts["architecture"], "blocks": facts["blocks"],
                "objective": spec.objective.to_dict(), "group_size": q.group_size, "sym": q.sym,
                "act_order": q.act_order, "static_groups": q.static_groups, "damp": q.damp, "grid": q.grid,
                "rotation": dict(vars(spec.rotation)), "recipe_decoder": dec.name, "calibration": {"dataset": cal.dataset, "samples": cal.samples,
                                                            "seqlen": cal.seqlen, "seed": cal.seed},
                "device": "cpu", "calibration_device": facts["device"], "dtype": "float64",
                "torch_threads": torch.get_num_threads(), "skipped": skipped,
                "seconds": time.perf_counter() - t0}
        records += summarize(found, solvers, meta)
        rows_by_bits[b] = found
    def write_json(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(records, f, indent=1)
            f.write("\n")
    _atomic(output, write_json)
    if png:
        plot(rows_by_bits, [e.label for e in solvers if e.label != "exact"], png,
             f"{facts['model']}: {c}-column windows, {rows} rows, blocks {','.join(map(str, facts['blocks']))}")
    return records
