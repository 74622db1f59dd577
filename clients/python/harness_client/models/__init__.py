""" Contains all the data models used in inputs/outputs """

from .agent import Agent
from .agent_config import AgentConfig
from .agent_settings import AgentSettings
from .agent_settings_env import AgentSettingsEnv
from .attempt_record import AttemptRecord
from .attempt_status import AttemptStatus
from .cancelled import Cancelled
from .create_agent import CreateAgent
from .create_agent_config import CreateAgentConfig
from .create_agent_settings import CreateAgentSettings
from .create_agent_settings_env import CreateAgentSettingsEnv
from .create_task import CreateTask
from .create_task_kind import CreateTaskKind
from .error import Error
from .fleet import Fleet
from .governor_state import GovernorState
from .handoff_artifact import HandoffArtifact
from .health import Health
from .limit import Limit
from .limit_info import LimitInfo
from .limit_list import LimitList
from .log_chunk import LogChunk
from .network import Network
from .openapi_response_200 import OpenapiResponse200
from .overlap import Overlap
from .pause_queue import PauseQueue
from .quarantine import Quarantine
from .queue_list import QueueList
from .queue_state import QueueState
from .queue_view import QueueView
from .queue_view_served_by import QueueViewServedBy
from .ready import Ready
from .ready_status import ReadyStatus
from .remove_limit_scope import RemoveLimitScope
from .replica_row import ReplicaRow
from .replica_row_queues import ReplicaRowQueues
from .resumed import Resumed
from .resumed_count import ResumedCount
from .run_agent import RunAgent
from .runtime_kind import RuntimeKind
from .scope import Scope
from .set_limit_scope import SetLimitScope
from .set_limit_type_0 import SetLimitType0
from .set_limit_type_1 import SetLimitType1
from .stats import Stats
from .status import Status
from .stream import Stream
from .task import Task
from .task_logs import TaskLogs
from .task_progress import TaskProgress
from .update_agent import UpdateAgent
from .update_agent_config import UpdateAgentConfig
from .update_agent_settings import UpdateAgentSettings
from .update_agent_settings_env import UpdateAgentSettingsEnv

__all__ = (
    "Agent",
    "AgentConfig",
    "AgentSettings",
    "AgentSettingsEnv",
    "AttemptRecord",
    "AttemptStatus",
    "Cancelled",
    "CreateAgent",
    "CreateAgentConfig",
    "CreateAgentSettings",
    "CreateAgentSettingsEnv",
    "CreateTask",
    "CreateTaskKind",
    "Error",
    "Fleet",
    "GovernorState",
    "HandoffArtifact",
    "Health",
    "Limit",
    "LimitInfo",
    "LimitList",
    "LogChunk",
    "Network",
    "OpenapiResponse200",
    "Overlap",
    "PauseQueue",
    "Quarantine",
    "QueueList",
    "QueueState",
    "QueueView",
    "QueueViewServedBy",
    "Ready",
    "ReadyStatus",
    "RemoveLimitScope",
    "ReplicaRow",
    "ReplicaRowQueues",
    "Resumed",
    "ResumedCount",
    "RunAgent",
    "RuntimeKind",
    "Scope",
    "SetLimitScope",
    "SetLimitType0",
    "SetLimitType1",
    "Stats",
    "Status",
    "Stream",
    "Task",
    "TaskLogs",
    "TaskProgress",
    "UpdateAgent",
    "UpdateAgentConfig",
    "UpdateAgentSettings",
    "UpdateAgentSettingsEnv",
)
