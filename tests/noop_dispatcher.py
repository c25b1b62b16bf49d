"""A dispatcher class for registry tests: registered and inspected, never built."""

from moe_a2a.dispatchers import BaseDispatcher, StandardDispatchOutput


class NoopDispatcher(BaseDispatcher):
    output_class = StandardDispatchOutput

    def dispatch(self, hidden_states, topk, *, batch):  # pragma: no cover - never built
        raise NotImplementedError

    def combine(self, combine_input, *, batch):  # pragma: no cover
        raise NotImplementedError
