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
  from ..models.agent_settings_env import AgentSettingsEnv





T = TypeVar("T", bound="AgentSettings")



@_attrs_define
class AgentSettings:
    """ An agent's settings (schedule and limits), stored as `agents.config`.

        Attributes:
            cpu_percent (int):
            env (AgentSettingsEnv):
            max_retries (int):
            memory_mb (int):
            network (Network): Whether a run may use the network: allow (the host's) or none (a network namespace of its own
                with nothing in it)
            overlap (Overlap): What a run due while the previous one still runs does: skip (recorded as cancelled with the
                reason), queue (waits for it) or allow (runs alongside)
            requirements (None | str): A Python agent's `requirements.txt`: its runs use a virtual environment with these
                installed (built on each host at first use, cached by hash).
            schedule (None | str):
            timeout (int): Seconds.
            timezone (None | str):
            queue (None | str | Unset): The queue its runs wait in (`default` when none): only replicas that serve it run
                it.
     """

    cpu_percent: int
    env: AgentSettingsEnv
    max_retries: int
    memory_mb: int
    network: Network
    overlap: Overlap
    requirements: None | str
    schedule: None | str
    timeout: int
    timezone: None | str
    queue: None | str | Unset = UNSET





    def to_dict(self) -> dict[str, Any]:
        from ..models.agent_settings_env import AgentSettingsEnv # noqa: PLC0415
        cpu_percent = self.cpu_percent

        env = self.env.to_dict()

        max_retries = self.max_retries

        memory_mb = self.memory_mb

        network = self.network.value

        overlap = self.overlap.value

        requirements: None | str
        requirements = self.requirements

        schedule: None | str
        schedule = self.schedule

        timeout = self.timeout

        timezone: None | str
        timezone = self.timezone

        queue: None | str | Unset
        if isinstance(self.queue, Unset):
            queue = UNSET
        else:
            queue = self.queue


        field_dict: dict[str, Any] = {}

        field_dict.update({
            "cpu_percent": cpu_percent,
            "env": env,
            "max_retries": max_retries,
            "memory_mb": memory_mb,
            "network": network,
            "overlap": overlap,
            "requirements": requirements,
            "schedule": schedule,
            "timeout": timeout,
            "timezone": timezone,
        })
        if queue is not UNSET:
            field_dict["queue"] = queue

        return field_dict



    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        from ..models.agent_settings_env import AgentSettingsEnv # noqa: PLC0415
        d = dict(src_dict)
        cpu_percent = d.pop("cpu_percent")

        env = AgentSettingsEnv.from_dict(d.pop("env"))




        max_retries = d.pop("max_retries")

        memory_mb = d.pop("memory_mb")

        network = Network(d.pop("network"))




        overlap = Overlap(d.pop("overlap"))




        def _parse_requirements(data: object) -> None | str:
            if data is None:
                return data
            return cast(None | str, data)

        requirements = _parse_requirements(d.pop("requirements"))


        def _parse_schedule(data: object) -> None | str:
            if data is None:
                return data
            return cast(None | str, data)

        schedule = _parse_schedule(d.pop("schedule"))


        timeout = d.pop("timeout")

        def _parse_timezone(data: object) -> None | str:
            if data is None:
                return data
            return cast(None | str, data)

        timezone = _parse_timezone(d.pop("timezone"))


        def _parse_queue(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        queue = _parse_queue(d.pop("queue", UNSET))


        agent_settings = cls(
            cpu_percent=cpu_percent,
            env=env,
            max_retries=max_retries,
            memory_mb=memory_mb,
            network=network,
            overlap=overlap,
            requirements=requirements,
            schedule=schedule,
            timeout=timeout,
            timezone=timezone,
            queue=queue,
        )

        return agent_settings

