from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar, BinaryIO, TextIO, TYPE_CHECKING, Generator

from attrs import define as _attrs_define
from attrs import field as _attrs_field

from ..types import UNSET, Unset

from typing import cast
import datetime

if TYPE_CHECKING:
  from ..models.queue_view_served_by import QueueViewServedBy





T = TypeVar("T", bound="QueueView")



@_attrs_define
class QueueView:
    """ A queue and who serves it, as `harness queues` and `GET /api/queues` show it.

        Attributes:
            delayed (int): Waiting for their start time (a delay, or a retry's backoff).
            name (str):
            paused (bool): Paused fleet-wide: no replica claims from it until it is resumed.
            reason (str): What was given with the pause.
            runnable (int): Due now: what the replicas serving it would claim next.
            running (int):
            served_by (QueueViewServedBy): Live replicas serving it, with their capacity for it (empty: nothing runs its
                tasks).
            updated_at (datetime.datetime | None): When it was last paused or resumed (none: never).
     """

    delayed: int
    name: str
    paused: bool
    reason: str
    runnable: int
    running: int
    served_by: QueueViewServedBy
    updated_at: datetime.datetime | None
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)





    def to_dict(self) -> dict[str, Any]:
        from ..models.queue_view_served_by import QueueViewServedBy # noqa: PLC0415
        delayed = self.delayed

        name = self.name

        paused = self.paused

        reason = self.reason

        runnable = self.runnable

        running = self.running

        served_by = self.served_by.to_dict()

        updated_at: None | str
        if isinstance(self.updated_at, datetime.datetime):
            updated_at = self.updated_at.isoformat()
        else:
            updated_at = self.updated_at


        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update({
            "delayed": delayed,
            "name": name,
            "paused": paused,
            "reason": reason,
            "runnable": runnable,
            "running": running,
            "served_by": served_by,
            "updated_at": updated_at,
        })

        return field_dict



    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        from ..models.queue_view_served_by import QueueViewServedBy # noqa: PLC0415
        d = dict(src_dict)
        delayed = d.pop("delayed")

        name = d.pop("name")

        paused = d.pop("paused")

        reason = d.pop("reason")

        runnable = d.pop("runnable")

        running = d.pop("running")

        served_by = QueueViewServedBy.from_dict(d.pop("served_by"))




        def _parse_updated_at(data: object) -> datetime.datetime | None:
            if data is None:
                return data
            try:
                if not isinstance(data, str):
                    raise TypeError()
                updated_at_type_0 = datetime.datetime.fromisoformat(data)



                return updated_at_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(datetime.datetime | None, data)

        updated_at = _parse_updated_at(d.pop("updated_at"))


        queue_view = cls(
            delayed=delayed,
            name=name,
            paused=paused,
            reason=reason,
            runnable=runnable,
            running=running,
            served_by=served_by,
            updated_at=updated_at,
        )


        queue_view.additional_properties = d
        return queue_view

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
