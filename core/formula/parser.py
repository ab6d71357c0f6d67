"""Parsing formula text into a lark tree, with errors an operator can act on.

Every failure is a :class:`core.errors.InvalidArgument` with ``reason`` FORMULA_SYNTAX (the text
does not follow the grammar) or FORMULA_INVALID (a limit is exceeded), ``metadata`` holding
``line`` and ``column`` (1-based), and a message such as
``line 2, column 14: expected an expression after '*', but found ')'``. No other exception
escapes, whatever the input: lark's exceptions are translated, and the tree depth is checked
iteratively before any recursive processing, so deeply nested input cannot hit Python's
recursion limit.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken
from lark.lark import PostLex

from core.errors import InvalidArgument
from core.formula.grammar import GRAMMAR

MAX_SOURCE_LENGTH = 10_000
MAX_NESTING_DEPTH = 50

# A newline is dropped (the statement continues) after these tokens...
_CONTINUE_AFTER = frozenset(
    {
        "PLUS", "MINUS", "STAR", "SLASH", "COMP", "ASSIGN", "COMMA", "IF", "THEN",
        "ELIF", "ELSE", "AND", "OR", "NOT", "WHERE", "IN", "DOT",
    }
)  # fmt: skip
# ...and before these, which can never start a statement. A line starting with '+' or '-' is a
# new statement (unary minus), so those two are deliberately absent.
_CONTINUE_BEFORE = frozenset(
    {"THEN", "ELIF", "ELSE", "AND", "OR", "STAR", "SLASH", "COMP", "WHERE", "IN", "DOT"}
)
_OPEN = frozenset({"LPAR", "LSQB"})
_CLOSE = frozenset({"RPAR", "RSQB"})


class _StatementPostLexer(PostLex):
    """Turns newlines and ';' into statement separators (``_SEP``), the way people read them.

    * Newlines inside parentheses or brackets are ignored, so an expression can span lines.
    * A newline after an operator / keyword that needs more (``*``, ``and``, ``then``...) or
      before one that cannot start a statement (``elif``, ``else``, ``and``...) is ignored, so
      ``if ... then ...`` can be laid out one branch per line.
    * Runs of separators collapse, and leading / trailing separators vanish (blank lines and
      comment lines are harmless).
    """

    always_accept = ("_NL", "SEMI")

    def process(self, stream: Iterator[Token]) -> Iterator[Token]:
        depth = 0
        pending: Token | None = None
        previous: Token | None = None
        for token in stream:
            if token.type in ("_NL", "SEMI"):
                is_newline = token.type == "_NL"
                if is_newline and (
                    depth > 0 or (previous is not None and previous.type in _CONTINUE_AFTER)
                ):
                    continue
                if previous is None:
                    continue
                if pending is None or (pending.type == "_NL" and not is_newline):
                    pending = token
                continue
            if pending is not None:
                if not (pending.type == "_NL" and token.type in _CONTINUE_BEFORE):
                    yield Token.new_borrow_pos("_SEP", pending.value, pending)
                pending = None
            if token.type in _OPEN:
                depth += 1
            elif token.type in _CLOSE and depth > 0:
                depth -= 1
            previous = token
            yield token


@functools.cache
def _parser() -> Lark:
    """Build the LALR parser once, on first use (table construction takes a few ms)."""
    return Lark(
        GRAMMAR,
        parser="lalr",
        lexer="basic",
        postlex=_StatementPostLexer(),
        propagate_positions=True,
        maybe_placeholders=True,
    )


@dataclass(frozen=True)
class Position:
    """A 1-based line and column in the formula text."""

    line: int
    column: int

    def __str__(self) -> str:
        return f"line {self.line}, column {self.column}"


def formula_error(
    reason: str, position: Position, message: str, **extra: object
) -> InvalidArgument:
    """Build the InvalidArgument every formula error uses: position first, then the problem."""
    metadata: dict[str, object] = {"line": position.line, "column": position.column}
    metadata.update(extra)
    return InvalidArgument(f"{position}: {message}", reason=reason, metadata=metadata)


_EXPRESSION_START = frozenset(
    {"NUMBER", "PERCENT", "STRING", "TRUE", "FALSE", "SKIP", "NAME", "CUSTOMER", "LPAR"}
)
_OPERATORS = frozenset({"PLUS", "MINUS", "STAR", "SLASH", "COMP", "AND", "OR"})
_WORDS = {
    "RPAR": "')'",
    "RSQB": "']'",
    "LPAR": "'('",
    "LSQB": "'['",
    "COMMA": "','",
    "DOT": "'.'",
    "ASSIGN": "'='",
    "THEN": "'then'",
    "ELIF": "'elif'",
    "ELSE": "'else'",
    "WHERE": "'where'",
    "IN": "'in'",
    "NOT": "'not'",
    "AND": "'and'",
    "OR": "'or'",
    "COMP": "a comparison (==, !=, <, >, <=, >=)",
    "NAME": "a name",
    "STRING": "a text in double quotes",
    "NUMBER": "a number",
    "_SEP": "the end of the line",
}
_ORDER = list(_WORDS)


def _rank(name: str) -> int:
    return _ORDER.index(name) if name in _ORDER else len(_ORDER)


def _describe_expected(expected: set[str]) -> list[str]:
    """Summarise lark's terminal names in plain words, most useful first."""
    words: list[str] = []
    rest = set(expected)
    if "$END" in rest:
        rest = (rest - {"$END"}) | {"_SEP"}
    if {"NUMBER", "NAME"} <= rest:
        words.append("an expression")
        rest -= _EXPRESSION_START | {"MINUS", "NOT", "IF"}
    if {"STAR", "PLUS"} <= rest:
        words.append("an operator (+ - * / == < and or ...)")
        rest -= _OPERATORS
    if words:  # '(' and '.' after a name are legal but only noise next to "an operator"
        rest -= {"LPAR", "DOT"}
    words.extend(_WORDS[t] for t in sorted(rest, key=_rank) if t in _WORDS)
    return words


