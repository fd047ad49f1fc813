"""The base of every REST response model (`controller.responses` and the modules beside
it): camelCase on the wire, and a field without a value omitted, never `null` (issue 14:
clients generated from the reference's schemas break on a `null` where it declares an
object, a string or an enum), except the fields a model lists in `KEEP_NULL`."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, model_serializer
from pydantic.alias_generators import to_camel

__all__ = ["ResponseModel"]


class ResponseModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)
    # Wire names of this model's fields sent as null when they have no value (the
    # reference declares them nullable and gives null a meaning).
    KEEP_NULL: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A wrap serializer rather than exclude_none: it applies to nested models too,
        # each with its own KEEP_NULL.
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v is not None or k in self.KEEP_NULL}

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)
