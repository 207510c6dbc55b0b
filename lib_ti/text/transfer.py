"""Nearest-token transfer between CLIP-L and CLIP-G (SD1 <-> SDXL).

SDXL's two text encoders share the CLIP BPE vocabulary, so row ``i`` of the CLIP-L and of the CLIP-G
token table is the same token. A vector on one encoder is written as a weighted mix of a few
vocabulary rows there; the same mix of those tokens' rows on the other encoder is its counterpart.
A vector that is a token, or a mix of up to ``k`` tokens (what Create and Merge make), is reproduced
exactly; for any other vector the residual says how much of it no mix of ``k`` tokens explains.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from lib_ti.embedding import ENCODER_WIDTHS, Embedding
from lib_ti.errors import EmbeddingFormatError, TIError, short_repr

logger = logging.getLogger(__name__)

#: Tokens per vector unless asked otherwise: merges mix a few words, and a trained vector stays near a
#: few tokens; more tokens fit the source better but mostly fit what has no counterpart on the other side.
DEFAULT_K = 8
MAX_K = 64
#: Candidates per vector taken from one pass over the whole table (the greedy search runs within them).
POOL = 512
#: A fit whose residual is below this fraction of the vector's norm is exact: no more tokens are added.
EXACT = 1e-6
#: A row whose part outside the span of the rows already picked is below this fraction of its length is
#: passed over (float32 inputs carry about 7 digits; a direction smaller than that is rounding, and
#: solving for it would only amplify noise into large cancelling weights).
RCOND = 1e-7
_CHUNK = 8192


class TransferError(TIError, ValueError):
    """A nearest-token transfer cannot run with these inputs."""


@dataclass
class TransferResult:
    """Transferred vectors and how well each source vector was explained by its tokens."""

    #: ``[N, target width]`` float32
    vectors: torch.Tensor
    #: per vector ``|v - fit| / |v|``: 0 when the vector is exactly a mix of its tokens (0 for a zero vector)
    residual: list[float]
    #: per vector the tokens of the mix as ``(token id, weight)``, largest ``|weight|`` first
    tokens: list[list[tuple[int, float]]]

    @property
    def fit_cosine(self) -> list[float]:
        """Cosine between each source vector and its fit (a least-squares fit is orthogonal to its residual)."""
        return [math.sqrt(max(0.0, 1.0 - r * r)) for r in self.residual]


def _check_tables(source: torch.Tensor, target: torch.Tensor, k: object) -> int:
    for what, t in (("source", source), ("target", target)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            msg = f"the {what} token table must be a 2-D floating [tokens, width] tensor, not {shape}"
            raise TransferError(msg)
    if source.shape[0] != target.shape[0]:
        msg = (
            f"the token tables have different row counts ({source.shape[0]} and {target.shape[0]}); "
            "a transfer needs two encoders of one vocabulary"
        )
        raise TransferError(msg)
    limit = min(MAX_K, source.shape[0], source.shape[1])
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= limit:
        msg = f"tokens per vector (k) must be a whole number from 1 to {limit}, not {short_repr(k)}"
        raise TransferError(msg)
    return k


def _scores(
    table: torch.Tensor, queries: torch.Tensor, inv_norm: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``|cos|`` of every table row with every query (``[V, N]``) in one pass, chunked so a float16
    table is converted a slice at a time; also the rows' inverse norms (computed on the way if not given)."""
    q = queries.to(torch.float32).T.contiguous()
    out = torch.empty(table.shape[0], q.shape[1])
    norms = torch.empty(table.shape[0]) if inv_norm is None else inv_norm
    for start in range(0, table.shape[0], _CHUNK):
        rows = table[start : start + _CHUNK].detach().to("cpu", torch.float32)
        if inv_norm is None:
            norms[start : start + rows.shape[0]] = rows.norm(dim=1).clamp_min(1e-12).reciprocal()
        # [V, D] @ [D, N] runs several times faster on CPU than [N, D] @ [D, V]
        out[start : start + rows.shape[0]] = rows @ q
    out.abs_().mul_(norms[:, None])
    return out, norms


