"""The pydantic base every manifest and config model derives from.

Unknown keys are errors (`extra="forbid"`); keys starting with `_` are comments and are dropped before
validation, at the level they appear (never inside free-form values such as an inline JSON schema).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Strict, model_validator

# Strict scalars: JSON's "3" must not become 3, nor true become 1. Floats accept integers (JSON has one
# number type) but not strings or booleans.
Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
Num = Annotated[float, Strict()]


def is_comment_key(key: object) -> bool:
    """Keys beginning with `_` are comments in every manifest object."""
    return isinstance(key, str) and key.startswith("_")


class StrictModel(BaseModel):
    """Forbids unknown keys and drops `_comment`-style keys of its own level."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _drop_comments(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not is_comment_key(k)}
        return data


class OpenMap(StrictModel):
    """An object whose schema allows extra keys of a few scalar types (metrics, statistics).

    Subclasses set `extra_types` to the accepted Python types of those extra values.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    extra_types: ClassVar[tuple[type, ...]] = (int, float, str)

    @model_validator(mode="after")
    def _check_extra_types(self) -> OpenMap:
        names = "/".join(sorted({_json_type(t) for t in self.extra_types}))
        for key, value in (self.__pydantic_extra__ or {}).items():
            bad_bool = isinstance(value, bool) and bool not in self.extra_types
            if bad_bool or not isinstance(value, self.extra_types):
                raise ValueError(f"{key}: expected a {names}, got {value!r}")
        return self


def _json_type(t: type) -> str:
    return {
        int: "number",
        float: "number",
        str: "string",
        bool: "boolean",
        dict: "object",
        list: "array",
        type(None): "null",
    }.get(t, t.__name__)
