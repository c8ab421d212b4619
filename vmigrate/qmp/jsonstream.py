"""QMP's JSON dialect, split into messages the way QEMU 7.2 splits them.

QEMU does not read "one JSON document per line": a lexer turns bytes into
tokens, and a streamer emits a message as soon as the brace/bracket depth is
back to zero (so a bare ``42`` or a stray ``}`` is a message of its own).
Strings may be single-quoted.  A lexical error drops what was collected so
far, reports ``stray '<text>'`` and skips input up to the next structural or
control character.  Error texts are QEMU's, because QMP clients and our
conformance tests compare them.

Sans-IO: :meth:`JSONMessageStream.feed` takes bytes and returns the messages
(or errors) completed by them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from vmigrate.qmp.errors import QMPError

MAX_TOKEN_SIZE = 64 << 20
MAX_TOKEN_COUNT = 2 << 20
MAX_NESTING = 1 << 10

# Token kinds
LCURLY, RCURLY, LSQUARE, RSQUARE, COLON, COMMA = "{", "}", "[", "]", ":", ","
INTEGER, FLOAT, KEYWORD, STRING = "int", "float", "keyword", "string"

_WHITESPACE = b" \t\r\n"
_STRUCTURAL = b"[]{}:,"
_DIGITS = b"0123456789"


@dataclass(slots=True)
class Token:
    kind: str
    text: bytes


def _parse_error(detail: str) -> QMPError:
    return QMPError(f"JSON parse error, {detail}")


class _Lexer:
    """Byte-level tokenizer mirroring the states of QEMU's JSON lexer."""

    def __init__(self) -> None:
        self.state = "start"
        self.token = bytearray()

    def feed(self, data: bytes, out: list) -> None:
        for b in data:
            self._char(b, out)

    def _emit(self, kind: str, out: list) -> None:
        out.append(Token(kind, bytes(self.token)))
        self.token.clear()
        self.state = "start"

    def _error(self, out: list) -> None:
        out.append(Token("error", bytes(self.token)))
        self.token.clear()
        self.state = "recovery"

    def _char(self, b: int, out: list) -> None:
        while True:
            st = self.state
            if st == "start":
                if b in _WHITESPACE:
                    return
                self.token.append(b)
                if b in _STRUCTURAL:
                    self._emit(chr(b), out)
                elif b == 0x22:
                    self.state = "dq"
                elif b == 0x27:
                    self.state = "sq"
                elif b == 0x30:
                    self.state = "zero"
                elif b in _DIGITS:
                    self.state = "digits"
                elif b == 0x2D:
                    self.state = "sign"
                elif 0x61 <= b <= 0x7A:
                    self.state = "keyword"
                else:
                    self._error(out)
                return
            if st == "recovery":
                if b < 0x20 and b != 0x09 or b >= 0xFE or b in _STRUCTURAL:
                    self.state = "start"
                    continue
                return
            if st in ("dq", "sq"):
                if 0x20 <= b <= 0xFD:
                    self.token.append(b)
                    if b == 0x5C:
                        self.state = st + "_esc"
                    elif (b == 0x22) if st == "dq" else (b == 0x27):
                        self._emit(STRING, out)
                    self._check_size(out)
                    return
                self.token.append(b)
                self._error(out)
                return
            if st in ("dq_esc", "sq_esc"):
                self.token.append(b)
                if 0x20 <= b <= 0xFD:
                    self.state = st[:2]
                else:
                    self._error(out)
                return
            if self._number_or_keyword(st, b, out):
                return

    def _number_or_keyword(self, st: str, b: int, out: list) -> bool:
        """Advance a number/keyword state; False means: re-examine b from start."""
        # (state, accepted chars) -> next state; otherwise terminal or error
        if st == "keyword":
            if 0x61 <= b <= 0x7A:
                self.token.append(b)
                return True
            self._emit(KEYWORD, out)
            return False
        moves: dict[str, list[tuple[bytes, str]]] = {
            "sign": [(b"0", "zero"), (b"123456789", "digits")],
            "zero": [(b".", "mantissa")],
            "digits": [(_DIGITS, "digits"), (b"eE", "exp_e"), (b".", "mantissa")],
            "mantissa": [(_DIGITS, "mantissa_digits")],
            "mantissa_digits": [(_DIGITS, "mantissa_digits"), (b"eE", "exp_e")],
            "exp_e": [(b"+-", "exp_sign"), (_DIGITS, "exp_digits")],
            "exp_sign": [(_DIGITS, "exp_digits")],
            "exp_digits": [(_DIGITS, "exp_digits")],
        }
        for chars, nxt in moves[st]:
            if b in chars:
                self.token.append(b)
                self.state = nxt
                return True
        terminal = {"zero": INTEGER, "digits": INTEGER, "mantissa_digits": FLOAT, "exp_digits": FLOAT}
        if st == "zero" and b in _DIGITS:
            self.token.append(b)
            self._error(out)
            return True
        if st in terminal:
            self._emit(terminal[st], out)
            return False
        self.token.append(b)
        self._error(out)
        return True

    def _check_size(self, out: list) -> None:
        if len(self.token) > MAX_TOKEN_SIZE:
            self._error(out)


