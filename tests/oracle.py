"""The one torch oracle for attention, shared by every kernel test (float64, no tricks)."""

import torch
from torch import Tensor


def attention_oracle(
    q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """Exact attention of queries over keys with ``k_pos <= q_pos`` (causal by position).

    Parameters
    ----------
    q : [Nq, Hq, D]; k, v : [Nk, Hkv, D] with Hq a multiple of Hkv (GQA).
    q_pos : [Nq] int; k_pos : [Nk] int.

    Returns
    -------
    out : [Nq, Hq, D] float64 (zeros where no key is visible); lse : [Nq, Hq] float64
    (natural log; -inf where no key is visible).
    """
    g = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(g, dim=1)
    v = v.double().repeat_interleave(g, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    visible = k_pos[None, :] <= q_pos[:, None]
    s = s.masked_fill(~visible[None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("hqk,khd->qhd", p, v)
    return out, lse.transpose(0, 1)
