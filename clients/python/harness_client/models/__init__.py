""" Contains all the data models used in inputs/outputs """

from .agent import Agent
from .agent_config import AgentConfig
from .agent_config_env import AgentConfigEnv
from .attempt_record import AttemptRecord
from .attempt_status import AttemptStatus
from .cancelled import Cancelled
from .create_agent import CreateAgent
from .create_agent_config import CreateAgentConfig
from .create_agent_config_env import CreateAgentConfigEnv
from .create_task import CreateTask
from .create_task_kind import CreateTaskKind
from .error import Error
from .fleet import Fleet
from .governor_state import GovernorState
from .handoff_artifact import HandoffArtifact
from .health import Health
from .network import Network
from .openapi_response_200 import OpenapiResponse200
from .overlap import Overlap
from .ready import Ready
from .ready_status import ReadyStatus
from .replica_row import ReplicaRow
from .resumed import Resumed
from .resumed_count import ResumedCount
from .run_agent import RunAgent
from .runtime_kind import RuntimeKind
from .stats import Stats
from .status import Status
from .task import Task
from .update_agent import UpdateAgent
from .update_agent_config import UpdateAgentConfig
from .update_agent_config_env import UpdateAgentConfigEnv

__all__ = (
    "Agent",
    "AgentConfig",
    "AgentConfigEnv",
    "AttemptRecord",
    "AttemptStatus",
    "Cancelled",
    "CreateAgent",
    "CreateAgentConfig",
    "CreateAgentConfigEnv",
    "CreateTask",
    "CreateTaskKind",
    "Error",
    "Fleet",
    "GovernorState",
    "HandoffArtifact",
    "Health",
    "Network",
    "OpenapiResponse200",
    "Overlap",
    "Ready",
    "ReadyStatus",
    "ReplicaRow",
    "Resumed",
    "ResumedCount",
    "RunAgent",
    "RuntimeKind",
    "Stats",
    "Status",
    "Task",
    "UpdateAgent",
    "UpdateAgentConfig",
    "UpdateAgentConfigEnv",
)
