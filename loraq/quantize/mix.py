"""Size-targeted mixes: each tensor's type chosen to minimise the predicted loss under a byte budget.

llama-quantize's mixes are fixed rules. Here every tensor the ftype's rules would quantize gets a
menu of types valid for its row length; each option's loss is predicted from the tensor itself
(its quantization error, weighted per column by the importance matrix when there is one, so the
loss estimates E‖ΔW·x‖² per token over the calibration data), times an optional per-tensor
sensitivity. The menu choice is a multiple-choice knapsack, solved by the Lagrangian method: for a
price λ per byte each tensor independently takes argmin(loss + λ·bytes); bisection on λ finds the
cheapest price that fits, and the budget left over buys the best loss-per-byte upgrades.

The result is a {tensor: type} map that the driver applies as anchored --tensor-type patterns, so
llama-quantize given the same list (--tensor-type-file) and imatrix writes the same bytes."""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from gguf import GGUFValueType

from ..errors import BadArguments
from ..ggml_types import GGMLType, ggml_type
from ..gguf_io import GGUFFile, open_gguf
from ..kernels import can_quantize, dequantize, quantize, read_f32

if TYPE_CHECKING:
    from .driver import QuantizeOptions

# The types a mix may use: every block format llama.cpp runs on the CPU that loraq writes,
# from 1.56 to 8.5 bits per weight. Types that need an importance matrix join only with one.
CANDIDATES = (
    "iq1_s",
    "iq1_m",
    "iq2_xxs",
    "iq2_xs",
    "iq2_s",
    "q2_K",
    "iq3_xxs",
    "iq3_s",
    "q3_K",
    "iq4_xs",
    "iq4_nl",
    "q4_0",
    "q4_1",
    "q4_K",
    "q5_0",
    "q5_1",
    "q5_K",
    "q6_K",
    "q8_0",
)
SAMPLE_ROWS = 128  # rows per tensor quantized to predict a type's loss: the error is a per-row sum


@dataclass(frozen=True)
class Option:
    type: GGMLType
    nbytes: int
    loss: float


# ggml (iq1_s, iq2_xxs, iq2_xs) or llama-quantize (iq1_m, iq2_s, iq3_xxs) refuse these without the tensor's own importance vector
_OWN_IMATRIX = frozenset({"iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs"})


def candidates(ne0: int, has_imatrix: bool, allowed: Sequence[str] = CANDIDATES, own_imatrix: bool | None = None) -> list[GGMLType]:
    """The allowed types whose blocks tile a row of ne0 elements. `own_imatrix`: the tensor has
    its own ne0 weights in the imatrix (default: has_imatrix)."""
    own = has_imatrix if own_imatrix is None else own_imatrix
    out = []
    for name in allowed:
        t = ggml_type(name)
        if name in _OWN_IMATRIX and not own:
            continue
        if ne0 % t.block == 0 and can_quantize(t) and (has_imatrix or name != "q2_K"):
            out.append(t)
    return out


def sample_rows(n_rows: int, k: int = SAMPLE_ROWS) -> np.ndarray:
    """Evenly spaced rows: deterministic, and spread over heads and experts."""
    if n_rows <= k:
        return np.arange(n_rows)
    return np.unique(np.linspace(0, n_rows - 1, k).round().astype(np.int64))


def row_errors(rows: np.ndarray, t: GGMLType, weights: np.ndarray | None, delta: np.ndarray | None = None) -> tuple[float, float, float]:
    """(plain, weighted, erased) for `rows` quantized to t with the imatrix as llama-quantize would:
    the mean per row of Σ_cols (x − deq(q(x)))², the weighted one with w_c = the imatrix's mean x²
    per column (= E‖ΔW·x‖² per output row and token, cross terms dropped; equal to plain without an
    imatrix). With the fine-tune's `delta` on those rows, `erased` is the share of it the rounding
    undoes (erased_share) and both errors count only the part orthogonal to the delta."""
    q = quantize(rows, t, weights)
    err = dequantize(q, t, rows.shape) - rows
    erased = 0.0
    if delta is not None:
        erased = erased_share(err, delta)
        err += np.float32(erased) * delta
    per_col = np.einsum("ij,ij->j", err, err, dtype=np.float64) / max(1, rows.shape[0])
    plain = float(per_col.sum())
    return plain, plain if weights is None else float(per_col @ weights.astype(np.float64)), erased


