from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar, BinaryIO, TextIO, TYPE_CHECKING, Generator

from attrs import define as _attrs_define
from attrs import field as _attrs_field

from ..types import UNSET, Unset

from ..models.network import Network
from ..models.overlap import Overlap
from ..types import UNSET, Unset
from typing import cast

if TYPE_CHECKING:
  from ..models.create_agent_settings_env import CreateAgentSettingsEnv





T = TypeVar("T", bound="CreateAgentSettings")



@_attrs_define
class CreateAgentSettings:
    """ The agent's settings; on PATCH, only the fields given change

        Attributes:
            cpu_percent (int | Unset):
            env (CreateAgentSettingsEnv | Unset):
            max_retries (int | Unset):
            memory_mb (int | Unset):
            network (Network | Unset): Whether a run may use the network: allow (the host's) or none (a network namespace of
                its own with nothing in it)
            overlap (Overlap | Unset): What a run due while the previous one still runs does: skip (recorded as cancelled
                with the reason), queue (waits for it) or allow (runs alongside)
            queue (None | str | Unset): A queue: only replicas serving it run the task (default: its agent's, else
                `default`)
            requirements (None | str | Unset): A Python agent's requirements.txt: its runs use a virtual environment with
                these installed
            schedule (None | str | Unset): Cron: 5 fields, or 6 with seconds first
            timeout (int | Unset): Seconds
            timezone (None | str | Unset): IANA time zone of the schedule (default UTC)
     """

    cpu_percent: int | Unset = UNSET
    env: CreateAgentSettingsEnv | Unset = UNSET
    max_retries: int | Unset = UNSET
    memory_mb: int | Unset = UNSET
    network: Network | Unset = UNSET
    overlap: Overlap | Unset = UNSET
    queue: None | str | Unset = UNSET
    requirements: None | str | Unset = UNSET
    schedule: None | str | Unset = UNSET
    timeout: int | Unset = UNSET
    timezone: None | str | Unset = UNSET





    def to_dict(self) -> dict[str, Any]:
        from ..models.create_agent_settings_env import CreateAgentSettingsEnv # noqa: PLC0415
        cpu_percent = self.cpu_percent

        env: dict[str, Any] | Unset = UNSET
        if not isinstance(self.env, Unset):
            env = self.env.to_dict()

        max_retries = self.max_retries

        memory_mb = self.memory_mb

        network: str | Unset = UNSET
        if not isinstance(self.network, Unset):
            network = self.network.value


        overlap: str | Unset = UNSET
        if not isinstance(self.overlap, Unset):
            overlap = self.overlap.value


        queue: None | str | Unset
        if isinstance(self.queue, Unset):
            queue = UNSET
        else:
            queue = self.queue

        requirements: None | str | Unset
        if isinstance(self.requirements, Unset):
            requirements = UNSET
        else:
            requirements = self.requirements

        schedule: None | str | Unset
        if isinstance(self.schedule, Unset):
            schedule = UNSET
        else:
            schedule = self.schedule

        timeout = self.timeout

        timezone: None | str | Unset
        if isinstance(self.timezone, Unset):
            timezone = UNSET
        else:
            timezone = self.timezone


        field_dict: dict[str, Any] = {}

        field_dict.update({
        })
        if cpu_percent is not UNSET:
            field_dict["cpu_percent"] = cpu_percent
        if env is not UNSET:
            field_dict["env"] = env
        if max_retries is not UNSET:
            field_dict["max_retries"] = max_retries
        if memory_mb is not UNSET:
            field_dict["memory_mb"] = memory_mb
        if network is not UNSET:
            field_dict["network"] = network
        if overlap is not UNSET:
            field_dict["overlap"] = overlap
        if queue is not UNSET:
            field_dict["queue"] = queue
        if requirements is not UNSET:
            field_dict["requirements"] = requirements
        if schedule is not UNSET:
            field_dict["schedule"] = schedule
        if timeout is not UNSET:
            field_dict["timeout"] = timeout
        if timezone is not UNSET:
            field_dict["timezone"] = timezone

        return field_dict



    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        from ..models.create_agent_settings_env import CreateAgentSettingsEnv # noqa: PLC0415
        d = dict(src_dict)
        cpu_percent = d.pop("cpu_percent", UNSET)

        _env = d.pop("env", UNSET)
        env: CreateAgentSettingsEnv | Unset
        if isinstance(_env,  Unset):
            env = UNSET
        else:
            env = CreateAgentSettingsEnv.from_dict(_env)




        max_retries = d.pop("max_retries", UNSET)

        memory_mb = d.pop("memory_mb", UNSET)

        _network = d.pop("network", UNSET)
        network: Network | Unset
        if isinstance(_network,  Unset):
            network = UNSET
        else:
            network = Network(_network)




        _overlap = d.pop("overlap", UNSET)
        overlap: Overlap | Unset
        if isinstance(_overlap,  Unset):
            overlap = UNSET
        else:
            overlap = Overlap(_overlap)




        def _parse_queue(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        queue = _parse_queue(d.pop("queue", UNSET))


        def _parse_requirements(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        requirements = _parse_requirements(d.pop("requirements", UNSET))


        def _parse_schedule(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        schedule = _parse_schedule(d.pop("schedule", UNSET))


        timeout = d.pop("timeout", UNSET)

        def _parse_timezone(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        timezone = _parse_timezone(d.pop("timezone", UNSET))


        create_agent_settings = cls(
            cpu_percent=cpu_percent,
            env=env,
            max_retries=max_retries,
            memory_mb=memory_mb,
            network=network,
            overlap=overlap,
            queue=queue,
            requirements=requirements,
            schedule=schedule,
            timeout=timeout,
            timezone=timezone,
        )

        return create_agent_settings

