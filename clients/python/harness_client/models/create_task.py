from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar, BinaryIO, TextIO, TYPE_CHECKING, Generator

from attrs import define as _attrs_define
from attrs import field as _attrs_field

from ..types import UNSET, Unset

from ..models.create_task_kind import CreateTaskKind
from ..types import UNSET, Unset
from typing import cast
import datetime






T = TypeVar("T", bound="CreateTask")



@_attrs_define
class CreateTask:
    """ 
        Attributes:
            kind (CreateTaskKind): A kind this fleet runs
            concurrency_key (None | str | Unset): What limits of scope key count it under (e.g. a customer)
            delay_s (float | None | Unset): Not before this many seconds from now
            idempotency_key (None | str | Unset): One task per key for ever; the Idempotency-Key header wins over it
            max_retries (int | None | Unset):
            payload (Any | Unset): Any JSON value whose strings and keys hold no NUL character and whose numbers are within
                ±1e300
            priority (int | Unset): Higher runs first (default 0)
            queue (None | str | Unset): A queue: only replicas serving it run the task (default: its agent's, else
                `default`)
            run_at (datetime.datetime | None | Unset): Not before this time (RFC 3339)
            timeout_s (float | None | Unset):
     """

    kind: CreateTaskKind
    concurrency_key: None | str | Unset = UNSET
    delay_s: float | None | Unset = UNSET
    idempotency_key: None | str | Unset = UNSET
    max_retries: int | None | Unset = UNSET
    payload: Any | Unset = UNSET
    priority: int | Unset = UNSET
    queue: None | str | Unset = UNSET
    run_at: datetime.datetime | None | Unset = UNSET
    timeout_s: float | None | Unset = UNSET





    def to_dict(self) -> dict[str, Any]:
        kind = self.kind.value

        concurrency_key: None | str | Unset
        if isinstance(self.concurrency_key, Unset):
            concurrency_key = UNSET
        else:
            concurrency_key = self.concurrency_key

        delay_s: float | None | Unset
        if isinstance(self.delay_s, Unset):
            delay_s = UNSET
        else:
            delay_s = self.delay_s

        idempotency_key: None | str | Unset
        if isinstance(self.idempotency_key, Unset):
            idempotency_key = UNSET
        else:
            idempotency_key = self.idempotency_key

        max_retries: int | None | Unset
        if isinstance(self.max_retries, Unset):
            max_retries = UNSET
        else:
            max_retries = self.max_retries

        payload = self.payload

        priority = self.priority

        queue: None | str | Unset
        if isinstance(self.queue, Unset):
            queue = UNSET
        else:
            queue = self.queue

        run_at: None | str | Unset
        if isinstance(self.run_at, Unset):
            run_at = UNSET
        elif isinstance(self.run_at, datetime.datetime):
            run_at = self.run_at.isoformat()
        else:
            run_at = self.run_at

        timeout_s: float | None | Unset
        if isinstance(self.timeout_s, Unset):
            timeout_s = UNSET
        else:
            timeout_s = self.timeout_s


        field_dict: dict[str, Any] = {}

        field_dict.update({
            "kind": kind,
        })
        if concurrency_key is not UNSET:
            field_dict["concurrency_key"] = concurrency_key
        if delay_s is not UNSET:
            field_dict["delay_s"] = delay_s
        if idempotency_key is not UNSET:
            field_dict["idempotency_key"] = idempotency_key
        if max_retries is not UNSET:
            field_dict["max_retries"] = max_retries
        if payload is not UNSET:
            field_dict["payload"] = payload
        if priority is not UNSET:
            field_dict["priority"] = priority
        if queue is not UNSET:
            field_dict["queue"] = queue
        if run_at is not UNSET:
            field_dict["run_at"] = run_at
        if timeout_s is not UNSET:
            field_dict["timeout_s"] = timeout_s

        return field_dict



    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        d = dict(src_dict)
        kind = CreateTaskKind(d.pop("kind"))




        def _parse_concurrency_key(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        concurrency_key = _parse_concurrency_key(d.pop("concurrency_key", UNSET))


        def _parse_delay_s(data: object) -> float | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(float | None | Unset, data)

        delay_s = _parse_delay_s(d.pop("delay_s", UNSET))


        def _parse_idempotency_key(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        idempotency_key = _parse_idempotency_key(d.pop("idempotency_key", UNSET))


        def _parse_max_retries(data: object) -> int | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(int | None | Unset, data)

        max_retries = _parse_max_retries(d.pop("max_retries", UNSET))


        payload = d.pop("payload", UNSET)

        priority = d.pop("priority", UNSET)

        def _parse_queue(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        queue = _parse_queue(d.pop("queue", UNSET))


        def _parse_run_at(data: object) -> datetime.datetime | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, str):
                    raise TypeError()
                run_at_type_0 = datetime.datetime.fromisoformat(data)



                return run_at_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(datetime.datetime | None | Unset, data)

        run_at = _parse_run_at(d.pop("run_at", UNSET))


        def _parse_timeout_s(data: object) -> float | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(float | None | Unset, data)

        timeout_s = _parse_timeout_s(d.pop("timeout_s", UNSET))


        create_task = cls(
            kind=kind,
            concurrency_key=concurrency_key,
            delay_s=delay_s,
            idempotency_key=idempotency_key,
            max_retries=max_retries,
            payload=payload,
            priority=priority,
            queue=queue,
            run_at=run_at,
            timeout_s=timeout_s,
        )

        return create_task

