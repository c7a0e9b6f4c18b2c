"""FrameBuffer: frames come out whole and in order however the bytes arrive (pure logic)."""

from __future__ import annotations

import random
from struct import pack

import pytest
from amqp.exceptions import UnexpectedFrame

from kombu_pyamqp_threadsafe.frames import MIN_READ, FrameBuffer


def _frame(frame_type: int, channel: int, payload: bytes) -> bytes:
    return pack(">BHI", frame_type, channel, len(payload)) + payload + b"\xce"


def _chunked_recv_into(stream: bytes, rng: random.Random, largest: int):
    """A recv_into that hands out ``stream`` in random pieces, as a socket may."""
    position = 0

    def recv_into(view: memoryview) -> int:
        nonlocal position
        size = min(len(view), rng.randint(1, largest), len(stream) - position)
        view[:size] = stream[position : position + size]
        position += size
        return size

    return recv_into


@pytest.mark.parametrize("seed", range(20))
def test_frames_survive_any_split_compaction_and_growth(seed: int) -> None:
    rng = random.Random(seed)
    # Payloads from empty to several times the buffer, so reads split headers, payloads and
    # frame ends, the tail is compacted, and the buffer grows.
    frames = [
        (
            rng.choice((1, 2, 3, 8)),
            rng.randint(0, 2047),
            rng.randbytes(rng.choice((0, 1, 6, 7, 100, MIN_READ, 5 * MIN_READ))),
        )
        for _ in range(300)
    ]
    stream = b"".join(_frame(*f) for f in frames)
    split = rng.randint(0, 64)
    buffer = FrameBuffer(stream[:split], size=2 * MIN_READ)
    recv_into = _chunked_recv_into(stream[split:], rng, largest=rng.choice((7, 500, 3 * MIN_READ)))
    received: list[tuple[int, int, bytes]] = []
    buffer.parse(received.append)
    while buffer.receive(recv_into):
        buffer.parse(received.append)
    assert received == frames


def test_a_bad_frame_end_is_an_error_naming_it() -> None:
    buffer = FrameBuffer(_frame(1, 1, b"abc")[:-1] + b"\x00")
    with pytest.raises(UnexpectedFrame, match="0x00"):
        buffer.parse(lambda frame: None)
