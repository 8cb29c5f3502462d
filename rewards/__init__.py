"""posttrain.rewards: verifiable rewards (math, sandboxed code, tool calls, format) and the reward registry.

Installed as ``posttrain.rewards``; never import it as a top-level ``rewards`` module. Rewards never import
``posttrain.judges``: the judge reward reaches the registry through the ``posttrain.rewards`` entry-point group.

A reward is ``fn(prompts, completions, **columns) -> list[float | None]``, called by keyword as TRL calls it
(``prompts``, ``completions``, ``completion_ids``, ``trainer_state``, ``log_metric``, ``log_extra`` and the data
columns; a function gets only the keywords it names), so TRL's reward functions work unchanged. The public API:

- ``get(name_or_path, **options)``: a built-in (``math``, ``code``, ``tool_call``, ``format``, ``overlong``),
  a ``module:function`` path or a plugin's entry-point name; ``available()`` lists the names.
- ``RewardSet`` / ``combine``: weighted rewards, ``None`` skipped; ``RewardResult`` with ``metrics()`` and
  ``raise_for_errors(max_fraction)`` (``RewardFailedError``: ``rewards.max_error_fraction``).
- ``RewardPool``: worker processes with a per-sample time limit (kill and replace).
- ``BoundedReward``: a reward called from any other process (filters, pair scoring), with the pool's time limit.
- ``completion_text``: the text of a string or chat completion.

Importing this package imports neither sympy/math-verify nor the code sandbox: built-ins load on ``get``.

How a training loop uses it::

    config = RewardsConfig(rewards=[RewardSpec("math"), RewardSpec("overlong", 1.0, {"max_len": 1024, "cache_len": 256})])
    reward_set, pool = config.build()          # pool: None when config.num_workers == 0
    try:
        result = reward_set.score(prompts, completions, pool=pool, answer=answers, completion_ids=ids)
        rewards = result.total                 # None where no reward could score: advantage 0, reported
        accuracy = result.values["math"]       # the verifier's own outcome, e.g. for dynamic sampling
        log(result.metrics())                  # mean/std per reward, unscored and error counts
    finally:
        if pool is not None:
            pool.close()
"""

from posttrain.rewards.base import (
    RewardConfigError,
    RewardCountError,
    RewardError,
    RewardFn,
    RewardTrainerState,
    RewardValueError,
    call_reward,
    completion_text,
    reward_name,
    reward_trainer_state,
)
from posttrain.rewards.bounded import BoundedReward
from posttrain.rewards.combine import (
    RewardFailedError,
    RewardResult,
    RewardsConfig,
    RewardSet,
    RewardSpec,
    WeightedReward,
    combine,
    combine_values,
)
from posttrain.rewards.pool import RewardLoadError, RewardNotPicklableError, RewardPool, SampleError
from posttrain.rewards.registry import (
    BUILTIN_REWARDS,
    ENTRY_POINT_GROUP,
    RewardOptionError,
    UnknownRewardError,
    available,
    get,
)

__all__ = [
    "BUILTIN_REWARDS",
    "ENTRY_POINT_GROUP",
    "BoundedReward",
    "RewardConfigError",
    "RewardCountError",
    "RewardError",
    "RewardFailedError",
    "RewardFn",
    "RewardLoadError",
    "RewardNotPicklableError",
    "RewardOptionError",
    "RewardPool",
    "RewardResult",
    "RewardSet",
    "RewardSpec",
    "RewardTrainerState",
    "RewardValueError",
    "RewardsConfig",
    "SampleError",
    "UnknownRewardError",
    "WeightedReward",
    "available",
    "call_reward",
    "combine",
    "combine_values",
    "completion_text",
    "get",
    "reward_name",
    "reward_trainer_state",
]
