"""``python -m tests.raising_producer ARGS``: the producer command (``producer.produce``, same arguments)
whose policy raises in its second query, inside the first episode after its first sample was sent: a
fault injected from outside the product, to exercise the ``errored`` episode path end to end."""

from __future__ import annotations

from typing import Any

from common.policy import Observation, PolicyOutput
from producer import loop, produce


class InjectedError(RuntimeError):
    """The fault this helper injects."""


class RaisingPolicy:
    """Delegates to ``policy``; its ``act`` call number ``raise_on`` (1-based) raises :class:`InjectedError`."""

    def __init__(self, policy: Any, raise_on: int = 2) -> None:
        self._policy = policy
        self._raise_on = raise_on
        self.calls = 0

    def act(self, observations: list[Observation]) -> list[PolicyOutput]:
        self.calls += 1
        if self.calls == self._raise_on:
            raise InjectedError(f"injected failure in policy call {self.calls}")
        return self._policy.act(observations)

    def __getattr__(self, name: str) -> Any:  # backbone_id, hidden_dim, shape, codec, ...
        return getattr(self._policy, name)


def main(argv: list[str] | None = None) -> int:
    build = loop.build_policy
    loop.build_policy = lambda cfg, prepared_images=False: RaisingPolicy(build(cfg, prepared_images))
    return produce.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
