"""What the test files share: a run's figures drawn quickly unless a test looks at them, and the slowest set-ups run
on the second core beside the other tests."""

import concurrent.futures

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


def background(setup):
    """Make setup(tmp folder) -> value a fixture of its name whose work starts with the session's first test, when
    a selected test takes it: the set-ups run one at a time, in a thread, beside the tests (which wait for the
    value only where they take it)."""
    BACKGROUND[setup.__name__] = setup
    return pytest.fixture(scope="session", name=setup.__name__)(lambda started: started[setup.__name__].result())


@pytest.fixture(scope="session", autouse=True)
def started(tmp_path_factory, request):
    """-> fixture name -> the future of its background set-up (those the selected tests take)."""
    taken = {name for item in request.session.items for name in getattr(item, "fixturenames", ())}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        yield {name: pool.submit(setup, tmp_path_factory.mktemp(name)) for name, setup in BACKGROUND.items()
               if name in taken}


THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def one_core_each(started):
    """While a background set-up runs, a test's torch runs on one thread: two threads on a core held by another
    process run 3x slower. Afterwards, on the threads the session began with."""
    torch.set_num_threads(1 if not all(future.done() for future in started.values()) else THREADS)