# A type whose error takes back more than this share of the fine-tune's delta on a tensor is no
# option for it: base weights that lie on the type's grid (a base dequantized from that type, as the
# demo's SmolLM2 from Q4_1) snap W + ΔW back to W. Measured on the demo: q4_1 erases 94 % of the
# delta, q4_K 94 % and q5_K 77 % on ffn_down, q5_1 overshoots it by 58 %; q4_0, q5_0, q6_K, q8_0
# and iq4_nl stay under 18 %. llama.cpp's own mixes cannot see this; it costs Q4_K_M on the demo.
MAX_ERASED = 0.25


def erased_share(err: np.ndarray, delta: np.ndarray) -> float:
    """a = −⟨E, ΔW⟩ / ‖ΔW‖²: the share of the delta that quantizing W + ΔW undoes (0: none, 1: all)."""
    dd = float(np.einsum("ij,ij->", delta, delta, dtype=np.float64))
    return -float(np.einsum("ij,ij->", err, delta, dtype=np.float64)) / dd if dd > 0 else 0.0


def tensor_options(
    g: GGUFFile,
    name: str,
    types: Sequence[GGMLType],
    weights: np.ndarray | None,
    sensitivity: float | None = None,
    *,
    base: GGUFFile | None = None,
) -> list[Option]:
    """Each type's (bytes, predicted loss per token) for tensor `name`.

    With `sensitivity` (KLD per unit of squared error, measured: imatrix/sensitivity.py) the loss
    is sensitivity × the type's squared error, a predicted KLD. Without, a matrix multiplied by the activations perturbs every output row:
    loss = n_rows × the weighted row error; token_embd is looked up, one row per token: its loss is
    the plain row error, plus the matrix term when it is also the (tied) output and the imatrix
    covers it. With `base` (the model before the merge), types that erase the delta are dropped
    and the loss counts the error orthogonal to the delta (the part the probe priced)."""
    info = g.tensor(name)
    n_rows = int(np.prod(info.ne[1:])) if len(info.ne) > 1 else 1
    pick = sample_rows(n_rows)
    w = read_f32(g, info).reshape(n_rows, info.ne[0])
    rows = np.ascontiguousarray(w[pick])
    del w
    delta = None
    if base is not None and base.has_tensor(name) and base.tensor(name).ne == info.ne:
        bt = base.tensor(name)
        delta = rows - read_f32(base, bt).reshape(n_rows, info.ne[0])[pick]
        if not np.any(delta):
            delta = None
    if weights is not None and weights.size != info.ne[0]:
        weights = None  # per-expert imatrix slices: predict from the plain error
    lookup = name == "token_embd.weight"
    out = []
    for t in types:
        plain, weighted, erased = row_errors(rows, t, weights, delta)
        if abs(erased) > MAX_ERASED:
            continue
        if sensitivity is not None:
            loss = sensitivity * n_rows * plain
        elif lookup:
            loss = plain + (n_rows * weighted if weights is not None else 0.0)
        else:
            loss = n_rows * weighted
        out.append(Option(t, t.row_bytes(info.ne[0]) * n_rows, loss))
    return out


def _hull(opts: Sequence[Option]) -> list[Option]:
    """The lower convex hull in (bytes, loss): the options a Lagrangian price can select, cheapest
    first. Dominated options (more bytes, no less loss) never can."""
    pts = sorted(opts, key=lambda o: (o.nbytes, o.loss))
    front: list[Option] = []
    for o in pts:
        if front and o.loss >= front[-1].loss:
            continue
        front.append(o)
    hull: list[Option] = []
    for o in front:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or above the segment a→o: never the unique minimiser for any price
            if (b.loss - a.loss) * (o.nbytes - a.nbytes) >= (o.loss - a.loss) * (b.nbytes - a.nbytes):
                hull.pop()
            else:
                break
        hull.append(o)
    return hull


