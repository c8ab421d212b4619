"""QMP's JSON dialect, split into messages the way QEMU 7.2 splits them.

QEMU does not read "one JSON document per line": a lexer turns bytes into
tokens, and a streamer emits a message as soon as the brace/bracket depth is
back to zero (so a bare ``42`` or a stray ``}`` is a message of its own).
Strings may be single-quoted.  A lexical error drops what was collected so
far, reports ``stray '<text>'`` and skips input up to the next structural or
control character.  Strings are QEMU's "modified UTF-8" (``\\u0000`` and
``C0 80`` are NUL, noncharacters are refused).  Error texts are QEMU's,
because QMP clients and our conformance tests compare them.

Sans-IO: :meth:`JSONMessageStream.feed` takes bytes and returns the messages
(or errors) completed by them; :func:`dumps` writes a message byte for byte
as QEMU's JSON writer does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterator

from vmigrate.qmp.errors import QMPError

MAX_TOKEN_SIZE = 64 << 20
MAX_TOKEN_COUNT = 2 << 20
MAX_NESTING = 1 << 10

# Token kinds
LCURLY, RCURLY, LSQUARE, RSQUARE, COLON, COMMA = "{", "}", "[", "]", ":", ","
INTEGER, FLOAT, KEYWORD, STRING = "int", "float", "keyword", "string"
#: A token cut off at MAX_TOKEN_SIZE bytes by the lexer (its text is dropped).
OVERSIZE = "oversize"

_WHITESPACE = b" \t\r\n"
_STRUCTURAL = b"[]{}:,"
_DIGITS = b"0123456789"


@dataclass(slots=True)
class Token:
    kind: str
    text: bytes


def _parse_error(detail: str) -> QMPError:
    return QMPError(f"JSON parse error, {detail}")


# Runs of bytes that leave the lexer in the state it is in, scanned by the
# regex engine instead of byte by byte in Python: a 64 MiB string then lexes
# in a fraction of a second, not in tens (docs/qmp-limits.md).  Each class is the set of
# bytes that QEMU's table (qobject/json-lexer.c) maps from the state to itself
# (for strings: plain bytes, or a backslash and the byte it escapes; written
# as an unrolled loop, which the regex engine runs some 60 times faster).
_DIGIT_RUN = re.compile(rb"[0-9]*")
_TOKEN_RUNS = {
    "dq": re.compile(rb'[\x20\x21\x23-\x5b\x5d-\xfd]*(?:\\[\x20-\xfd][\x20\x21\x23-\x5b\x5d-\xfd]*)*'),
    "sq": re.compile(rb"[\x20-\x26\x28-\x5b\x5d-\xfd]*(?:\\[\x20-\xfd][\x20-\x26\x28-\x5b\x5d-\xfd]*)*"),
    "keyword": re.compile(rb"[a-z]*"),
    "digits": _DIGIT_RUN,
    "mantissa_digits": _DIGIT_RUN,
    "exp_digits": _DIGIT_RUN,
}
# Runs of bytes skipped without building a token.
_SKIP_RUNS = {
    "start": re.compile(rb"[ \t\r\n]*"),
    "recovery": re.compile(rb"[\t\x20-\x2b\x2d-\x39\x3b-\x5a\x5c\x5e-\x7a\x7c\x7e-\xfd]*"),
}

# Number states: (accepted bytes, next state); states that may end a number, and as what.
_NUMBER_MOVES: dict[str, list[tuple[bytes, str]]] = {
    "sign": [(b"0", "zero"), (b"123456789", "digits")],
    "zero": [(b".", "mantissa")],
    "digits": [(_DIGITS, "digits"), (b"eE", "exp_e"), (b".", "mantissa")],
    "mantissa": [(_DIGITS, "mantissa_digits")],
    "mantissa_digits": [(_DIGITS, "mantissa_digits"), (b"eE", "exp_e")],
    "exp_e": [(b"+-", "exp_sign"), (_DIGITS, "exp_digits")],
    "exp_sign": [(_DIGITS, "exp_digits")],
    "exp_digits": [(_DIGITS, "exp_digits")],
}
_NUMBER_TERMINALS = {"zero": INTEGER, "digits": INTEGER, "mantissa_digits": FLOAT, "exp_digits": FLOAT}
# One shared token per structural byte: the lexer's most frequent output.
_STRUCTURAL_TOKENS = {b: Token(chr(b), bytes([b])) for b in _STRUCTURAL}


class _Lexer:
    """Byte-level tokenizer mirroring the states of QEMU's JSON lexer."""

    def __init__(self) -> None:
        self.state = "start"
        self.token = bytearray()

    def feed(self, data: bytes, out: list) -> None:
        pos, end = 0, len(data)
        while pos < end:
            skip = _SKIP_RUNS.get(self.state)
            if skip is not None:
                pos = skip.match(data, pos).end()
                if self.state == "start" and pos < end and data[pos] in _STRUCTURAL_TOKENS:
                    out.append(_STRUCTURAL_TOKENS[data[pos]])
                    pos += 1
                    continue
            else:
                run = _TOKEN_RUNS.get(self.state)
                if run is not None:
                    stop = min(run.match(data, pos).end(), pos + MAX_TOKEN_SIZE + 1 - len(self.token))
                    self.token += data[pos:stop]
                    pos = stop
                    if len(self.token) > MAX_TOKEN_SIZE:
                        self._oversize(out)
                        continue
            if pos < end:
                self._char(data[pos], out)
                pos += 1
                if len(self.token) > MAX_TOKEN_SIZE:
                    self._oversize(out)

    def buffered(self) -> int:
        """Bytes of the token being read."""
        return len(self.token)

    def _oversize(self, out: list) -> None:
        """QEMU's cap on a token still being read (json_lexer_feed_char).

        Past ``MAX_TOKEN_SIZE`` bytes the lexer hands what it has to the
        streamer, which answers "JSON token size limit exceeded", and starts
        afresh with the next byte: the rest of an overlong string is lexed as
        JSON text.  Nothing of the token is echoed.
        """
        out.append(Token(OVERSIZE, b""))
        self.token = bytearray()
        self.state = "start"

    def _emit(self, kind: str, out: list) -> None:
        out.append(Token(kind, bytes(self.token)))
        self.token = bytearray()
        self.state = "start"

    def _error(self, out: list) -> None:
        out.append(Token("error", bytes(self.token)))
        self.token = bytearray()
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
        for chars, nxt in _NUMBER_MOVES[st]:
            if b in chars:
                self.token.append(b)
                self.state = nxt
                return True
        if st == "zero" and b in _DIGITS:
            self.token.append(b)
            self._error(out)
            return True
        if st in _NUMBER_TERMINALS:
            self._emit(_NUMBER_TERMINALS[st], out)
            return False
        self.token.append(b)
        self._error(out)
        return True


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

    def buffered(self) -> int:
        """Bytes of the message being collected (tokens so far and the one being read)."""
        return self._size + self._lexer.buffered()

    def _reset(self) -> None:
        self._tokens = []
        self._braces = self._brackets = 0
        self._size = 0

    def _token(self, tok: Token) -> Any:
        if tok.kind == "error":
            self._reset()
            return _parse_error(f"stray '{_qemu_text(tok.text)}'")
        if tok.kind == OVERSIZE:
            self._reset()
            return QMPError("JSON token size limit exceeded")
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
        tokens = self._tokens
        self._reset()
        try:
            return _Parser(tokens).message()
        except QMPError as err:
            return err


