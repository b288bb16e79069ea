"""``python record_server_requests.py ARGS`` = ``peagle ARGS``, recording every request the run sends to vLLM servers.

Run by torchrun in `tests_vllm/test_stream.py`: each rank appends one JSON line per `ServerStates.extract` call
(the calling thread's name: ``peagle-states-stream`` for the stream's training requests, the main thread's for
validation; the token ids of every document asked for) to ``$PEAGLE_TEST_REQUESTS/rank<RANK>.jsonl``, then the
call goes to the servers unchanged.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Sequence

from torch import Tensor

from peagle.cli import main
from peagle.target.vllm_server import ServerStates

_extract = ServerStates.extract


def _recording_extract(self: ServerStates, token_ids: Sequence[Sequence[int]]) -> list[tuple[Tensor, Tensor]]:
    """Log the request (thread, token ids), then send it."""
    path = os.path.join(os.environ["PEAGLE_TEST_REQUESTS"], f"rank{os.environ.get('RANK', '0')}.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps({"thread": threading.current_thread().name,
                            "ids": [[int(t) for t in ids] for ids in token_ids]}) + "\n")
    return _extract(self, token_ids)


if __name__ == "__main__":
    ServerStates.extract = _recording_extract  # type: ignore[method-assign]
    sys.exit(main(sys.argv[1:]))
