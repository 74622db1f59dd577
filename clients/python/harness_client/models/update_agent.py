from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar, BinaryIO, TextIO, TYPE_CHECKING, Generator

from attrs import define as _attrs_define
from attrs import field as _attrs_field

from ..types import UNSET, Unset

from ..types import UNSET, Unset
from typing import cast

if TYPE_CHECKING:
  from ..models.update_agent_config import UpdateAgentConfig
  from ..models.update_agent_settings import UpdateAgentSettings





T = TypeVar("T", bound="UpdateAgent")



@_attrs_define
class UpdateAgent:
    """ 
        Attributes:
            active (bool | Unset):
            code (str | Unset): Python source that compiles and defines a top-level class Agent
            command (list[str] | Unset): A program (found on /usr/local/bin:/usr/bin:/bin) and its arguments
            config (UpdateAgentConfig | Unset): The agent's own config, passed to Agent(config) on every run (a command
                finds it as `config` in its input); at most 65536 bytes as JSON. On PATCH it replaces the config. Deprecated:
                without `settings`, a config whose every field is a settings field is read as the settings (the response then
                carries `Deprecation: true`).
            settings (UpdateAgentSettings | Unset): The agent's settings; on PATCH, only the fields given change
     """

    active: bool | Unset = UNSET
    code: str | Unset = UNSET
    command: list[str] | Unset = UNSET
    config: UpdateAgentConfig | Unset = UNSET
    settings: UpdateAgentSettings | Unset = UNSET





    def to_dict(self) -> dict[str, Any]:
        from ..models.update_agent_config import UpdateAgentConfig # noqa: PLC0415
        from ..models.update_agent_settings import UpdateAgentSettings # noqa: PLC0415
        active = self.active

        code = self.code

        command: list[str] | Unset = UNSET
        if not isinstance(self.command, Unset):
            command = self.command



        config: dict[str, Any] | Unset = UNSET
        if not isinstance(self.config, Unset):
            config = self.config.to_dict()

        settings: dict[str, Any] | Unset = UNSET
        if not isinstance(self.settings, Unset):
            settings = self.settings.to_dict()


        field_dict: dict[str, Any] = {}

        field_dict.update({
        })
        if active is not UNSET:
            field_dict["active"] = active
        if code is not UNSET:
            field_dict["code"] = code
        if command is not UNSET:
            field_dict["command"] = command
        if config is not UNSET:
            field_dict["config"] = config
        if settings is not UNSET:
            field_dict["settings"] = settings

        return field_dict



    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        from ..models.update_agent_config import UpdateAgentConfig # noqa: PLC0415
        from ..models.update_agent_settings import UpdateAgentSettings # noqa: PLC0415
        d = dict(src_dict)
        active = d.pop("active", UNSET)

        code = d.pop("code", UNSET)

        command = cast(list[str], d.pop("command", UNSET))


        _config = d.pop("config", UNSET)
        config: UpdateAgentConfig | Unset
        if isinstance(_config,  Unset):
            config = UNSET
        else:
            config = UpdateAgentConfig.from_dict(_config)




        _settings = d.pop("settings", UNSET)
        settings: UpdateAgentSettings | Unset
        if isinstance(_settings,  Unset):
            settings = UNSET
        else:
            settings = UpdateAgentSettings.from_dict(_settings)




        update_agent = cls(
            active=active,
            code=code,
            command=command,
            config=config,
            settings=settings,
        )

        return update_agent

