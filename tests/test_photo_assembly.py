"""OpenGlass photo reassembly as pure logic (``harken.gateway.photo_assembly``), and the segment
time rules the app relies on."""

from __future__ import annotations

import base64
import tracemalloc

import pytest

from harken.gateway.photo_assembly import PhotoAssembler, PhotoChunkError, PhotoLimits
from harken.gateway.segments import Segment


def pieces(photo_id: str, data: bytes, size: int = 8192) -> list[dict]:
    text = base64.b64encode(data).decode()
    parts = [text[i:i + size] for i in range(0, len(text), size)]
    return [{"type": "image_chunk", "id": photo_id, "index": i, "total": len(parts), "data": p}
            for i, p in enumerate(parts)]


JPEG = b"\xff\xd8" + bytes(range(256)) * 100 + b"\xff\xd9"      # ~25 KB, four 8 KB pieces of base64


def test_pieces_out_of_order_and_duplicated_give_the_photo_once():
    assembler = PhotoAssembler()
    parts = pieces("p", JPEG)
    assert len(parts) == 5
    order = [parts[3], parts[0], parts[3], parts[4], parts[1], parts[0]]
    assert all(assembler.add(p, now=0.0) is None for p in order)
    photo = assembler.add(parts[2], now=0.0)
    assert photo is not None and photo.jpeg == JPEG and photo.temp_id == "p"
    assert assembler.in_flight == 0 and assembler.bytes_held == 0
    assert assembler.add(parts[2], now=0.0) is None          # a late duplicate starts nothing finished


def test_an_oversized_photo_is_refused_and_forgotten():
    assembler = PhotoAssembler(PhotoLimits(max_photo_bytes=20_000))
    parts = pieces("big", JPEG)
    assembler.add(parts[0], now=0.0)
    assembler.add(parts[1], now=0.0)
    with pytest.raises(PhotoChunkError, match="larger than"):
        assembler.add(parts[2], now=0.0)
    assert assembler.in_flight == 0 and assembler.bytes_held == 0


def test_a_photo_never_finished_is_dropped_after_the_timeout():
    assembler = PhotoAssembler(PhotoLimits(timeout=60.0))
    parts = pieces("slow", JPEG)
    assembler.add(parts[0], now=0.0)
    assert assembler.in_flight == 1
    assembler.add(pieces("other", b"\xff\xd8x\xff\xd9" * 10)[0], now=61.0)   # any later piece expires it
    assert "slow" not in assembler._pending and assembler.expired == 1
    # Its remaining pieces now start a new photo that would need piece 0 again: nothing is returned.
    assert all(assembler.add(p, now=62.0) is None for p in parts[1:])


@pytest.mark.parametrize("message,complaint", [
    ({"id": "x", "index": 0, "total": 1, "data": "not base64!"}, "base64"),
    ({"id": "x", "index": 0, "total": 1, "data": ""}, "base64"),
    ({"id": "x", "index": 0, "total": 1, "data": 5}, "base64"),
    ({"id": "", "index": 0, "total": 1, "data": "AAAA"}, "id"),
    ({"id": "x" * 65, "index": 0, "total": 1, "data": "AAAA"}, "id"),
    ({"id": "x", "index": -1, "total": 1, "data": "AAAA"}, "index"),
    ({"id": "x", "index": "0", "total": 1, "data": "AAAA"}, "index"),
    ({"id": "x", "index": 0, "total": 0, "data": "AAAA"}, "total"),
    ({"id": "x", "index": 0, "total": 100_000, "data": "AAAA"}, "total"),
    ({"id": "x", "index": 3, "total": 2, "data": "AAAA"}, "out of range"),
])
def test_a_bad_piece_is_refused_with_a_reason(message, complaint):
    with pytest.raises(PhotoChunkError, match=complaint):
        PhotoAssembler().add({"type": "image_chunk", **message}, now=0.0)


def test_pieces_that_do_not_decode_together_are_refused_and_a_total_that_changes_too():
    assembler = PhotoAssembler()
    assembler.add({"id": "a", "index": 0, "total": 2, "data": "AA=="}, now=0.0)
    with pytest.raises(PhotoChunkError, match="base64"):
        assembler.add({"id": "a", "index": 1, "total": 2, "data": "AAAA"}, now=0.0)
    assembler.add({"id": "b", "index": 0, "total": 2, "data": "AAAA"}, now=0.0)
    with pytest.raises(PhotoChunkError, match="differs"):
        assembler.add({"id": "b", "index": 1, "total": 3, "data": "AAAA"}, now=0.0)


def test_memory_held_stays_bounded_whatever_a_client_sends():
    """A client opening photo after photo and never finishing them: the assembler holds at most
    ``max_in_flight`` photos and ``max_bytes_in_flight`` bytes (measured with tracemalloc)."""
    limits = PhotoLimits()
    assembler = PhotoAssembler(limits)
    piece = "A" * 8192
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        peak_held = 0
        for n in range(4000):                      # 32 MB of base64 offered, 100 pieces per photo
            photo_id = f"p{n // 100}"
            assembler.add({"id": photo_id, "index": n % 100, "total": 101, "data": piece}, now=n * 0.001)
            peak_held = max(peak_held, assembler.bytes_held)
        held_now = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    print(f"\nFIGURE photo reassembly: 32 MB offered unfinished; held at most {peak_held} bytes of pieces, "
          f"{held_now} bytes traced at the end (limit {limits.max_bytes_in_flight})")
    assert assembler.in_flight <= limits.max_in_flight
    assert peak_held <= limits.max_bytes_in_flight
    assert held_now < limits.max_bytes_in_flight + 256 * 1024


def test_segment_times_are_milliseconds_and_never_negative():
    segment = Segment(id="s", text="hi", speaker_id=0, is_user=False, person_id=None, start=-2e-08, end=1.23456789)
    for shape in (segment.to_wire(), segment.to_stored()):
        assert shape["start"] == 0.0 and isinstance(shape["start"], float)
        assert shape["end"] == 1.235


async def test_a_connection_describes_a_bounded_number_of_photos_at_once():
    """Finished photos each hold their JPEG until the vision model answers: past the bound a new
    one is refused with an error event (the connection goes on)."""
    import asyncio

    from harken.gateway.session_photos import MAX_PHOTOS_PROCESSING, SessionPhotos

    sent: list[dict] = []
    release = asyncio.Event()

    class SlowDescriber:
        async def describe(self, jpeg_base64: str) -> str:
            await release.wait()
            return "a photo"

    class Service:
        store = None
        describer = SlowDescriber()

    async def send(event: dict) -> None:
        sent.append(event)

    photos = SessionPhotos(send)
    for n in range(MAX_PHOTOS_PROCESSING + 2):
        for piece in pieces(f"p{n}", JPEG):
            await photos.on_chunk(piece, None, Service())
    kinds = [e["type"] for e in sent]
    assert kinds.count("photo_processing") == MAX_PHOTOS_PROCESSING and kinds.count("error") == 2
    release.set()
    await photos.close()
    assert [e["type"] for e in sent].count("photo_described") == MAX_PHOTOS_PROCESSING
