from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar, BinaryIO, TextIO, TYPE_CHECKING, Generator

from attrs import define as _attrs_define
from attrs import field as _attrs_field

from ..types import UNSET, Unset

from ..models.attempt_status import AttemptStatus
from typing import cast
import datetime






T = TypeVar("T", bound="AttemptRecord")



@_attrs_define
class AttemptRecord:
    """ One attempt that did not succeed, as kept in `tasks.attempts`.

        Attributes:
            attempt (int):
            ended_at (datetime.datetime):
            error (None | str):
            replica (None | str): The replica that ran it.
            started_at (datetime.datetime | None):
            status (AttemptStatus): How an attempt that did not succeed ended (lost: its replica stopped heartbeating)
     """

    attempt: int
    ended_at: datetime.datetime
    error: None | str
    replica: None | str
    started_at: datetime.datetime | None
    status: AttemptStatus
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)





    def to_dict(self) -> dict[str, Any]:
        attempt = self.attempt

        ended_at = self.ended_at.isoformat()

        error: None | str
        error = self.error

        replica: None | str
        replica = self.replica

        started_at: None | str
        if isinstance(self.started_at, datetime.datetime):
            started_at = self.started_at.isoformat()
        else:
            started_at = self.started_at

        status = self.status.value


        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update({
            "attempt": attempt,
            "ended_at": ended_at,
            "error": error,
            "replica": replica,
            "started_at": started_at,
            "status": status,
        })

        return field_dict



    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        d = dict(src_dict)
        attempt = d.pop("attempt")

        ended_at = datetime.datetime.fromisoformat(d.pop("ended_at"))




        def _parse_error(data: object) -> None | str:
            if data is None:
                return data
            return cast(None | str, data)

        error = _parse_error(d.pop("error"))


        def _parse_replica(data: object) -> None | str:
            if data is None:
                return data
            return cast(None | str, data)

        replica = _parse_replica(d.pop("replica"))


        def _parse_started_at(data: object) -> datetime.datetime | None:
            if data is None:
                return data
            try:
                if not isinstance(data, str):
                    raise TypeError()
                started_at_type_0 = datetime.datetime.fromisoformat(data)



                return started_at_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(datetime.datetime | None, data)

        started_at = _parse_started_at(d.pop("started_at"))


        status = AttemptStatus(d.pop("status"))




        attempt_record = cls(
            attempt=attempt,
            ended_at=ended_at,
            error=error,
            replica=replica,
            started_at=started_at,
            status=status,
        )


        attempt_record.additional_properties = d
        return attempt_record

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
