# Agent Harness Python runner: loads agent.py from the working directory, runs
# Agent(config).execute() (sync or async) and writes {"ok": ..., "result"|"error": ...} to
# $HARNESS_RESULT_FILE. Never writes to stdout, so the agent's prints cannot corrupt the result.
# The agent may `import harness` (this module's PermanentError and progress) and call
# self.progress(fraction, message), which writes $HARNESS_PROGRESS_FILE.
#
# Its start-up is part of every run's overhead, so it avoids `import json` (7 ms: it pulls in
# re, enum, functools) on the common path: the input is JSON written by the harness itself,
# which is also Python literal syntax once true/false/null are bound, and results are encoded
# by the small encoder below. Anything unusual falls back to the json module.
import os
import sys

_LITERALS = {"__builtins__": {}, "true": True, "false": False, "null": None}
_ESCAPES = {i: "\\u%04x" % i for i in range(32)}
_ESCAPES.update({ord('"'): '\\"', ord("\\"): "\\\\", 8: "\\b", 9: "\\t", 10: "\\n", 12: "\\f", 13: "\\r"})


class _Unencodable(Exception):
    pass


def _encode(o, out, depth=0):
    if depth > 200:
        raise _Unencodable()
    if o is None:
        out.append("null")
    elif o is True:
        out.append("true")
    elif o is False:
        out.append("false")
    elif type(o) is str:
        if not o.isascii():
            try:
                o.encode("utf-8")
            except UnicodeEncodeError:
                raise _Unencodable()  # lone surrogates: json escapes them
        out.append('"' + o.translate(_ESCAPES) + '"')
    elif type(o) is int:
        out.append(str(o))
    elif type(o) is float:
        if o != o or o in (float("inf"), float("-inf")):
            raise ValueError("Out of range float values are not JSON compliant: %r" % o)
        out.append(repr(o))
    elif type(o) is dict:
        out.append("{")
        first = True
        for k, v in o.items():
            if type(k) is not str or not (k.isascii() or _utf8(k)):
                raise _Unencodable()
            if not first:
                out.append(",")
            first = False
            out.append('"' + k.translate(_ESCAPES) + '":')
            _encode(v, out, depth + 1)
        out.append("}")
    elif type(o) in (list, tuple):
        out.append("[")
        for i, v in enumerate(o):
            if i:
                out.append(",")
            _encode(v, out, depth + 1)
        out.append("]")
    else:
        raise _Unencodable()


def _utf8(s):
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _dumps(o):
    try:
        out = []
        _encode(o, out)
        return "".join(out)
    except _Unencodable:
        import json

        return json.dumps(o, allow_nan=False)


def _load(text):
    try:
        return eval(text, _LITERALS)
    except Exception:
        import json

        return json.loads(text)


def _write(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class PermanentError(Exception):
    """Raised by an agent, ends its task failed at once: no retry can succeed."""


def progress(fraction=None, message=None):
    """Reports how far the run is: fraction from 0 to 1, and/or a message."""
    report = {}
    if fraction is not None:
        fraction = float(fraction)
        if not 0.0 <= fraction <= 1.0:
            raise ValueError("progress fraction must be between 0 and 1, not %r" % fraction)
        report["fraction"] = fraction
    if message is not None:
        report["message"] = str(message)[:1000]
    import _thread

    path = os.environ["HARNESS_PROGRESS_FILE"]
    # A temporary file per thread: two threads reporting at once do not collide.
    tmp = "%s.%d.tmp" % (path, _thread.get_ident())
    with open(tmp, "w") as f:
        f.write(_dumps(report))
    os.replace(tmp, path)


def _agent_progress(self, fraction=None, message=None):
    progress(fraction, message)


def _install_module():
    module = type(sys)("harness")
    module.PermanentError = PermanentError
    module.progress = progress
    sys.modules["harness"] = module


def _agent_traceback():
    # The runner's own frames (compiled from "<string>") are not the agent's concern.
    import traceback

    etype, e, tb = sys.exc_info()
    while tb is not None and tb.tb_frame.f_code.co_filename == "<string>":
        tb = tb.tb_next
    return "".join(traceback.format_exception(etype, e, tb))


def _main():
    result_path = os.environ["HARNESS_RESULT_FILE"]
    _install_module()
    try:
        with open(os.environ["HARNESS_INPUT_FILE"]) as f:
            inp = _load(f.read())
        sys.argv = ["agent.py"]
        with open("agent.py") as f:
            source = f.read()
        namespace = {"__name__": "agent", "__file__": os.path.abspath("agent.py")}
        exec(compile(source, "agent.py", "exec"), namespace)
        agent_class = namespace.get("Agent")
        if not isinstance(agent_class, type):
            raise TypeError("agent.py must define a class named Agent")
        if not hasattr(agent_class, "progress"):
            agent_class.progress = _agent_progress
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
            encoded = _dumps(result)
        except (TypeError, ValueError) as e:
            raise TypeError("Agent.execute() returned a dict that is not JSON-serialisable: %s" % e)
        _write(result_path, '{"ok": true, "result": ' + encoded + "}")
    except BaseException as e:
        report = {"ok": False, "error": _agent_traceback()}
        if isinstance(e, PermanentError):
            report["permanent"] = True
        _write(result_path, _dumps(report))
        sys.stdout.flush()
        os._exit(1)


