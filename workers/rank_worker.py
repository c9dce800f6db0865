"""Entry point of a rank process: `python workers/rank_worker.py '<RankSpec JSON>'`.

The supervisor (`shmkv.fleet`) starts it with its end of a channel inherited as the
descriptor the spec's `supervisor_endpoint` (`fd://N`) names; it is not meant to be started
by hand."""

from __future__ import annotations

import sys

from shmkv.procutil import die_with_parent

if __name__ == "__main__":
    die_with_parent()
    from shmkv.engine import rank_main

    sys.exit(rank_main(sys.argv[1]))
