"""Nothing a user relies on breaks: the public names and their parameters.

tests/data/public_api.json is a snapshot of every name in ``__all__`` of
jaxmx, jaxmx.ptq, jaxmx.flax (and .linen, .nnx) and jaxmx.optax, with each
callable's parameters (name, kind, default) and each class's public members.
A name may be added, and a function may gain a parameter that has a default;
a name, member or parameter that disappears, moves position, changes kind or
changes its default fails here. Regenerate with ``python -m tests._public_api``
only when a break is intended (and say so in the changelog).
"""

import json

import pytest

from tests import _public_api

SNAPSHOT = json.loads(_public_api.SNAPSHOT.read_text())
NOW = _public_api.snapshot()


def _cases():
    for mod, names in SNAPSHOT.items():
        for name in names:
            yield f"{mod}.{name}"


def _compatible(old: list[dict], new: list[dict], where: str) -> None:
    new_by_name = {p["name"]: (i, p) for i, p in enumerate(new)}
    for i, p in enumerate(old):
        assert p["name"] in new_by_name, f"{where}: parameter {p['name']!r} was removed"
        j, q = new_by_name[p["name"]]
        assert q["kind"] == p["kind"], f"{where}({p['name']}): kind {p['kind']} -> {q['kind']}"
        assert q["default"] == p["default"], (
            f"{where}({p['name']}): default {p['default']} -> {q['default']}"
        )
        if p["kind"] in ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD"):
            assert j == i, f"{where}: positional parameter {p['name']!r} moved from {i} to {j}"
    for q in new:
        if q["name"] not in {p["name"] for p in old}:
            assert q["default"] is not None or q["kind"] in ("VAR_POSITIONAL", "VAR_KEYWORD"), (
                f"{where}: new parameter {q['name']!r} has no default (breaks existing calls)"
            )


@pytest.mark.parametrize("qualname", list(_cases()))
def test_public_name_keeps_its_signature(qualname):
    mod, name = qualname.rsplit(".", 1)
    old = SNAPSHOT[mod][name]
    assert name in NOW[mod], f"{qualname} is no longer public"
    new = NOW[mod][name]
    assert new["kind"] == old["kind"], f"{qualname}: {old['kind']} -> {new['kind']}"
    if old.get("signature") is not None:
        assert new.get("signature") is not None, f"{qualname} lost its signature"
        _compatible(old["signature"], new["signature"], qualname)
    missing = set(old.get("members", ())) - set(new.get("members", ()))
    assert not missing, f"{qualname} lost members {sorted(missing)}"
