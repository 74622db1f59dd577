"""A minimal Agent Harness agent: counts its runs and greets.

Run it once:        harness exec examples/hello_agent.py --config '{"name": "world"}'
Register and run:   harness agents add hello --file examples/hello_agent.py
                    harness agents run hello
"""


class Agent:
    def __init__(self, config):
        self.name = config.get("name", "world")

    def execute(self):
        # self.handoff is the previous run's artifact (None on the first run).
        previous = (self.handoff or {}).get("state") or {}
        count = previous.get("count", 0) + 1
        return {
            "greeting": f"Hello, {self.name}!",
            "state": {"count": count},
            "summary": f"greeted {self.name} ({count} runs so far)",
        }
