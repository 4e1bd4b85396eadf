"""Weighted prompts: compel's syntax and A1111's, each parsed by hand into one structure that
prompt_weighting.py turns into embeddings.

compel (2.1.1, `compel/prompt_parser.py`, a pyparsing grammar) is ported element by element as a
parser of ordered choices: `word+` / `word-` (1.1 or 0.9 per sign), `(words)1.3`, `"words"--`,
`(words).attend(0.5)`, nesting (weights multiply), `("a", "b").blend(0.7, 0.3[, no_normalize])`,
`("a", "b").and(1, 0.5)`, escapes (`\\(`, `\\)`, `\\"` become the character; compel keeps the
backslash of `\\,` `\\.` `\\+` `\\-` `\\=`), and text the grammar cannot read kept word by word, as
compel keeps it. Adjacent pieces of equal weight join with one space, as compel's `fuse_fragments`
joins them. `.swap()` (cross-attention control, which needs an attention hook in the U-Net) and
`withLora()` / `useLora()` are refused in one line.

A1111 (`(word:1.3)`, `(word)` = x1.1, `[word]` = /1.1, nesting multiplies, `\\(` `\\)` `\\[` `\\]`
`\\\\` escapes, `BREAK` starts a new chunk) is read as A1111's `parse_prompt_attention` reads it,
and lands on the same structure: each BREAK-separated part is one part of a conjunction, so that
it starts its own 75-token chunk. Where we differ from A1111: a BREAK inside brackets breaks too
(A1111 turns it into the word "BREAK" weighted -1.1); scheduling (`[a:b:0.5]`, `[a|b]`), `AND` and
`<lora:...>` are not read (the text stays as the attention parser reads it); the weights follow
compel's math (prompt_weighting.py), not A1111's multiply-and-restore-the-mean.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from dataclasses import dataclass

from .errors import InvalidArgument

SYNTAXES = ("compel", "a1111")


class PromptSyntaxError(InvalidArgument):
    """A prompt its syntax cannot read, or a construct this runtime does not run; the message says which."""


@dataclass(frozen=True)
class Fragment:
    """A stretch of text and the weight of each of its tokens."""

    text: str
    weight: float = 1.0


@dataclass(frozen=True)
class WeightedText:
    """Fragments read one after another (compel's FlattenedPrompt)."""

    fragments: tuple[Fragment, ...]


@dataclass(frozen=True)
class Blend:
    """A weighted sum of the embeddings of several texts; `normalize` divides the weights by their sum."""

    texts: tuple[WeightedText, ...]
    weights: tuple[float, ...]
    normalize: bool = True


@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt's parts, whose embeddings are joined along the token axis (compel's Conjunction), each
    lerped from the empty prompt's by its weight; `pooled_text` is the text SDXL's pooled embedding reads."""

    parts: tuple[WeightedText | Blend, ...]
    weights: tuple[float, ...]
    pooled_text: str


def parse_prompt(text: str, syntax: str) -> ParsedPrompt:
    """`text` read in `syntax` ("compel" or "a1111")."""
    if syntax == "compel":
        return parse_compel(text)
    if syntax == "a1111":
        return parse_a1111(text)
    raise PromptSyntaxError(f"unknown prompt syntax '{syntax}': choose one of {', '.join(SYNTAXES)}")


# -- compel -------------------------------------------------------------------------------------------

SKIPPED = " \n\t\r"  # pyparsing's default whitespace, skipped before most elements
WHITE = " \t\r\n"  # what NotAny(White()) looks for between a term and its weight
SYNTACTIC = '()",.+-='
WORD_STOP = string.whitespace + SYNTACTIC
KEYWORD = string.ascii_letters + string.digits + "_-"
REAL = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+)")  # pyparsing_common.real
INTEGER = re.compile(r"-?[0-9]+")
QUOTED = re.compile(r'"(?:(?:\\")|(?:[^"\n\r]))*"')  # QuotedString('"', esc_quote='\\"')
UNQUOTE = re.compile(r"(\\t|\\n|\\f|\\r)|(\\[0-7]{3}|\\0|\\x[0-9a-fA-F]{2}|\\u[0-9a-fA-F]{4})|(.)|(\n)")
WHITESPACE_ESCAPES = {r"\t": "\t", r"\n": "\n", r"\f": "\f", r"\r": "\r"}


@dataclass(frozen=True)
class _Text:
    text: str


@dataclass(frozen=True)
class _Attention:
    weight: float
    children: tuple


@dataclass(frozen=True)
class _Unsupported:
    what: str  # the one-line refusal


@dataclass(frozen=True)
class _Group:
    """A .blend() or .and(): its texts' nodes, and its options."""

    operator: str
    texts: tuple[tuple, ...]
    options: tuple[tuple, ...]


