"""RLHF post-training on Ray: vLLM generators, DeepSpeed trainers, a weight-sync group between them.

    import rlhf
    cfg = rlhf.load_config("configs/grpo_tiny.yaml", ["train.lr=1e-3"])
    summary = rlhf.run(cfg, reward_fns=[my_reward])

    pool = rlhf.TopologyPool()           # runs of one shape (a sweep) share their actors
    for lr in (1e-3, 3e-3):
        rlhf.run(rlhf.load_config("configs/grpo_tiny.yaml", [f"train.lr={lr}"]), topologies=pool)
    pool.close()
"""

from rlhf.config import ConfigError, RunConfig, load_config


def run(cfg: RunConfig, reward_fns=None, topologies=None) -> dict:
    """Train `cfg` (see rlhf.driver.run); imported lazily so `import rlhf` stays light."""
    from rlhf.driver import run as _run

    return _run(cfg, reward_fns, topologies)


def __getattr__(name: str):
    if name == "TopologyPool":  # rlhf.topology imports Ray and the actors: only when asked for
        from rlhf.topology import TopologyPool

        return TopologyPool
    raise AttributeError(f"module 'rlhf' has no attribute {name!r}")


__all__ = ["ConfigError", "RunConfig", "TopologyPool", "load_config", "run"]
