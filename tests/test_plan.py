"""The placement plan and memory estimate: hand-computed figures, placement on fake nodes, refusals."""

from __future__ import annotations

import pytest

from rlhf.config import load_config
from rlhf.plan import GIB, ModelShape, PlanError, build_plan, check, place, trainer_memory
from tests.conftest import REPO, tiny_overrides

SHAPE = ModelShape(params=1_000_000, hidden=64, layers=2, heads=1, vocab=100)


def cfg_with(tiny_model, tmp_path, **extra):
    base = {"data.max_prompt_tokens": 16, "rollout.max_new_tokens": 16, "train.micro_batch_size": 2,
            "train.mini_batch_size": 32}
    return load_config(REPO / "configs" / "grpo_tiny.yaml", tiny_overrides(tiny_model, tmp_path, **{**base, **extra}))


def node(address: str, cpus: float, memory_gib: float = 20.0, gpus: float = 0.0, **custom: float) -> dict:
    res = {"CPU": cpus, "memory": memory_gib * 0.7 * GIB, "object_store_memory": memory_gib * 0.3 * GIB, **custom}
    if gpus:
        res["GPU"] = gpus
    return {"NodeManagerAddress": address, "Alive": True, "Resources": res}


def test_trainer_memory_by_hand_zero3_over_two_ranks_and_offload(tiny_model, tmp_path):
    cfg = cfg_with(tiny_model, tmp_path, **{"train.ranks": 2, "train.zero_stage": 3, "train.micro_batch_size": 2,
                                            "train.mini_batch_size": 32})
    device, host = trainer_memory(cfg, SHAPE)
    # fp32: 4 bytes per parameter and per gradient, 8 for Adam's m and v and 4 for ZeRO's fp32 master
    # partition; ZeRO-3 halves all of them over 2 ranks
    assert device["parameters"] == pytest.approx(2e6 / GIB)
    assert device["gradients"] == pytest.approx(2e6 / GIB)
    assert device["optimizer"] == pytest.approx(6e6 / GIB)
    assert device["optimizer_step"] == pytest.approx(4e6 / GIB)  # foreach AdamW's temporaries
    # activations: s=32, b=2, h=64, a=1: per layer 32*2*64*(34 + 5*1*32/64) * 2 bytes (fp32), 2 layers,
    # plus 3 fp32 tensors of the logits b*s*V
    per_layer = 32 * 2 * 64 * (34 + 5 * 32 / 64) * 2
    assert device["activations"] == pytest.approx((2 * per_layer + 3 * 2 * 32 * 100 * 4) / GIB)
    assert host == {}
    off = cfg_with(tiny_model, tmp_path, **{"train.ranks": 2, "train.zero_stage": 3, "train.offload_optimizer": True,
                                            "train.offload_params": True, "train.mini_batch_size": 32})
    device, host = trainer_memory(off, SHAPE)
    assert set(device) == {"gradients", "activations"}
    assert set(host) == {"optimizer", "optimizer_step", "parameters"}
    # Checkpointing keeps each layer's input plus one layer (twice, with its gradients): less from 3 layers on.
    deep = ModelShape(params=1_000_000, hidden=64, layers=8, heads=1, vocab=100)
    ckpt = cfg_with(tiny_model, tmp_path, **{"train.gradient_checkpointing": True})
    plain = trainer_memory(cfg_with(tiny_model, tmp_path), deep)[0]["activations"]
    assert trainer_memory(ckpt, deep)[0]["activations"] < plain / 2


def test_roles_land_on_the_nodes_their_custom_resources_name(tiny_model, tmp_path):
    cfg = cfg_with(tiny_model, tmp_path, **{"rollout.num_generators": 2, "resources.generator_node": "rollout",
                                            "resources.trainer_node": "train"})
    nodes = [node("10.0.0.1", 4, train=1), node("10.0.0.2", 4, rollout=1)]
    plans = build_plan(cfg, "cpu", SHAPE)
    place(plans, nodes, cfg)
    where = {p.role: p.node for p in plans}
    assert where == {"generator-0": "10.0.0.2#1", "generator-1": "10.0.0.2#1", "trainer-rank-0": "10.0.0.1#0"}
    check(plans, nodes, cfg, "cpu")  # fits