SWAP = _Unsupported(".swap() (cross-attention control) is not supported: write the prompt without it")
LORA = _Unsupported("withLora()/useLora() in a prompt is not supported: load LoRAs with --lora (loras= in Python)")

Match = tuple[int, list] | None


def _unescape(raw: str) -> str:
    """What compel's Fragment does to its text each time one is made (parsed, flattened, fused): \\( \\) \\"
    become the character; other escapes keep their backslash."""
    return raw.replace("\\(", "(").replace("\\)", ")").replace('\\"', '"')


def _text(raw: str) -> _Text:
    return _Text(_unescape(raw))


def _unquote(body: str) -> str:
    """QuotedString's unquoting: whitespace and numeric escapes become characters, \\" a quote."""

    def one(m: re.Match) -> str:
        if m[1]:
            return WHITESPACE_ESCAPES[m[1]]
        if m[2]:
            code = m[2][1:]
            if code == "0":
                return "\0"
            return chr(int(code, 8)) if code.isdigit() else chr(int(code[1:], 16))
        return m[3] or m[4]

    return UNQUOTE.sub(one, body).replace('\\"', '"')


class _CompelGrammar:
    """compel's grammar over one string: each element returns (end, nodes), or None where pyparsing's fails.
    Every element but the free word and the whitespace skips leading whitespace first, as pyparsing's do."""

    def __init__(self, text: str):
        self.s = text
        self.n = len(text)
        self.memo: dict[int, Match] = {}  # parenthesized fragments by start: nesting would cost 4**depth tries

    def skip(self, p: int) -> int:
        while p < self.n and self.s[p] in SKIPPED:
            p += 1
        return p

    def literal(self, p: int | None, word: str) -> int | None:
        if p is None:
            return None
        p = self.skip(p)
        return p + len(word) if self.s.startswith(word, p) else None

    def followed_by_white(self, p: int) -> bool:
        return p < self.n and self.s[p] in WHITE

    def word(self, p: int) -> Match:
        """non_syntax_word: escaped symbols, + or - before a plain character, anything but whitespace and syntax."""
        s, start = self.s, self.skip(p)
        q = start
        while q < self.n:
            if s[q] == "\\" and q + 1 < self.n and s[q + 1] in SYNTACTIC:
                q += 2
            elif s[q] in "+-" and q + 1 < self.n and s[q + 1] not in WHITE and s[q + 1] not in SYNTACTIC:
                q += 1
            elif s[q] not in WORD_STOP:
                q += 1
            else:
                break
        return (q, [_text(s[start:q])]) if q > start else None

    def free_word(self, p: int) -> Match:
        q = p
        while q < self.n and self.s[q] not in string.whitespace:
            q += 1
        return (q, [_text(self.s[p:q])]) if q > p else None

    def white(self, p: int) -> Match:
        q = p
        while q < self.n and self.s[q] in WHITE:
            q += 1
        return (q, []) if q > p else None

    def number(self, p: int) -> tuple[int, float] | None:
        p = self.skip(p)
        m = REAL.match(self.s, p) or INTEGER.match(self.s, p)
        return (m.end(), float(m[0])) if m else None

    def weight(self, p: int, signs_only: bool = False) -> tuple[int, float] | None:
        """`+`s (1.1 each), `-`s (0.9 each) or a number."""
        p = self.skip(p)
        for sign, base in (("+", 1.1), ("-", 0.9)):
            q = p
            while q < self.n and self.s[q] == sign:
                q += 1
            if q > p:
                return q, pow(base, q - p)
        return None if signs_only else self.number(p)

    def keyword(self, p: int) -> tuple[int, str] | None:
        p = q = self.skip(p)
        while q < self.n and self.s[q] in KEYWORD:
            q += 1
        return (q, self.s[p:q]) if q > p else None

    def quoted(self, p: int, inner: Callable[[_CompelGrammar, int], Match]) -> Match:
        """A quoted string whose content `inner` reads whole (compel's parse_fragment_str)."""
        p = self.skip(p)
        m = QUOTED.match(self.s, p)
        if not m:
            return None
        body = _unquote(m[0][1:-1])
        if not body.strip():
            return m.end(), [_Text("")]
        grammar = _CompelGrammar(body.replace('"', '\\"'))
        found = inner(grammar, 0)
        if found is None or grammar.skip(found[0]) != grammar.n:
            return None
        return m.end(), found[1]

    def parenthesized(self, p: int) -> Match:
        if p not in self.memo:
            q = self.literal(p, "(")
            found = self.fragments(q, commas=True) if q is not None else None
            q = self.literal(found[0], ")") if found else None
            self.memo[p] = (q, found[1]) if q is not None else None
        return self.memo[p]

    def target(self, p: int) -> Match:
        """potential_operator_target: a quoted string, a parenthesized fragment or a word."""
        return self.quoted(p, _fragments_with_commas) or self.parenthesized(p) or self.word(p)

    def first_of(self, p: int, elements) -> Match:
        for element in elements:
            found = element(p)
            if found is not None:
                return found
        return None

    def repeat(self, p: int, elements) -> tuple[int, list]:
        """ZeroOrMore(MatchFirst(elements))."""
        nodes: list = []
        while True:
            found = self.first_of(p, elements)
            if found is None or found[0] == p:
                return p, nodes
            p, more = found
            nodes += more

    def fragments(self, p: int, commas: bool) -> tuple[int, list]:
        """fragment_including_commas_or_periods (commas) or fragment_excluding_commas."""
        elements = [self.lora, self.attention, self.swap, self.parenthesized, self.quoted_fragment, self.word]
        if commas:
            elements.append(self.comma_or_period)
        return self.repeat(p, elements)

    def quoted_fragment(self, p: int) -> Match:
        return self.quoted(p, _fragments_with_commas)

    def comma_or_period(self, p: int) -> Match:
        for mark in ",.":
            q = self.literal(p, mark)
            if q is not None:
                return q, [_Text(mark)]
        return None

    def attention(self, p: int) -> Match:
        """`target.attend(w)`, `(...)w` / `"..."w` with no space before w, or `word+` / `word-`."""
        found = self.target(p)
        if found is not None:
            q = self.literal(self.literal(found[0], ".attend"), "(")
            weight = self.weight(q) if q is not None else None
            end = self.literal(weight[0], ")") if weight else None
            if end is not None:
                return end, [_Attention(weight[1], tuple(found[1]))]
        for term, signs_only in (
            (lambda at: self.quoted_fragment(at) or self.parenthesized(at), False),
            (self.word, True),
        ):
            found = term(p)
            if found is None or self.followed_by_white(found[0]):
                continue
            weight = self.weight(found[0], signs_only)
            if weight is not None:
                return weight[0], [_Attention(weight[1], tuple(found[1]))]
        return None

    def swap(self, p: int) -> Match:
        """`target.swap(replacement[, options])`: parsed so that it can be refused."""
        found = self.target(p)
        q = self.literal(self.literal(found[0], ".swap"), "(") if found else None
        if q is None:
            return None
        q, _ = self.fragments(q, commas=False)
        comma = self.literal(q, ",")
        if comma is not None:
            q, _ = self.options(comma)
        q = self.literal(q, ")")
        return (q, [SWAP]) if q is not None else None

    def lora(self, p: int) -> Match:
        """`withLora(name[, weight])` / `useLora(...)`: parsed so that it can be refused."""
        q = self.literal(p, "useLora")
        q = self.literal(self.literal(p, "withLora") if q is None else q, "(")
        name = self.keyword(q) if q is not None else None
        if name is None:
            return None
        comma = self.literal(name[0], ",")
        weight = self.number(comma) if comma is not None else None
        q = self.literal(weight[0] if weight else name[0], ")")
        return (q, [LORA]) if q is not None else None

    def option(self, p: int) -> tuple[int, tuple] | None:
        """`key=value`, a number (kept as text, as compel keeps it) or a flag."""
        key = self.keyword(p)
        if key is not None:
            q = self.literal(key[0], "=")
            value = (self.number(q) or self.keyword(q)) if q is not None else None
            if value is not None:
                return value[0], (key[1], value[1])
        number = self.number(p)
        if number is not None:
            return number[0], (str(number[1]),)
        return (key[0], (key[1],)) if key is not None else None

    def options(self, p: int) -> tuple[int, list]:
        found = self.option(p)
        if found is None:
            return p, []
        p, options = found[0], [found[1]]
        while True:
            comma = self.literal(p, ",")
            found = self.option(comma) if comma is not None else None
            if found is None:
                return p, options
            p = found[0]
            options.append(found[1])

    def group(self, p: int, operators: tuple[str, ...]) -> tuple[int, _Group] | None:
        """`(text, text, ...).blend(options)` or `.and(options)`: each text a target or a quoted prompt."""
        q = self.literal(p, "(")
        item = (lambda at: self.target(at) or self.quoted(at, _prompt)) if q is not None else None
        found = item(q) if item else None
        if found is None:
            return None
        q, texts = found[0], [tuple(found[1])]
        while (comma := self.literal(q, ",")) is not None and (found := item(comma)) is not None:
            q = found[0]
            texts.append(tuple(found[1]))
        q = self.literal(q, ")")
        operator = next((op for op in operators if self.literal(q, op) is not None), None) if q else None
        q = self.literal(self.literal(q, operator), "(") if operator else None
        if q is None:
            return None
        q, options = self.options(q)
        q = self.literal(q, ")")
        return (q, _Group(operator, tuple(texts), tuple(options))) if q is not None else None

    def prompt(self, p: int) -> tuple[int, list]:
        """A whole prompt: anything the finer elements cannot read is kept word by word."""
        elements = [
            self.swap,
            self.lora,
            self.attention,
            self.quoted_fragment,
            self.parenthesized,
            self.free_word,
            self.white,
        ]
        return self.repeat(p, elements)


