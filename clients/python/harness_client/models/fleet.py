from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar, BinaryIO, TextIO, TYPE_CHECKING, Generator

from attrs import define as _attrs_define
from attrs import field as _attrs_field

from ..types import UNSET, Unset

from typing import cast

if TYPE_CHECKING:
  from ..models.quarantine import Quarantine
  from ..models.replica_row import ReplicaRow





T = TypeVar("T", bound="Fleet")



@_attrs_define
class Fleet:
    """ 
        Attributes:
            leader (None | str):
            quarantines (list[Quarantine]): Agents and kinds no replica starts for now
            replicas (list[ReplicaRow]):
     """

    leader: None | str
    quarantines: list[Quarantine]
    replicas: list[ReplicaRow]
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)





    def to_dict(self) -> dict[str, Any]:
        from ..models.quarantine import Quarantine # noqa: PLC0415
        from ..models.replica_row import ReplicaRow # noqa: PLC0415
        leader: None | str
        leader = self.leader

        quarantines = []
        for quarantines_item_data in self.quarantines:
            quarantines_item = quarantines_item_data.to_dict()
            quarantines.append(quarantines_item)



        replicas = []
        for replicas_item_data in self.replicas:
            replicas_item = replicas_item_data.to_dict()
            replicas.append(replicas_item)




        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update({
            "leader": leader,
            "quarantines": quarantines,
            "replicas": replicas,
        })

        return field_dict



    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        from ..models.quarantine import Quarantine # noqa: PLC0415
        from ..models.replica_row import ReplicaRow # noqa: PLC0415
        d = dict(src_dict)
        def _parse_leader(data: object) -> None | str:
            if data is None:
                return data
            return cast(None | str, data)

        leader = _parse_leader(d.pop("leader"))


        quarantines = []
        _quarantines = d.pop("quarantines")
        for quarantines_item_data in (_quarantines):
            quarantines_item = Quarantine.from_dict(quarantines_item_data)



            quarantines.append(quarantines_item)


        replicas = []
        _replicas = d.pop("replicas")
        for replicas_item_data in (_replicas):
            replicas_item = ReplicaRow.from_dict(replicas_item_data)



            replicas.append(replicas_item)


        fleet = cls(
            leader=leader,
            quarantines=quarantines,
            replicas=replicas,
        )


        fleet.additional_properties = d
        return fleet

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
