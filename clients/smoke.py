"""Drives a real replica through the generated Python client (clients/python).

Usage: python clients/smoke.py BASE_URL TOKEN
Enqueue, get, a refused payload, a failed task's output and its retry, list an agent's runs,
stats and fleet, each through the
client's typed functions and models. Exits non-zero on the first surprise.
"""
import sys
import time

from harness_client import AuthenticatedClient
from harness_client.api.agents import create_agent, run_agent
from harness_client.api.fleet import fleet
from harness_client.api.tasks import (
    create_task,
    get_task,
    list_agent_tasks,
    retry_task,
    task_logs,
    task_stats,
)
from harness_client.models import (
    CreateAgent,
    CreateTask,
    CreateTaskKind,
    Error,
    Fleet,
    RunAgent,
    Stats,
    Status,
    Task,
    TaskLogs,
)

base, token = sys.argv[1], sys.argv[2]
client = AuthenticatedClient(base_url=base, token=token, raise_on_unexpected_status=True)


def check(cond, what):
    if not cond:
        sys.exit(f"smoke: {what}")


def wait(task_id, statuses, within=30.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        t = get_task.sync(task_id, client=client)
        check(isinstance(t, Task), f"get_task {task_id}: {t}")
        if t.status in statuses:
            return t
        time.sleep(0.1)
    sys.exit(f"smoke: task {task_id} never reached {statuses}")


# Enqueue and get.
t = create_task.sync(client=client, body=CreateTask(kind=CreateTaskKind.ECHO, payload={"hello": "client"}))
check(isinstance(t, Task), f"create_task: {t}")
done = wait(t.id, {Status.COMPLETED})
check(done.result == {"hello": "client"}, f"echo result {done.result}")

# A payload the kind can never run is refused at enqueue, naming the field.
refused = create_task.sync(
    client=client,
    body=CreateTask(kind=CreateTaskKind.SLEEP, payload={"ms": "soon"}, max_retries=0),
)
check(isinstance(refused, Error) and "payload.ms" in refused.error, f"create_task: {refused}")

# A failure, its output, and a retry as a new task.
bad = create_task.sync(
    client=client,
    body=CreateTask(
        kind=CreateTaskKind.COMMAND,
        payload={"argv": ["sh", "-c", "echo said so; exit 1"]},
        max_retries=0,
    ),
)
check(isinstance(bad, Task), f"create_task: {bad}")
failed = wait(bad.id, {Status.FAILED})
check("exit code 1" in (failed.error or ""), f"the failure says why: {failed.error}")
logs = task_logs.sync(bad.id, client=client)
check(isinstance(logs, TaskLogs), f"task_logs: {logs}")
check("said so" in "".join(c.text for c in logs.chunks), f"task_logs chunks: {logs.chunks}")
again = retry_task.sync(bad.id, client=client)
check(isinstance(again, Task) and again.id != bad.id, f"retry_task: {again}")

# An agent's runs.
agent = create_agent.sync(client=client, body=CreateAgent(name="smoke", command=["true"]))
check(not isinstance(agent, Error) and agent is not None, f"create_agent: {agent}")
run = run_agent.sync("smoke", client=client, body=RunAgent())
check(isinstance(run, Task), f"run_agent: {run}")
wait(run.id, {Status.COMPLETED})
runs = list_agent_tasks.sync(agent.id, client=client)
check(isinstance(runs, list) and [r.id for r in runs] == [run.id], f"list_agent_tasks: {runs}")

# Stats add up; the fleet has this replica.
stats = task_stats.sync(client=client)
check(isinstance(stats, Stats), f"task_stats: {stats}")
parts = sum(
    getattr(stats, s.value)
    for s in Status
)
check(parts == stats.total, f"statuses add up to the total: {parts} vs {stats.total}")
f = fleet.sync(client=client)
check(isinstance(f, Fleet) and len(f.replicas) >= 1, f"fleet: {f}")
print(f"smoke: ok ({stats.total} tasks, {len(f.replicas)} replica(s), leader {f.leader})")