def _fragments_with_commas(grammar: _CompelGrammar, p: int) -> Match:
    return grammar.fragments(p, commas=True)


def _prompt(grammar: _CompelGrammar, p: int) -> Match:
    return grammar.prompt(p)


def parse_compel(text: str) -> ParsedPrompt:
    """A prompt in compel's syntax, as compel's PromptParser.parse_conjunction and flatten read it."""
    fixed = re.sub(r",(\S)", r", \1", text)  # compel puts a space after each comma first
    if not fixed.strip():
        return ParsedPrompt((WeightedText((Fragment(""),)),), (1.0,), text)
    grammar = _CompelGrammar(fixed)
    conjunction = grammar.group(0, (".and", ".add"))
    if conjunction is not None:
        end, group = conjunction
        if grammar.skip(end) != grammar.n:
            raise PromptSyntaxError(f"text after .and() is not read: move it inside the .and() in {text!r}")
        weights = _weights(group, len(group.texts))
        parts = [(_weighted_text(nodes), weight) for nodes, weight in zip(group.texts, weights)]
    else:
        parts = [(_implicit_part(grammar, text), 1.0)]
    kept = [(part, weight) for part, weight in parts if part is not None]
    if not kept:
        raise PromptSyntaxError(f"{text!r} holds no text to read: write words, or leave the prompt empty")
    return ParsedPrompt(tuple(part for part, _ in kept), tuple(weight for _, weight in kept), text)


