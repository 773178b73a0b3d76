"""The GPU path's decisions, checked on CPU: which optimizer DeepSpeed is given, which GPU shares the
plan refuses (naming the roles and keys), what the plan counts on a GPU, and the order in which
colocated roles start and a colocated push wakes the generators (with fakes)."""

from __future__ import annotations

import pytest

from actors.deepspeed_rank import deepspeed_config
from rlhf.config import load_config
from rlhf.plan import CUDA_CONTEXT_GIB, GIB, ModelShape, PlanError, build_plan, check, check_gpu_sharing
from rlhf.topology import push_after_wake, start_roles
from tests.conftest import REPO, tiny_overrides

SHAPE = ModelShape(params=1_000_000, hidden=64, layers=2, heads=1, vocab=100)


def cfg_with(tiny_model, tmp_path, **extra):
    base = {"data.max_prompt_tokens": 16, "rollout.max_new_tokens": 16, "train.micro_batch_size": 2,
            "train.mini_batch_size": 32, "resources.gpu_memory_gb": 80}
    return load_config(REPO / "configs" / "grpo_tiny.yaml", tiny_overrides(tiny_model, tmp_path, **{**base, **extra}))


def gpu_node(gpus: int) -> dict:
    return {"NodeManagerAddress": "g", "Alive": True,
            "Resources": {"CPU": 16.0, "GPU": float(gpus), "memory": 100 * GIB, "object_store_memory": 20 * GIB}}


# ---- 1. the optimizer ----

def test_torch_adamw_by_default_fused_on_gpu_never_deepspeeds_unbuilt_ops(tiny_model, tmp_path):
    cfg = cfg_with(tiny_model, tmp_path)
    params = lambda c, device: deepspeed_config(c, device, 1e-3)["optimizer"]["params"]  # noqa: E731
    assert params(cfg, "cpu")["torch_adam"] is True and "fused" not in params(cfg, "cpu")  # CPU runs unchanged
    assert params(cfg, "cuda")["torch_adam"] is True and params(cfg, "cuda")["fused"] is True
    offload = cfg_with(tiny_model, tmp_path, **{"train.zero_stage": 2, "train.offload_optimizer": True})
    assert params(offload, "cuda")["torch_adam"] is True and "fused" not in params(offload, "cuda")  # steps on the host
    ds = cfg_with(tiny_model, tmp_path, **{"train.optimizer": "deepspeed"})
    assert "torch_adam" not in params(ds, "cuda")  # DeepSpeed's FusedAdam (or CPU Adam under offload), where built
    with pytest.raises(Exception, match="train.optimizer"):
        cfg_with(tiny_model, tmp_path, **{"train.optimizer": "apex"})


# ---- 2. colocation means one GPU ----

def test_colocated_shares_adding_up_to_more_than_one_gpu_are_refused(tiny_model, tmp_path):
    cfg = cfg_with(tiny_model, tmp_path, **{"resources.colocate": True})  # trainer_gpus 1 + generator_gpus 1
    with pytest.raises(PlanError, match=r"resources.colocate: trainer-rank-i and generator-i must share one GPU, .*"
                                        r"resources.trainer_gpus \+ resources.generator_gpus = 1 \+ 1 = 2"):
        check_gpu_sharing(cfg)
    check_gpu_sharing(cfg_with(tiny_model, tmp_path, **{"resources.colocate": True, "resources.trainer_gpus": 0.5,
                                                        "resources.generator_gpus": 0.5}))
    with pytest.raises(PlanError, match=r"weight_sync.backend=nccl with resources.colocate: trainer-rank-0 and "
                                        r"generator-0 share a GPU"):
        check_gpu_sharing(cfg_with(tiny_model, tmp_path, **{"resources.colocate": True, "resources.trainer_gpus": 0.5,
                                                            "resources.generator_gpus": 0.5,
                                                            "weight_sync.backend": "nccl"}))
    # on CPU colocation shares cores, not a GPU: nothing to refuse
    plans = build_plan(cfg, "cpu", SHAPE)
    check(plans, [], cfg, "cpu")


def test_colocated_two_ranks_two_generators_pass_and_ipc_sends_from_each_generators_rank(tiny_model, tmp_path):
    cfg = cfg_with(tiny_model, tmp_path, **{"resources.colocate": True, "resources.trainer_gpus": 0.5,
                                            "resources.generator_gpus": 0.5, "train.ranks": 2,
                                            "rollout.num_generators": 2, "train.micro_batch_size": 2})
    plans = {p.role: p for p in build_plan(cfg, "cuda", SHAPE)}
    assert plans["trainer-rank-1"].bundle["GPU"] == 1.0 and plans["generator-1"].colocated_with == "trainer-rank-1"
    # both ranks send over ipc (to the generator on their GPU), so both keep send buffers
    assert "weight_sync_buffers" in plans["trainer-rank-0"].device_gib
    assert "weight_sync_buffers" in plans["trainer-rank-1"].device_gib
    check(list(plans.values()), [gpu_node(2)], cfg, "cuda")


# ---- 4. NCCL groups and shared GPUs ----

