"""One SIGTERM while a process starts is one stop, even when the SystemExit it raises lands
inside a ``__del__``, where Python cannot raise it (mailferry/starting.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

from devstack.consumers import ROOT, settings_env
from devstack.ports import free_port

# A child that takes SIGTERM inside a finalizer while "importing", then reaches its loop.
CHILD = textwrap.dedent("""
    import os, signal, sys
    from mailferry import starting

    starting.stop_while_starting()

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between these bytecodes, inside __del__
                pass

    Finalized()  # dropped at once: its __del__ runs here and swallows the SystemExit
    print("went on starting", flush=True)
    stops = []
    starting.hand_over(lambda *args: stops.append(int(args[0])))
    print("loop stops:", stops, flush=True)
""")


def test_a_stop_swallowed_while_starting_reaches_the_loop():
    child = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                           timeout=30)
    assert "went on starting" in child.stdout, child.stdout  # the case: SystemExit swallowed
    assert child.stderr == "", child.stderr  # and not printed as if it were an error
    assert f"loop stops: [{int(signal.SIGTERM)}]" in child.stdout, child.stdout
    assert child.returncode == 0, child.stderr


def test_no_stop_while_starting_leaves_the_loop_running():
    code = ("from mailferry import starting\nstarting.stop_while_starting()\nstops = []\n"
            "starting.hand_over(lambda *a: stops.append(a))\nprint('loop stops:', stops)")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=30)
    assert child.stdout.strip() == "loop stops: []", child.stdout + child.stderr


def test_the_api_given_a_stop_from_its_start_exits_once_it_is_up(settings):
    """uvicorn installs handlers of its own; a stop remembered from starting reaches them."""
    settings = settings.replace(api_port=free_port())
    code = ("from mailferry import starting\nstarting.stop_while_starting()\n"
            "starting._stop_requested = True  # as if a SIGTERM's SystemExit had been swallowed\n"
            "from api.main import main\nraise SystemExit(main())")
    child = subprocess.run([sys.executable, "-c", code], env=settings_env(settings), cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, child.stderr[-2000:]
    assert "api: listening" in child.stderr, child.stderr[-2000:]  # it started, then stopped


def test_other_exceptions_in_a_finalizer_are_still_reported():
    code = ("from mailferry import starting\nstarting.stop_while_starting()\n"
            "class Broken:\n    def __del__(self):\n        raise ValueError('finalizer bug')\n"
            "Broken()\n")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=30)
    assert "ValueError: finalizer bug" in child.stderr, child.stderr
