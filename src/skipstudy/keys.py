"""What a declared config key is: a field of a pydantic model (:class:`Options`), whose default,
type and range are that key's one declaration, and the one-line refusal every check prints
(``key=value must be ...; e.g. key=...``): a pydantic ``ValidationError``'s location becomes the
dotted key, the field's JSON schema (its type and range) the words, its example or default the fix."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError

from skipstudy.errors import ConfigError


class Options(BaseModel):
    """The keys of one config group option. Strict, as a command line is: ``1`` is not ``true``
    and ``"abc"`` no number; an unknown key is refused with the closest known ones."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _text(value: Any) -> Any:
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


Text = Annotated[str, BeforeValidator(_text)]  # a path or a name: numbers pass as their text


def key(default: Any = ..., *, eg: Any = None, valid: str | None = None, bad: Any = None, **limits: Any) -> Any:
    """A field: ``eg`` the example a refusal offers (else the default), ``valid`` words for a range
    that a rule decides (with ``bad``, a value it refuses), ``limits`` pydantic's (``ge``, ``lt``...)."""
    return Field(default, examples=None if eg is None else [eg], description=valid,
                 json_schema_extra=None if bad is None else {"bad": bad}, **limits)


def rule(accepts: Callable[[Any], bool]) -> AfterValidator:
    """A range no bound states (6n+2, odd); its words are the field's ``valid``."""
    def check(value: Any) -> Any:
        if not accepts(value):
            raise ValueError("outside the declared range")
        return value
    return AfterValidator(check)


def defaults(model: type[BaseModel]) -> dict:
    """``model``'s keys and defaults as a config node (``???``: a key the yaml must set)."""
    return {name: "???" if field.is_required() else field.get_default(call_default_factory=True)
            for name, field in model.model_fields.items()}


def show(value: Any) -> str:
    """A value as an override would write it: ``true``, ``null``, ``[100,150]``, ``adam``."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(show(v) for v in value) + "]"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def closest(name: str, known: Any) -> list[str]:
    """Up to three of ``known`` that ``name`` may have meant: those it begins, else the nearest."""
    return [k for k in sorted(known) if k.startswith(name) and name][:3] or \
        difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)


def unknown_key(key: str, known: Any, where: str) -> ConfigError:
    """The refusal of ``key``, not among ``known`` (the keys of ``where``), with the closest."""
    name = key.rsplit(".", 1)[-1]
    prefix = key[: -len(name)]
    close = closest(name, known)
    hint = f"did you mean {', '.join(prefix + c for c in close)}? " if close else ""
    valid = ", ".join(sorted(known)) if len(known) <= 20 else f"the arguments of {where}"
    return ConfigError(f"{key} is not a key of {where}; {hint}valid: {valid}")


def field_schema(model: type[BaseModel], name: str) -> dict:
    """The JSON schema of one field (its type and range), with its ``valid`` words and example;
    empty for a type JSON cannot describe (a Trainer argument that takes a callable)."""
    field = model.model_fields[name]
    try:
        hint = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
        schema = TypeAdapter(hint).json_schema()
    except Exception:  # noqa: BLE001 - pydantic's PydanticSchemaGenerationError and kin
        schema = {}
    return {**schema, **(field.json_schema_extra or {}), "description": field.description,
            "examples": field.examples}


def _interval(s: dict, noun: str) -> str:
    lo, hi = s.get("minimum", s.get("exclusiveMinimum")), s.get("maximum", s.get("exclusiveMaximum"))
    lo_open, hi_open = "exclusiveMinimum" in s, "exclusiveMaximum" in s
    a = f"{'an' if noun == 'integer' else 'a'} {noun}"
    if hi is None and lo is not None and ((lo == 0 and lo_open) or (noun == "integer" and lo == 1)):
        return f"a positive {noun}"
    if hi is None:
        return a if lo is None else f"{a} {'>' if lo_open else '>='} {lo}"
    if lo is None:
        return f"{a} {'<' if hi_open else '<='} {hi}"
    return f"{a} in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def words(s: dict) -> tuple[str, bool, bool]:
    """(the valid values in words, whether null is valid, whether they are a list of choices)."""
    if s.get("description"):
        return s["description"], False, False
    if "anyOf" in s:
        parts = [words(p) for p in s["anyOf"] if p.get("type") != "null"]
        null = len(parts) < len(s["anyOf"])
        return " or ".join(w for w, _, _ in parts), null, len(parts) == 1 and parts[0][2] and not null
    if "enum" in s or "const" in s:
        return ", ".join(show(v) for v in s.get("enum", [s.get("const")])), False, True
    kind = s.get("type")
    if kind in ("integer", "number"):
        return _interval(s, "integer" if kind == "integer" else "number"), False, False
    if kind == "array":
        item, _, choices = words(s.get("items", {}))
        size = f"{s['minItems']} " if s.get("minItems") is not None and s.get("minItems") == s.get("maxItems") else ""
        different = "different " if s.get("uniqueItems") else ""
        return f"a list of {size}{different}values, each {'one of: ' if choices else ''}{item}", False, False
    return {"boolean": "true or false", "string": "a string", "object": "a group of keys"}.get(kind, "a valid value"), \
        False, False


def example(s: dict, field: Any) -> Any:
    """The value a refusal offers as the fix: the declared example, else the default, else null if
    valid, else a value of the declared type."""
    default = None if field is None or field.is_required() else field.get_default()
    if s.get("examples") or (default is not None and not str(default).startswith("${")):
        return s["examples"][0] if s.get("examples") else default
    if any(part.get("type") == "null" for part in s.get("anyOf", [])):
        return None
    for part in s.get("anyOf", [s]):
        if "enum" in part or "const" in part:
            return part.get("enum", [part.get("const")])[0]
        if part.get("type") in ("boolean", "integer", "number", "string"):
            return {"boolean": True, "integer": 1, "number": 1.0, "string": "auto"}[part["type"]]
    return None


def validate(model: type[BaseModel], node: Mapping, prefix: str, where: str) -> BaseModel:
    """``node`` as ``model``, or pydantic's first error as one line, quoted ``<prefix><key>``: the
    dotted key, the value, the valid range, a fix."""
    try:
        return model.model_validate(dict(node))
    except ValidationError as err:
        first = err.errors()[0]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, ConfigError):  # a rule across keys (a model validator) words its own refusal
        raise cause from None
    path, value, inner = [], node, model
    for part in first["loc"]:  # down through nested models, to the key the user wrote
        if inner is None or not isinstance(part, str) or part not in inner.model_fields:
            break
        path.append(part)
        owner, value = inner, value.get(part) if isinstance(value, Mapping) else None
        ann = inner.model_fields[part].annotation
        inner = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    full = prefix + ".".join(path)
    if first["type"] == "extra_forbidden":
        name = str(first["loc"][len(path)])
        raise unknown_key(f"{full}.{name}" if path else prefix + name, inner.model_fields, full if path else where)
    if not path:
        raise ConfigError(f"{prefix.rstrip('.')}: {first['msg']}")
    if inner is not None:
        raise ConfigError(f"{full}={value!r} must be a group of keys; valid keys: {', '.join(inner.model_fields)}")
    s, field = field_schema(owner, path[-1]), owner.model_fields[path[-1]]
    valid, null, choices = words(s)
    if first["type"] == "missing":
        raise ConfigError(f"{full} is missing; e.g. {full}={show(example(s, None))}")
    verb = "is not one of:" if choices and not null else "must be"
    raise ConfigError(f"{full}={value!r} {verb} {valid}{' or null' if null else ''}; "
                      f"e.g. {full}={show(example(s, field))}")
