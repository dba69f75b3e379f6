"""Test-session settings: one torch thread. The test models are tiny, so a second thread buys little,
and CI's two cores also run the servers, browsers and subprocesses the tests start; oversubscribed
torch threads spin against each other there (one test went from 0.3 s to 18 s)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # the CLI and trainer subprocesses the tests start

import torch  # noqa: E402

torch.set_num_threads(1)