_MORE = object()


class _Container:
    """An object or array being filled while parsing (one level of nesting)."""

    __slots__ = ("value", "closer", "key", "want_key")

    def __init__(self, is_object: bool) -> None:
        self.value: dict | list = {} if is_object else []
        self.closer = RCURLY if is_object else RSQUARE
        self.key: str | None = None
        self.want_key = is_object


_OPENED = object()


class _Parser:
    """QEMU's recursive-descent JSON parser, run iteratively.

    The explicit stack keeps the 1024 nesting levels the streamer admits
    within reach of Python's recursion limit, and the checks happen in the
    same order as QEMU's, so the same error text comes out.
    """

    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = tokens
        self.pos = 0

    def peek(self) -> Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def pop(self) -> Token:
        tok = self.peek()
        if tok is None:
            raise _parse_error("premature EOI")
        self.pos += 1
        return tok

    def message(self) -> Any:
        stack: list[_Container] = []
        while True:
            value = self._start_value(stack)
            if value is _OPENED:
                top = stack[-1]
                if self.peek() is None:
                    raise _parse_error("premature EOI")
                if self.peek().kind != top.closer:
                    continue
                self.pos += 1
                value = stack.pop().value
            while True:
                if not stack:
                    return value
                if not self._add(stack[-1], value):
                    break
                value = stack.pop().value

    def _start_value(self, stack: list[_Container]) -> Any:
        tok = self.peek()
        if tok is None:
            raise _parse_error("premature EOI")
        if tok.kind in (LCURLY, LSQUARE):
            self.pos += 1
            stack.append(_Container(tok.kind == LCURLY))
            return _OPENED
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
        self.pos -= 1
        raise _parse_error("expecting value")

    def _add(self, top: _Container, value: Any) -> bool:
        """Store a finished value in ``top``; True if that closed ``top``."""
        if top.want_key:
            if not isinstance(value, str):
                raise _parse_error("key is not a string in object")
            if self.pop().kind != COLON:
                raise _parse_error("missing : in object pair")
            top.key = value
            top.want_key = False
            return False
        if isinstance(top.value, dict):
            if top.key in top.value:
                raise _parse_error("duplicate key")
            top.value[top.key] = value
        else:
            top.value.append(value)
        tok = self.pop()
        if tok.kind == top.closer:
            return True
        if tok.kind != COMMA:
            raise _parse_error("expected separator in dict" if isinstance(top.value, dict) else "expected separator in list")
        top.want_key = isinstance(top.value, dict)
        return False


