from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar, BinaryIO, TextIO, TYPE_CHECKING, Generator

from attrs import define as _attrs_define
from attrs import field as _attrs_field

from ..types import UNSET, Unset

from typing import cast
import datetime






T = TypeVar("T", bound="Quarantine")



@_attrs_define
class Quarantine:
    """ A quarantine as `harness fleet`, `agents list` and the API show it.

        Attributes:
            agent (None | str): The agent's name, for an agent's quarantine.
            agent_id (int | None):
            created_at (datetime.datetime):
            held (bool): Escalated: in force until a person lifts it (`harness agents resume <name>`,
                `harness fleet resume --all`).
            kind (str):
            reason (str):
            replica_id (str): The replica whose governor decided it.
            until (datetime.datetime):
     """

    agent: None | str
    agent_id: int | None
    created_at: datetime.datetime
    held: bool
    kind: str
    reason: str
    replica_id: str
    until: datetime.datetime
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)





    def to_dict(self) -> dict[str, Any]:
        agent: None | str
        agent = self.agent

        agent_id: int | None
        agent_id = self.agent_id

        created_at = self.created_at.isoformat()

        held = self.held

        kind = self.kind

        reason = self.reason

        replica_id = self.replica_id

        until = self.until.isoformat()


        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update({
            "agent": agent,
            "agent_id": agent_id,
            "created_at": created_at,
            "held": held,
            "kind": kind,
            "reason": reason,
            "replica_id": replica_id,
            "until": until,
        })

        return field_dict



    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        d = dict(src_dict)
        def _parse_agent(data: object) -> None | str:
            if data is None:
                return data
            return cast(None | str, data)

        agent = _parse_agent(d.pop("agent"))


        def _parse_agent_id(data: object) -> int | None:
            if data is None:
                return data
            return cast(int | None, data)

        agent_id = _parse_agent_id(d.pop("agent_id"))


        created_at = datetime.datetime.fromisoformat(d.pop("created_at"))




        held = d.pop("held")

        kind = d.pop("kind")

        reason = d.pop("reason")

        replica_id = d.pop("replica_id")

        until = datetime.datetime.fromisoformat(d.pop("until"))




        quarantine = cls(
            agent=agent,
            agent_id=agent_id,
            created_at=created_at,
            held=held,
            kind=kind,
            reason=reason,
            replica_id=replica_id,
            until=until,
        )


        quarantine.additional_properties = d
        return quarantine

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
