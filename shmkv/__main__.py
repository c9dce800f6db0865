"""`python -m shmkv` = the `shmkv` command."""

from __future__ import annotations

import sys

from shmkv.cli import main

sys.exit(main())
