"""Conversations: storage, lifecycle, processing and integration webhooks (PROTOCOL §7–§8).

How the gateway uses it — once per process (the app's lifespan)::

    store = await Store.from_settings(settings).open()       # SQLite or PostgreSQL; migrates
    service = ConversationService(settings, store)
    await service.start()          # silence checks, sweep of leftovers, outbox delivery
    ...
    await service.stop()
    await store.close()

and once per WebSocket session::

    live = await service.connect(uid, language=..., source=..., conversation_timeout=...,
                                 session_id=sid, events=send_event,          # async (dict) -> None
                                 on_new_conversation=reset_builder)          # sync (live) -> None
    if live.last_memory_id:                       # only when there is one (the app needs a string)
        send_event({"type": "last_memory", "memory_id": live.last_memory_id})
    builder = SegmentBuilder([Segment.from_stored(d) for d in live.existing_segments])
    offset = live.time_offset(clock_origin, first_word_session_time)        # conversation time
    ...every 600 ms...
    await live.save_batch([s.to_stored() for s in batch.changed], batch.deleted_ids)
    # raises LeaseLost if a newer connection of the user (any node) took the conversation over
    ...every decoded frame...
    live.add_audio(pcm_int16_16k)                                            # never blocks
    ...on close...
    await live.close(usage={"audio_seconds": ..., "speech_seconds": ..., "words": ..., "provider": ...})

When the conversation times out while the client stays connected, the service processes it
(``memory_processing_started`` then ``memory_created`` through ``events``), switches the handle
to a new conversation, bumps ``live.generation`` and calls ``on_new_conversation(live)``
synchronously: the session then starts a fresh ``SegmentBuilder`` and takes a new
``time_offset``. REST handlers use ``service.list_conversations``, ``get_conversation``,
``get_webhook``, ``set_webhook`` and ``delete_webhook``; the Omi app's calls also
``service.process_now`` and ``assign_segments`` (which reach a live session through the
``hooks`` it gave ``connect``) and ``AppQueries`` (status filters, stars, location, webhooks
switched off).
"""

from .audio_chunks import AudioChunker
from .lifecycle import ConversationService, LiveConversation
from .model import Conversation, Usage, WebhookSetting, conversation_object
from .outbox import OutboxDeliverer
from .processing import ConversationProcessor
from .queries import AppQueries, UnknownSegments
from .store import LeaseLost, Store, database_url
from .webhooks import KINDS as WEBHOOK_KINDS
from .webhooks import WebhookSettingError, sign, verify_signature

__all__ = [
    "AppQueries", "AudioChunker", "Conversation", "ConversationProcessor", "ConversationService", "LeaseLost", "LiveConversation",
    "OutboxDeliverer", "Store", "Usage", "WEBHOOK_KINDS", "WebhookSetting", "WebhookSettingError",
    "UnknownSegments", "conversation_object", "database_url", "sign", "verify_signature",
]
