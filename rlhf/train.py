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
    ap.add_argument("--dry-run", action="store_true",
                    help="print where every actor would go and its memory estimate, check that it fits; start nothing")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        return dry_run(cfg)
    from rlhf.driver import run

    run(cfg)
    return 0


def dry_run(cfg) -> int:
    """The placement plan on the cluster `ray.init()` finds (RAY_ADDRESS, or a local one), checked."""
    import ray

    ray.init(log_to_driver=False)
    try:
        return print_plan(cfg, [n for n in ray.nodes() if n.get("Alive", True)])
    finally:
        ray.shutdown()


def print_plan(cfg, nodes: list[dict]) -> int:
    """Print where every actor of `cfg` would go on `nodes` (ray.nodes() rows); 2 and the reason if it cannot fit."""
    from rlhf.plan import PlanError, build_plan, check, format_plan, place
    from rlhf.topology import resolve_device

    device = resolve_device(cfg)
    plans = build_plan(cfg, device)
    try:
        place(plans, nodes, cfg)
        print(format_plan(plans, device))
        check(plans, nodes, cfg, device)
    except PlanError as e:
        print(f"plan error: {e}", file=sys.stderr)
        return 2
    print(f"the plan fits on {len(nodes)} node(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
