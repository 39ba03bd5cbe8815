"""``make produce``: run LIBERO episodes with a VLA and stream one sample per policy query to the trainer.

    python -m producer.produce --endpoint tcp://127.0.0.1:5555                       # embedded VLA
    python -m producer.produce --vla openvla-oft --model-id moojink/openvla-7b-oft-finetuned-libero-spatial

Per episode: reset the task at a fixed initial state, query the policy, execute ``replan`` actions of the
chunk open-loop (cameras are rendered only for the observation of the next query), repeat until success
or the step limit. With ``--sample-every N`` the policy is also queried every N steps in between, on
the states the executed chunk passes through, for training data only (these queries' actions are not
executed; the acting queries stay those at multiples of ``replan``). Every query becomes one ``sample`` message (hidden state, codes, action chunk, ids,
optionally the observation); the episode ends with ``episode_end`` (success / failed / errored).
A simulator or policy exception ends the episode as ``errored`` and the producer goes on.

Delivery (:class:`ReliableSender`): a DEALER socket with a send high-water mark, so a slow trainer
blocks this loop instead of dropping data. Every data message is kept until the trainer acknowledges it
as archived; if the trainer restarts (a new trainer session in an ack), the producer says hello again
and resends everything not yet acknowledged. Ctrl-C / SIGTERM: the current episode is closed as
``incomplete``, the producer waits for the last acks (at most ``--flush-timeout-s``; a second Ctrl-C
stops waiting), says ``bye`` and prints its counts: sent, acknowledged and unacknowledged. When no
trainer answers it warns after ``--no-trainer-warn-s``; it exits with code 1 if anything it sent was
not acknowledged (not delivered).

The configuration is ``producer/config.py``, the loop ``producer/loop.py``, delivery ``producer/sender.py``.
"""

from __future__ import annotations

import logging
import os

from common.cli import parse_config
from common.logs import setup_logging
from common.shutdown import stop_on_signals
from common.vla.openvla_oft import OpenVLAOFTUnavailable
from producer.config import ProducerConfig
from producer.loop import Producer

__all__ = ["Producer", "ProducerConfig", "main"]  # what scripts import from the command's module

log = logging.getLogger("producer")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ProducerConfig, argv, prog="python -m producer.produce")
    setup_logging(f"producer-{cfg.producer_id}")
    os.environ.setdefault("MUJOCO_GL", "egl")
    if cfg.ray_address:
        # Lazy: Ray is heavy (seconds to import) and only fleets need it.
        from producer.fleet import run_fleet

        return run_fleet(cfg)
    try:
        producer = Producer(cfg)
    except ValueError as exc:  # an unreadable --replay-obs file
        log.error("%s", exc)
        return 2
    with stop_on_signals(  # a second signal: do not wait for acks; all is flushed after the block
        producer.stop,
        log,
        "finishing the current step, then closing",
        again=producer.abort,
        again_message="not waiting for the trainer's acknowledgements",
    ):
        try:
            summary = producer.run()
        except OpenVLAOFTUnavailable as exc:
            log.error("OpenVLAOFTUnavailable: %s", exc)
            return 2
    if summary["refused"]:
        return 2
    return 0 if summary["unacked"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
