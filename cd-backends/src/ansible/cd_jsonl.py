# -*- coding: utf-8 -*-
# Shipped with the `cd` library (cd-backends, feature `ansible`) and written
# to a temporary directory at run time; selected with
# ANSIBLE_CALLBACK_PLUGINS=<dir> and ANSIBLE_STDOUT_CALLBACK=cd_jsonl.
#
# Prints one JSON object per line on stdout, per play, task and host, so the
# Rust side can turn them into events and typed results. Works with
# ansible-core 2.12 … 2.19 (CallbackTaskResult.result / .host / .task, and
# the older _result / _host / _task).
from __future__ import annotations

DOCUMENTATION = """
    name: cd_jsonl
    type: stdout
    short_description: JSON lines per play, task and host for the cd library
    description:
      - One JSON object per line on stdout for each play, task start, host
        result (ok, changed, failed, skipped, unreachable), diff and the recap.
"""

import json
import os
import sys
import time

from ansible.plugins.callback import CallbackBase


def _host(result):
    h = getattr(result, "host", None) or getattr(result, "_host", None)
    return h.get_name() if h is not None else None


def _task(result):
    return getattr(result, "task", None) or getattr(result, "_task", None)


NO_LOG_MESSAGE = "output hidden: the task is no_log"


def _res(result):
    r = getattr(result, "result", None)
    if r is None:
        r = getattr(result, "_result", None)
    return r if isinstance(r, dict) else {}


def _no_log(result):
    # A task marked `no_log` (or whose result says so): its output, messages
    # and diff are never emitted, as ansible's own callbacks censor them.
    task = getattr(result, "_task", None)
    if task is not None and getattr(task, "no_log", False):
        return True
    return bool(_res(result).get("_ansible_no_log", False))


