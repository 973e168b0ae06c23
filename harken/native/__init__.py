"""Native (C) parts of the audio path, compiled at setup by ``python -m harken.native.build``.

Each attribute is the compiled module, or None when it was not built; every user has a Python
path that gives the same result, so a missing build costs speed, never behaviour.
"""

from __future__ import annotations

try:
    from . import _opus_reader as opus_reader
except ImportError:
    opus_reader = None

try:
    from . import _lc3_probe as lc3_probe
except ImportError:
    lc3_probe = None