_ESCAPES = {
    ord('"'): '"', ord("'"): "'", ord("\\"): "\\", ord("/"): "/",
    ord("b"): "\b", ord("f"): "\f", ord("n"): "\n", ord("r"): "\r", ord("t"): "\t",
}

# Smallest code point of a 2..6 byte sequence (shorter is overlong).
_MIN_CODEPOINT = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)

# Code points QEMU refuses although Python's UTF-8 codec accepts them.
_NONCHARACTER = re.compile(
    "[\ufdd0-\ufdef" + "".join(f"\\U{p:04x}fffe\\U{p:04x}ffff" for p in range(17)) + "]"
)


def _valid_codepoint(cp: int) -> bool:
    return 0 <= cp <= 0x10FFFF and not (0xFDD0 <= cp <= 0xFDEF or cp & 0xFFFE == 0xFFFE or 0xD800 <= cp <= 0xDFFF)


def _mod_utf8_codepoint(data: bytes, pos: int) -> tuple[int, int]:
    """Decode one code point of QEMU's "modified UTF-8" at ``pos``.

    Returns (code point or -1, position after what was consumed).  Differs
    from UTF-8 in accepting the overlong ``C0 80`` as U+0000 and refusing
    noncharacters; the end of ``data`` reads as the C string's NUL.
    """
    byte = data[pos]
    pos += 1
    if byte < 0x80:
        return byte, pos
    if byte >= 0xFE or not byte & 0x40:
        return -1, pos
    length, mask = 0, 0x80
    while byte & mask:
        length += 1
        mask >>= 1
    cp = byte & (mask - 1)
    for _ in range(1, length):
        follow = data[pos] if pos < len(data) else 0
        if follow & 0xC0 != 0x80:
            return -1, pos
        pos += 1
        cp = (cp << 6) | (follow & 0x3F)
    if not _valid_codepoint(cp) or (cp < _MIN_CODEPOINT[length - 2] and not (cp == 0 and length == 2)):
        return -1, pos
    return cp, pos


def _well_formed(raw: bytes) -> str | None:
    """``raw`` decoded, if it is UTF-8 that QEMU's decoder takes as is; else None.

    The common case, decoded in C: the code-point loop below would take tens
    of seconds for a string near the 64 MiB token limit.  Noncharacters
    (U+FDD0..U+FDEF, U+xFFFE, U+xFFFF) are encoded with the bytes EF B7 or
    BF BE/BF BF, so text without those needs no search for them.
    """
    if raw.isascii():
        return raw.decode("ascii")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if (b"\xef\xb7" in raw or b"\xbf\xbe" in raw or b"\xbf\xbf" in raw) and _NONCHARACTER.search(text):
        return None
    return text


def _qemu_text(raw: bytes) -> str:
    """Raw input bytes as they come back inside an error message.

    QEMU formats them into a C string (cut at the first NUL) and its JSON
    writer turns every undecodable sequence into U+FFFD.
    """
    raw = raw.split(b"\0", 1)[0]
    text = _well_formed(raw)
    if text is not None:
        return text
    out = []
    pos = 0
    while pos < len(raw):
        cp, pos = _mod_utf8_codepoint(raw, pos)
        out.append(chr(cp) if cp >= 0 else "\ufffd")
    return "".join(out)


def _decode_plain(raw: bytes) -> str:
    text = _well_formed(raw)
    if text is not None:
        return text
    out = []
    pos = 0
    while pos < len(raw):
        cp, pos = _mod_utf8_codepoint(raw, pos)
        if cp < 0:
            raise _parse_error("invalid UTF-8 sequence in string")
        out.append(chr(cp))
    return "".join(out)


