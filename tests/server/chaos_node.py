"""A light node process for fault-injection tests (no torch): ``python chaos_node.py --port P --node-id ID ...``.

Its trainer adds ``--delta`` to every weight and claims ``--examples``
examples. In the rounds listed in ``--die`` it kills itself with SIGKILL:
while training (``--die-mode train``) or halfway through uploading its result
(``--die-mode upload``, after the result header and one data chunk).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import numpy as np

from fedloom.client import node as node_loop

# No torch in this light node: seeding would import it inside the first task, and loading torch holds the GIL
# for seconds, starving the heartbeat thread of ten processes on two cores.
sys.modules["torch"] = None  # type: ignore[assignment]


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class Trainer:
    def __init__(self, delta: float, examples: int, die_in: set[int], mode: str):
        self.delta, self.examples, self.die_in, self.mode = delta, examples, die_in, mode
        self.round = 0

    def fit(self, weights, config):
        if self.mode == "train" and self.round in self.die_in:
            die()
        return weights.map(lambda a: a + np.asarray(self.delta, a.dtype)), self.examples, {"loss": self.delta}

    def evaluate(self, weights, config):
        return self.examples, {}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--delta", type=float, default=1.0)
    parser.add_argument("--examples", type=int, default=1)
    parser.add_argument("--die", default="", help="comma-separated rounds")
    parser.add_argument("--die-mode", choices=["train", "upload"], default="train")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    die_in = {int(r) for r in args.die.split(",") if r}
    trainer = Trainer(args.delta, args.examples, die_in, args.die_mode)
    execute = node_loop.execute

    def tracking_execute(trainer_, node_id, instruction):  # the trainer protocol does not see the round
        trainer.round = instruction.round
        return execute(trainer_, node_id, instruction)

    node_loop.execute = tracking_execute
    if args.die_mode == "upload" and die_in:
        upload = node_loop._upload

        def dying_upload(outcome, first):
            for sent, message in enumerate(upload(outcome, first)):
                if sent == 3:  # header, tensor header, one 4 MiB chunk are out: the rest never comes
                    die()
                yield message

        node_loop._upload = dying_upload
    node_loop.run(trainer, f"127.0.0.1:{args.port}", node_id=args.node_id, connect_timeout=30)


if __name__ == "__main__":
    main()
