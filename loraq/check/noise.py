"""The base model as `loraq check` sees it, and each tensor's quantization noise predicted from a sample.

The noise of type T on base weight W is E = Q_T(W) − W, with Q_T llama.cpp's quantizer (loraq's
byte-identical kernels) and no importance matrix. Two sizes of it are predicted, both from
`mix.sample_rows` (128 evenly spaced rows, quantized with the real kernels), in seconds for a model:

    ‖E‖²_F = Σ_rows ‖e_i‖²  ≈  n_rows · mean over sampled rows of ‖e_i‖²

the whole noise energy (each row is quantized on its own, so the sample mean is unbiased), and,
for a low-rank delta ΔW = B·A, the noise inside the delta's own subspaces (a matched filter)

    ‖Uᵀ E V‖²_F  ≈  n_rows · mean over sampled rows of ‖U_i‖² · ‖e_i V‖²

with U, V orthonormal bases of B's column space and A's row space (QR of B and Aᵀ). The input side
is exact on each sampled row (e_i V); the output side uses that rows are quantized independently,
so the cross terms e_i V · e_j V of ‖Uᵀ(EV)‖² average out and row i weighs by its leverage ‖U_i‖²
(for U spread evenly this is the isotropic (r/n_out)·‖E V‖²_F). On the demo's 210 tensors (both
adapters, Q4_K_M to Q8_0) the summed estimate is within 2.5 % of projecting every row's error, each
tensor's within 0.74–1.53× (tests/test_check.py checks a sample).

Which of the two the verdict uses is decided per tensor by `DeltaBasis.structured` (verdicts.py
says why). A delta counts as structured when the stable rank of B·A, ‖ΔW‖²_F / ‖ΔW‖²_2, is under
`STRUCTURED` times what independent random factors of the same shape give (≈ r / ((1+√(r/n_out))²
(1+√(r/n_in))²), the Marchenko–Pastur edges of B and A): a trained LoRA puts its energy in a few
directions (the demo's: 0.11–0.54 of that figure), random factors spread it evenly (1.1–1.5).

A Hugging Face base folder is read without converting it: names, shapes and q/k row permutation
come from the converter's own plan (loraq.convert.hf_base), and values are rounded to the GGUF the
base stage would write (`base_outtype`), so the noise is that of the file llama-quantize would
read."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from ..convert.hf_base import _permute_rows, _plan, _read, index_tensors, load_hparams
from ..errors import BadArguments
from ..ggml_types import GGMLType, ggml_type
from ..gguf_io import GGUFFile, TensorInfo, open_gguf
from ..kernels import can_quantize, dequantize, quantize, read_f32
from ..quantize.mix import sample_rows


class HFModelView:
    """The parts of a GGUFFile that planning reads (KVs the type rules and the adapter map use,
    tensor names, shapes and types), built from a Hugging Face folder's config and safetensors
    headers; `read` gives one tensor's values as the converted GGUF would hold them."""

    def __init__(self, folder: Path, outtype: str = "f16"):
        self.path = folder
        hf_arch, arch, hp = load_hparams(folder)
        self.arch = arch
        self.hf_arch = hf_arch
        out_type = ggml_type({"f16": "F16", "bf16": "BF16", "f32": "F32"}[outtype])
        plan = _plan(folder, hf_arch, arch, hp, index_tensors(folder), out_type)
        self.tensors: list[TensorInfo] = []
        self._src: dict[str, tuple[Any, int]] = {}
        for o, src, heads in plan:
            self.tensors.append(TensorInfo(o.name, tuple(o.ne), o.type, 0, o.nbytes))
            self._src[o.name] = (src, heads)
        self._by_name = {t.name: t for t in self.tensors}
        self._kvs: dict[str, Any] = {
            "general.architecture": arch,
            "general.type": "model",
            f"{arch}.block_count": hp["num_hidden_layers"],
            f"{arch}.attention.head_count": hp["num_attention_heads"],
            f"{arch}.attention.head_count_kv": hp["num_key_value_heads"],
        }

    def get(self, key: str, default: Any = None) -> Any:
        return self._kvs.get(key, default)

    def arch_int(self, suffix: str, default: int | None = None) -> int | None:
        v = self._kvs.get(f"{self.arch}.{suffix}")
        return default if v is None else int(v)

    def tensor(self, name: str) -> TensorInfo:
        return self._by_name[name]

    def has_tensor(self, name: str) -> bool:
        return name in self._by_name

    def read(self, t: TensorInfo) -> np.ndarray:
        src, heads = self._src[t.name]
        if isinstance(src, np.ndarray):
            x = src.astype(np.float32)
        else:
            rows = src.shape[0] if src.shape else 1
            x = np.asarray(_read(src, 0, rows), dtype=np.float32)
            if heads:
                x = _permute_rows(x, heads)
        x = np.ascontiguousarray(x.reshape(t.shape), dtype=np.float32)
        if t.type.name != "f32":  # the GGUF holds the values rounded to its type
            x = dequantize(quantize(x.reshape(-1, t.ne[0]), t.type), t.type, t.shape)
        return x

    def close(self) -> None:
        pass


