"""One connection's OpenGlass photos: pieces in, ``photo_processing`` / ``photo_described`` out.

Upstream's sequence (backend/routers/listen/receiver.py): when a photo's last piece arrives, the
client gets ``photo_processing {temp_id, photo_id}``; the photo is described and stored with the
conversation, then ``photo_described {photo_id, description, discarded}``. Here the photo is
stored first (with an empty description) so that it stays with its conversation even if the
connection ends during the description; a bad piece gets an ``error`` event (``param``
"image_chunk"), never a close.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

from ..conversations.photos import describe_photo, save_photo
from . import events
from .photo_assembly import Photo, PhotoAssembler, PhotoChunkError, PhotoLimits

log = logging.getLogger("harken.photos")

# ``error`` event code for a piece that cannot be used: 1007 is WebSocket's "inconsistent data";
# the connection is NOT closed (the code only classifies the error).
BAD_PIECE_CODE = 1007
DESCRIBE_WAIT_AT_CLOSE = 5.0      # seconds the end of a connection waits for descriptions under way
# Finished photos being stored and described at once, per connection: each holds its JPEG until
# the model answers (up to its timeout), so a client sending small photos fast is refused past it.
MAX_PHOTOS_PROCESSING = 4


class SessionPhotos:
    def __init__(self, send: Callable[[dict], Awaitable[None]], *, limits: PhotoLimits | None = None) -> None:
        self._send = send
        self.assembler = PhotoAssembler(limits)
        self._tasks: set[asyncio.Task] = set()
        self.received = 0

    async def on_chunk(self, message: dict, live, service) -> None:
        """One ``image_chunk`` message. ``live``: the session's conversation handle (None when
        nothing is stored); ``service``: the ConversationService (for the store and describer)."""
        try:
            photo = self.assembler.add(message, time.monotonic())
        except PhotoChunkError as exc:
            log.info("image_chunk refused: %s", exc.message)
            await self._send(events.error(BAD_PIECE_CODE, exc.message, "image_chunk"))
            return
        if photo is None:
            return
        if len(self._tasks) >= MAX_PHOTOS_PROCESSING:
            await self._send(events.error(BAD_PIECE_CODE, f"{MAX_PHOTOS_PROCESSING} photos are being described "
                                          "already: this one is dropped, send it again later", "image_chunk"))
            return
        self.received += 1
        photo_id = str(uuid.uuid4())
        await self._send(events.photo_processing(photo.temp_id, photo_id))
        task = asyncio.create_task(self._keep(photo, photo_id, live, service), name=f"photo-{photo_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _keep(self, photo: Photo, photo_id: str, live, service) -> None:
        store = getattr(service, "store", None)
        stored = False
        if live is not None and store is not None:
            try:
                await save_photo(store, photo_id=photo_id, conversation_id=live.conversation_id, uid=live.uid,
                                 jpeg=photo.jpeg, now=time.time())
                stored = True
            except Exception:
                log.exception("could not store photo %s", photo_id)
        describer = getattr(service, "describer", None)
        description = await describer.describe(photo.base64) if describer is not None else ""
        if stored and description:
            try:
                await describe_photo(store, photo_id, description)
            except Exception:
                log.exception("could not store the description of photo %s", photo_id)
        try:
            await self._send(events.photo_described(photo_id, description, False))
        except Exception:
            pass               # the client left; the photo is stored

    async def close(self) -> None:
        """End of the connection: descriptions under way get a short while, unfinished photos go."""
        self.assembler.clear()
        if self._tasks:
            done, pending = await asyncio.wait(list(self._tasks), timeout=DESCRIBE_WAIT_AT_CLOSE)
            for task in pending:
                task.cancel()
