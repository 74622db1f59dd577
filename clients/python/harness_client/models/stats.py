from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar, BinaryIO, TextIO, TYPE_CHECKING, Generator

from attrs import define as _attrs_define
from attrs import field as _attrs_field

from ..types import UNSET, Unset







T = TypeVar("T", bound="Stats")



@_attrs_define
class Stats:
    """ 
        Attributes:
            cancelled (int):
            completed (int):
            failed (int):
            pending (int):
            retry_scheduled (int):
            running (int):
            success_rate (float): Completed as a percentage of completed + failed + timeout
            timeout (int):
            total (int):
     """

    cancelled: int
    completed: int
    failed: int
    pending: int
    retry_scheduled: int
    running: int
    success_rate: float
    timeout: int
    total: int
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)





    def to_dict(self) -> dict[str, Any]:
        cancelled = self.cancelled

        completed = self.completed

        failed = self.failed

        pending = self.pending

        retry_scheduled = self.retry_scheduled

        running = self.running

        success_rate = self.success_rate

        timeout = self.timeout

        total = self.total


        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update({
            "cancelled": cancelled,
            "completed": completed,
            "failed": failed,
            "pending": pending,
            "retry_scheduled": retry_scheduled,
            "running": running,
            "success_rate": success_rate,
            "timeout": timeout,
            "total": total,
        })

        return field_dict



    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        d = dict(src_dict)
        cancelled = d.pop("cancelled")

        completed = d.pop("completed")

        failed = d.pop("failed")

        pending = d.pop("pending")

        retry_scheduled = d.pop("retry_scheduled")

        running = d.pop("running")

        success_rate = d.pop("success_rate")

        timeout = d.pop("timeout")

        total = d.pop("total")

        stats = cls(
            cancelled=cancelled,
            completed=completed,
            failed=failed,
            pending=pending,
            retry_scheduled=retry_scheduled,
            running=running,
            success_rate=success_rate,
            timeout=timeout,
            total=total,
        )


        stats.additional_properties = d
        return stats

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
