from __future__ import annotations

import base64
import os
import time

import pytest

from pgscale.files import Base64Stream, Malformed, RateLimiter, object_key, versioned_key


def decode_in_slices(text: str, size: int) -> bytes:
    stream = Base64Stream()
    out = b"".join(stream.feed(text[i : i + size]) for i in range(0, len(text), size))
    stream.close()
    return out


@pytest.mark.parametrize("size", [1, 3, 4, 5, 7, 1000])
def test_any_slicing_decodes_the_same(size: int) -> None:
    payload = os.urandom(1000)
    text = base64.b64encode(payload).decode()
    assert decode_in_slices(text, size) == payload
    assert decode_in_slices(base64.encodebytes(payload).decode(), size) == payload  # MIME line breaks


def test_data_url_keeps_media_type() -> None:
    stream = Base64Stream()
    assert stream.feed("data:image/png;base64," + base64.b64encode(b"png!").decode()) == b"png!"
    assert stream.media_type == "image/png"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("QQ==QQ==", "padding"),
        ("QUJ", "multiple of 4"),
        ("QU*D", "invalid Base64"),
        ("QUJDé", "non-ASCII"),
        ("QQ==", None),
    ],
)
def test_malformed_input_names_the_reason(text: str, reason: str | None) -> None:
    if reason is None:
        assert decode_in_slices(text, 2) == b"A"
        return
    with pytest.raises(Malformed, match=reason):
        decode_in_slices(text, 4)


@pytest.mark.parametrize("text", ["QUJDé", "éQUJD", "QUJDQUJD\u65e5"])
def test_bytes_slices_decode_and_fail_like_text(text: str) -> None:
    """Large values arrive as their UTF-8 bytes: the same result, the same offset in the reason."""
    for feed in (text, text.encode()):
        with pytest.raises(Malformed) as caught:
            Base64Stream().feed(feed)
        if isinstance(feed, str):
            expected = str(caught.value)
    assert str(caught.value) == expected
    payload = os.urandom(999)
    stream = Base64Stream()
    assert stream.feed(base64.encodebytes(payload)) == payload


@pytest.mark.parametrize("piece", [1, 5, 8, 77])
def test_long_slices_decode_in_pieces_the_same(piece: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pgscale.files.PIECE", piece)
    payload = os.urandom(1001)
    for text in (base64.b64encode(payload).decode(), base64.encodebytes(payload).decode()):
        assert decode_in_slices(text, 300) == payload
        assert decode_in_slices("data:a/b;base64," + text, 300) == payload
    with pytest.raises(Malformed, match="padding"):
        decode_in_slices("QQ==QUJD" * 10, 80)


def test_padding_then_more_data_across_slices_is_rejected() -> None:
    stream = Base64Stream()
    stream.feed("QQ==")
    with pytest.raises(Malformed, match="after the final padding"):
        stream.feed("QUJD")


def test_object_keys_are_deterministic_and_safe() -> None:
    assert object_key("{table}/{key}", schema="public", table="File", key="a/../b c") == "File/a%2F..%2Fb%20c"
    assert object_key("{schema}/{table}/{key}", schema="s", table="Datei", key="ü") == "s/Datei/%C3%BC"
    assert versioned_key("File/1", "ab" * 32) == "File/1~" + "ab" * 8


def test_rate_limiter_spaces_rows() -> None:
    limiter = RateLimiter(rows=50)
    started = time.monotonic()
    for _ in range(11):
        limiter.acquire(0)
    assert time.monotonic() - started >= 0.18
