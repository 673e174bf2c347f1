"""The engine slot's restarts (serve/control/engine_slot.py) on the fake engine, without Ray."""

from __future__ import annotations

import asyncio

import pytest

from expertserve.engine.config import EngineConfig, EngineSettings
from expertserve.errors import EngineRestarting
from expertserve.serve.control.engine_slot import EngineSlot
from expertserve.serve.control.shape import EngineShape
from expertserve.serve.errors import client_error
from tests.fakes import FakeEngine


def test_a_drain_then_start_restart_refuses_new_requests_at_once_instead_of_holding_them() -> None:
    """Finding 15 of the security issue: new requests waited until the replica's longest stream ended and the new
    engine started; now they are refused at once (503 engine_restarting), and the ingress sends them elsewhere."""

    async def scenario() -> None:
        settings = EngineSettings(
            model_dir="m", max_lora_rank=8, prefix_caching=False, engine=EngineConfig(restart_overlap=False)
        )
        slot = EngineSlot(FakeEngine, settings)
        await slot.start()
        release = asyncio.Event()

        async def long_stream() -> None:
            async with slot.using():
                await release.wait()

        running = asyncio.create_task(long_stream())
        await asyncio.sleep(0.05)
        restart = asyncio.create_task(slot.restart(EngineShape(16, False)))
        await asyncio.sleep(0.05)
        assert not slot.ready
        began = asyncio.get_running_loop().time()
        with pytest.raises(EngineRestarting) as info:
            async with slot.using():
                pass
        assert asyncio.get_running_loop().time() - began < 0.05
        mapped = client_error(info.value)
        assert mapped is not None and mapped.status == 503 and mapped.code == "engine_restarting"
        release.set()
        await running
        await restart
        assert slot.ready and slot.shape == EngineShape(16, False)
        async with slot.using():
            pass

    asyncio.run(scenario())
