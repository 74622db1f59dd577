from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar, BinaryIO, TextIO, TYPE_CHECKING, Generator

from attrs import define as _attrs_define
from attrs import field as _attrs_field

from ..types import UNSET, Unset

from ..models.scope import Scope
from typing import cast
import datetime






T = TypeVar("T", bound="LimitInfo")



@_attrs_define
class LimitInfo:
    """ A limit with what it applies to now, as `harness limits` and the API show it.

        Attributes:
            concurrency (int | None): At most this many of its tasks running at once, fleet-wide.
            per_ms (int | None):
            rate (int | None): At most `rate` starts per `per_ms` milliseconds, fleet-wide.
            running (int): Its tasks running fleet-wide (claimed, not yet ended).
            scope (Scope): What a limit applies to.
            target (str):
            updated_at (datetime.datetime):
            waiting (int): Its tasks due now that wait because the limit is full (no slot or no token left);
                0 while it is not.
     """

    concurrency: int | None
    per_ms: int | None
    rate: int | None
    running: int
    scope: Scope
    target: str
    updated_at: datetime.datetime
    waiting: int
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)





    def to_dict(self) -> dict[str, Any]:
        concurrency: int | None
        concurrency = self.concurrency

        per_ms: int | None
        per_ms = self.per_ms

        rate: int | None
        rate = self.rate

        running = self.running

        scope = self.scope.value

        target = self.target

        updated_at = self.updated_at.isoformat()

        waiting = self.waiting


        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update({
            "concurrency": concurrency,
            "per_ms": per_ms,
            "rate": rate,
            "running": running,
            "scope": scope,
            "target": target,
            "updated_at": updated_at,
            "waiting": waiting,
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


        running = d.pop("running")

        scope = Scope(d.pop("scope"))




        target = d.pop("target")

        updated_at = datetime.datetime.fromisoformat(d.pop("updated_at"))




        waiting = d.pop("waiting")

        limit_info = cls(
            concurrency=concurrency,
            per_ms=per_ms,
            rate=rate,
            running=running,
            scope=scope,
            target=target,
            updated_at=updated_at,
            waiting=waiting,
        )


        limit_info.additional_properties = d
        return limit_info

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