def choose_mix(options: Mapping[str, Sequence[Option]], budget: int) -> dict[str, Option]:
    """The option per tensor minimising Σ loss with Σ bytes ≤ budget (Lagrangian, then greedy fill)."""
    hulls = {n: _hull(o) for n, o in options.items() if o}
    floor = sum(h[0].nbytes for h in hulls.values())
    if floor > budget:
        raise BadArguments(f"the size target is below the smallest possible mix ({floor} bytes of quantized tensors > {budget})")

    def pick(lam: float) -> dict[str, int]:
        return {n: min(range(len(h)), key=lambda i: h[i].loss + lam * h[i].nbytes) for n, h in hulls.items()}

    def size(sel: Mapping[str, int]) -> int:
        return sum(hulls[n][i].nbytes for n, i in sel.items())

    losses = [o.loss for h in hulls.values() for o in h]
    lo, hi = 0.0, max(1e-30, max(losses, default=0.0))  # at λ = max loss per byte everything is cheapest
    while size(pick(hi)) > budget:
        hi *= 2
    for _ in range(100):  # bisection on a monotone step function: 100 halvings exhaust a float
        mid = (lo + hi) / 2
        if size(pick(mid)) > budget:
            lo = mid
        else:
            hi = mid
    sel = pick(hi)
    left = budget - size(sel)
    # Spend what is left on the best remaining upgrades, one hull step at a time.
    while True:
        best, best_gain = None, 0.0
        for n, i in sel.items():
            h = hulls[n]
            if i + 1 < len(h):
                d = h[i + 1].nbytes - h[i].nbytes
                if d <= left:
                    gain = (h[i].loss - h[i + 1].loss) / d
                    if gain > best_gain:
                        best, best_gain = n, gain
        if best is None:
            break
        i = sel[best]
        left -= hulls[best][i + 1].nbytes - hulls[best][i].nbytes
        sel[best] = i + 1
    return {n: hulls[n][i] for n, i in sel.items()}


def tensor_type_patterns(mix: Mapping[str, GGMLType | Option]) -> list[tuple[str, str]]:
    """The mix as --tensor-type (pattern, type) pairs: anchored, so blk.1 never matches blk.11."""
    out = []
    for name, o in mix.items():
        t = o.type if isinstance(o, Option) else o
        out.append((f"^{re.escape(name)}$", t.name))
    return out


def format_tensor_type_file(pairs: Sequence[tuple[str, str]]) -> str:
    """llama-quantize's --tensor-type-file: whitespace-separated PATTERN=TYPE words."""
    return "".join(f"{p}={t}\n" for p, t in pairs)


def parse_tensor_type_file(text: str, limit: int = 1 << 16) -> list[tuple[str, str]]:
    """Read a --tensor-type-file as llama-quantize does (words split on whitespace, each NAME=TYPE)."""
    words = text.split()
    if len(words) > limit:
        raise BadArguments(f"tensor type file has {len(words)} entries; at most {limit} are accepted")
    out = []
    for w in words:
        name, sep, typ = w.partition("=")
        if not sep or not name or not typ:
            raise BadArguments(f"tensor type file: expected NAME=TYPE, got '{w[:80]}'")
        out.append((name, ggml_type(typ).name))
    return out


ProgressFn = Callable[[str, int, int], None]


def plan_options(
    g: GGUFFile,
    names: Sequence[str],
    ne0: Mapping[str, int],
    imatrix: Mapping[str, np.ndarray] | None,
    sensitivity: Mapping[str, float] | None = None,
    allowed: Sequence[str] = CANDIDATES,
    progress: ProgressFn | None = None,
    base: GGUFFile | None = None,
) -> dict[str, list[Option]]:
    """Every searched tensor's menu; `names` are the tensors the ftype's rules quantize. With
    `sensitivity` (measured KLD per unit squared error), a tensor it lacks is priced at the median
    of its kind (blk.*.ffn_up ...), or of all, so that every option is in the same units."""
    fill = _fill_sensitivity(sensitivity, names) if sensitivity else None
    out = {}
    for k, name in enumerate(names):
        w = None if imatrix is None else imatrix.get(name)
        own = w is not None and np.size(w) == ne0[name]  # per-expert slices: tensor_options drops them
        types = candidates(ne0[name], w is not None or imatrix is not None, allowed, own)
        s = None if fill is None else fill[name]
        out[name] = tensor_options(g, name, types, None if w is None else np.asarray(w, dtype=np.float32), s, base=base)
        if progress:
            progress(name, k + 1, len(names))
    return out