@dataclass
class BaseView:
    """The base for the check: a GGUF, or a Hugging Face folder read in place (`view`)."""

    path: Path
    kind: str  # "gguf" or "hf"
    g: GGUFFile  # a GGUFFile, or an HFModelView typed as one (it has every attribute planning reads)
    hf: HFModelView | None = None

    def read(self, name: str) -> np.ndarray:
        """Tensor `name` as float32 in numpy orientation (rows × ne[0])."""
        t = self.g.tensor(name)
        x = self.hf.read(t) if self.hf is not None else read_f32(self.g, t)
        return x.reshape(-1, t.ne[0])


@contextmanager
def open_base(path: Path, outtype: str = "f16") -> Iterator[BaseView]:
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BadArguments(f"base {path} is a folder without config.json; give a GGUF or a Hugging Face model folder")
        view = HFModelView(path, outtype)
        yield BaseView(path, "hf", cast(GGUFFile, view), view)
        return
    with open_gguf(path) as g:
        yield BaseView(path, "gguf", g)


# A delta whose stable rank is under this share of an iid-random pair's counts as structured
# (trained): the demo's trained LoRA is at most 0.54, the random demo adapter at least 1.1.
STRUCTURED = 0.75


@dataclass(frozen=True)
class DeltaBasis:
    """ΔW = B·A's subspaces and how concentrated its energy is (see the module doc)."""

    u: np.ndarray  # (n_out, r) orthonormal basis of B's column space
    v: np.ndarray  # (n_in, r) orthonormal basis of A's row space
    stable_rank: float  # ‖ΔW‖²_F / ‖ΔW‖²_2 (0 for a zero delta)
    iid_stable_rank: float  # what independent random factors of this shape give

    @property
    def structured(self) -> bool:
        return 0 < self.stable_rank < STRUCTURED * self.iid_stable_rank


def delta_basis(b: np.ndarray, a: np.ndarray) -> DeltaBasis:
    """Bases of ΔW = B·A (b: n_out × r, a: r × n_in) and its stable rank, from the r × r core:
    with B = Q_b R_b and Aᵀ = Q_a R_a, ΔW = Q_b (R_b R_aᵀ) Q_aᵀ has the singular values of R_b R_aᵀ."""
    qb, rb = np.linalg.qr(b.astype(np.float64))
    qa, ra = np.linalg.qr(a.astype(np.float64).T)
    s = np.linalg.svd(rb @ ra.T, compute_uv=False)
    sr = float((s * s).sum() / (s[0] * s[0])) if len(s) and s[0] > 0 else 0.0
    r, n_out, n_in = b.shape[1], b.shape[0], a.shape[1]
    iid = r / ((1 + math.sqrt(r / n_out)) ** 2 * (1 + math.sqrt(r / n_in)) ** 2) if r else 0.0
    return DeltaBasis(qb, qa, sr, iid)


