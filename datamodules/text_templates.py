"""Item text templates: an item's metadata fields -> the one string a language model embeds.

A template is one of
- a name from ``TEMPLATES`` (``"amazon"``, ``"movielens"``, ``"title"``);
- a Python format string over the field names, e.g. ``"{title} by {brand}"``; format specs (without nested
  fields) and indexing work on the raw value (``"{price:.2f}"``, ``"{details[Color]}"``);
- a list of field names, e.g. ``["title", "brand"]``, rendered as ``"Title: ... Brand: ..."``;
- ``None``: every field of the item, in its dict order, labelled like a field list.

Missing fields never raise while rendering (but ``check_template_fields``, run before item texts are embedded,
refuses a field that no item has). A field is *missing* when its key is absent or its value is None, NaN, empty or
whitespace only, or an empty list/dict. Text in square brackets is an optional group: it is dropped whole when any
field inside it is missing, so ``"{title}[ by {brand}]"`` gives ``"Dune by Herbert"`` or just ``"Dune"``.
``[[`` and ``]]`` are literal brackets. A missing field outside a group renders as the empty string. Items with
no fields at all (None) render as ``""``; the embedding cache gives those a zero vector and counts them.

Values become text as follows: strings are HTML-unescaped, HTML tags are removed and whitespace is collapsed;
lists (also nested, e.g. Amazon 2014 category paths) are flattened, de-duplicated in order and joined with
``", "``; dicts become ``"key: value; key: value"``; integral floats print as integers (a year read as 1995.0
prints as 1995). Rendered text is not cut here: the encoder truncates it by tokens (its ``max_length``), so put
long fields such as descriptions last.
"""

from __future__ import annotations

import functools
import html
import logging
import math
import numbers
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

TEMPLATES: dict[str, str] = {
    # Amazon 2014/2018/2023 metadata; description last because token truncation cuts from the end.
    "amazon": "[Title: {title}. ][Brand: {brand}. ][Categories: {categories}. ][Price: {price}. ]"
    "[Description: {description}]",
    # MovieLens movies.dat split into title, year and genres (a list).
    "movielens": "{title}[ ({year})][. Genres: {genres}]",
    "title": "{title}",
}

log = logging.getLogger(__name__)


class TemplateError(ValueError):
    """A text template that cannot be used: malformed, an unknown name, or fields that no item has."""


_TAG = re.compile(r"</?[A-Za-z][^<>]*>")  # an HTML tag; "a < b" is left alone


def value_text(value: Any) -> str:
    """The text of one field value by the rules in the module docstring; "" means missing."""
    if isinstance(value, str):
        if "&" in value:
            value = html.unescape(value)
        if "<" in value:
            value = _TAG.sub(" ", value)
        return " ".join(value.split())
    if value is None:
        return ""
    if _is_list(value):
        seen: dict[str, None] = {}
        _collect(value, seen)
        return ", ".join(seen)
    if isinstance(value, Mapping):
        parts = [f"{value_text(k)}: {v}" for k, v in ((k, value_text(v)) for k, v in value.items()) if v]
        return "; ".join(parts)
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        x = float(value)
        if math.isnan(x):
            return ""
        return str(int(x)) if x.is_integer() else str(x)
    return value_text(str(value))


def _is_list(value: Any) -> bool:
    if isinstance(value, (list, tuple)):  # the common case, without the slower abstract checks below
        return True
    return isinstance(value, Iterable) and not isinstance(value, (str, bytes, bytearray, Mapping))


def _collect(values: Iterable, seen: dict[str, None]) -> None:
    """Flatten nested lists into ``seen`` (an ordered set of non-empty texts)."""
    for v in values:
        if _is_list(v):
            _collect(v, seen)
        elif text := value_text(v):
            seen.setdefault(text, None)


def _lookup(fields: Mapping[str, Any], name: str) -> Any:
    """The value of a replacement field (``title``, ``details[Color]``, ``a.b``), or None when it is missing."""
    if name.isidentifier():
        return fields.get(name)
    try:
        return string.Formatter().get_field(name, (), fields)[0]
    except (KeyError, IndexError, AttributeError, TypeError):
        return None


def _render_segment(parts: tuple[tuple[str, str | None, str, str | None], ...], fields: Mapping) -> tuple[str, bool]:
    """Format one parsed segment; returns (text, whether any field in it was missing)."""
    out: list[str] = []
    missing = False
    for literal, name, spec, conversion in parts:
        out.append(literal)
        if name is None:
            continue
        value = _lookup(fields, name)
        text = value_text(value)
        if not text:
            missing = True
            continue
        if conversion:
            value = {"r": repr, "s": str, "a": ascii}[conversion](value)
            text = value_text(value)
        if spec:
            try:
                text = format(value, spec)
            except (TypeError, ValueError) as err:
                raise TemplateError(f"cannot format field {name!r} = {value!r} with spec {spec!r}: {err}") from err
        out.append(text)
    return "".join(out), missing


Parsed = tuple[tuple[bool, tuple[tuple[str, str | None, str, str | None], ...]], ...]