class JSONMessageStream:
    """Collects tokens into QMP messages; returns parsed values or QMPError."""

    def __init__(self) -> None:
        self._lexer = _Lexer()
        self._tokens: list[Token] = []
        self._braces = 0
        self._brackets = 0
        self._size = 0

    def feed(self, data: bytes) -> list[Any]:
        tokens: list[Token] = []
        self._lexer.feed(data, tokens)
        results: list[Any] = []
        for tok in tokens:
            result = self._token(tok)
            if result is not _MORE:
                results.append(result)
        return results

    def _reset(self) -> None:
        self._tokens.clear()
        self._braces = self._brackets = 0
        self._size = 0

    def _token(self, tok: Token) -> Any:
        if tok.kind == "error":
            self._reset()
            return _parse_error(f"stray '{tok.text.decode('utf-8', 'replace')}'")
        if tok.kind == LCURLY:
            self._braces += 1
        elif tok.kind == RCURLY:
            self._braces -= 1
        elif tok.kind == LSQUARE:
            self._brackets += 1
        elif tok.kind == RSQUARE:
            self._brackets -= 1
        error = None
        if self._size + len(tok.text) + 1 > MAX_TOKEN_SIZE:
            error = QMPError("JSON token size limit exceeded")
        elif len(self._tokens) + 1 > MAX_TOKEN_COUNT:
            error = QMPError("JSON token count limit exceeded")
        elif self._braces + self._brackets > MAX_NESTING:
            error = QMPError("JSON nesting depth limit exceeded")
        if error is not None:
            self._reset()
            return error
        self._tokens.append(tok)
        self._size += len(tok.text)
        if (self._braces > 0 or self._brackets > 0) and self._braces >= 0 and self._brackets >= 0:
            return _MORE
        tokens = self._tokens[:]
        self._reset()
        try:
            return _Parser(tokens).message()
        except QMPError as err:
            return err


_MORE = object()


