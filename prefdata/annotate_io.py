"""The annotation server's shared work, done once for many annotators: labels made durable in groups, and each
pair's media loaded once however many ask for it at the same moment. Both keep the event loop free: it answers
other annotators while a disk syncs or a video is transcoded."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Callable, Dict, List

from prefdata.annotate_store import LabelLog


class GroupCommit:
    """Labels acknowledged only once durable, with one fsync for all the labels posted while the previous one ran
    (group commit). Each label is written to the log at once, in the order posted (its sequence number); its
    `append` returns when an fsync that started after its write has finished. A failed fsync fails every label it
    covered (the page says "not saved"; a retry writes the label again, and the later line counts)."""

    def __init__(self, label_log: LabelLog):
        self._log = label_log
        self._waiting: List[asyncio.Future] = []
        self._syncing = False

    async def append(self, annotator: str, session: str, pair: str, choice: str, left: str) -> dict:
        record = self._log.write(annotator, session, pair, choice, left)
        durable = asyncio.get_running_loop().create_future()
        self._waiting.append(durable)
        if not self._syncing:
            self._syncing = True
            asyncio.get_running_loop().create_task(self._sync())
        await durable
        return record

    async def _sync(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                try:
                    await loop.run_in_executor(None, self._log.sync)
                except OSError as err:
                    for durable in batch:
                        if not durable.done():  # (a request its client gave up on)
                            durable.set_exception(err)
                    continue
                for durable in batch:
                    if not durable.done():
                        durable.set_result(None)
        finally:
            self._syncing = False


class PairMedia:
    """Each pair's members as the page shows them (`load(pair)`: read, and transcoded, in a worker thread), loaded
    once however many annotators ask at the same moment: the first request starts the work and the others await
    the same future, so a pair is never transcoded twice at once. The last `size` pairs stay; a load that failed
    is tried again by the next request."""

    def __init__(self, load: Callable[[str], Dict[str, bytes]], size: int):
        self._load, self._size = load, size
        self._futures: "OrderedDict[str, asyncio.Future]" = OrderedDict()

    def get(self, pair: str) -> "asyncio.Future":
        future = self._futures.get(pair)
        if future is None or (future.done() and future.exception() is not None):
            future = asyncio.get_running_loop().run_in_executor(None, self._load, pair)
            future.add_done_callback(lambda f: f.cancelled() or f.exception())  # a prefetch's error: not logged
        self._futures[pair] = future
        self._futures.move_to_end(pair)
        while len(self._futures) > self._size:
            self._futures.popitem(last=False)
        return future
