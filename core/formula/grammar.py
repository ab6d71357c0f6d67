"""The formula grammar, in lark's EBNF, for an LALR(1) parser.

It lives in a Python string rather than a ``.lark`` file so that importing the domain performs no
file I/O. Newlines are handled by the post-lexer in :mod:`core.formula.parser` (they separate
statements outside parentheses and are dropped where a statement obviously continues), which is
why the grammar only sees ``_SEP`` tokens.

Design notes:

* ``then`` branches and conditions are ``or_expr`` (no bare nested ``if``): this removes the
  dangling-``else`` ambiguity, so the grammar has no LALR conflicts. Nest with parentheses:
  ``if a then (if b then 1 else 2) else 3``. The ``else`` branch may itself be an ``if``.
* Arithmetic, ``and`` and ``or`` chains are flat n-ary rules, so a long sum like
  ``a + b + c + ...`` does not create deep trees (depth is limited separately).
* A comparison is not associative: ``a < b < c`` is a syntax error, not a surprise.
* ``customer`` is a keyword: ``customer.tier`` or ``customer["Logins count ever"]``.
"""

GRAMMAR = r"""
start: (assignment _SEP)* expr

assignment: NAME ASSIGN expr

?expr: if_expr
     | or_expr

if_expr: IF or_expr "then" or_expr elif_branch* else_branch?
elif_branch: ELIF or_expr "then" or_expr
else_branch: ELSE expr

?or_expr: and_expr ("or" and_expr)*
?and_expr: not_expr ("and" not_expr)*
?not_expr: NOT not_expr -> not_op
         | comparison
?comparison: sum (COMP sum)?
?sum: product ((PLUS | MINUS) product)*
?product: unary ((STAR | SLASH) unary)*
?unary: MINUS unary -> neg
      | atom

?atom: NUMBER -> number
     | PERCENT -> percent
     | STRING -> string
     | TRUE -> true
     | FALSE -> false
     | SKIP -> skip
     | NAME -> name
     | NAME "." NAME -> dotted
     | CUSTOMER "." NAME -> prop
     | CUSTOMER "[" STRING "]" -> prop
     | NAME "(" [arglist] [where_clause] ")" -> call
     | "(" expr ")"

arglist: expr ("," expr)*
where_clause: WHERE condition ("and" condition)*

?condition: NAME (ASSIGN | COMP) filter_value -> cmp_condition
          | NAME "in" value_list -> in_condition
          | NAME NOT "in" value_list -> not_in_condition

value_list: "(" filter_value ("," filter_value)* ")"

?filter_value: STRING -> fv_string
             | NUMBER -> fv_number
             | MINUS NUMBER -> fv_negative

IF: "if"
ELIF: "elif"
ELSE: "else"
NOT: "not"
TRUE: "true"
FALSE: "false"
SKIP: "skip"
CUSTOMER: "customer"
WHERE: "where"

COMP: "==" | "!=" | "<=" | ">=" | "<" | ">"
ASSIGN: "="
PLUS: "+"
MINUS: "-"
STAR: "*"
SLASH: "/"
SEMI: ";"

PERCENT: /[0-9]+(\.[0-9]+)?%/
NUMBER: /[0-9]+(\.[0-9]+)?/
STRING: /"(?:[^"\\\n]|\\.)*"/
NAME: /[A-Za-z_][A-Za-z0-9_]*/

_NL: /\n/
COMMENT: /#[^\n]*/
WS: /[ \t\f\r]+/

%ignore WS
%ignore COMMENT
%declare _SEP
"""
