"""The entry point that `ray job submit` runs:

    python -m rlhf.train --config configs/grpo_tiny.yaml train.lr=1e-3 rollout.temperature=0.8
"""

from __future__ import annotations

import argparse
import sys

from rlhf.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rlhf.train", description="Train a policy with RL on Ray.")
    ap.add_argument("--config", required=True, help="a YAML file from configs/")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from rlhf.driver import run

    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
