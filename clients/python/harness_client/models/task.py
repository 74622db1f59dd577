from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar, BinaryIO, TextIO, TYPE_CHECKING, Generator

from attrs import define as _attrs_define
from attrs import field as _attrs_field

from ..types import UNSET, Unset

from ..models.status import Status
from typing import cast
import datetime

if TYPE_CHECKING:
  from ..models.attempt_record import AttemptRecord
  from ..models.task_progress import TaskProgress





T = TypeVar("T", bound="Task")



@_attrs_define
class Task:
    """ The whole stored record of a task.

        Attributes:
            agent_id (int | None):
            attempt (int):
            attempts (list[AttemptRecord]): One entry per attempt that did not succeed, oldest first.
            cancel_requested (bool):
            completed_at (datetime.datetime | None):
            concurrency_key (None | str): What limits of scope `key` count it under.
            created_at (datetime.datetime):
            error (None | str):
            fire_at (datetime.datetime | None):
            id (int):
            idempotency_key (None | str):
            kind (str):
            max_retries (int):
            payload (Any):
            priority (int):
            progress (None | TaskProgress): The latest progress its run reported (on one task, not in listings).
            queue (str): The queue it waits in.
            replica (None | str): The replica running it (`locked_by`).
            result (Any):
            retry_count (int):
            scheduled_at (datetime.datetime):
            started_at (datetime.datetime | None):
            status (Status): Where a task is in its lifecycle
            timeout_ms (int | None):
            traceparent (None | str):
     """

    agent_id: int | None
    attempt: int
    attempts: list[AttemptRecord]
    cancel_requested: bool
    completed_at: datetime.datetime | None
    concurrency_key: None | str
    created_at: datetime.datetime
    error: None | str
    fire_at: datetime.datetime | None
    id: int
    idempotency_key: None | str
    kind: str
    max_retries: int
    payload: Any
    priority: int
    progress: None | TaskProgress
    queue: str
    replica: None | str
    result: Any
    retry_count: int
    scheduled_at: datetime.datetime
    started_at: datetime.datetime | None
    status: Status
    timeout_ms: int | None
    traceparent: None | str
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)





    def to_dict(self) -> dict[str, Any]:
        from ..models.attempt_record import AttemptRecord # noqa: PLC0415
        from ..models.task_progress import TaskProgress # noqa: PLC0415
        agent_id: int | None
        agent_id = self.agent_id

        attempt = self.attempt

        attempts = []
        for attempts_item_data in self.attempts:
            attempts_item = attempts_item_data.to_dict()
            attempts.append(attempts_item)



        cancel_requested = self.cancel_requested

        completed_at: None | str
        if isinstance(self.completed_at, datetime.datetime):
            completed_at = self.completed_at.isoformat()
        else:
            completed_at = self.completed_at

        concurrency_key: None | str
        concurrency_key = self.concurrency_key

        created_at = self.created_at.isoformat()

        error: None | str
        error = self.error

        fire_at: None | str
        if isinstance(self.fire_at, datetime.datetime):
            fire_at = self.fire_at.isoformat()
        else:
            fire_at = self.fire_at

        id = self.id

        idempotency_key: None | str
        idempotency_key = self.idempotency_key

        kind = self.kind

        max_retries = self.max_retries

        payload = self.payload

        priority = self.priority

        progress: dict[str, Any] | None
        if isinstance(self.progress, TaskProgress):
            progress = self.progress.to_dict()
        else:
            progress = self.progress

        queue = self.queue

        replica: None | str
        replica = self.replica

        result = self.result

        retry_count = self.retry_count

        scheduled_at = self.scheduled_at.isoformat()

        started_at: None | str
        if isinstance(self.started_at, datetime.datetime):
            started_at = self.started_at.isoformat()
        else:
            started_at = self.started_at

        status = self.status.value

        timeout_ms: int | None
        timeout_ms = self.timeout_ms

        traceparent: None | str
        traceparent = self.traceparent


        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update({
            "agent_id": agent_id,
            "attempt": attempt,
            "attempts": attempts,
            "cancel_requested": cancel_requested,
            "completed_at": completed_at,
            "concurrency_key": concurrency_key,
            "created_at": created_at,
            "error": error,
            "fire_at": fire_at,
            "id": id,
            "idempotency_key": idempotency_key,
            "kind": kind,
            "max_retries": max_retries,
            "payload": payload,
            "priority": priority,
            "progress": progress,
            "queue": queue,
            "replica": replica,
            "result": result,
            "retry_count": retry_count,
            "scheduled_at": scheduled_at,
            "started_at": started_at,
            "status": status,
            "timeout_ms": timeout_ms,
            "traceparent": traceparent,
        })

        return field_dict



    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        from ..models.attempt_record import AttemptRecord # noqa: PLC0415
        from ..models.task_progress import TaskProgress # noqa: PLC0415
        d = dict(src_dict)
        def _parse_agent_id(data: object) -> int | None:
            if data is None:
                return data
            return cast(int | None, data)

        agent_id = _parse_agent_id(d.pop("agent_id"))


        attempt = d.pop("attempt")

        attempts = []
        _attempts = d.pop("attempts")
        for attempts_item_data in (_attempts):
            attempts_item = AttemptRecord.from_dict(attempts_item_data)



            attempts.append(attempts_item)


        cancel_requested = d.pop("cancel_requested")

        def _parse_completed_at(data: object) -> datetime.datetime | None:
            if data is None:
                return data
            try:
                if not isinstance(data, str):
                    raise TypeError()
                completed_at_type_0 = datetime.datetime.fromisoformat(data)



                return completed_at_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(datetime.datetime | None, data)

        completed_at = _parse_completed_at(d.pop("completed_at"))


        def _parse_concurrency_key(data: object) -> None | str:
            if data is None:
                return data
            return cast(None | str, data)

        concurrency_key = _parse_concurrency_key(d.pop("concurrency_key"))


        created_at = datetime.datetime.fromisoformat(d.pop("created_at"))




        def _parse_error(data: object) -> None | str:
            if data is None:
                return data
            return cast(None | str, data)

        error = _parse_error(d.pop("error"))


        def _parse_fire_at(data: object) -> datetime.datetime | None:
            if data is None:
                return data
            try:
                if not isinstance(data, str):
                    raise TypeError()
                fire_at_type_0 = datetime.datetime.fromisoformat(data)



                return fire_at_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(datetime.datetime | None, data)

        fire_at = _parse_fire_at(d.pop("fire_at"))


        id = d.pop("id")

        def _parse_idempotency_key(data: object) -> None | str:
            if data is None:
                return data
            return cast(None | str, data)

        idempotency_key = _parse_idempotency_key(d.pop("idempotency_key"))


        kind = d.pop("kind")

        max_retries = d.pop("max_retries")

        payload = d.pop("payload")

        priority = d.pop("priority")

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


        queue = d.pop("queue")

        def _parse_replica(data: object) -> None | str:
            if data is None:
                return data
            return cast(None | str, data)

        replica = _parse_replica(d.pop("replica"))


        result = d.pop("result")

        retry_count = d.pop("retry_count")

        scheduled_at = datetime.datetime.fromisoformat(d.pop("scheduled_at"))




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


        status = Status(d.pop("status"))




        def _parse_timeout_ms(data: object) -> int | None:
            if data is None:
                return data
            return cast(int | None, data)

        timeout_ms = _parse_timeout_ms(d.pop("timeout_ms"))


        def _parse_traceparent(data: object) -> None | str:
            if data is None:
                return data
            return cast(None | str, data)

        traceparent = _parse_traceparent(d.pop("traceparent"))


        task = cls(
            agent_id=agent_id,
            attempt=attempt,
            attempts=attempts,
            cancel_requested=cancel_requested,
            completed_at=completed_at,
            concurrency_key=concurrency_key,
            created_at=created_at,
            error=error,
            fire_at=fire_at,
            id=id,
            idempotency_key=idempotency_key,
            kind=kind,
            max_retries=max_retries,
            payload=payload,
            priority=priority,
            progress=progress,
            queue=queue,
            replica=replica,
            result=result,
            retry_count=retry_count,
            scheduled_at=scheduled_at,
            started_at=started_at,
            status=status,
            timeout_ms=timeout_ms,
            traceparent=traceparent,
        )


        task.additional_properties = d
        return task

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