def _implicit_part(grammar: _CompelGrammar, text: str) -> WeightedText | Blend | None:
    """compel's implicit conjunction: a .blend() or a plain prompt, then the end of the text."""
    if grammar.lora(0) is not None:  # compel's leading LoRAs
        raise PromptSyntaxError(LORA.what)
    p = 0
    blend = grammar.group(p, (".blend",))
    if blend is not None:
        p, part = blend[0], _blend(blend[1])
    else:
        p, nodes = grammar.prompt(p)
        part = _weighted_text(nodes)
    if grammar.skip(p) != grammar.n:
        raise PromptSyntaxError(f"compel's syntax cannot read {text!r} past character {p}: check the brackets there")
    return part


def _weights(group: _Group, count: int) -> list[float]:
    """A .blend()'s or .and()'s numbers (compel reads each option's first item as a float), one per text."""
    try:
        weights = [float(option[0]) for option in group.options]
    except ValueError as e:
        raise PromptSyntaxError(f"{group.operator}() takes numbers, one per text: {e}") from e
    if weights and len(weights) != count:
        raise PromptSyntaxError(f"{group.operator}() has {len(weights)} weights for {count} texts: give one per text")
    return weights or [1.0] * count


def _blend(group: _Group) -> Blend:
    options = group.options
    normalize = not (options and options[-1][0] == "no_normalize")
    weights = _weights(_Group(group.operator, group.texts, options if normalize else options[:-1]), len(group.texts))
    texts = [_weighted_text(nodes) for nodes in group.texts]
    if any(t is None for t in texts):
        raise PromptSyntaxError(".blend() has a text with no words: give each text words")
    return Blend(tuple(texts), tuple(weights), normalize)


