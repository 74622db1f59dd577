from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar, BinaryIO, TextIO, TYPE_CHECKING, Generator

from attrs import define as _attrs_define
from attrs import field as _attrs_field

from ..types import UNSET, Unset

from ..models.status import Status
from typing import cast

if TYPE_CHECKING:
  from ..models.log_chunk import LogChunk
  from ..models.task_progress import TaskProgress





T = TypeVar("T", bound="TaskLogs")



@_attrs_define
class TaskLogs:
    """ A task's stored output, as `GET /api/tasks/{id}/logs` answers.

        Attributes:
            attempt (int): The task's latest attempt.
            chunks (list[LogChunk]): In order: attempt, then seq.
            next_ (None | str): More chunks follow: ask again with `after` set to this (`attempt:seq`).
            progress (None | TaskProgress):
            status (Status): Where a task is in its lifecycle
            task_id (int):
     """

    attempt: int
    chunks: list[LogChunk]
    next_: None | str
    progress: None | TaskProgress
    status: Status
    task_id: int
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)





    def to_dict(self) -> dict[str, Any]:
        from ..models.log_chunk import LogChunk # noqa: PLC0415
        from ..models.task_progress import TaskProgress # noqa: PLC0415
        attempt = self.attempt

        chunks = []
        for chunks_item_data in self.chunks:
            chunks_item = chunks_item_data.to_dict()
            chunks.append(chunks_item)



        next_: None | str
        next_ = self.next_

        progress: dict[str, Any] | None
        if isinstance(self.progress, TaskProgress):
            progress = self.progress.to_dict()
        else:
            progress = self.progress

        status = self.status.value

        task_id = self.task_id


        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update({
            "attempt": attempt,
            "chunks": chunks,
            "next": next_,
            "progress": progress,
            "status": status,
            "task_id": task_id,
        })

        return field_dict



    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        from ..models.log_chunk import LogChunk # noqa: PLC0415
        from ..models.task_progress import TaskProgress # noqa: PLC0415
        d = dict(src_dict)
        attempt = d.pop("attempt")

        chunks = []
        _chunks = d.pop("chunks")
        for chunks_item_data in (_chunks):
            chunks_item = LogChunk.from_dict(chunks_item_data)



            chunks.append(chunks_item)


        def _parse_next_(data: object) -> None | str:
            if data is None:
                return data
            return cast(None | str, data)

        next_ = _parse_next_(d.pop("next"))


        def _parse_progress(data: object) -> None | TaskProgress:
            if data is None:
                return data
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                progress_type_0 = TaskProgress.from_dict(data)



                return progress_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(None | TaskProgress, data)

        progress = _parse_progress(d.pop("progress"))


        status = Status(d.pop("status"))




        task_id = d.pop("task_id")

        task_logs = cls(
            attempt=attempt,
            chunks=chunks,
            next_=next_,
            progress=progress,
            status=status,
            task_id=task_id,
        )


        task_logs.additional_properties = d
        return task_logs

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
