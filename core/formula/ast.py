"""The compiled formula tree: what the compiler produces, the evaluator runs and storage keeps.

Names are already resolved here: a variable carries its value, a local name points to an
earlier assignment, an aggregate is a key into the formula's :class:`AggregateSpec` list, and a
template call carries its (constant) template name. So the tree can be evaluated, stored and
reloaded without the source text or the variables it was compiled with.

Every node keeps the 1-based ``line`` and ``column`` where it starts in the source, so runtime
problems ("division by zero at line 3, column 12") point back at the text the operator wrote.
Arithmetic, ``and`` and ``or`` chains are n-ary, so the tree depth is the real nesting depth.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal


@dataclass(frozen=True, kw_only=True)
class Node:
    """Base of every expression node; positions are keyword-only so subclasses read naturally."""

    line: int = 0
    column: int = 0

    def position(self) -> str:
        """'line L, column C', for messages."""
        return f"line {self.line}, column {self.column}"


@dataclass(frozen=True)
class Number(Node):
    """A decimal literal; ``5%`` is stored as 0.05."""

    value: Decimal


@dataclass(frozen=True)
class Text(Node):
    """A text literal (escapes already decoded)."""

    value: str


@dataclass(frozen=True)
class Boolean(Node):
    """``true`` or ``false``."""

    value: bool


@dataclass(frozen=True)
class Skip(Node):
    """``skip``: give no reward."""


@dataclass(frozen=True)
class Template(Node):
    """``template("name")``: give the named bonus template."""

    name: str


@dataclass(frozen=True)
class Variable(Node):
    """A promotion variable with a single value, resolved at compile time."""

    name: str
    value: Decimal | str


@dataclass(frozen=True)
class CurrencyVariable(Node):
    """A per-currency promotion variable, resolved with the customer's currency at evaluation."""

    name: str
    values: tuple[tuple[str, Decimal], ...]


@dataclass(frozen=True)
class LocalRef(Node):
    """A reference to an earlier assignment of the formula."""

    name: str


@dataclass(frozen=True)
class Property(Node):
    """A customer property: ``customer.tier`` or ``customer["Logins count ever"]``."""

    name: str


@dataclass(frozen=True)
class Aggregate(Node):
    """An aggregate over the customer's events; ``key`` refers to an AggregateSpec."""

    key: str


@dataclass(frozen=True)
class Negate(Node):
    """Unary minus."""

    operand: Node


@dataclass(frozen=True)
class Not(Node):
    """Boolean ``not``."""

    operand: Node


@dataclass(frozen=True)
class Arithmetic(Node):
    """``first op1 x1 op2 x2 ...`` evaluated left to right; all ops of one precedence level."""

    first: Node
    rest: tuple[tuple[str, Node], ...]


@dataclass(frozen=True)
class Comparison(Node):
    """``left op right`` with op one of == != < > <= >=."""

    op: str
    left: Node
    right: Node


@dataclass(frozen=True)
class Logical(Node):
    """``a and b and ...`` or ``a or b or ...``, short-circuiting."""

    op: str
    operands: tuple[Node, ...]


@dataclass(frozen=True)
class Branch:
    """One ``if`` / ``elif`` arm; ``text`` is the condition as written, for explanations."""

    condition: Node
    value: Node
    text: str


@dataclass(frozen=True)
class Conditional(Node):
    """``if ... then ... elif ... then ... else ...``; no ``else`` means ``else skip``."""

    branches: tuple[Branch, ...]
    otherwise: Node | None


@dataclass(frozen=True)
class Call(Node):
    """A scalar function: min, max, cap, floor, abs, round."""

    function: str
    args: tuple[Node, ...]


@dataclass(frozen=True)
class Assignment:
    """``name = value`` on its own line."""

    name: str
    value: Node
    line: int
    column: int


@dataclass(frozen=True)
class Program:
    """A whole formula: assignments in order, then the result expression."""

    assignments: tuple[Assignment, ...]
    result: Node


SCALAR_FUNCTIONS = ("min", "max", "cap", "floor", "abs", "round")


def children(node: Node) -> Iterator[Node]:
    """The direct sub-expressions of a node, in source order."""
    if isinstance(node, Negate | Not):
        yield node.operand
    elif isinstance(node, Arithmetic):
        yield node.first
        for _, operand in node.rest:
            yield operand
    elif isinstance(node, Comparison):
        yield node.left
        yield node.right
    elif isinstance(node, Logical):
        yield from node.operands
    elif isinstance(node, Conditional):
        for branch in node.branches:
            yield branch.condition
            yield branch.value
        if node.otherwise is not None:
            yield node.otherwise
    elif isinstance(node, Call):
        yield from node.args


def walk(program: Program) -> Iterator[Node]:
    """Every node of the program, assignments first, in source order (iterative, no recursion)."""
    roots = [a.value for a in program.assignments] + [program.result]
    for root in roots:
        stack = [root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(list(children(node))))


def result_leaves(program: Program) -> Iterator[Node]:
    """The expressions that can become the formula's result (through ifs and local names).

    Tells whether a formula can give an amount, a template or both, without evaluating it.
    """
    assignments = {a.name: a.value for a in program.assignments}
    stack = [program.result]
    while stack:
        node = stack.pop()
        if isinstance(node, Conditional):
            stack.extend(b.value for b in node.branches)
            stack.append(node.otherwise if node.otherwise is not None else Skip())
        elif isinstance(node, LocalRef) and node.name in assignments:
            stack.append(assignments[node.name])
        else:
            yield node


def evaluation_depths(program: Program) -> Iterator[tuple[Assignment | None, int]]:
    """How deep the evaluator's calls go for each assignment (then for the result, None):
    nested expressions, counted through the local names they use, since a name is computed
    where it is first read. Each level costs Python stack frames, so the compiler bounds it
    (a chain of 800 ``v2 = v1 + 1`` steps is shallow in the text but 1,600 levels deep)."""
    depth_of: dict[str, int] = {}

    def depth(root: Node) -> int:
        # Iterative post-order: a statement may itself be nested up to the parser's limit.
        result: dict[int, int] = {}
        stack: list[tuple[Node, bool]] = [(root, False)]
        while stack:
            node, done = stack.pop()
            kids = list(children(node))
            if not done:
                stack.append((node, True))
                stack.extend((kid, False) for kid in kids)
                continue
            below = max((result[id(kid)] for kid in kids), default=0)
            if isinstance(node, LocalRef):
                below = max(below, depth_of.get(node.name, 0))
            result[id(node)] = below + 1
        return result[id(root)]

    for assignment in program.assignments:
        depth_of[assignment.name] = depth(assignment.value)
        yield assignment, depth_of[assignment.name]
    yield None, depth(program.result)
