#!/usr/bin/env python3
"""Validate every PromQL expression of a Grafana dashboard with promtool.

promtool has no portable "parse this query" command, so each expression is written into a
temporary rules file as a recording rule and `promtool check rules` parses it. Grafana
variables are replaced by valid stand-ins first.

Usage: check_dashboard.py [DASHBOARD.json ...]   (default: deploy/grafana/harness.json)
Env:   PROMTOOL (default: promtool from $PATH)
"""
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT = os.path.join(HERE, "grafana", "harness.json")
PROMTOOL = os.environ.get("PROMTOOL", "promtool")

# Built-in Grafana interval variables become durations; anything else is a label value.
DURATIONS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h", "__interval_ms": "60000"}
VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def substitute(expr):
    def repl(m):
        name = m.group(1) or m.group(2) or m.group(3)
        return DURATIONS.get(name, "placeholder")
    return VAR.sub(repl, expr)


def walk_panels(panels):
    for p in panels or []:
        yield p
        yield from walk_panels(p.get("panels"))


def expressions(dash):
    """(where, expr) for panel targets and the PromQL inside query variables."""
    for p in walk_panels(dash.get("panels")):
        for t in p.get("targets") or []:
            if t.get("expr"):
                yield f'panel {p.get("id")} "{p.get("title")}" ref {t.get("refId")}', t["expr"]
    for v in (dash.get("templating") or {}).get("list") or []:
        if v.get("type") != "query":
            continue
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = re.fullmatch(r"\s*(?:label_values|query_result)\((.*?)(?:,\s*\w+)?\)\s*", q or "", re.S)
        if m and m.group(1).strip():
            yield f'variable "{v.get("name")}"', m.group(1)


def structure_errors(dash):
    errs = []
    if not dash.get("uid") or not dash.get("title"):
        errs.append("dashboard needs uid and title")
    if not isinstance(dash.get("schemaVersion"), int) or dash["schemaVersion"] < 36:
        errs.append("schemaVersion missing or older than 36")
    ids = [p.get("id") for p in walk_panels(dash.get("panels"))]
    if len(ids) != len(set(ids)) or None in ids:
        errs.append(f"panel ids must be present and unique: {ids}")
    for p in walk_panels(dash.get("panels")):
        if p.get("type") != "row" and not p.get("targets"):
            errs.append(f'panel {p.get("id")} "{p.get("title")}" has no targets')
    return errs


def promtool_check(exprs):
    """Return promtool's output, or None when every expression parses."""
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": substitute(e)} for i, (_, e) in enumerate(exprs)]}]}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        json.dump(rules, f)  # JSON is valid YAML
        path = f.name
    try:
        r = subprocess.run([PROMTOOL, "check", "rules", path], capture_output=True, text=True)
        return None if r.returncode == 0 else (r.stdout + r.stderr).strip()
    finally:
        os.unlink(path)


def main(paths):
    failed = False
    for path in paths or [DEFAULT]:
        with open(path) as f:
            dash = json.load(f)
        exprs = list(expressions(dash))
        errs = structure_errors(dash)
        if not exprs:
            errs.append("no PromQL expressions found")
        elif promtool_check(exprs) is not None:
            # Pinpoint the offending expressions one by one.
            for where, e in exprs:
                out = promtool_check([(where, e)])
                if out is not None:
                    errs.append(f"{where}: invalid PromQL: {e}\n    {out.splitlines()[-1]}")
        for e in errs:
            print(f"FAIL {path}: {e}")
        if errs:
            failed = True
        else:
            print(f"OK   {path}: {len(exprs)} PromQL expressions valid")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
