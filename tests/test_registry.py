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


def test_entry_facts_are_declared_checked_and_defaulted():
    from unlearn_fast.registry import Registry

    def non_negative_rank(name, facts):
        if facts["rank"] < 0:
            raise ValueError(f"{name}: rank")

    registry = Registry("thing", meta={"fast": True, "rank": 0}, check_meta=non_negative_rank)
    registry.register("a", meta={"rank": 2})(lambda: None)
    assert registry.get("a").meta == {"fast": True, "rank": 2}
    with pytest.raises(ValueError, match=r"unknown fact\(s\) \['speed'\] in meta; valid: fast, rank"):
        registry.register("b", meta={"speed": 1})
    with pytest.raises(ValueError, match="b: rank"):
        registry.register("b", meta={"rank": -1})


def test_default_metrics_keep_their_order_from_the_entries():
    from unlearn_fast.evaluate import DEFAULT_METRICS

    # The report's columns follow this order; it comes from the metric entries' facts now.
    assert DEFAULT_METRICS == (
        "target_acc", "similar_acc", "retain_acc", "test_acc", "target_loss", "target_confidence", "mia_auc",
        "residual_influence", "residual_influence_median", "kl_to_oracle_targets", "js_to_oracle_similar",
        "weight_distance_to_oracle", "mia_svc_auc_targets", "relearn_steps", "reconstruction_ssim_targets",
        "reconstruction_ssim_gap_to_oracle", "ri_targets_used")
