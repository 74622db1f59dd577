from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar, BinaryIO, TextIO, TYPE_CHECKING, Generator

from attrs import define as _attrs_define
from attrs import field as _attrs_field

from ..types import UNSET, Unset

from ..models.governor_state import GovernorState
from typing import cast
import datetime

if TYPE_CHECKING:
  from ..models.replica_row_queues import ReplicaRowQueues





T = TypeVar("T", bound="ReplicaRow")



@_attrs_define
class ReplicaRow:
    """ A replica as `harness fleet` shows it.

        Attributes:
            capacity (int):
            cpu_percent (float | None): From the replica's latest metrics row.
            governor_state (GovernorState): What a replica's governor says of it (the governor's state machine works in
                these terms).
            heartbeat_age_s (float): Seconds since the last heartbeat.
            heartbeat_at (datetime.datetime):
            hostname (str):
            id (str):
            is_leader (bool):
            isolation (None | str):
            leader_since (datetime.datetime | None):
            memory_percent (float | None):
            pid (int):
            queues (ReplicaRowQueues): The queues it serves, with its capacity for each.
            resume_requested_at (datetime.datetime | None):
            running (int):
            started_at (datetime.datetime):
            version (str):
     """

    capacity: int
    cpu_percent: float | None
    governor_state: GovernorState
    heartbeat_age_s: float
    heartbeat_at: datetime.datetime
    hostname: str
    id: str
    is_leader: bool
    isolation: None | str
    leader_since: datetime.datetime | None
    memory_percent: float | None
    pid: int
    queues: ReplicaRowQueues
    resume_requested_at: datetime.datetime | None
    running: int
    started_at: datetime.datetime
    version: str
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)





    def to_dict(self) -> dict[str, Any]:
        from ..models.replica_row_queues import ReplicaRowQueues # noqa: PLC0415
        capacity = self.capacity

        cpu_percent: float | None
        cpu_percent = self.cpu_percent

        governor_state = self.governor_state.value

        heartbeat_age_s = self.heartbeat_age_s

        heartbeat_at = self.heartbeat_at.isoformat()

        hostname = self.hostname

        id = self.id

        is_leader = self.is_leader

        isolation: None | str
        isolation = self.isolation

        leader_since: None | str
        if isinstance(self.leader_since, datetime.datetime):
            leader_since = self.leader_since.isoformat()
        else:
            leader_since = self.leader_since

        memory_percent: float | None
        memory_percent = self.memory_percent

        pid = self.pid

        queues = self.queues.to_dict()

        resume_requested_at: None | str
        if isinstance(self.resume_requested_at, datetime.datetime):
            resume_requested_at = self.resume_requested_at.isoformat()
        else:
            resume_requested_at = self.resume_requested_at

        running = self.running

        started_at = self.started_at.isoformat()

        version = self.version


        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update({
            "capacity": capacity,
            "cpu_percent": cpu_percent,
            "governor_state": governor_state,
            "heartbeat_age_s": heartbeat_age_s,
            "heartbeat_at": heartbeat_at,
            "hostname": hostname,
            "id": id,
            "is_leader": is_leader,
            "isolation": isolation,
            "leader_since": leader_since,
            "memory_percent": memory_percent,
            "pid": pid,
            "queues": queues,
            "resume_requested_at": resume_requested_at,
            "running": running,
            "started_at": started_at,
            "version": version,
        })

        return field_dict



    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        from ..models.replica_row_queues import ReplicaRowQueues # noqa: PLC0415
        d = dict(src_dict)
        capacity = d.pop("capacity")

        def _parse_cpu_percent(data: object) -> float | None:
            if data is None:
                return data
            return cast(float | None, data)

        cpu_percent = _parse_cpu_percent(d.pop("cpu_percent"))


        governor_state = GovernorState(d.pop("governor_state"))




        heartbeat_age_s = d.pop("heartbeat_age_s")

        heartbeat_at = datetime.datetime.fromisoformat(d.pop("heartbeat_at"))




        hostname = d.pop("hostname")

        id = d.pop("id")

        is_leader = d.pop("is_leader")

        def _parse_isolation(data: object) -> None | str:
            if data is None:
                return data
            return cast(None | str, data)

        isolation = _parse_isolation(d.pop("isolation"))


        def _parse_leader_since(data: object) -> datetime.datetime | None:
            if data is None:
                return data
            try:
                if not isinstance(data, str):
                    raise TypeError()
                leader_since_type_0 = datetime.datetime.fromisoformat(data)



                return leader_since_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(datetime.datetime | None, data)

        leader_since = _parse_leader_since(d.pop("leader_since"))


        def _parse_memory_percent(data: object) -> float | None:
            if data is None:
                return data
            return cast(float | None, data)

        memory_percent = _parse_memory_percent(d.pop("memory_percent"))


        pid = d.pop("pid")

        queues = ReplicaRowQueues.from_dict(d.pop("queues"))




        def _parse_resume_requested_at(data: object) -> datetime.datetime | None:
            if data is None:
                return data
            try:
                if not isinstance(data, str):
                    raise TypeError()
                resume_requested_at_type_0 = datetime.datetime.fromisoformat(data)



                return resume_requested_at_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(datetime.datetime | None, data)

        resume_requested_at = _parse_resume_requested_at(d.pop("resume_requested_at"))


        running = d.pop("running")

        started_at = datetime.datetime.fromisoformat(d.pop("started_at"))




        version = d.pop("version")

        replica_row = cls(
            capacity=capacity,
            cpu_percent=cpu_percent,
            governor_state=governor_state,
            heartbeat_age_s=heartbeat_age_s,
            heartbeat_at=heartbeat_at,
            hostname=hostname,
            id=id,
            is_leader=is_leader,
            isolation=isolation,
            leader_since=leader_since,
            memory_percent=memory_percent,
            pid=pid,
            queues=queues,
            resume_requested_at=resume_requested_at,
            running=running,
            started_at=started_at,
            version=version,
        )


        replica_row.additional_properties = d
        return replica_row

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
