"""DraftPolicy: whether proposing draft tokens pays, on this machine and this traffic.

A draft row costs a row of every matmul and of the verify kernel, and buys a token only when
the model agrees with it. What it costs next to a plain decode token depends on the CPU (the
AMX verify kernel is ~2.5x cheaper than the FMA one on AVX-512), the batch and the context, so
it is measured while serving, not assumed. Right after a decode-only step with drafts, every
2 steps until MIN_SAMPLES samples, then every PROBE_INTERVAL, and every SETTLED_INTERVAL once
the estimate has its SAMPLES (a control step forgoes a step's drafts: ~4% of the shared
workload's throughput at one in 20 steps), the scheduler runs one control step: the same
requests, no drafts. The pair gives a sample of the relative cost of a draft row,

    r = (t_with_drafts - t_control) / num_drafts  /  (t_control / num_decodes),

and the median of the last SAMPLES samples is the policy's estimate (PRIOR_COST until there
are MIN_SAMPLES: the prompts' prefill steps give no pairs). A draft pays when the
chance that it is accepted exceeds r. Each request keeps its own acceptance (accepted per
drafted, a running average); while it is below GATE x r (samples of r scatter by +-0.3 on a
noisy 2-core machine, and drafts near break-even cost little either way) the request proposes
nothing for 2, 4, 8, ...
up to MAX_PAUSE steps, then tries one draft, and the full k again once one is accepted. A new
request starts from the population: where the requests' acceptance so far is below r it starts
paused (NEW_LEVEL). So drafts that never pay cost a draft row per ~MAX_PAUSE steps, and drafts
that pay (cheap verify, text that repeats itself) run as before.
"""

from __future__ import annotations

import statistics
from collections import deque

PROBE_INTERVAL = 20  # steps between control steps, until SAMPLES samples
SETTLED_INTERVAL = 200  # then
SAMPLES = 9  # control-step samples the estimate is the median of
MIN_SAMPLES = 3  # before these, the gate assumes PRIOR_COST
PRIOR_COST = 0.3  # a draft row in plain tokens, before it is measured
GATE = 0.5  # drafts stop below this fraction of break-even
MAX_PAUSE = 128  # steps
ACCEPTANCE_WEIGHT = 0.5  # of the newest outcome in a request's running acceptance
POPULATION_WEIGHT = 0.05  # of the newest outcome in all requests' running acceptance
NEW_LEVEL = 5  # a new request's first pause (2**5 steps) where drafts do not pay


class _RequestState:
    __slots__ = ("acceptance", "level", "pause")

    def __init__(self) -> None:
        self.acceptance: float | None = None
        self.level = 0  # low outcomes in a row
        self.pause = 0  # steps left without proposing


class DraftPolicy:
    def __init__(self) -> None:
        self.samples: deque[float] = deque(maxlen=SAMPLES)
        self.requests: dict[str, _RequestState] = {}
        self.acceptance: float | None = None  # of all requests' drafts
        self._steps_since_probe = 0
        self._control_pending = False
        # (decodes, drafts, seconds) of the last step, when it was decode-only with drafts.
        self._last_with_drafts: tuple[int, int, float] | None = None

    @property
    def relative_cost(self) -> float | None:
        """A draft row's cost in plain decode tokens; None until measured."""
        if len(self.samples) < MIN_SAMPLES:
            return None
        return max(0.0, statistics.median(self.samples))

    @property
    def threshold(self) -> float:
        """The acceptance below which a request's drafts stop (GATE x break-even)."""
        cost = self.relative_cost
        return GATE * (PRIOR_COST if cost is None else cost)

    # ---- steps -------------------------------------------------------------------------------
    def control_step(self) -> bool:
        """Whether the step being scheduled runs without drafts, to measure their cost."""
        due = self._last_with_drafts is not None and self._steps_since_probe >= PROBE_INTERVAL
        self._control_pending = due
        return due

    def observe_step(
        self, num_decodes: int, num_drafts: int, num_prefill_tokens: int, seconds: float
    ) -> None:
        self._steps_since_probe += 1
        decode_only = num_prefill_tokens == 0 and num_decodes > 0 and seconds > 0
        if self._control_pending:
            self._control_pending = False
            last = self._last_with_drafts
            if decode_only and num_drafts == 0 and last is not None and last[0] == num_decodes:
                _, drafts, t_drafts = last
                per_token = seconds / num_decodes
                self.samples.append((t_drafts - seconds) / drafts / per_token)
                self._steps_since_probe = 0
            self._last_with_drafts = None
            return
        with_drafts = decode_only and num_drafts > 0
        self._last_with_drafts = (num_decodes, num_drafts, seconds) if with_drafts else None

    # ---- requests ----------------------------------------------------------------------------
    def max_drafts(self, req_id: str) -> int | None:
        """How many drafts the request may propose for its next step: 0, 1 (trying again
        after a pause), or None: as many as the proposer finds."""
        state = self.requests.get(req_id)
        if state is None:
            state = self.requests[req_id] = _RequestState()
            if self.acceptance is not None and self.acceptance < self.threshold:
                state.level, state.pause = NEW_LEVEL, 2**NEW_LEVEL
        if state.pause > 0:
            state.pause -= 1
            return 0
        return 1 if state.level else None

    def observe_request(self, req_id: str, num_drafts: int, num_accepted: int) -> None:
        if num_drafts == 0:
            return
        rate = num_accepted / num_drafts
        if self.acceptance is None:
            self.acceptance = rate
        else:
            self.acceptance += POPULATION_WEIGHT * (rate - self.acceptance)
        state = self.requests.setdefault(req_id, _RequestState())
        if state.acceptance is None:
            state.acceptance = rate
        else:
            state.acceptance += ACCEPTANCE_WEIGHT * (rate - state.acceptance)
        if state.acceptance < self.threshold and not (state.level and num_accepted):
            state.level += 1
            state.pause = min(MAX_PAUSE, 2**state.level)
        else:  # paying, or the one draft tried after a pause was accepted
            state.level = 0

    def drop(self, req_id: str) -> None:
        self.requests.pop(req_id, None)
