from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar, BinaryIO, TextIO, TYPE_CHECKING, Generator

from attrs import define as _attrs_define
from attrs import field as _attrs_field

from ..types import UNSET, Unset

from typing import cast
import datetime






T = TypeVar("T", bound="HandoffArtifact")



@_attrs_define
class HandoffArtifact:
    """ The state of one run, as the next run sees it (`self.handoff`).

        Attributes:
            agent_id (int):
            compressed (bool):
            created_at (datetime.datetime):
            metadata (Any):
            run_number (int):
            state (Any):
            summary (None | str):
     """

    agent_id: int
    compressed: bool
    created_at: datetime.datetime
    metadata: Any
    run_number: int
    state: Any
    summary: None | str
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)





    def to_dict(self) -> dict[str, Any]:
        agent_id = self.agent_id

        compressed = self.compressed

        created_at = self.created_at.isoformat()

        metadata = self.metadata

        run_number = self.run_number

        state = self.state

        summary: None | str
        summary = self.summary


        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update({
            "agent_id": agent_id,
            "compressed": compressed,
            "created_at": created_at,
            "metadata": metadata,
            "run_number": run_number,
            "state": state,
            "summary": summary,
        })

        return field_dict



    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        d = dict(src_dict)
        agent_id = d.pop("agent_id")

        compressed = d.pop("compressed")

        created_at = datetime.datetime.fromisoformat(d.pop("created_at"))




        metadata = d.pop("metadata")

        run_number = d.pop("run_number")

        state = d.pop("state")

        def _parse_summary(data: object) -> None | str:
            if data is None:
                return data
            return cast(None | str, data)

        summary = _parse_summary(d.pop("summary"))


        handoff_artifact = cls(
            agent_id=agent_id,
            compressed=compressed,
            created_at=created_at,
            metadata=metadata,
            run_number=run_number,
            state=state,
            summary=summary,
        )


        handoff_artifact.additional_properties = d
        return handoff_artifact

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