@pytest.mark.parametrize("overrides, message", [
    ({"resources.trainer_gpus": 0.5, "resources.generator_gpus": 0.5},
     r"weight_sync.backend=nccl: trainer-rank-0 \(resources.trainer_gpus=0.5\) and generator-0 "
     r"\(resources.generator_gpus=0.5\) may share one GPU"),
    ({"resources.generator_gpus": 0.5, "rollout.num_generators": 2},
     r"weight_sync.backend=nccl: generator-0 and generator-1 may share one GPU \(resources.generator_gpus=0.5"),
    ({"resources.trainer_gpus": 0.5, "train.ranks": 2, "train.micro_batch_size": 2},
     r"trainer-rank-0 and trainer-rank-1 may share one GPU \(resources.trainer_gpus=0.5 each"),
    ({"rollout.tensor_parallel_size": 2, "resources.generator_gpus": 0.5},
     r"rollout.tensor_parallel_size=2: .* resources.generator_gpus must be 1 \(it is 0.5"),
    ({"resources.generator_gpus": 0.5, "rollout.num_generators": 2, "weight_sync.backend": "gloo",
      "rollout.gpu_memory_utilization": 0.6},
     r"generator-0, generator-1 may share one GPU .* rollout.gpu_memory_utilization=0.6 of the whole device: "
     r"1.2 of it together; lower rollout.gpu_memory_utilization to at most 0.50"),
])
def test_gpu_shares_that_nccl_or_vllm_would_refuse_are_refused_naming_the_roles(tiny_model, tmp_path, overrides,
                                                                                 message):
    with pytest.raises(PlanError, match=message):
        check_gpu_sharing(cfg_with(tiny_model, tmp_path, **overrides))


def test_whole_gpus_and_engines_that_fit_together_pass(tiny_model, tmp_path):
    check_gpu_sharing(cfg_with(tiny_model, tmp_path, **{"train.ranks": 2, "rollout.num_generators": 2,
                                                        "train.micro_batch_size": 2}))
    check_gpu_sharing(cfg_with(tiny_model, tmp_path, **{"rollout.tensor_parallel_size": 2}))
    check_gpu_sharing(cfg_with(tiny_model, tmp_path, **{"resources.generator_gpus": 0.5, "rollout.num_generators": 2,
                                                        "weight_sync.backend": "gloo",
                                                        "rollout.gpu_memory_utilization": 0.45}))


# ---- 8. what the plan counts on a GPU ----

def test_the_gpu_plan_counts_tp_gpus_cuda_context_nccl_and_sync_buffers(tiny_model, tmp_path):
    cfg = cfg_with(tiny_model, tmp_path, **{"rollout.tensor_parallel_size": 2, "train.ranks": 2,
                                            "train.micro_batch_size": 2, "weight_sync.bucket_mb": 64,
                                            "rollout.gpu_memory_utilization": 0.5})
    plans = {p.role: p for p in build_plan(cfg, "cuda", SHAPE)}
    gen = plans["generator-0"]
    assert gen.bundle["GPU"] == 2.0
    assert gen.device_gib["weights + kv_cache (2 GPUs)"] == pytest.approx(0.5 * 80 * 2)
    assert gen.device_gib["weight_sync_buffers"] == pytest.approx(2 * 64 / 1024 * 2)  # two buckets per worker
    rank0, rank1 = plans["trainer-rank-0"].device_gib, plans["trainer-rank-1"].device_gib
    assert rank0["cuda_context"] == CUDA_CONTEXT_GIB and "nccl (DeepSpeed)" in rank0 and "nccl (weight sync)" in rank0
    assert rank0["weight_sync_buffers"] == pytest.approx(2 * 64 / 1024)
    assert "weight_sync_buffers" not in rank1 and "nccl (weight sync)" not in rank1  # rank 0 alone sends over NCCL
    assert "cuda_context" not in build_plan(cfg, "cpu", SHAPE)[1].host_gib  # on CPU the measured runtime instead


def test_check_resources_counts_tensor_parallel_gpus(monkeypatch, tiny_model, tmp_path):
    import ray

    from rlhf.topology import ResourceError, check_resources

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 2.0})
    cfg = cfg_with(tiny_model, tmp_path, **{"rollout.tensor_parallel_size": 2})
    with pytest.raises(ResourceError, match=r"needs 3 GPUs \(1 generators x 2 \+ 1 trainer ranks x 1\)"):
        check_resources(cfg, "cuda")


# ---- 5 and 7. start-up order and the colocated push, with fakes ----

class Recorder:
    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, name: str, value=None, show_args: bool = False):
        def record(*args):
            self.calls.append(f"{name} {args[0]}" if show_args else name)
            return value
        return record


def test_colocated_on_gpu_generators_start_and_sleep_before_the_trainer_allocates():
    rec = Recorder()
    generators, others = start_roles(True, rec("start generators", ["g0"]), rec("wait generators"),
                                     rec("sleep generators"), rec("start trainer", "trainer"), rec("wake generators"))
    assert (generators, others) == (["g0"], "trainer")
    assert rec.calls == ["start generators", "wait generators", "sleep generators", "start trainer",
                         "wait generators", "wake generators"]


def test_apart_the_engines_load_while_the_trainer_sets_up_and_never_sleep():
    rec = Recorder()
    start_roles(False, rec("start generators", ["g0"]), rec("wait generators"), rec("sleep generators"),
                rec("start trainer"), rec("wake generators"))
    assert rec.calls == ["start generators", "start trainer", "wait generators"]


def test_colocated_push_wakes_weights_pushes_releases_the_trainer_cache_then_wakes_the_kv_cache():
    rec = Recorder()
    metrics = push_after_wake(rec("wake", show_args=True), rec("push", {"sync/seconds": 0.1}),
                              rec("release trainer cache"))
    assert metrics == {"sync/seconds": 0.1}
    assert rec.calls == ["wake ['weights']", "push", "release trainer cache", "wake ['kv_cache']"]


def test_a_failed_colocated_push_does_not_wake_the_kv_cache_into_the_trainers_memory():
    rec = Recorder()

    def push():
        raise RuntimeError("push failed")

    with pytest.raises(RuntimeError, match="push failed"):
        push_after_wake(rec("wake", show_args=True), push, rec("release trainer cache"))
    assert rec.calls == ["wake ['weights']"]