@functools.lru_cache(maxsize=64)
def _compile(template: str) -> Parsed:
    """Split a template into optional/required segments, each parsed by ``string.Formatter.parse``."""
    segments: list[tuple[bool, str]] = []
    current: list[str] = []
    optional = False
    i = 0
    while i < len(template):
        c = template[i]
        if c == "{" and template[i + 1 : i + 2] != "{":  # a replacement field: its brackets index, not group
            depth, j = 0, i
            while j < len(template):
                depth += {"{": 1, "}": -1}.get(template[j], 0)
                j += 1
                if depth == 0:
                    break
            current.append(template[i:j])
            i = j
            continue
        if c in "[]{}" and template[i + 1 : i + 2] == c:  # doubled bracket = literal; doubled brace kept for format
            current.append(c if c in "[]" else c + c)
            i += 2
            continue
        if c == "[":
            if optional:
                raise TemplateError(f"template {template!r}: nested optional group at character {i}")
            segments.append((False, "".join(current)))
            current, optional = [], True
        elif c == "]":
            if not optional:
                raise TemplateError(f"template {template!r}: ']' at character {i} closes no '['")
            segments.append((True, "".join(current)))
            current, optional = [], False
        else:
            current.append(c)
        i += 1
    if optional:
        raise TemplateError(f"template {template!r}: '[' is never closed")
    segments.append((False, "".join(current)))
    parsed = []
    for optional, fmt in segments:
        try:
            parts = tuple(string.Formatter().parse(fmt))
        except ValueError as err:
            raise TemplateError(f"template {template!r}: {err}") from err
        if any(spec and "{" in spec for _, _, spec, _ in parts):
            raise TemplateError(f"template {template!r}: nested fields inside a format spec are not supported")
        if parts:
            parsed.append((optional, parts))
    return tuple(parsed)


def _label(name: str) -> str:
    text = name.replace("_", " ").strip()
    return text[:1].upper() + text[1:]


def fields_template(names: Sequence[str]) -> str:
    """The template for a list of field names: ``"[Title: {title}. ][Brand: {brand}. ]"``."""
    for name in names:
        if not name.isidentifier():
            raise TemplateError(f"field name {name!r} is not an identifier; use a format string template instead")
    return "".join(f"[{_label(n)}: {{{n}}}. ]" for n in names)


def resolve_template(template: str | Sequence[str] | None) -> str | None:
    """The format string a template stands for (None stays None: all fields, labelled).

    Raises:
        TemplateError: an unknown template name or a malformed format string.
    """
    if template is None:
        return None
    if isinstance(template, str):
        if template in TEMPLATES:
            return TEMPLATES[template]
        if "{" not in template:
            raise TemplateError(
                f"unknown text template {template!r}: named templates are {sorted(TEMPLATES)}; "
                "a format string needs {field} placeholders, e.g. '{title} by {brand}'"
            )
        _compile(template)
        return template
    return fields_template(list(template))


def render_item_text(fields: Mapping[str, Any] | None, template: str | Sequence[str] | None = None) -> str:
    """One item's text from its metadata fields (see the module docstring for the rules).

    Args:
        fields: field name -> value for one item, or None for an item without metadata.
        template: a name from ``TEMPLATES``, a format string, a list of field names, or None for all fields.

    Returns:
        The rendered text with whitespace collapsed; "" when the item has no usable text.
    """
    if fields is None:
        return ""
    if not isinstance(fields, Mapping):
        raise TypeError(f"item fields must be a mapping or None, got {type(fields).__name__}")
    fmt = resolve_template(template)
    if fmt is None:
        fmt = fields_template([str(k) for k in fields if str(k).isidentifier()])
    out: list[str] = []
    for optional, parts in _compile(fmt):
        text, missing = _render_segment(parts, fields)
        if not (optional and missing):
            out.append(text)
    return " ".join("".join(out).split())


def render_item_texts(
    items: Iterable[Mapping[str, Any] | None], template: str | Sequence[str] | None = None
) -> list[str]:
    """``render_item_text`` over many items, in order."""
    resolve_template(template)  # fail on a bad template before the first item
    return [render_item_text(fields, template) for fields in items]


def template_fields(template: str | Sequence[str] | None) -> dict[str, bool]:
    """The replacement fields of a template, each mapped to whether it is required (outside every ``[...]`` group).
    ``None`` (all fields) has none."""
    fmt = resolve_template(template)
    fields: dict[str, bool] = {}
    for optional, parts in _compile(fmt) if fmt is not None else ():
        for _, name, _, _ in parts:
            if name is not None:
                fields[name] = fields.get(name, False) or not optional
    return fields


def check_template_fields(items: Sequence[Mapping[str, Any] | None], template: str | Sequence[str] | None) -> None:
    """Check a template against the items' metadata before anything is embedded.

    A field that no item has would render the same literal text (or nothing) for every item, so the text features
    could not tell items apart: that is refused, except for an optional field of a named template (``amazon``'s
    ``[Brand: {brand}. ]`` is meant for datasets that may lack brands). A field that only some items lack is
    reported with counts: a warning when it is required (those items render a dangling literal such as
    ``"Dune by"``), an info line when it sits in an optional group.

    Args:
        items: per item, its metadata fields, or None for an item without metadata (ignored here).
        template: as for ``render_item_text``.

    Raises:
        TemplateError: naming the template, the field and the fields the items do have.
    """
    records = [r for r in items if r is not None]
    if not records:
        return
    named = isinstance(template, str) and template in TEMPLATES
    for name, required in template_fields(template).items():
        have = sum(1 for r in records if value_text(_lookup(r, name)))
        if have == 0 and (required or not named):
            columns = sorted({str(k) for r in records for k in r})
            shown = columns[:30] + ([f"... {len(columns) - 30} more"] if len(columns) > 30 else [])
            raise TemplateError(
                f"text template {template!r}: no item has field {name!r}; the items' fields are {shown} "
                "(fix data.text.template)"
            )
        if have < len(records):
            (log.warning if required else log.info)(
                "text template %r: field %r is missing for %d of %d items with metadata",
                template, name, len(records) - have, len(records),
            )
