"""Plain torch references (float64, slow, obvious) for the MagicPIG kernels.

Shared by the numba tests (``cpu_kernels.lsh``) and the Triton test (``gpu_kernels.simhash``).
"""

import math

import torch
from torch import Tensor

W_FLOOR = 1e-4


def simhash_reference(x: Tensor, r: Tensor, k: int, l: int, center: Tensor | None = None) -> Tensor:
    """Codes [..., N, L] int64 of x [..., N, D] (minus center [..., D]): bit b of table j is
    ``((x - center) @ r)[..., j*k + b] > 0``."""
    x = torch.as_tensor(x).double()
    if center is not None:
        x = x - torch.as_tensor(center).double()[..., None, :]
    h = x @ torch.as_tensor(r).double()
    bits = (h.unflatten(-1, (l, k)) > 0).long()
    return (bits << torch.arange(k)).sum(-1)


def build_tables_reference(codes: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """CSR tables of codes [n, L]: offsets [L, 2**k + 1], ids [L, n] (stable sort by bucket)."""
    codes = torch.as_tensor(codes).long()
    offsets, ids = [], []
    for j in range(codes.shape[1]):
        counts = torch.bincount(codes[:, j], minlength=2**k)
        offsets.append(torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))
        ids.append(torch.sort(codes[:, j], stable=True).indices)
    return torch.stack(offsets), torch.stack(ids)


def probe_reference(codes: Tensor, q_codes: Tensor, lo: int, hi: int) -> Tensor:
    """Ids in [lo, hi) of keys (codes [n, L]) whose code equals the query's in >= 2 tables."""
    codes = torch.as_tensor(codes).long()
    hits = (codes == torch.as_tensor(q_codes).long()[None, :]).sum(1)
    ids = torch.arange(codes.shape[0])
    return ids[(hits >= 2) & (ids >= lo) & (ids < hi)]


def collision_weight_reference(cos: Tensor, k: int, l: int) -> Tensor:
    """MagicPIG's probability of >= 2 collisions in l tables of k bits, at cosine ``cos``."""
    p = (1 - torch.arccos(cos.clamp(-1, 1)) / math.pi) ** k
    return 1 - (1 - p) ** l - l * p * (1 - p) ** (l - 1)


def sampled_attention_reference(
    q: Tensor, keys: Tensor, values: Tensor, mean: Tensor, candidates: Tensor, k: int, l: int, scale: float
) -> tuple[Tensor, Tensor]:
    """Importance-corrected softmax of q [D] over keys[candidates] -> out [D], lse (float64).

    The angle is between q and the centred key ``k - mean``; the logit uses the uncentred key.
    """
    q = torch.as_tensor(q).double()
    idx = torch.as_tensor(candidates).long()
    kc = torch.as_tensor(keys).double()[idx]
    vc = torch.as_tensor(values).double()[idx]
    if len(idx) == 0:
        return torch.zeros_like(q), torch.tensor(float("-inf"), dtype=torch.float64)
    centred = kc - torch.as_tensor(mean).double()
    den = q.norm() * centred.norm(dim=1)
    cos = torch.where(den > 0, centred @ q / den, torch.zeros_like(den))
    logits = kc @ q * scale - torch.log(collision_weight_reference(cos, k, l) + W_FLOOR)
    lse = torch.logsumexp(logits, 0)
    return torch.softmax(logits, 0) @ vc, lse
