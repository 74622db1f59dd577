from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar, BinaryIO, TextIO, TYPE_CHECKING, Generator

from attrs import define as _attrs_define
from attrs import field as _attrs_field

from ..types import UNSET, Unset

from ..models.scope import Scope
from typing import cast






T = TypeVar("T", bound="Limit")



@_attrs_define
class Limit:
    """ One limit. `target`: a queue's name, a kind, an agent's id, a key or [`EACH_KEY`].

        Attributes:
            concurrency (int | None): At most this many of its tasks running at once, fleet-wide.
            per_ms (int | None):
            rate (int | None): At most `rate` starts per `per_ms` milliseconds, fleet-wide.
            scope (Scope): What a limit applies to.
            target (str):
     """

    concurrency: int | None
    per_ms: int | None
    rate: int | None
    scope: Scope
    target: str
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)





    def to_dict(self) -> dict[str, Any]:
        concurrency: int | None
        concurrency = self.concurrency

        per_ms: int | None
        per_ms = self.per_ms

        rate: int | None
        rate = self.rate

        scope = self.scope.value

        target = self.target


        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update({
            "concurrency": concurrency,
            "per_ms": per_ms,
            "rate": rate,
            "scope": scope,
            "target": target,
        })

        return field_dict



    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        d = dict(src_dict)
        def _parse_concurrency(data: object) -> int | None:
            if data is None:
                return data
            return cast(int | None, data)

        concurrency = _parse_concurrency(d.pop("concurrency"))


        def _parse_per_ms(data: object) -> int | None:
            if data is None:
                return data
            return cast(int | None, data)

        per_ms = _parse_per_ms(d.pop("per_ms"))


        def _parse_rate(data: object) -> int | None:
            if data is None:
                return data
            return cast(int | None, data)

        rate = _parse_rate(d.pop("rate"))


        scope = Scope(d.pop("scope"))




        target = d.pop("target")

        limit = cls(
            concurrency=concurrency,
            per_ms=per_ms,
            rate=rate,
            scope=scope,
            target=target,
        )


        limit.additional_properties = d
        return limit

    @property
    def additional_keys(self) -> list[str]:
        return list(self.additional_properties.keys())

    def __getitem__(self, key: str) -> Any:
        return self.additional_properties[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.additional_properties[key] = value

    def __delitem__(self, key: str) -> None:
        del self.additional_properties[key]

    def __contains__(self, key: str) -> bool:
        return key in self.additional_properties
