"""Attention policies, chosen by name. Adding one = a file, an entry here, a test row."""

from __future__ import annotations

from hetero.policies.base import DecodeStep, Policy, pack_tables
from hetero.policies.dense import DensePolicy
from hetero.policies.exact import exact_attention
from hetero.policies.magicpig import MagicPIGPolicy
from hetero.policies.quest import QuestPolicy
from hetero.policies.streaming import StreamingPolicy

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (DensePolicy, StreamingPolicy, QuestPolicy, MagicPIGPolicy)
}


def make_policy(name: str, **params) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    try:
        return POLICIES[name](**params)
    except TypeError as e:
        raise ValueError(f"policy {name!r}: {e}") from None


__all__ = [
    "POLICIES", "DecodeStep", "DensePolicy", "MagicPIGPolicy", "Policy", "QuestPolicy", "StreamingPolicy",
    "exact_attention", "make_policy", "pack_tables",
]
