"""A seed-shaped async agent: `execute` is a coroutine, run by the harness with asyncio.

Run it once:        harness exec examples/async_agent.py
Time it:            harness bench --agent examples/async_agent.py --runs 200
"""


class Agent:
    def __init__(self, config):
        self.config = config

    async def execute(self):
        return {"status": "success", "result": "Hello, World!"}
