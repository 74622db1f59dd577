# Agent Harness Python runner: loads agent.py from the working directory, runs
# Agent(config).execute() (sync or async) and writes {"ok": ..., "result"|"error": ...} to
# $HARNESS_RESULT_FILE. Never writes to stdout, so the agent's prints cannot corrupt the result.
# Imports only what it needs: its start-up is part of every run's overhead.
import json
import os
import sys


def _write(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj))
    os.replace(tmp, path)


def _main():
    result_path = os.environ["HARNESS_RESULT_FILE"]
    try:
        with open(os.environ["HARNESS_INPUT_FILE"]) as f:
            inp = json.load(f)
        sys.argv = ["agent.py"]
        with open("agent.py") as f:
            source = f.read()
        namespace = {"__name__": "agent", "__file__": os.path.abspath("agent.py")}
        exec(compile(source, "agent.py", "exec"), namespace)
        agent_class = namespace.get("Agent")
        if not isinstance(agent_class, type):
            raise TypeError("agent.py must define a class named Agent")
        handoff = inp.get("handoff")
        # Readable in __init__ (class attribute) and in execute (instance attribute).
        agent_class.handoff = handoff
        init = agent_class.__init__
        code = getattr(init, "__code__", None)
        takes_config = code is not None and (code.co_argcount >= 2 or code.co_flags & 0x04)
        agent = agent_class(inp.get("config") or {}) if takes_config else agent_class()
        agent.handoff = handoff
        agent.input = inp.get("input")
        result = agent.execute()
        if hasattr(result, "__await__"):
            import asyncio

            async def _await(awaitable):
                return await awaitable

            result = asyncio.run(_await(result))
        if not isinstance(result, dict):
            raise TypeError(
                "Agent.execute() must return a dict (a JSON object), not %s"
                % type(result).__name__
            )
        try:
            encoded = json.dumps(result, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise TypeError("Agent.execute() returned a dict that is not JSON-serialisable: %s" % e)
        _write(result_path, '{"ok": true, "result": ' + encoded + "}")
    except BaseException:
        import traceback

        _write(result_path, {"ok": False, "error": traceback.format_exc()})
        sys.stdout.flush()
        os._exit(1)


_main()
