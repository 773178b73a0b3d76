"""RLHF post-training on Ray: vLLM generators, DeepSpeed trainers, a weight-sync group between them.

    import rlhf
    cfg = rlhf.load_config("configs/grpo_tiny.yaml", ["train.lr=1e-3"])
    summary = rlhf.run(cfg, reward_fns=[my_reward])
"""

from rlhf.config import ConfigError, RunConfig, load_config


def run(cfg: RunConfig, reward_fns=None) -> dict:
    """Train `cfg` (see rlhf.driver.run); imported lazily so `import rlhf` stays light."""
    from rlhf.driver import run as _run

    return _run(cfg, reward_fns)


__all__ = ["ConfigError", "RunConfig", "load_config", "run"]
