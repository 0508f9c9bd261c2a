"""What the test files share: a run's figures drawn quickly unless a test looks at them, and the slowest set-ups run
on the second core beside the other tests."""

import concurrent.futures
import contextlib
import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest
import torch

import compare as cp
import grouptc as gt

SAVE_FIGURE = {gt: gt.save_figure, cp: cp.save_figure}  # as the programs draw them


@pytest.fixture(autouse=True)
def quick_figures(monkeypatch):
    """Most tests check that a figure is written, not how it looks: drawn at 10 dpi without the layout pass, a run's
    figures cost a fraction of their time. The tests that look at the pictures take `real_figures`."""
    def save(fig, path, dpi):
        try:
            gt.write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=10, format="png"))
        finally:
            gt._plt().close(fig)
    for module in SAVE_FIGURE:
        monkeypatch.setattr(module, "save_figure", save)


@pytest.fixture
def real_figures(quick_figures, monkeypatch):
    """The figures as grouptc.py and compare.py draw them."""
    for module, save in SAVE_FIGURE.items():
        monkeypatch.setattr(module, "save_figure", save)


BACKGROUND = {}  # fixture name -> its set-up: a chain of one-thread processes (marked @background)
SESSIONS = []  # the sessions of the processes the set-ups started (spawn); None at its end: the test session's over
SPAWNING = threading.Lock()


def spawn(argv, **kwargs):
    """subprocess.Popen for a background set-up: in a session of its own, which the test session kills if it ends
    first (-x, Ctrl-C: a set-up's thread cannot be interrupted, its processes can); none starts after that."""
    with SPAWNING:
        if SESSIONS and SESSIONS[-1] is None:
            raise RuntimeError("the test session has ended")
        process = subprocess.Popen(argv, start_new_session=True, **kwargs)
        SESSIONS.append(process.pid)
    return process


def kill_session(sid, sig):
    """Signal every process of session `sid` (a script's, started with start_new_session)."""
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat_file.read_text().rsplit(")", 1)[1].split()[3]) == sid:
                os.kill(int(stat_file.parent.name), sig)


def background(setup):
    """Make setup(tmp folder) -> value a fixture of its name whose work starts with the session's first test, when
    a selected test takes it: the set-ups run one at a time, in a thread, beside the tests (which wait for the
    value only where they take it)."""
    name = setup.__name__
    BACKGROUND[name] = setup

    def fixture(started, tmp_path_factory):  # (not started: taken some other way, e.g. getfixturevalue)
        return started[name].result() if name in started else setup(tmp_path_factory.mktemp(name))
    return pytest.fixture(scope="session", name=name)(fixture)


@pytest.fixture(scope="session", autouse=True)
def started(tmp_path_factory, request):
    """-> fixture name -> the future of its background set-up (those the selected tests take). A session that ends
    first drops the set-ups not yet begun and kills the processes of the one running."""
    taken = {name for item in request.session.items for name in getattr(item, "fixturenames", ())}
    pool = concurrent.futures.ThreadPoolExecutor(1)
    futures = {name: pool.submit(setup, tmp_path_factory.mktemp(name)) for name, setup in BACKGROUND.items()
               if name in taken}
    try:
        yield futures
    finally:
        for future in futures.values():
            future.cancel()
        with SPAWNING:
            SESSIONS.append(None)
        if not all(future.done() for future in futures.values()):
            for sid in SESSIONS[:-1]:
                kill_session(sid, signal.SIGCONT)
                kill_session(sid, signal.SIGKILL)
        pool.shutdown()


THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def one_core_each(started):
    """While a background set-up runs, a test's torch runs on one thread: two threads on a core held by another
    process run 3x slower. Afterwards, on the threads the session began with."""
    torch.set_num_threads(1 if not all(future.done() for future in started.values()) else THREADS)