def _kind(name: str) -> str:
    return re.sub(r"^blk\.\d+\.", "", name)


def _fill_sensitivity(known: Mapping[str, float], names: Sequence[str]) -> dict[str, float]:
    by_kind: dict[str, list[float]] = {}
    for n, v in known.items():
        by_kind.setdefault(_kind(n), []).append(v)
    overall = float(np.median(list(known.values())))
    return {n: known[n] if n in known else float(np.median(by_kind.get(_kind(n), [overall]))) for n in names}


MIX_KV = "loraq.quantize.tensor_types"  # the chosen types: the --tensor-type-file text, one STRING KV


def target_mix(
    inp: Path | str,
    ftype_name: str,
    opts: QuantizeOptions,
    *,
    bpw: float | None = None,
    size_of: str | None = None,
    progress: ProgressFn | None = None,
    base: Path | str | None = None,
    sensitivity: Mapping[str, float] | None = None,
) -> tuple[list[tuple[str, str]], int]:
    """The --tensor-type pairs of a mix for `inp` whose tensor bytes stay within the budget: `bpw`
    over all elements (as llama-quantize reports bpw), or the tensor bytes of ftype `size_of`
    planned with the same options. The ftype's own rules choose what is left alone (norms, and
    every tensor they don't quantize). `base`: the model a fine-tune was merged into (types that
    erase its delta are dropped); `sensitivity`: measured KLD per unit squared error per tensor
    (imatrix/sensitivity.py). Returns (pairs, budget bytes)."""
    from ..ggml_types import file_type
    from .driver import plan_quantize

    if (bpw is None) == (size_of is None):
        raise BadArguments("give exactly one size target: --target-bpw or --size-of")
    with open_gguf(inp) as g, open_gguf(base) if base is not None else contextlib.nullcontext() as gb:
        plan, _ = plan_quantize(g, file_type(ftype_name), opts, dry_run=True)
        total = sum(e.nbytes for e in plan)
        n_el = sum(int(np.prod(e.ne)) for e in plan)
        if bpw is not None:
            if not (0 < bpw <= 32):
                raise BadArguments(f"--target-bpw must lie in (0, 32], got {bpw}")
            budget = int(bpw * n_el / 8)
        else:
            ref, _ = plan_quantize(g, file_type(str(size_of)), opts, dry_run=True)
            budget = sum(e.nbytes for e in ref)
        # A tied token_embd is also the output head: its error reaches every logit, which the
        # lookup's row error does not measure; unless its sensitivity was measured, it keeps the
        # type the ftype's rules give the head.
        tied = not g.has_tensor("output.weight") and not (sensitivity and "token_embd.weight" in sensitivity)
        searched = [
            e for e in plan if e.dst.quantized and e.dst != e.src and len(e.ne) == 2 and not (tied and e.name == "token_embd.weight")
        ]
        fixed = total - sum(e.nbytes for e in searched)
        # the list itself is stored in the file: one string per tensor, ~40 bytes each
        kv_bytes = sum(len(f"^{re.escape(e.name)}$=q4_0") + 8 for e in searched) + 64
        kv_bytes += 32 * len(plan)  # alignment padding may differ per tensor (GGUF aligns each to 32)
        names = [e.name for e in searched]
        options = plan_options(g, names, {e.name: e.ne[0] for e in searched}, opts.imatrix, sensitivity, progress=progress, base=gb)
    mix = choose_mix(options, budget - fixed - kv_bytes)
    return tensor_type_patterns({n: mix[n] for n in (e.name for e in searched)}), budget


def with_mix(opts: QuantizeOptions, pairs: Sequence[tuple[str, str]]) -> QuantizeOptions:
    """`opts` with a mix applied: its anchored patterns ahead of the user's (first match wins) and
    the list recorded in the file (MIX_KV), so --tensor-type-file can replay it."""
    return dataclasses.replace(
        opts,
        tensor_types=[*pairs, *opts.tensor_types],
        kv_overrides=[*opts.kv_overrides, (MIX_KV, GGUFValueType.STRING, format_tensor_type_file(pairs).encode())],
    )
