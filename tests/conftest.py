"""Makes the shared helpers in tests/fixtures.py importable as `fixtures` whatever pytest's import mode."""

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


def pytest_configure(config):
    # Our own code must not warn: a warning raised from kleinbild's modules fails the test that caused it.
    config.addinivalue_line("filterwarnings", "error:::kleinbild")
    try:
        from hypothesis.configuration import set_hypothesis_home_dir
    except ImportError:
        return
    import atexit
    import shutil
    import tempfile

    home = tempfile.mkdtemp(prefix="kleinbild-hypothesis-")  # not .hypothesis/ in the checkout
    set_hypothesis_home_dir(home)
    atexit.register(shutil.rmtree, home, ignore_errors=True)
