"""Attention policies, chosen by name. Adding one = a file, a line here (or
``register_policy`` from outside the package), a row in the policy test matrix. A policy's
options are the public fields of its dataclass: the CLI's ``--policy-param NAME=VALUE``
reads them by type (``parse_policy_params``) and ``--help`` lists them."""

from __future__ import annotations

import dataclasses

from hetero.policies.actqkv import ActQKVPolicy
from hetero.policies.base import DecodeStep, LayerTables, Policy, StepPlan, pack_rows
from hetero.policies.dense import DensePolicy
from hetero.policies.exact import exact_attention
from hetero.policies.magicpig import MagicPIGPolicy
from hetero.policies.quest import QuestPolicy
from hetero.policies.streaming import StreamingPolicy

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (DensePolicy, StreamingPolicy, QuestPolicy, MagicPIGPolicy, ActQKVPolicy)
}


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Add a policy class to the registry under its ``name`` (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Policy)) or not isinstance(getattr(cls, "name", None), str):
        raise TypeError(f"a policy is a Policy subclass with a name, got {cls!r}")
    if POLICIES.get(cls.name, cls) is not cls:
        raise ValueError(f"a policy named {cls.name!r} is registered already: {POLICIES[cls.name]}")
    POLICIES[cls.name] = cls
    return cls


def policy_options(cls: type[Policy]) -> dict[str, dataclasses.Field]:
    """A policy's options: the public fields of its dataclass that ``__init__`` takes."""
    return {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}


_BOOLS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
_READERS = {"int": int, "float": float, "str": str, "bool": lambda text: _BOOLS[text.strip().lower()]}


def parse_policy_params(name: str, pairs: list[tuple[str, str]]) -> dict:
    """``(option, text)`` pairs (a later one wins) as the parameters of policy ``name``, each
    text read by the type of its dataclass field: int, float, bool or str."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    options, params = policy_options(POLICIES[name]), {}
    for option, text in pairs:
        if option not in options:
            raise ValueError(f"policy {name!r} has no option {option!r}; its options: "
                             f"{', '.join(options) or 'none'}")
        annotation = options[option].type
        kind = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
        kind = kind.removesuffix(" | None")  # an option whose default is derived (quest's n_local)
        if kind not in _READERS:
            raise ValueError(f"policy {name!r}: option {option!r} ({kind}) cannot be set here")
        try:
            params[option] = _READERS[kind](text)
        except (KeyError, ValueError):
            raise ValueError(f"policy {name!r}: {option} must be {kind}, got {text!r}") from None
    return params


def make_policy(name: str, **params) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    try:
        return POLICIES[name](**params)
    except TypeError as e:
        raise ValueError(f"policy {name!r}: {e}") from None


__all__ = [
    "POLICIES", "ActQKVPolicy", "DecodeStep", "DensePolicy", "LayerTables", "MagicPIGPolicy", "Policy", "QuestPolicy", "StepPlan",
    "StreamingPolicy", "exact_attention", "make_policy", "pack_rows", "parse_policy_params", "policy_options",
    "register_policy",
]
