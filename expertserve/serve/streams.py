"""Several engine streams as one (completions with a list of prompts), choices indexed as OpenAI does."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from expertserve.engine.request import Chunk

_END = object()


async def merged(started: list[tuple[Any, Chunk | None]], n: int) -> AsyncIterator[Chunk]:
    """The chunks of every (stream, first chunk) pair in arrival order; choice `j` of prompt `i` becomes choice
    `i * n + j`. One stream passes through unchanged, with no task in between."""
    if len(started) == 1:
        stream, first = started[0]
        if first is not None:
            yield first
            async for chunk in stream:
                yield chunk
        return
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def pump(prompt: int, stream: Any, first: Chunk | None) -> None:
        try:
            if first is not None:
                await queue.put(dataclasses.replace(first, index=prompt * n + first.index))
                async for chunk in stream:
                    await queue.put(dataclasses.replace(chunk, index=prompt * n + chunk.index))
        except BaseException as e:  # handed to the consumer, which raises it
            await queue.put(e)
        finally:
            await queue.put(_END)

    tasks = [asyncio.create_task(pump(i, stream, first)) for i, (stream, first) in enumerate(started)]
    try:
        open_streams = len(tasks)
        while open_streams:
            item = await queue.get()
            if item is _END:
                open_streams -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
