"""Temporary names carry host and process (``mt_dialog.files``): only this host's gone
processes' leftovers are removable; another host's are reported, never touched."""

from __future__ import annotations

import os
import subprocess
import sys

from mt_dialog import files


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_by_owner(tmp_path):
    path = str(tmp_path / "data")
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {"gone": f"{path}.tmp-{files.host()}-{_dead_pid()}",
                 "alive": f"{path}.tmp-{files.host()}-{alive.pid}",
                 "elsewhere": f"{path}.tmp-node-17.cluster-4242",
                 "legacy": f"{path}.tmp-{_dead_pid()}"}  # no host: written here before
        for name in names.values():
            os.makedirs(name)
        os.makedirs(files.temp_path(path))  # this process's own: never a leftover
        states = {os.path.basename(l.path): (l.host, l.state) for l in files.leftovers(path)}
        assert states == {
            os.path.basename(names["gone"]): (files.host(), "gone"),
            os.path.basename(names["alive"]): (files.host(), "alive"),
            os.path.basename(names["elsewhere"]): ("node-17.cluster", "elsewhere"),
            os.path.basename(names["legacy"]): (files.host(), "gone")}
        assert sorted(files.remove_gone(path)) == sorted([names["gone"], names["legacy"]])
        assert os.path.isdir(names["alive"]) and os.path.isdir(names["elsewhere"])
    finally:
        alive.kill()
        alive.wait()


def test_write_json_atomic_replaces_whole(tmp_path):
    path = str(tmp_path / "record.json")
    files.write_json_atomic(path, {"a": 1})
    files.write_json_atomic(path, {"a": 2})
    with open(path) as handle:
        assert handle.read().startswith("{") and '"a": 2' in open(path).read()
    assert os.listdir(tmp_path) == ["record.json"]
