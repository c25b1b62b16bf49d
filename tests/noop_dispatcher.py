"""A dispatcher class for registry tests: registered and inspected, never built."""

from moe_a2a.dispatchers import BaseDispatcher


class NoopDispatcher(BaseDispatcher):
    def dispatch(self, hidden_states, topk):  # pragma: no cover - never built
        raise NotImplementedError

    def combine(self, combine_input):  # pragma: no cover
        raise NotImplementedError
