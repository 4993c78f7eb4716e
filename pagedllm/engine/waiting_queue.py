"""WaitingQueue: requests waiting for a seat in the running batch, fair between groups.

A group is what one API call fanned out into (its prompts times its n samples). Admission takes
the head of the group that holds the fewest running seats (the oldest head on a tie), and no group
may hold more than ``max_seats_per_group``, so one call that becomes hundreds of sequences cannot
keep a small request behind it waiting: the small one is admitted at the next free seat, and a
quarter of the seats are never all one group's. Requests with a group of their own (the offline
API's) are admitted first come, first served, as before.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Callable

from pagedllm.engine.request import Request


def max_seats_per_group(max_num_seqs: int) -> int:
    """Seats one group may hold: all but a quarter, so others always find one soon."""
    return max(1, max_num_seqs - max_num_seqs // 4)


class WaitingQueue:
    def __init__(self, max_seats_per_group: int) -> None:
        self.max_seats_per_group = max_seats_per_group
        # group -> its waiting requests in arrival order; groups in order of their oldest head.
        self._groups: OrderedDict[str, deque[Request]] = OrderedDict()
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def append(self, request: Request) -> None:
        self._groups.setdefault(request.group_id, deque()).append(request)
        self._len += 1

    def appendleft(self, request: Request) -> None:
        """A preempted request: first of its group, and its group first on a tie."""
        queue = self._groups.setdefault(request.group_id, deque())
        queue.appendleft(request)
        self._groups.move_to_end(request.group_id, last=False)
        self._len += 1

    def remove(self, request: Request) -> None:
        queue = self._groups[request.group_id]
        queue.remove(request)
        self._len -= 1
        if not queue:
            del self._groups[request.group_id]

    def peek(
        self, seats: Counter[str], admissible: Callable[[Request], bool] | None = None
    ) -> Request | None:
        """The request to admit next, given the seats each group holds; None if every waiting
        group is at its seat limit. ``admissible``: groups whose head it refuses wait (a LoRA
        adapter beyond the step's limit); the others go ahead of them."""
        best, best_seats = None, None
        for group_id, queue in self._groups.items():
            held = seats.get(group_id, 0)
            if held >= self.max_seats_per_group:
                continue
            if admissible is not None and not admissible(queue[0]):
                continue
            if best_seats is None or held < best_seats:
                best, best_seats = queue[0], held
                if held == 0:
                    break  # nobody can hold fewer; the oldest such group wins
        return best