@dataclass(frozen=True)
class Noise:
    type: str  # the ggml type the tensor gets
    predicted: float  # predicted ‖Q(W) − W‖²_F over the whole tensor
    row_sq: np.ndarray  # ‖e_i‖² of each sampled row
    rows: np.ndarray  # the sampled row indices
    subspace: float | None = None  # predicted ‖Uᵀ E V‖²_F, given a basis
    sub_row_sq: np.ndarray | None = None  # ‖U_i‖² · ‖e_i V‖² of each sampled row, given a basis


def predict_noise(w: np.ndarray, t: GGMLType, k: int | None = None, basis: DeltaBasis | None = None) -> Noise:
    """‖Q_t(W) − W‖²_F predicted from sampled rows of `w` (rows × ne0, float32), no imatrix, and
    with `basis` the noise inside the delta's subspaces, ‖Uᵀ E V‖²_F (module doc).
    A type that keeps the tensor (F32, or F16/BF16 of values already in it) gives 0."""
    n_rows = w.shape[0]
    idx = sample_rows(n_rows) if k is None else sample_rows(n_rows, k)
    rows = np.ascontiguousarray(w[idx], dtype=np.float32)
    if not can_quantize(t):
        raise BadArguments(f"loraq cannot quantize to {t.name}")
    err = rows.astype(np.float64) - dequantize(quantize(rows, t), t, rows.shape)
    row_sq = np.einsum("ij,ij->i", err, err)
    predicted = float(n_rows * row_sq.mean()) if len(idx) else 0.0
    if basis is None:
        return Noise(t.name, predicted, row_sq, idx)
    ev = err @ basis.v
    lev = np.einsum("ij,ij->i", basis.u[idx], basis.u[idx])
    sub_rows = lev * np.einsum("ij,ij->i", ev, ev)
    return Noise(t.name, predicted, row_sq, idx, float(n_rows * sub_rows.mean()) if len(idx) else 0.0, sub_rows)


def exact_noise(w: np.ndarray, t: GGMLType) -> float:
    """‖Q_t(W) − W‖²_F from quantizing every row (what `predict_noise` estimates)."""
    total = 0.0
    step = max(1, (1 << 20) // max(1, w.shape[1]))
    for lo in range(0, w.shape[0], step):
        rows = np.ascontiguousarray(w[lo : lo + step], dtype=np.float32)
        err = rows.astype(np.float64) - dequantize(quantize(rows, t), t, rows.shape)
        total += float(np.einsum("ij,ij->", err, err))
    return total


def exact_subspace_noise(w: np.ndarray, t: GGMLType, u: np.ndarray, v: np.ndarray) -> float:
    """‖Uᵀ (Q_t(W) − W) V‖²_F from quantizing every row (what `predict_noise` estimates with a basis)."""
    ev = np.zeros((w.shape[0], v.shape[1]))
    step = max(1, (1 << 20) // max(1, w.shape[1]))
    for lo in range(0, w.shape[0], step):
        rows = np.ascontiguousarray(w[lo : lo + step], dtype=np.float32)
        ev[lo : lo + step] = (rows.astype(np.float64) - dequantize(quantize(rows, t), t, rows.shape)) @ v
    m = u.T @ ev
    return float(np.einsum("ij,ij->", m, m))


def fro_sq_lowrank(b: np.ndarray, a: np.ndarray) -> tuple[float, np.ndarray]:
    """(‖B·A‖²_F, per-row ‖(B·A)_i‖²) from the factors, without forming the product:
    ‖B·A‖²_F = Σ (BᵀB) ∘ (A·Aᵀ), and row i is b_i (A·Aᵀ) b_iᵀ."""
    b64, a64 = b.astype(np.float64), a.astype(np.float64)
    gram = a64 @ a64.T
    rows = np.einsum("ij,jk,ik->i", b64, gram, b64)
    return float(rows.sum()), rows


def rel(a: float, b: float) -> float:
    """a / b, with 0/0 = 0 and x/0 = inf."""
    if b == 0:
        return 0.0 if a == 0 else math.inf
    return a / b