class _Parser:
    """Recursive descent over one message's tokens, with QEMU's error texts."""

    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = tokens
        self.pos = 0

    def peek(self) -> Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def pop(self) -> Token | None:
        tok = self.peek()
        if tok is not None:
            self.pos += 1
        return tok

    def message(self) -> Any:
        return self.value()

    def value(self) -> Any:
        tok = self.peek()
        if tok is None:
            raise _parse_error("premature EOI")
        if tok.kind == LCURLY:
            return self.obj()
        if tok.kind == LSQUARE:
            return self.array()
        self.pos += 1
        if tok.kind == STRING:
            return _decode_string(tok.text)
        if tok.kind == INTEGER:
            n = int(tok.text)
            if -(1 << 63) <= n < (1 << 64):
                return n
            return float(tok.text)
        if tok.kind == FLOAT:
            return float(tok.text)
        if tok.kind == KEYWORD:
            word = tok.text.decode()
            if word in ("true", "false", "null"):
                return {"true": True, "false": False, "null": None}[word]
            raise _parse_error(f"invalid keyword '{word}'")
        raise _parse_error("expecting value")

    def obj(self) -> dict:
        self.pop()
        result: dict = {}
        if self.peek() is None:
            raise _parse_error("premature EOI")
        if self.peek().kind == RCURLY:
            self.pop()
            return result
        self.pair(result)
        while True:
            tok = self.pop()
            if tok is None:
                raise _parse_error("premature EOI")
            if tok.kind == RCURLY:
                return result
            if tok.kind != COMMA:
                raise _parse_error("expected separator in dict")
            self.pair(result)

    def pair(self, result: dict) -> None:
        if self.peek() is None:
            raise _parse_error("premature EOI")
        key = self.value()
        if not isinstance(key, str):
            raise _parse_error("key is not a string in object")
        tok = self.pop()
        if tok is None:
            raise _parse_error("premature EOI")
        if tok.kind != COLON:
            raise _parse_error("missing : in object pair")
        value = self.value()
        if key in result:
            raise _parse_error("duplicate key")
        result[key] = value

    def array(self) -> list:
        self.pop()
        result: list = []
        tok = self.peek()
        if tok is None:
            raise _parse_error("premature EOI")
        if tok.kind == RSQUARE:
            self.pop()
            return result
        result.append(self.value())
        while True:
            tok = self.pop()
            if tok is None:
                raise _parse_error("premature EOI")
            if tok.kind == RSQUARE:
                return result
            if tok.kind != COMMA:
                raise _parse_error("expected separator in list")
            result.append(self.value())


_ESCAPES = {
    ord('"'): '"', ord("'"): "'", ord("\\"): "\\", ord("/"): "/",
    ord("b"): "\b", ord("f"): "\f", ord("n"): "\n", ord("r"): "\r", ord("t"): "\t",
}


def _decode_string(text: bytes) -> str:
    """Decode a quoted token: JSON escapes, plus \\' for single quotes."""
    body = text[1:-1]
    out: list[str] = []
    i = 0
    plain = bytearray()
    while i < len(body):
        b = body[i]
        if b != 0x5C:
            plain.append(b)
            i += 1
            continue
        if plain:
            out.append(_utf8(bytes(plain)))
            plain.clear()
        esc = body[i + 1] if i + 1 < len(body) else -1
        if esc in _ESCAPES:
            out.append(_ESCAPES[esc])
            i += 2
        elif esc == ord("u"):
            code, i = _unicode_escape(body, i)
            out.append(code)
        else:
            raise _parse_error("invalid escape sequence in string")
    if plain:
        out.append(_utf8(bytes(plain)))
    return "".join(out)


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _parse_error("invalid UTF-8 sequence in string") from None


def _unicode_escape(body: bytes, i: int) -> tuple[str, int]:
    """Decode \\uXXXX (and a surrogate pair); QEMU names the bad escape text."""
    start = i
    cp = _hex4(body, i + 2)
    i += 6
    if 0xD800 <= cp <= 0xDBFF and body[i : i + 2] == b"\\u":
        low = _hex4(body, i + 2)
        cp = 0x10000 + ((cp & 0x3FF) << 10) + (low & 0x3FF) if 0xDC00 <= low <= 0xDFFF else -1
        i += 6 if cp >= 0 else 0
    if cp <= 0 or 0xD800 <= cp <= 0xDFFF:
        text = body[start:i].decode("ascii", "replace")
        raise _parse_error(f"{text} is not a valid Unicode character")
    return chr(cp), i


def _hex4(body: bytes, i: int) -> int:
    digits = body[i : i + 4]
    if len(digits) != 4 or any(d not in b"0123456789abcdefABCDEF" for d in digits):
        return -1
    return int(digits, 16)


def dumps(value: Any) -> bytes:
    """Serialise a reply compactly-but-readably, one message per line."""
    return json.dumps(value, separators=(", ", ": ")).encode() + b"\r\n"
