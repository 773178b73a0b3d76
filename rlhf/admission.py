"""The rollout stream's decisions, as pure functions: which prompt may start, which scored group is
filtered, which ready group is too old to train. `rlhf/rollouts.py` holds the state and calls these.

Staleness: the batch trained at step s runs on trainer weights of version s - 1, so a group generated
by version v is max_staleness-fresh for step s iff v >= min_version(s) = s - 1 - max_staleness.

Admission (which prompt may start now) keeps staleness bounded without waste: a prompt admitted now
lands in step  s = next untaken step + slots already held // prompts_per_step, and is admitted only
if the weights the generators serve (version v) are fresh enough for that step (v >= min_version(s)),
if s <= steps, and if the buffer has a free slot. With max_staleness 0 that is exactly the sync
schedule. Groups that still arrive too old (a slow generator, reordering by the DAPO filter) are
dropped when a batch is taken (`ReplayBuffer.take(..., min_version(step))`), and counted.

DAPO's dynamic sampling (Yu et al. 2025): a group whose rewards have no spread gives a group
baseline no signal and is filtered, and a prompt is admitted in its place; once
(max_sampling_rounds - 1) batches' worth have been filtered since the last batch was taken, such
groups are trained anyway, so a task with little signal cannot stall the run.
"""

from __future__ import annotations


def min_version(step: int, max_staleness: int) -> int:
    """The oldest policy version whose groups may be trained at `step` (trainer weights: step - 1)."""
    return step - 1 - max_staleness


def admission_step(*, next_step: int, reserved: int, prompts_per_step: int, capacity: int, served_version: int,
                   max_staleness: int, steps: int) -> int | None:
    """The step a prompt admitted now would be trained at, or None when it may not start now.

    next_step: the step whose batch has not been taken yet; reserved: buffer slots held (in flight
    plus ready); served_version: the weights the generators serve; steps: the run's last step.
    """
    step = next_step + reserved // prompts_per_step
    if reserved >= capacity or step > steps or served_version < min_version(step, max_staleness):
        return None
    return step


def keep_groups(signal: list[bool], filtered: int, max_filtered: int) -> list[bool]:
    """For scored groups in order, True to put each into the buffer, False to filter it (DAPO).

    signal: whether each group's rewards have any spread (all True without dynamic sampling);
    filtered: groups already filtered since the last batch was taken; max_filtered:
    (max_sampling_rounds - 1) * prompts_per_step, after which groups without signal are kept.
    """
    keep = []
    for s in signal:
        keep.append(s or filtered >= max_filtered)
        filtered += not keep[-1]
    return keep
