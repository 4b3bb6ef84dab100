"""``python -m moe_sampler ...``: see :mod:`moe_sampler.cli`."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