def _short(text: str, limit: int = 40) -> str:
    """Long tokens (a 5,000-character text) are cut in messages and metadata."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe_token(token: Token) -> str:
    kind = token.type
    if kind == "$END":
        return "the end of the formula"
    if kind == "_SEP":
        return "';'" if token.value == ";" else f"the end of line {token.line}"
    value = _short(str(token.value))
    if kind == "NAME":
        return f"name '{value}'"
    if kind == "NUMBER":
        return f"number {value}"
    if kind == "PERCENT":
        return f"percentage {value}"
    if kind == "STRING":
        return f"text {value}"
    return f"'{value}'"


def _join(words: list[str]) -> str:
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " or " + words[-1]


def _tokens_before(source: str, line: int, column: int) -> list[Token]:
    """The tokens before a position (separators included), found by lexing again.

    Lark's LALR errors do not say what came before the bad token, nor whether a parenthesis or
    an ``if`` is open; re-lexing the (short) text answers both, so the message can say
    "after '*'" and list only the tokens that make sense here. Lexing errors further on do not
    matter.
    """
    tokens: list[Token] = []
    try:
        for token in _parser().lex(source):
            if (token.line or 0, token.column or 0) >= (line, column):
                break
            tokens.append(token)
    except UnexpectedInput:
        pass
    return tokens


def _open_depth(before: list[Token]) -> int:
    depth = 0
    for token in before:
        if token.type in _OPEN:
            depth += 1
        elif token.type in _CLOSE and depth > 0:
            depth -= 1
    return depth


def _plausible(expected: set[str], before: list[Token]) -> set[str]:
    """Drop expected tokens that lark's LALR lookahead allows but this context makes pointless.

    After ``5`` lark also "expects" ')' and 'then' (they may follow an expression somewhere);
    if no '(' is open and no ``if`` is waiting for its ``then``, suggesting them only confuses.
    """
    depth = 0
    # the if/elif/then/else keywords seen at each open parenthesis level of this statement
    keywords: list[list[str]] = [[]]
    for token in before:
        if token.type in _OPEN:
            depth += 1
            keywords.append([])
        elif token.type in _CLOSE:
            if depth > 0:
                depth -= 1
                keywords.pop()
        elif token.type == "_SEP" and depth == 0:
            keywords = [[]]
        elif token.type in ("IF", "ELIF", "THEN", "ELSE"):
            keywords[-1].append(token.type)
    result = set(expected)
    if depth == 0:
        result -= {"RPAR", "RSQB", "COMMA", "WHERE"}
    else:
        result -= {"_SEP", "$END"}
    last = keywords[-1][-1] if keywords[-1] else None
    if last in ("IF", "ELIF"):
        result -= {"ELIF", "ELSE", "_SEP", "$END"}
    elif last == "THEN":
        result -= {"THEN"}
    else:
        result -= {"THEN", "ELIF", "ELSE"}
    return result or set(expected)


def _char_name(char: str) -> str:
    if char == "'":
        return '"\'"'
    return f"'{char}'" if char.isprintable() and not char.isspace() else f"U+{ord(char):04X}"


_CHARACTER_HINTS = {
    '"': "this text is not closed: add the closing '\"' on the same line",
    "'": 'use double quotes for text, like "Roulette"',
    "%": "a percent sign must follow a number directly, like 5%",
    "!": "use '!=' for 'is not equal'",
    "&": "use the word 'and'",
    "|": "use the word 'or'",
    "{": "use parentheses '(' and ')' for grouping",
    "}": "use parentheses '(' and ')' for grouping",
}


def _syntax_error(source: str, exc: UnexpectedInput) -> InvalidArgument:
    if isinstance(exc, UnexpectedCharacters):
        position = Position(exc.line, exc.column)
        char = exc.char
        hint = _CHARACTER_HINTS.get(char, "it has no meaning in a formula")
        return formula_error(
            "FORMULA_SYNTAX",
            position,
            f"unexpected character {_char_name(char)}: {hint}",
            token=char,
        )
    if isinstance(exc, UnexpectedToken):
        return _token_error(source, exc)
    line = getattr(exc, "line", 1) or 1
    column = getattr(exc, "column", 1) or 1
    return formula_error(
        "FORMULA_SYNTAX", Position(max(line, 1), max(column, 1)), "the formula is not complete"
    )


def _last_meaningful(tokens: list[Token]) -> Token | None:
    for token in reversed(tokens):
        if token.type != "_SEP":
            return token
    return None


def _token_error(source: str, exc: UnexpectedToken) -> InvalidArgument:
    token = exc.token
    expected = {str(name) for name in exc.expected}
    at_end = token.type == "$END"
    if at_end:
        before = _tokens_before(source, 1 << 30, 0)
        previous = _last_meaningful(before)
        if previous is None:
            return formula_error(
                "FORMULA_SYNTAX",
                Position(1, 1),
                "the formula is empty: write a result, e.g. sum(deposit.amount) * 10%",
            )
        position = Position(
            previous.end_line or previous.line or 1, previous.end_column or previous.column or 1
        )
        if "_SEP" in expected and "$END" not in expected and not expected & _EXPRESSION_START:
            return formula_error(
                "FORMULA_SYNTAX",
                position,
                "the formula has no result: it ends with an assignment; add a last line with "
                "the result to give (for example just the name you assigned)",
            )
    else:
        position = Position(token.line or 1, token.column or 1)
        before = _tokens_before(source, position.line, position.column)
        previous = _last_meaningful(before)
    after = f" after '{_short(str(previous.value))}'" if previous is not None else ""
    hints: list[str] = []
    if at_end and "RPAR" in expected:
        hints.append("a '(' is still open")
    if token.type == "COMP" and "COMP" not in expected:
        hints.append("comparisons cannot be chained; combine them with 'and'")
    if token.type == "ASSIGN":
        hints.append("'=' gives a name a value; to compare two values use '=='")
    operand = ("NUMBER", "NAME", "STRING", "PERCENT")
    unclosed = (
        not at_end
        and previous is not None
        and (previous.line or 0) < (token.line or 0)
        and _open_depth(before) > 0
    )
    if token.type == "NAME" and token.value in {"elseif", "else_if", "elsif"}:
        hints.append("write 'elif'")
    elif token.type == "NAME" and "STRING" in expected and "NAME" not in expected:
        hints.append(f'text goes in double quotes: "{token.value}"')
    elif unclosed and previous is not None:
        hints.append(f"a '(' is not closed: is a ')' missing on line {previous.line}?")
    elif token.type in operand and previous is not None and previous.type in (*operand, "RPAR"):
        hints.append("an operator is missing between the two")
    if token.type == "RPAR" and _open_depth(before) == 0:
        hints.append("there is no '(' for this ')'")
    hint = "".join(f" ({h})" for h in hints)
    if "NUMBER" in expected and "NAME" in expected:
        if at_end:
            message = f"the formula ends too early: expected an expression{after}"
        elif previous is None:
            message = f"expected an expression at the start, but found {_describe_token(token)}"
        else:
            message = f"expected an expression{after}, but found {_describe_token(token)}"
        return formula_error(
            "FORMULA_SYNTAX", position, message + hint, token=_short(str(token.value))
        )
    words = _join(_describe_expected(_plausible(expected, before))) or "something else"
    if at_end:
        message = f"the formula ends too early{after}: expected {words}"
    else:
        message = f"unexpected {_describe_token(token)}{after}: expected {words}"
    return formula_error("FORMULA_SYNTAX", position, message + hint, token=_short(str(token.value)))


# Structural rules that do not add a level of nesting an operator would count.
_STRUCTURAL = frozenset(
    {"start", "assignment", "arglist", "elif_branch", "else_branch", "where_clause", "value_list"}
)


def _check_depth(tree: Tree[Token]) -> None:
    """Reject trees nested deeper than MAX_NESTING_DEPTH, without recursion."""
    stack: list[tuple[Tree[Token], int]] = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        # A leaf (a number, a name, an aggregate's words: no subtree) nests nothing: "-1" is
        # one level, "abs(-1)" two, so the limit counts operations, as formulas.proto says.
        leaf = all(not isinstance(child, Tree) for child in node.children)
        level = depth if node.data in _STRUCTURAL or leaf else depth + 1
        if level > MAX_NESTING_DEPTH:
            meta = node.meta
            position = Position(getattr(meta, "line", 1) or 1, getattr(meta, "column", 1) or 1)
            raise formula_error(
                "FORMULA_INVALID",
                position,
                f"the formula is nested more than {MAX_NESTING_DEPTH} levels deep here; "
                "split it into named steps (name = expression) on separate lines",
                limit=MAX_NESTING_DEPTH,
            )
        for child in node.children:
            if isinstance(child, Tree):
                stack.append((child, level))


def parse_formula(source: str) -> Tree[Token]:
    """Parse formula text into lark's tree, or raise InvalidArgument.

    Checks the length limit before parsing and the nesting limit right after, so everything
    downstream may recurse safely.
    """
    if not isinstance(source, str):
        raise InvalidArgument(
            f"a formula must be text, got {type(source).__name__}",
            reason="FORMULA_INVALID",
            metadata={"line": 1, "column": 1},
        )
    if len(source) > MAX_SOURCE_LENGTH:
        raise InvalidArgument(
            f"the formula is {len(source)} characters long; the limit is {MAX_SOURCE_LENGTH}",
            reason="FORMULA_INVALID",
            metadata={"line": 1, "column": 1, "limit": MAX_SOURCE_LENGTH},
        )
    try:
        tree = _parser().parse(source)
    except UnexpectedInput as exc:
        raise _syntax_error(source, exc) from None
    except InvalidArgument:
        raise
    except Exception as exc:  # defensive: lark must never leak its own errors to callers
        raise InvalidArgument(
            f"the formula could not be read ({type(exc).__name__})",
            reason="FORMULA_SYNTAX",
            metadata={"line": 1, "column": 1},
        ) from None
    _check_depth(tree)
    return tree