def _decode_string(text: bytes) -> str:
    """Decode a quoted token: JSON escapes, plus \\' for single quotes."""
    raw = text[1:]  # the body and the closing quote, which error texts may include
    end = len(raw) - 1
    out: list[str] = []
    i = 0
    while i < end:
        j = raw.find(b"\\", i, end)
        if j < 0:
            j = end
        if j > i:
            out.append(_decode_plain(raw[i:j]))
        if j == end:
            break
        esc = raw[j + 1]
        if esc in _ESCAPES:
            out.append(_ESCAPES[esc])
            i = j + 2
        elif esc == ord("u"):
            code, i = _unicode_escape(raw, j)
            out.append(code)
        else:
            raise _parse_error("invalid escape sequence in string")
    return "".join(out)


def _unicode_escape(raw: bytes, start: int) -> tuple[str, int]:
    """Decode \\uXXXX (and a surrogate pair); QEMU names the bad escape text."""
    cp = _hex4(raw, start + 2)
    i = start + 6
    if 0xD800 <= cp <= 0xDBFF and raw[i : i + 2] == b"\\u":
        low = _hex4(raw, i + 2)
        if 0xDC00 <= low <= 0xDFFF:
            cp = 0x10000 + ((cp & 0x3FF) << 10) + (low & 0x3FF)
            i += 6
        else:
            cp = -1
    if not _valid_codepoint(cp):
        raise _parse_error(f"{_qemu_text(raw[start:i])} is not a valid Unicode character")
    return chr(cp), i


def _hex4(raw: bytes, i: int) -> int:
    digits = raw[i : i + 4]
    if len(digits) != 4 or any(d not in b"0123456789abcdefABCDEF" for d in digits):
        return -1
    return int(digits, 16)


_NEEDS_ESCAPE = re.compile('[\x00-\x1f"\\\\\x7f-\U0010ffff]')
_NAMED_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match) -> str:
    c = match.group()
    named = _NAMED_ESCAPES.get(c)
    if named is not None:
        return named
    cp = ord(c)
    if cp > 0xFFFF:
        cp -= 0x10000
        return f"\\u{0xD800 + (cp >> 10):04X}\\u{0xDC00 + (cp & 0x3FF):04X}"
    return f"\\u{cp:04X}"


# Printable ASCII the writer copies as is: deleting these from a string's
# bytes (in C) shows whether it needs escaping at all, far faster than a
# regex search over a string near the 64 MiB token limit.
_PLAIN_ASCII = bytes(c for c in range(0x20, 0x7F) if c not in b'"\\')


def _quoted(s: str) -> str:
    if s.isascii() and not s.encode("ascii").translate(None, _PLAIN_ASCII):
        return '"' + s + '"'
    return '"' + _NEEDS_ESCAPE.sub(_escape, s) + '"'


def _scalar(value: Any) -> str:
    if isinstance(value, str):
        return _quoted(value)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "%.17g" % value
    raise TypeError(f"cannot serialise {type(value).__name__} as QMP JSON")


_END = object()


def _write(value: Any, out: list[str]) -> None:
    """Append ``value``'s text to ``out``; iterative, as values nest up to 1024 deep."""
    stack: list[tuple[Iterator, bool]] = []
    item = value
    while True:
        if isinstance(item, dict):
            out.append("{")
            stack.append((iter(item.items()), True))
            first = True
        elif isinstance(item, (list, tuple)):
            out.append("[")
            stack.append((iter(item), False))
            first = True
        else:
            out.append(_scalar(item))
            first = False
        while stack:
            members, is_object = stack[-1]
            nxt = next(members, _END)
            if nxt is _END:
                out.append("}" if is_object else "]")
                stack.pop()
                first = False
                continue
            if not first:
                out.append(", ")
            if is_object:
                key, item = nxt
                out.append(_quoted(key))
                out.append(": ")
            else:
                item = nxt
            break
        else:
            return


def dumps(value: Any) -> bytes:
    """Serialise one message byte for byte as QEMU's JSON writer does.

    Non-ASCII and control characters become upper-case ``\\uXXXX`` escapes
    (surrogate pairs beyond the BMP), numbers print as C's ``%.17g``, and the
    monitor ends each message with CR LF.
    """
    out: list[str] = []
    _write(value, out)
    return "".join(out).encode("ascii") + b"\r\n"