def test_spread_puts_generators_on_different_nodes(tiny_model, tmp_path):
    cfg = cfg_with(tiny_model, tmp_path, **{"rollout.num_generators": 2, "resources.generator_strategy": "SPREAD"})
    plans = build_plan(cfg, "cpu", SHAPE)
    place(plans, [node("a", 4), node("b", 4)], cfg)
    assert {p.node for p in plans if p.kind == "generator"} == {"a#0", "b#1"}


def test_the_plan_refuses_what_cannot_fit_naming_it(tiny_model, tmp_path):
    cfg = cfg_with(tiny_model, tmp_path, **{"resources.generator_cpus": 3})
    with pytest.raises(PlanError, match=r"generator-0: no node has CPU 3 free"):
        place(build_plan(cfg, "cpu", SHAPE), [node("a", 2)], cfg)

    big = ModelShape(params=7_000_000_000, hidden=4096, layers=32, heads=32, vocab=32000)
    gpu_cfg = cfg_with(tiny_model, tmp_path, **{"resources.gpu_memory_gb": 80, "model.dtype": "bfloat16"})
    plans = build_plan(gpu_cfg, "cuda", big)
    nodes = [node("g", 16, memory_gib=500, gpus=8)]
    place(plans, nodes, gpu_cfg)
    # 7B in bf16 on one rank without ZeRO: 14 GB weights + 14 grads + 84 Adam and master = ~104 GiB > 80
    with pytest.raises(PlanError, match=r"trainer-rank-0 does not fit: .* short by \d+\.\d GiB"):
        check(plans, nodes, gpu_cfg, "cuda")

    small_node = [node("laptop", 8, memory_gib=3)]
    plans = build_plan(cfg_with(tiny_model, tmp_path), "cpu", SHAPE)
    place(plans, small_node, cfg)
    with pytest.raises(PlanError, match=r"node laptop#0 does not fit its actors: .* short by 0.7 GiB; "
                                        r"the largest is generator-0"):
        check(plans, small_node, cfg, "cpu")


def test_colocated_generators_share_the_trainer_bundle_and_its_gpu(tiny_model, tmp_path):
    cfg = cfg_with(tiny_model, tmp_path, **{"resources.colocate": True})
    plans = {p.role: p for p in build_plan(cfg, "cpu", SHAPE)}
    assert plans["generator-0"].bundle == {} and plans["generator-0"].colocated_with == "trainer-rank-0"
    assert plans["trainer-rank-0"].bundle == {"CPU": 2.0}
    place(list(plans.values()), [node("a", 1), node("b", 2)], cfg)
    assert plans["generator-0"].node == plans["trainer-rank-0"].node == "b#1"

    gpu = cfg_with(tiny_model, tmp_path, **{"resources.colocate": True, "resources.trainer_gpus": 0.5,
                                           "resources.generator_gpus": 0.5, "resources.gpu_memory_gb": 16,
                                           "rollout.gpu_memory_utilization": 0.5, "model.dtype": "bfloat16"})
    mid = ModelShape(params=1_000_000_000, hidden=2048, layers=16, heads=16, vocab=32000)
    plans = build_plan(gpu, "cuda", mid)
    nodes = [node("g", 8, memory_gib=100, gpus=1)]
    place(plans, nodes, gpu)
    # 1B in bf16: 2 + 2 + 12 GB of weights, gradients, Adam and master copies, plus activations, then the
    # generator's 0.5 x 16 GiB: more than one 16 GiB GPU
    with pytest.raises(PlanError, match=r"trainer-rank-0 does not fit: .* plus the colocated generator"):
        check(plans, nodes, gpu, "cuda")
    with pytest.raises(Exception, match=r"resources.colocate: needs rollout.mode=sync"):
        cfg_with(tiny_model, tmp_path, **{"resources.colocate": True, "rollout.mode": "async"})


def test_deepspeed_comm_buckets_are_capped_at_the_model_and_aligned():
    from actors.deepspeed_rank import comm_bucket_elements

    assert comm_bucket_elements(3_700_001) == 3_700_032  # the model's size, rounded up to a multiple of 64
    assert comm_bucket_elements(10) == 1_000_000  # at least 1e6
    assert comm_bucket_elements(10**10) == 500_000_000  # DeepSpeed's default as the cap