def _flatten(nodes, scale: float) -> list[Fragment]:
    """Each text node with the product of the weights around it (compel's flatten_internal)."""
    fragments: list[Fragment] = []
    for node in nodes:
        if isinstance(node, _Unsupported):
            raise PromptSyntaxError(node.what)
        if isinstance(node, _Attention):
            fragments += _flatten(node.children, scale * node.weight)
        else:
            fragments.append(Fragment(_unescape(node.text), 1.0 * scale))
    return fragments


def _weighted_text(nodes) -> WeightedText | None:
    """The flattened nodes, neighbours of equal weight joined by a space (compel's fuse_fragments)."""
    fused: list[Fragment] = []
    for fragment in _flatten(nodes, 1.0):
        if fused and fused[-1].weight == fragment.weight:
            fused[-1] = Fragment(_unescape(f"{fused[-1].text} {fragment.text}"), fragment.weight)
        else:
            fused.append(fragment)
    return WeightedText(tuple(fused)) if fused else None


# -- A1111 ---------------------------------------------------------------------------------------------

A1111_ATTENTION = re.compile(
    r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:"
)  # modules/prompt_parser.py's re_attention: escapes, brackets, ":1.3)", text, a lone ":"
A1111_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
ROUND, SQUARE = 1.1, 1 / 1.1  # A1111's ( ) and [ ] multipliers


def parse_a1111(text: str) -> ParsedPrompt:
    """A prompt in A1111's attention syntax: its weighted pieces (merged where neighbours weigh the same),
    one conjunction part per BREAK-separated stretch."""
    segments: list[list[Fragment]] = [[]]
    for piece, weight in _a1111_pieces(text):
        if piece is None:  # BREAK
            segments.append([])
        elif segments[-1] and segments[-1][-1].weight == weight:
            segments[-1][-1] = Fragment(segments[-1][-1].text + piece, weight)
        else:
            segments[-1].append(Fragment(piece, weight))
    if len(segments) > 1 and not "".join(f.text for f in segments[-1]).strip():
        segments.pop()  # A1111 adds no chunk for a BREAK at the end
    parts = tuple(WeightedText(tuple(s) or (Fragment(""),)) for s in segments)
    return ParsedPrompt(parts, (1.0,) * len(parts), "".join(f.text for f in parts[0].fragments))


def _a1111_pieces(text: str) -> list[list]:
    """[text, weight] pieces, and [None, _] where a BREAK stands, as A1111's parse_prompt_attention reads them."""
    pieces: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for m in A1111_ATTENTION.finditer(text):
        token, weight = m[0], m[1]
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token in ("(", "["):
            (round_open if token == "(" else square_open).append(len(pieces))
        elif weight is not None and round_open:
            multiply(round_open.pop(), _a1111_weight(weight, text))
        elif token == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif token == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            for i, part in enumerate(A1111_BREAK.split(token)):
                if i:
                    pieces.append([None, 1.0])
                pieces.append([part, 1.0])
    for start in round_open:
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)
    return pieces or [["", 1.0]]


def _a1111_weight(weight: str, text: str) -> float:
    try:
        return float(weight)
    except ValueError:
        raise PromptSyntaxError(f"'{weight}' in {text!r} is not a weight: write a number such as 1.3") from None
