from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar, BinaryIO, TextIO, TYPE_CHECKING, Generator

from attrs import define as _attrs_define
from attrs import field as _attrs_field

from ..types import UNSET, Unset

from ..models.runtime_kind import RuntimeKind
from ..types import UNSET, Unset
from typing import cast
import datetime

if TYPE_CHECKING:
  from ..models.agent_config import AgentConfig
  from ..models.agent_settings import AgentSettings
  from ..models.quarantine import Quarantine





T = TypeVar("T", bound="Agent")



@_attrs_define
class Agent:
    """ An agent as JSON (the API's `Agent` schema): the runtime kind beside its code or argv.

        Attributes:
            active (bool):
            command (list[str] | None):
            config (AgentConfig): What `Agent(config)` receives on every run (a command: `config` in its input).
            created_at (datetime.datetime):
            id (int):
            last_fire_at (datetime.datetime | None): The last cron tick the scheduler enqueued (or skipped) for this agent.
            name (str):
            runtime (RuntimeKind): What an agent runs: python (its code defines class Agent) or command (an argv)
            settings (AgentSettings): An agent's settings (schedule and limits), stored as `agents.config`.
            updated_at (datetime.datetime):
            code (None | str | Unset):
            next_fire_at (datetime.datetime | None | Unset): The next cron tick, if the agent has a schedule and is active
            quarantine (None | Quarantine | Unset): In force when the agent's error burst quarantined it: its runs wait
     """

    active: bool
    command: list[str] | None
    config: AgentConfig
    created_at: datetime.datetime
    id: int
    last_fire_at: datetime.datetime | None
    name: str
    runtime: RuntimeKind
    settings: AgentSettings
    updated_at: datetime.datetime
    code: None | str | Unset = UNSET
    next_fire_at: datetime.datetime | None | Unset = UNSET
    quarantine: None | Quarantine | Unset = UNSET
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)





    def to_dict(self) -> dict[str, Any]:
        from ..models.agent_config import AgentConfig # noqa: PLC0415
        from ..models.agent_settings import AgentSettings # noqa: PLC0415
        from ..models.quarantine import Quarantine # noqa: PLC0415
        active = self.active

        command: list[str] | None
        if isinstance(self.command, list):
            command = self.command


        else:
            command = self.command

        config = self.config.to_dict()

        created_at = self.created_at.isoformat()

        id = self.id

        last_fire_at: None | str
        if isinstance(self.last_fire_at, datetime.datetime):
            last_fire_at = self.last_fire_at.isoformat()
        else:
            last_fire_at = self.last_fire_at

        name = self.name

        runtime = self.runtime.value

        settings = self.settings.to_dict()

        updated_at = self.updated_at.isoformat()

        code: None | str | Unset
        if isinstance(self.code, Unset):
            code = UNSET
        else:
            code = self.code

        next_fire_at: None | str | Unset
        if isinstance(self.next_fire_at, Unset):
            next_fire_at = UNSET
        elif isinstance(self.next_fire_at, datetime.datetime):
            next_fire_at = self.next_fire_at.isoformat()
        else:
            next_fire_at = self.next_fire_at

        quarantine: dict[str, Any] | None | Unset
        if isinstance(self.quarantine, Unset):
            quarantine = UNSET
        elif isinstance(self.quarantine, Quarantine):
            quarantine = self.quarantine.to_dict()
        else:
            quarantine = self.quarantine


        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update({
            "active": active,
            "command": command,
            "config": config,
            "created_at": created_at,
            "id": id,
            "last_fire_at": last_fire_at,
            "name": name,
            "runtime": runtime,
            "settings": settings,
            "updated_at": updated_at,
        })
        if code is not UNSET:
            field_dict["code"] = code
        if next_fire_at is not UNSET:
            field_dict["next_fire_at"] = next_fire_at
        if quarantine is not UNSET:
            field_dict["quarantine"] = quarantine

        return field_dict



    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        from ..models.agent_config import AgentConfig # noqa: PLC0415
        from ..models.agent_settings import AgentSettings # noqa: PLC0415
        from ..models.quarantine import Quarantine # noqa: PLC0415
        d = dict(src_dict)
        active = d.pop("active")

        def _parse_command(data: object) -> list[str] | None:
            if data is None:
                return data
            try:
                if not isinstance(data, list):
                    raise TypeError()
                command_type_0 = cast(list[str], data)

                return command_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(list[str] | None, data)

        command = _parse_command(d.pop("command"))


        config = AgentConfig.from_dict(d.pop("config"))




        created_at = datetime.datetime.fromisoformat(d.pop("created_at"))




        id = d.pop("id")

        def _parse_last_fire_at(data: object) -> datetime.datetime | None:
            if data is None:
                return data
            try:
                if not isinstance(data, str):
                    raise TypeError()
                last_fire_at_type_0 = datetime.datetime.fromisoformat(data)



                return last_fire_at_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(datetime.datetime | None, data)

        last_fire_at = _parse_last_fire_at(d.pop("last_fire_at"))


        name = d.pop("name")

        runtime = RuntimeKind(d.pop("runtime"))




        settings = AgentSettings.from_dict(d.pop("settings"))




        updated_at = datetime.datetime.fromisoformat(d.pop("updated_at"))




        def _parse_code(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        code = _parse_code(d.pop("code", UNSET))


        def _parse_next_fire_at(data: object) -> datetime.datetime | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, str):
                    raise TypeError()
                next_fire_at_type_0 = datetime.datetime.fromisoformat(data)



                return next_fire_at_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(datetime.datetime | None | Unset, data)

        next_fire_at = _parse_next_fire_at(d.pop("next_fire_at", UNSET))


        def _parse_quarantine(data: object) -> None | Quarantine | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                quarantine_type_0 = Quarantine.from_dict(data)



                return quarantine_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(None | Quarantine | Unset, data)

        quarantine = _parse_quarantine(d.pop("quarantine", UNSET))


        agent = cls(
            active=active,
            command=command,
            config=config,
            created_at=created_at,
            id=id,
            last_fire_at=last_fire_at,
            name=name,
            runtime=runtime,
            settings=settings,
            updated_at=updated_at,
            code=code,
            next_fire_at=next_fire_at,
            quarantine=quarantine,
        )


        agent.additional_properties = d
        return agent

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
