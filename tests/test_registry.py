"""The shared Registry behind methods, metrics, datasets and models."""

from __future__ import annotations

import pytest

from unlearn_fast.registry import Registry


def test_register_get_and_defaults():
    reg = Registry("widget")

    @reg.register("spin", speed=2)
    def spin(*, speed):
        """Spin it."""
        return speed

    assert reg.names() == ["spin"] and "spin" in reg and len(reg) == 1
    assert reg.get("spin").description == "Spin it."
    assert reg.resolve_hyper("spin", {}) == {"speed": 2}
    assert reg.get("spin").fn(**reg.resolve_hyper("spin", {"speed": 5})) == 5
    with pytest.raises(ValueError, match="unknown widget 'spun'; valid widgets: spin"):
        reg.get("spun")
    with pytest.raises(ValueError, match=r"got unknown option\(s\) \['colour'\]; valid options: speed"):
        reg.resolve_hyper("spin", {"colour": 1})
    with pytest.raises(ValueError, match="already registered"):
        reg.register("spin")(spin)
