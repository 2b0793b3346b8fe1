"""Which version serves: activation, rollback and hot-swap through the one owner (bot.adapters),
the registry as the one record, the store's log of what served, and the CLI's word about a
running bot. Versions are folders with a meta.json, as the SFT core writes them."""

from __future__ import annotations

import pytest

from bot.adapters import Adapters
from bot.cli import main
from bot.store import Store
from training.errors import UserError
from training.registry import Registry


class SwappingEngine:
    """Stands in for the engine's adapter slot: what it serves and every swap it was asked for."""

    def __init__(self, version: str | None = None):
        self.adapter_version = version
        self.swaps: list[str | None] = []

    async def swap_adapter(self, version) -> None:
        self.adapter_version = version.name if version else None
        self.swaps.append(self.adapter_version)


def registry_with(tmp_path, count: int) -> Registry:
    registry = Registry(tmp_path / "adapters", "甄嬛")
    for _ in range(count):
        with registry.writing() as draft:
            draft.commit({"base_model": "test", "trigger": "test"})
    return registry


async def test_promotion_and_rollback_write_the_registry_log_the_event_and_swap(tmp_path):
    registry = registry_with(tmp_path, 3)
    engine = SwappingEngine()
    async with Store.open(tmp_path / "bot.db") as store:
        adapters = Adapters(registry, store=store, engine=engine)
        for name in ("v0001", "v0002", "v0003"):
            await adapters.promote(name)
        assert (await adapters.rollback()).name == "v0002"
        assert (await adapters.rollback()).name == "v0001"
        with pytest.raises(UserError, match="no earlier active version"):
            await adapters.rollback()
        assert registry.active().name == "v0001" == adapters.serving
        assert engine.swaps == ["v0001", "v0002", "v0003", "v0002", "v0001"]
        assert [a.version for a in await store.activations("甄嬛")] == engine.swaps


async def test_a_rollback_is_refused_while_a_retrain_runs(tmp_path):
    registry = registry_with(tmp_path, 2)
    adapters = Adapters(registry, engine=SwappingEngine())
    await adapters.activate("v0001")
    await adapters.activate("v0002")
    adapters.pending = "a retrain is running (run 7)"
    with pytest.raises(UserError, match=r"a retrain is running \(run 7\); roll back after it ends"):
        await adapters.rollback()
    assert (await adapters.promote("v0001")).name == "v0001"  # the retrain's own promotion
    adapters.pending = None
    assert (await adapters.rollback()).name == "v0002"


async def test_without_an_engine_serving_is_the_registry_active(tmp_path):
    registry = registry_with(tmp_path, 1)
    adapters = Adapters(registry)
    assert adapters.serving is None
    await adapters.activate("v0001")
    assert adapters.serving == "v0001"


def test_the_cli_says_a_running_bot_keeps_its_version(tmp_path, capsys):
    registry = registry_with(tmp_path, 2)
    (tmp_path / "config.toml").write_text("", encoding="utf-8")
    config = str(tmp_path / "config.toml")
    assert main(["--config", config, "adapters", "activate", "v0001"]) == 0
    assert main(["--config", config, "adapters", "activate", "v0002"]) == 0
    assert main(["--config", config, "adapters", "rollback"]) == 0
    out = capsys.readouterr().out
    assert "Rolled back: v0001 is active again." in out and registry.active().name == "v0001"
    assert "keeps serving the version it loaded until it restarts" in out and "/rollback" in out