def _greedy(pool: torch.Tensor, v: torch.Tensor, k: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Orthogonal matching pursuit within ``pool`` (float64 ``[P, D]``): up to ``k`` rows, each the one
    nearest by ``|cosine|`` to what the rows picked so far leave unexplained.

    The least-squares fit is kept as a QR factorization grown one row at a time (Gram-Schmidt, twice,
    which is as accurate as Householder): a row whose part outside the span of the picked ones is below
    ``RCOND`` of its length adds nothing and is passed over. Returns the picked rows, their weights and
    the residual.
    """
    inv = pool.norm(dim=1).clamp_min(1e-300).reciprocal()
    target = EXACT * float(v.norm())
    width = pool.shape[1]
    q = v.new_zeros(width, 0)  # orthonormal columns spanning the picked rows
    r = v.new_zeros(0, 0)  # rows^T = q @ r, upper triangular
    z = v.new_zeros(0)  # q^T v
    picked: list[int] = []
    residual = v
    skip = torch.zeros(pool.shape[0], dtype=torch.bool)
    while len(picked) < k and float(residual.norm()) > target:
        score = (pool @ residual).abs_().mul_(inv).masked_fill_(skip, -1.0)
        best = int(score.argmax())
        if float(score[best]) <= 0.0:
            break  # nothing left in the pool explains any more of it
        skip[best] = True
        a = pool[best]
        c = q.T @ a
        rest = a - q @ c
        c2 = q.T @ rest
        rest -= q @ c2
        rho = float(rest.norm())
        if rho <= RCOND * float(a.norm()):
            continue
        m = len(picked)
        grown = v.new_zeros(m + 1, m + 1)
        grown[:m, :m] = r
        grown[:m, m] = c + c2
        grown[m, m] = rho
        r = grown
        q = torch.cat([q, (rest / rho)[:, None]], dim=1)
        z = torch.cat([z, (q[:, m] @ v)[None]])
        residual = v - q @ z
        picked.append(best)
    if not picked:
        return picked, z, residual
    w = torch.linalg.solve_triangular(r, z[:, None], upper=True)[:, 0]
    return picked, w, residual


def transfer_vectors(
    vectors: torch.Tensor, source_table: torch.Tensor, target_table: torch.Tensor, k: int = DEFAULT_K
) -> TransferResult:
    """Each row of ``vectors`` as a weighted mix of up to ``k`` rows of ``source_table``; the same mix of
    ``target_table``'s rows (the same tokens on the other encoder) is its transfer.

    Tokens are picked greedily: first the row nearest the vector by ``|cosine|``, then each time the row
    nearest to what the picked rows leave unexplained (orthogonal matching pursuit), with the weights
    re-solved by least squares in float64 after every pick. A token, or a mix of a few tokens, is thus
    reproduced exactly and stops the search early, and a row nearly parallel to the picked ones is never
    chosen (it explains nothing new), which keeps the solve well conditioned; a row that is within
    ``RCOND`` of that span is passed over all the same. Weights may be negative: Merge subtracts (``'cat' - 'dog'``), and a fit restricted to positive
    weights would replace such a vector by a different one. The search runs within the ``POOL`` rows
    nearest the vector, and once more within those nearest the residual if the first round is not exact
    (a token with a small weight in a mix stands out only once the large ones are removed): two passes
    over the table in all, however large ``k`` is.
    """
    k = _check_tables(source_table, target_table, k)
    if not isinstance(vectors, torch.Tensor) or vectors.dim() != 2:
        msg = "the vectors to transfer must be a 2-D [vectors, width] tensor"
        raise TransferError(msg)
    if vectors.shape[1] != source_table.shape[1]:
        msg = f"the vectors are {vectors.shape[1]} wide but the source token table is {source_table.shape[1]} wide"
        raise TransferError(msg)
    v64 = vectors.detach().to("cpu", torch.float64)
    if not torch.isfinite(v64).all():
        msg = "the vectors to transfer hold NaN or infinite values"
        raise TransferError(msg)
    n = v64.shape[0]
    out = torch.zeros(n, target_table.shape[1], dtype=torch.float64)
    residual = [0.0] * n
    tokens: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    live = [i for i in range(n) if float(v64[i].norm()) > 0.0]
    if not live:
        return TransferResult(out.float(), residual, tokens)
    pool_size = min(POOL, source_table.shape[0])
    scores, inv_norm = _scores(source_table, v64[live], None)
    pools = {i: scores[:, j].topk(pool_size).indices for j, i in enumerate(live)}
    found: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
    retry: list[int] = []
    for i in live:
        ids, w, res = _run(source_table, pools[i], v64[i], k)
        found[i] = (ids, w, float(res.norm() / v64[i].norm()))
        if found[i][2] > EXACT:
            retry.append(i)
    if retry:
        residuals = torch.stack([v64[i] - _fit(source_table, *found[i][:2]) for i in retry])
        scores, _ = _scores(source_table, residuals, inv_norm)
        for j, i in enumerate(retry):
            wider = torch.cat([pools[i], scores[:, j].topk(pool_size).indices]).unique()
            ids, w, res = _run(source_table, wider, v64[i], k)
            r = float(res.norm() / v64[i].norm())
            if r < found[i][2]:
                found[i] = (ids, w, r)
    for i, (ids, w, r) in found.items():
        out[i] = w @ target_table[ids].detach().to("cpu", torch.float64)
        order = w.abs().argsort(descending=True)
        tokens[i] = [(int(ids[o]), float(w[o])) for o in order]
        residual[i] = r
    logger.debug("transferred %d vectors with k=%d, residuals %s", n, k, residual)
    return TransferResult(out.float(), residual, tokens)


def _run(
    table: torch.Tensor, pool_ids: torch.Tensor, v: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    picked, w, res = _greedy(table[pool_ids].detach().to("cpu", torch.float64), v, k)
    return pool_ids[picked], w, res


def _fit(table: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return w @ table[ids].detach().to("cpu", torch.float64)


def _check_width(table: torch.Tensor, encoder: str, label: str) -> None:
    width = ENCODER_WIDTHS[encoder]
    if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[1] != width:
        shape = list(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
        msg = f"the {label} token table must be [tokens, {width}], not {shape}"
        raise TransferError(msg)


def _transferred(
    emb: Embedding, vectors: dict[str, torch.Tensor], k: int, res: TransferResult, name: str | None
) -> Embedding:
    meta = dict(emb.metadata)
    meta["transfer"] = f"nearest-tokens k={k}"
    meta["transfer_fit"] = ",".join(f"{c:.4f}" for c in res.fit_cosine)
    return Embedding(
        name or emb.name,
        vectors,
        step=emb.step,
        sd_checkpoint=emb.sd_checkpoint,
        sd_checkpoint_name=emb.sd_checkpoint_name,
        metadata=meta,
    )


def to_sdxl_by_tokens(
    emb: Embedding,
    l_table: torch.Tensor,
    g_table: torch.Tensor,
    k: int = DEFAULT_K,
    *,
    name: str | None = None,
) -> Embedding:
    """An SDXL embedding from an SD1 one: its vectors as CLIP-L, CLIP-G by nearest-token transfer.

    Name, step, checkpoint fields and metadata are kept; ``transfer`` (``nearest-tokens k=..``) and
    ``transfer_fit`` (the fit cosine of each vector, 1 = exact) are added.
    """
    if emb.kind != "sd1":
        msg = f"{emb.name} is {emb.kind}; only an SD1 (CLIP-L 768) embedding gets its CLIP-G half by nearest tokens"
        raise EmbeddingFormatError(msg)
    _check_width(l_table, "clip_l", "CLIP-L")
    _check_width(g_table, "clip_g", "CLIP-G")
    res = transfer_vectors(emb.vectors["clip_l"], l_table, g_table, k)
    return _transferred(emb, {"clip_l": emb.vectors["clip_l"], "clip_g": res.vectors}, k, res, name)


def to_sd1_by_tokens(
    emb: Embedding,
    g_table: torch.Tensor,
    l_table: torch.Tensor,
    k: int = DEFAULT_K,
    *,
    name: str | None = None,
) -> Embedding:
    """An SD1 embedding from a CLIP-G-only one (SDXL refiner) by nearest-token transfer to CLIP-L.

    An SDXL embedding already has its CLIP-L half, which SD1 reads as it is (``io.convert.to_sd1``).
    Metadata as in :func:`to_sdxl_by_tokens`.
    """
    if emb.kind == "sdxl":
        msg = f"{emb.name} is SDXL and has a CLIP-L half already; convert it to SD1 by taking that half"
        raise EmbeddingFormatError(msg)
    if emb.kind != "sdxl_refiner":
        msg = (
            f"{emb.name} is {emb.kind}; only a CLIP-G (1280) embedding gets CLIP-L vectors by nearest tokens"
        )
        raise EmbeddingFormatError(msg)
    _check_width(g_table, "clip_g", "CLIP-G")
    _check_width(l_table, "clip_l", "CLIP-L")
    res = transfer_vectors(emb.vectors["clip_g"], g_table, l_table, k)
    return _transferred(emb, {"clip_l": res.vectors}, k, res, name)
