"""Entry point of the coordinator process: `python workers/coordinator_worker.py '<spec JSON>'`."""

from __future__ import annotations

import sys

from shmkv.procutil import die_with_parent

if __name__ == "__main__":
    die_with_parent()
    from shmkv.coordinator import coordinator_main

    sys.exit(coordinator_main(sys.argv[1]))