def _message(res):
    for key in ("msg", "reason", "stderr", "module_stderr", "exception"):
        v = res.get(key)
        if v:
            text = str(v).strip()
            if key == "exception":
                text = text.splitlines()[-1] if text else text
            return text[:4000]
    if res.get("rc") not in (None, 0):
        return "exit code %s" % res.get("rc")
    return None


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "stdout"
    CALLBACK_NAME = "cd_jsonl"

    def __init__(self, *args, **kwargs):
        super(CallbackModule, self).__init__(*args, **kwargs)
        self._started = {}
        self._out = sys.stdout

    def _emit(self, event, **fields):
        fields["event"] = event
        fields["ts"] = time.time()
        try:
            line = json.dumps(fields, default=str, sort_keys=True)
        except Exception as e:  # never break the playbook over a log line
            line = json.dumps({"event": event, "error": "unserialisable: %s" % e})
        self._out.write(line + "\n")
        self._out.flush()

    def _task_fields(self, task):
        if task is None:
            return {"task": None}
        return {
            "task": task.get_name().strip(),
            "task_uuid": getattr(task, "_uuid", None),
            "action": getattr(task, "action", None),
        }

    def _duration(self, host, task):
        key = (host, getattr(task, "_uuid", None))
        start = self._started.pop(key, None)
        return None if start is None else round(time.monotonic() - start, 6)

    def _result(self, status, result, **extra):
        task = _task(result)
        host = _host(result)
        res = _res(result)
        fields = self._task_fields(task)
        hidden = _no_log(result)
        fields.update(
            host=host,
            status=status,
            changed=bool(res.get("changed", False)),
            duration_s=self._duration(host, task),
            msg=NO_LOG_MESSAGE if hidden else _message(res),
        )
        if "rc" in res:
            fields["rc"] = res.get("rc")
        if status == "failed" and not hidden:
            for key in ("stdout", "stderr"):
                if res.get(key):
                    fields[key] = str(res.get(key))[-4000:]
        if res.get("diff") and not hidden:
            fields["diff"] = res.get("diff")
        fields.update(extra)
        self._emit("runner_" + status, **fields)

    # ------------------------------------------------------------ playbook
    def v2_playbook_on_start(self, playbook):
        self._emit("playbook_start", playbook=getattr(playbook, "_file_name", None))

    def v2_playbook_on_play_start(self, play):
        self._emit("play_start", play=play.get_name().strip())

    def _mark_task(self, task):
        # Every process the task starts on a host gets
        # CD_ANSIBLE_RUN_ID=<run id>/<task uuid> in its environment (ahead of
        # the task's own `environment`, so the user's values still apply), so
        # that an interrupted run can find and stop, on the hosts, exactly the
        # processes of the tasks still running (and not, say, a service an
        # earlier task started). Called before the task is queued to workers.
        run_id = os.environ.get("CD_ANSIBLE_RUN_ID")
        uuid = getattr(task, "_uuid", None)
        if not run_id or not uuid:
            return
        mark = {"CD_ANSIBLE_RUN_ID": "%s/%s" % (run_id, uuid)}
        try:
            env = task._environment if hasattr(task, "_environment") else None
            if isinstance(env, list):
                env = list(env)
            elif isinstance(env, (dict, str)):
                env = [env]  # a mapping, or a template of one
            else:
                env = []  # unset
            if mark not in env:
                task.environment = [mark] + env
        except Exception as e:  # never break the playbook over the marker
            self._emit("warning", msg="could not mark the task's processes: %s" % e)

    def v2_playbook_on_task_start(self, task, is_conditional):
        self._mark_task(task)
        self._emit("task_start", **self._task_fields(task))

    def v2_playbook_on_handler_task_start(self, task):
        self._mark_task(task)
        self._emit("task_start", handler=True, **self._task_fields(task))

    def v2_playbook_on_no_hosts_matched(self):
        self._emit("no_hosts_matched")

    def v2_playbook_on_no_hosts_remaining(self):
        self._emit("no_hosts_remaining")

    # ------------------------------------------------------------ runner
    def v2_runner_on_start(self, host, task):
        self._started[(host.get_name(), getattr(task, "_uuid", None))] = time.monotonic()
        self._emit("runner_start", host=host.get_name(), **self._task_fields(task))

    def v2_runner_on_ok(self, result):
        self._result("ok", result)

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._result("failed", result, ignore_errors=bool(ignore_errors))

    def v2_runner_on_skipped(self, result):
        self._result("skipped", result)

    def v2_runner_on_unreachable(self, result):
        self._result("unreachable", result)

    def v2_runner_item_on_ok(self, result):
        self._item("ok", result)

    def v2_runner_item_on_failed(self, result):
        self._item("failed", result)

    def v2_runner_item_on_skipped(self, result):
        self._item("skipped", result)

    def _item(self, status, result):
        res = _res(result)
        fields = self._task_fields(_task(result))
        fields.update(
            host=_host(result),
            status=status,
            changed=bool(res.get("changed", False)),
            item="(hidden)" if _no_log(result) else str(res.get("item", res.get("_ansible_item_label", ""))),
            msg=NO_LOG_MESSAGE if _no_log(result) else _message(res),
        )
        self._emit("item_" + status, **fields)

    def v2_on_file_diff(self, result):
        res = _res(result)
        diff = res.get("diff")
        if diff and not _no_log(result):
            fields = self._task_fields(_task(result))
            fields.update(host=_host(result), diff=diff)
            self._emit("diff", **fields)

    # ------------------------------------------------------------ recap
    def v2_playbook_on_stats(self, stats):
        hosts = {}
        for h in sorted(stats.processed.keys()):
            s = stats.summarize(h)
            hosts[h] = {
                "ok": s.get("ok", 0),
                "changed": s.get("changed", 0),
                "unreachable": s.get("unreachable", 0),
                "failed": s.get("failures", 0),
                "skipped": s.get("skipped", 0),
                "rescued": s.get("rescued", 0),
                "ignored": s.get("ignored", 0),
            }
        self._emit("stats", hosts=hosts)
