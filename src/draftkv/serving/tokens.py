"""Each token's own bytes and text, as the OpenAI API reports them in logprobs.

Decoding one token alone is not its text: a byte-level token can hold part of a character (decoded
alone it is the replacement character, so distinct tokens would look alike), and a sentencepiece
token's leading space is dropped. A token's bytes are read from the vocabulary instead; its text is
those bytes when they are whole characters, else OpenAI's "bytes:\\xe6\\x9d" form. Offsets in a text
come from the bytes of the tokens before, so each points at the character its token starts in.
"""

from __future__ import annotations

import json
import re

BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece's byte fallback


def byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + extra)] = byte
            extra += 1
    return table


BYTE_LEVEL = byte_level_table()


def decoder_kinds(tokenizer) -> set[str]:
    """The types of the fast tokenizer's decoders (ByteLevel, Metaspace, ByteFallback, ...)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return {part.get("type", "") for part in parts}


class TokenTexts:
    """Bytes, text and offsets of a tokenizer's tokens (looked up once per token)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        kinds = decoder_kinds(tokenizer)
        self.byte_level = "ByteLevel" in kinds
        self.metaspace = "Metaspace" in kinds
        self.added = dict(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        self.known: dict[tuple[int, bool], bytes] = {}

    def bytes(self, token: int, special: bool = True) -> bytes:
        """The token's bytes; a special token's are its name when `special`, else none (it is not shown)."""
        key = (token, special)
        if key not in self.known:
            self.known[key] = self._bytes(token, special)
        return self.known[key]

    def _bytes(self, token: int, special: bool) -> bytes:
        if token in self.added:
            added = self.added[token]
            return b"" if getattr(added, "special", False) and not special else added.content.encode("utf-8")
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if isinstance(piece, str):
            if self.byte_level and all(c in BYTE_LEVEL for c in piece):
                return bytes(BYTE_LEVEL[c] for c in piece)
            if match := BYTE_TOKEN.fullmatch(piece):
                return bytes([int(match.group(1), 16)])
            if self.metaspace:
                return piece.replace("\u2581", " ").encode("utf-8")
        return self.tokenizer.decode([token], clean_up_tokenization_spaces=False).encode("utf-8")

    def text(self, token: int, special: bool = True) -> str:
        """The token's text, or "bytes:\\xNN..." when its bytes are not whole characters (OpenAI's form)."""
        raw = self.bytes(token, special)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{byte:02x}" for byte in raw)

    def decode(self, tokens: list[int], special: bool = True) -> str:
        """The text of a sequence of tokens: their bytes joined (a broken character is replaced)."""
        return b"".join(self.bytes(token, special) for token in tokens).decode("utf-8", "replace")

    def offsets(self, tokens: list[int], special: bool = True, start: int = 0) -> list[int]:
        """Where each token starts in `decode(tokens)` (plus `start`): a token that starts inside a
        character points at that character."""
        pieces = [self.bytes(token, special) for token in tokens]
        chars = characters(b"".join(pieces))
        offsets, at = [], 0
        for piece in pieces:
            offsets.append(start + (chars[at] if at < len(chars) else (chars[-1] + 1 if chars else 0)))
            at += len(piece)
        return offsets


def characters(data: bytes) -> list[int]:
    """For each byte, the index of the character it is part of in `data.decode("utf-8", "replace")` (where
    each undecodable run of bytes is one replacement character)."""
    index: list[int] = []
    position = count = 0
    while position < len(data):
        try:
            valid, bad = data[position:].decode("utf-8"), 0
        except UnicodeDecodeError as error:
            valid, bad = data[position: position + error.start].decode("utf-8"), error.end - error.start
        for char in valid:
            index += [count] * len(char.encode("utf-8"))
            count += 1
        position += len(valid.encode("utf-8"))
        if bad:
            index += [count] * bad
            count += 1
            position += bad
    return index
