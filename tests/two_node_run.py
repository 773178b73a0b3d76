"""A tiny GRPO run on a simulated two-node Ray cluster (ray.cluster_utils.Cluster: two raylets on
this machine). The head node advertises the custom resource "train", the second node "rollout";
the config puts the generator on "rollout" and the trainer on "train". Prints one JSON line: the
run's summary and, per actor role, the custom resources of the node it ran on.

Run by tests/test_scale.py in a subprocess of its own (one Ray cluster per process)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(model: str, out: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    import rlhf
    from rlhf.config import load_config
    from tests.conftest import tiny_overrides

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"train": 1},
                                                            "include_dashboard": False})
    cluster.add_node(num_cpus=2, resources={"rollout": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    cfg = load_config(REPO / "configs" / "grpo_tiny.yaml", tiny_overrides(Path(model), Path(out), **{
        "name": "twonode", "steps": 3, "resources.generator_node": "rollout", "resources.trainer_node": "train",
        "checkpoint.save_final": "false"}))
    placed: dict[str, list[str]] = {}

    def where_is_everyone(prompts, completions, **kwargs):
        """Runs in the driver during the run: the node of every live actor of this run."""
        from ray._private.state import actors

        if not placed:
            nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes()}
            for a in actors(actor_state_name="ALIVE").values():
                if a["Name"].startswith("twonode-"):
                    role = a["Name"].split(":", 1)[1]
                    placed[role] = sorted(k for k in nodes[a["Address"]["NodeID"]] if k in ("train", "rollout"))
        return [0.0] * len(completions)

    summary = rlhf.run(cfg, reward_fns=[where_is_everyone])
    print(json.dumps({"summary": summary, "placed": placed, "nodes": len(ray.nodes())}), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
