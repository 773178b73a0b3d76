"""Check every GPU path of the stack in one command, in at most ~9 minutes on one H100/H200:

    python scripts/gpu_check.py --out gpu-check          # all stages the machine's GPUs allow
    python scripts/gpu_check.py --out gpu-check --only probe,engine

No hub access: the probe stage builds the tiny model locally (rlhf.tiny_model) and the later stages
use it. Each stage runs in a subprocess of its own (its own process group) under a timeout, so a hang
costs that stage and nothing else; the whole check keeps to --budget-s. DIR/summary.json, rewritten
after every stage, holds per stage its status (ok / failed / skipped), seconds, key figures and the
tail of its log (the whole log is DIR/logs/STAGE.log), plus a GPU memory trace sampled at 1 Hz
(nvidia-smi, else NVML) with the stage that was running. Stages that need more GPUs than the machine
has are skipped and say so.

    probe         versions (torch, CUDA, NCCL, vLLM, DeepSpeed, Ray), nvcc / CUDA_HOME, DeepSpeed's ops,
                  device names, UUIDs and memory; builds the tiny model
    engine        vLLM with the weight-sync worker extension, bf16, sleep mode: greedy outputs before
                  sleep and after wake must be identical, and sleep must free device memory
    ipc_push      the trainer's (perturbed) weights over CUDA IPC into the engine on the same GPU:
                  checksums, the log-prob gap before (large) and after (bf16 noise) the push
    nccl_push     the same over NCCL, trainer on GPU 0 and engine on GPU 1; a receiver whose sender
                  never sends fails within the timeout; a closed group is rebuilt. 1 GPU: not testable
    colocated     the real driver (rlhf.run), 3 steps: colocated trainer and generator on fractional
                  GPUs, the reference on the GPU, ZeRO-2, verify on
    nccl_run      the same run apart over NCCL (2+ GPUs)
    tp2           the same run with a tensor-parallel (TP=2) generator (3+ GPUs)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TASK = REPO / "examples" / "charset"
RESULT_ENV = "GPU_CHECK_RESULT"  # where a stage's subprocess writes its figures (JSON)
LOG_TAIL_LINES = 60


@dataclass(frozen=True)
class Stage:
    name: str
    gpus: int  # GPUs it needs; fewer present: skipped
    timeout_s: float
    what: str


STAGES = [
    Stage("probe", 0, 120, "versions, NCCL, nvcc, DeepSpeed ops, devices; builds the tiny model"),
    Stage("engine", 1, 150, "vLLM + worker extension, bf16, sleep mode: greedy identical after wake, memory freed"),
    Stage("ipc_push", 1, 150, "CUDA IPC push: checksums, log-prob gap vs the trainer's model"),
    Stage("nccl_push", 2, 150, "NCCL push GPU 0 -> GPU 1, a dead sender's timeout, close and rebuild"),
    Stage("colocated", 1, 240, "rlhf.run 3 steps colocated: fractional GPUs, reference on GPU, ZeRO-2, verify"),
    Stage("nccl_run", 2, 200, "rlhf.run 3 steps apart over NCCL"),
    Stage("tp2", 3, 200, "rlhf.run 3 steps with a TP=2 generator"),
]
MIN_STAGE_S = 20.0  # a stage is not started with less of the budget left


# ---------------------------------------------------------------- orchestration

def gpu_memory_sampler() -> tuple[Callable[[], list[float]] | None, str]:
    """A function returning each GPU's used memory in MiB, and how it measures; (None, why) if none works.
    Neither creates a CUDA context (which would itself take memory on every GPU)."""
    if shutil.which("nvidia-smi"):
        def smi() -> list[float]:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5).stdout
            return [float(x) for x in out.split()]
        try:
            smi()
            return smi, "nvidia-smi"
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
    try:
        import pynvml

        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        return (lambda: [pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**20 for h in handles]), "nvml"
    except Exception as e:  # noqa: BLE001 - no NVIDIA driver here
        return None, f"no GPU memory trace: neither nvidia-smi nor NVML works ({type(e).__name__})"


def count_gpus() -> int:
    sampler, _ = gpu_memory_sampler()
    try:
        return len(sampler()) if sampler else 0
    except Exception:  # noqa: BLE001
        return 0


class MemoryTrace:
    """Samples `sampler` every `period_s` on a thread: rows of seconds since start, the running stage,
    and each GPU's used MiB."""

    def __init__(self, sampler: Callable[[], list[float]] | None, period_s: float = 1.0):
        self.sampler, self.period_s = sampler, period_s
        self.rows: list[dict] = []
        self.stage = ""
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="gpu-memory-trace", daemon=True)

    def start(self) -> MemoryTrace:
        if self.sampler is not None:
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                used = self.sampler()
            except Exception:  # noqa: BLE001 - a failed sample is a gap in the trace, not a failed check
                used = None
            if used is not None:
                self.rows.append({"t": round(time.monotonic() - self._t0, 1), "stage": self.stage, "used_mib": used})
            self._stop.wait(self.period_s)

    def peak_mib(self, stage: str) -> float | None:
        values = [max(r["used_mib"]) for r in self.rows if r["stage"] == stage and r["used_mib"]]
        return max(values) if values else None

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def kill_group(proc: subprocess.Popen) -> None:
    """End the stage's process group (vLLM's engine core, Ray's daemons and workers it started)."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:  # the leader is gone; its children may linger a moment
            time.sleep(0.5)


def run_stage(stage: Stage, command: list[str], out: Path, timeout_s: float) -> dict:
    """One stage in its own process group under `timeout_s`: its status, seconds, figures, log tail."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "results").mkdir(parents=True, exist_ok=True)
    log, result = out / "logs" / f"{stage.name}.log", out / "results" / f"{stage.name}.json"
    result.unlink(missing_ok=True)
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                env={**os.environ, RESULT_ENV: str(result)})
        try:
            rc = proc.wait(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            rc, timed_out = None, True
        kill_group(proc)  # after a timeout the hang; after an exit whatever it left running
    seconds = round(time.monotonic() - t0, 1)
    figures: dict = {}
    try:
        figures = json.loads(result.read_text())
    except (OSError, ValueError):
        pass
    row = {"name": stage.name, "what": stage.what, "seconds": seconds, "figures": figures.get("figures", {}),
           "log_tail": log_tail(log)}
    if timed_out:
        return {**row, "status": "failed", "reason": f"timed out after {timeout_s:g} s (killed)"}
    if figures.get("status") == "skipped":  # the stage found itself untestable here
        return {**row, "status": "skipped", "reason": figures.get("reason", "")}
    if rc != 0:
        return {**row, "status": "failed", "reason": figures.get("reason") or f"exit status {rc}"}
    if figures.get("status") != "ok":
        return {**row, "status": "failed", "reason": figures.get("reason") or "the stage reported no result"}
    return {**row, "status": "ok", "reason": ""}


def stage_command(stage: Stage, out: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--stage", stage.name, "--out", str(out)]


def run_check(stages: list[Stage], out: Path, gpus: int, budget_s: float,
              command: Callable[[Stage, Path], list[str]] = stage_command,
              sampler: Callable[[], list[float]] | None = None, sampler_kind: str = "",
              period_s: float = 1.0, min_stage_s: float = MIN_STAGE_S) -> dict:
    """Every stage in order, skipped when it needs more GPUs than `gpus` or when less than min_stage_s
    of `budget_s` is left; each under min(its timeout, the budget left). DIR/summary.json after each."""
    out.mkdir(parents=True, exist_ok=True)
    trace = MemoryTrace(sampler, period_s).start()
    t0 = time.monotonic()
    summary = {"gpus": gpus, "budget_s": budget_s, "memory_trace": sampler_kind, "stages": [], "gpu_memory": []}

    def write() -> None:
        summary["total_s"] = round(time.monotonic() - t0, 1)
        summary["gpu_memory"] = list(trace.rows)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))

    try:
        for stage in stages:
            left = budget_s - (time.monotonic() - t0)
            if stage.gpus > gpus:
                row = {"name": stage.name, "what": stage.what, "status": "skipped", "seconds": 0.0, "figures": {},
                       "log_tail": "", "reason": f"needs {stage.gpus} GPUs, the machine has {gpus}"
                                                 + (": not testable here" if stage.name == "nccl_push" else "")}
            elif left < min_stage_s:
                row = {"name": stage.name, "what": stage.what, "status": "skipped", "seconds": 0.0, "figures": {},
                       "log_tail": "", "reason": f"not run: {max(left, 0):.0f} s of the {budget_s:g} s budget left"}
            else:
                trace.stage = stage.name
                row = run_stage(stage, command(stage, out), out, min(stage.timeout_s, left))
                trace.stage = ""
                peak = trace.peak_mib(stage.name)
                if peak is not None:
                    row["figures"]["gpu_peak_used_mib"] = peak
            summary["stages"].append(row)
            print(f"[gpu_check] {row['name']}: {row['status']} in {row['seconds']:g} s"
                  + (f" ({row['reason']})" if row["reason"] else ""), flush=True)
            write()
    finally:
        trace.stop()
        write()
    return summary


# ---------------------------------------------------------------- stages (each runs in its own process)

def report(status: str = "ok", reason: str = "", **figures) -> None:
    Path(os.environ[RESULT_ENV]).write_text(json.dumps({"status": status, "reason": reason, "figures": figures},
                                                       indent=1, default=str))


def model_dir(out: Path) -> Path:
    path = out / "tiny-model"
    if not (path / "config.json").exists():
        raise SystemExit(f"no tiny model at {path}: the probe stage builds it")
    return path


def stage_probe(out: Path) -> None:
    import platform

    import torch

    figures: dict = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                     "cuda_available": torch.cuda.is_available(), "CUDA_HOME": os.environ.get("CUDA_HOME", "")}
    for module in ("vllm", "deepspeed", "ray", "transformers"):
        try:
            figures[module] = __import__(module).__version__
        except Exception as e:  # noqa: BLE001
            figures[module] = f"import failed: {e!r}"
    nvcc = shutil.which("nvcc")
    if nvcc:
        figures["nvcc"] = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip()
        figures["nvcc"] = figures["nvcc"].splitlines()[-1] if figures["nvcc"] else "found, no version"
    else:
        figures["nvcc"] = "not found (DeepSpeed cannot JIT-build its CUDA ops: train.optimizer=torch is needed)"
    if torch.cuda.is_available():
        figures["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        figures["devices"] = [{"index": i, "name": torch.cuda.get_device_name(i),
                               "uuid": str(torch.cuda.get_device_properties(i).uuid),
                               "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
                              for i in range(torch.cuda.device_count())]
        figures["torch_fused_adamw"] = True  # torch's fused AdamW kernels ship with every CUDA build
    try:
        from deepspeed.ops.op_builder import FusedAdamBuilder

        figures["deepspeed_fused_adam_compatible"] = bool(FusedAdamBuilder().is_compatible(verbose=False))
    except Exception as e:  # noqa: BLE001
        figures["deepspeed_fused_adam_compatible"] = f"unknown ({type(e).__name__})"
    from rlhf.tiny_model import build

    info = build(out / "tiny-model", corpus=TASK / "prompts.jsonl")
    figures["tiny_model_parameters"] = info["parameters"]
    (out / "probe.json").write_text(json.dumps(figures, indent=1))
    if torch.version.cuda is None or not torch.cuda.is_available():  # a CPU build of torch, or no driver
        report("failed", f"torch {torch.__version__} sees no CUDA device (torch.version.cuda="
                         f"{torch.version.cuda}): every later stage would fail for this reason", **figures)
        return
    report(**figures)


def prompt_ids(path: Path, n: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    rows = [json.loads(line) for line in (TASK / "prompts.jsonl").read_text().splitlines() if line.strip()][:n]
    return [tok(r["prompt"]).input_ids for r in rows]


def make_llm(path: Path, sleep_mode: bool, utilization: float):
    from vllm import LLM

    from rollout.generator import WORKER_EXTENSION

    return LLM(model=str(path), dtype="bfloat16", enforce_eager=True, max_model_len=512, seed=0,
               gpu_memory_utilization=utilization, enable_sleep_mode=sleep_mode, worker_extension_cls=WORKER_EXTENSION,
               logprobs_mode="processed_logprobs")


def greedy(llm, prompts: list[list[int]], tokens: int = 24) -> list[list[int]]:
    from vllm import SamplingParams

    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0.0, max_tokens=tokens))
    return [list(o.outputs[0].token_ids) for o in outs]


def stage_engine(out: Path) -> None:
    import torch

    path, prompts = model_dir(out), prompt_ids(model_dir(out), 16)
    t0 = time.perf_counter()
    llm = make_llm(path, sleep_mode=True, utilization=0.3)
    startup_s = time.perf_counter() - t0
    llm.collective_rpc("close_weight_sync")  # the worker extension is mixed in (a no-op with no group)
    before = greedy(llm, prompts)
    free_awake = torch.cuda.mem_get_info()[0]
    t0 = time.perf_counter()
    llm.sleep(level=1)
    sleep_s = time.perf_counter() - t0
    free_asleep = torch.cuda.mem_get_info()[0]
    t0 = time.perf_counter()
    llm.wake_up()
    wake_s = time.perf_counter() - t0
    after = greedy(llm, prompts)
    freed = (free_asleep - free_awake) / 2**30
    identical = before == after
    ok = identical and freed > 0.5
    report("ok" if ok else "failed", "" if ok else f"greedy identical after wake: {identical}; sleep freed "
           f"{freed:.2f} GiB", startup_s=round(startup_s, 1), sleep_s=round(sleep_s, 2), wake_s=round(wake_s, 2),
           freed_by_sleep_gib=round(freed, 2), greedy_identical_after_wake=identical,
           greedy_tokens=sum(map(len, before)))


def perturbed_trainer_model(path: Path, device: str):
    """The trainer's side: the HF model in fp32, moved away from the checkpoint the engine loaded (as
    training would), so that a push that did nothing shows as a large log-prob gap."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            # 0.5 std: on the random tiny model (near-uniform outputs) 0.05 moved the log-probs by only 0.036,
            # under the 0.1 the push stages require before a push; 0.5 moves them by 0.44 (HF fp32, measured)
            p.add_(torch.randn(p.shape, generator=g, device=device) * 0.5 * p.std().clamp_min(1e-3))
    return model


def logprob_gap(model, llm, prompts: list[list[int]], tokens: int = 24) -> float:
    """Mean |trainer - engine| log-prob of the tokens the engine sampled (temperature 1)."""
    import torch
    from vllm import SamplingParams

    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=1.0, max_tokens=tokens, logprobs=0, seed=0))
    diffs = []
    device = next(model.parameters()).device
    for prompt, o in zip(prompts, outs):
        ids = list(o.outputs[0].token_ids)
        engine = torch.tensor([step[t].logprob for t, step in zip(ids, o.outputs[0].logprobs)])
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ids], device=device)).logits[0, len(prompt) - 1:-1].float()
        trainer = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids, device=device)[:, None])[:, 0].cpu()
        diffs.append((trainer - engine).abs())
    return torch.cat(diffs).mean().item()


def connect_pair(sender, llm, backend: str, timeout_s: float, bucket_bytes: int) -> None:
    """The project's sender (this process) and the engine's worker extension join one sync group."""
    from weight_sync.group import free_port

    host = "127.0.0.1"
    port = free_port(host)
    errors: list[BaseException] = []
    t = threading.Thread(target=lambda: _catch(errors, sender.connect, backend, (host, port), 2, timeout_s,
                                               bucket_bytes))
    t.start()
    llm.collective_rpc("init_weight_sync", args=(host, port, 2, 1, backend, timeout_s, sender.meta(), bucket_bytes))
    t.join()
    if errors:
        raise errors[0]


def _catch(errors: list, fn, *args):
    try:
        return fn(*args)
    except BaseException as e:  # noqa: BLE001 - re-raised by the caller
        errors.append(e)


def push(sender, llm, version: int, verify: bool = True) -> dict:
    """One push: the sender's thread sends while the engine's workers receive; checksums compared."""
    result: dict = {}
    errors: list[BaseException] = []
    t0 = time.perf_counter()
    t = threading.Thread(target=lambda: result.update(sent=_catch(errors, sender.send, verify)))
    t.start()
    reports = llm.collective_rpc("receive_weights", args=(version, verify))
    t.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise errors[0]
    sent_bytes, sent_sums = result["sent"]
    llm.reset_prefix_cache()
    match = all(list(sums) == list(sent_sums) for _, sums in reports) if verify else None
    return {"seconds": round(seconds, 3), "gb": round(sent_bytes / 1e9, 4),
            "gb_per_s": round(sent_bytes / 1e9 / seconds, 2), "checksums_match": match,
            "served_version": [v for v, _ in reports]}


def stage_ipc_push(out: Path) -> None:
    from weight_sync.sender import WeightSender

    path, prompts = model_dir(out), prompt_ids(model_dir(out), 16)
    model = perturbed_trainer_model(path, "cuda")
    llm = make_llm(path, sleep_mode=False, utilization=0.25)  # its engine core is another process on this GPU
    sender = WeightSender(dict(model.named_parameters()), 0, 0, "bfloat16")
    connect_pair(sender, llm, "ipc", 60.0, 2**20)  # 1 MiB buckets: many buckets, both buffers reused
    gap_before = logprob_gap(model, llm, prompts)
    first = push(sender, llm, 1)
    second = push(sender, llm, 2)  # buffers shared once: the second push maps nothing anew
    gap_after = logprob_gap(model, llm, prompts)
    shared = len(sender.group._shared)
    ok = first["checksums_match"] and second["checksums_match"] and gap_after < 0.1 < gap_before and shared <= 2
    report("ok" if ok else "failed", "" if ok else "checksums, gap or buffer sharing off (see figures)",
           first_push=first, second_push=second, gap_before_push=round(gap_before, 4),
           gap_after_push=round(gap_after, 5), buffers_shared=shared, buckets=len(sender.buckets))


def stage_nccl_push(out: Path) -> None:
    import torch

    from weight_sync.sender import WeightSender

    if torch.cuda.device_count() < 2:
        report("skipped", f"not testable: NCCL needs two GPUs, this machine has {torch.cuda.device_count()}")
        return
    path, prompts = model_dir(out), prompt_ids(model_dir(out), 16)
    torch.cuda.set_device(0)
    model = perturbed_trainer_model(path, "cuda:0")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = "1"  # the engine core process (spawned now) sees GPU 1 only
    try:
        llm = make_llm(path, sleep_mode=False, utilization=0.3)
    finally:
        if visible is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES")
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
    sender = WeightSender(dict(model.named_parameters()), 0, 0, "bfloat16")
    timeout_s = 15.0
    connect_pair(sender, llm, "nccl", timeout_s, 2**22)
    gap_before = logprob_gap(model, llm, prompts)
    first = push(sender, llm, 1)
    gap_after = logprob_gap(model, llm, prompts)
    # Close both ends and rebuild (what a reconnect does): the new group carries a push.
    llm.collective_rpc("close_weight_sync")
    sender.close()
    connect_pair(sender, llm, "nccl", timeout_s, 2**22)
    rebuilt = push(sender, llm, 2)
    # Last (an interrupted reload leaves the engine's layers mid-reload): a sender that never sends. The
    # receiver must fail within the timeout, not hang, and its communicator is aborted.
    t0 = time.perf_counter()
    try:
        llm.collective_rpc("receive_weights", args=(3, False))
        dead_peer = "returned (wrong: nothing was sent)"
    except Exception as e:  # noqa: BLE001
        dead_peer = f"raised {type(e).__name__}"
    dead_peer_s = time.perf_counter() - t0
    sender.close()
    ok = (first["checksums_match"] and rebuilt["checksums_match"] and gap_after < 0.1 < gap_before
          and dead_peer.startswith("raised") and dead_peer_s < timeout_s + 10)
    report("ok" if ok else "failed", "" if ok else "see figures", first_push=first, rebuilt_push=rebuilt,
           gap_before_push=round(gap_before, 4), gap_after_push=round(gap_after, 5), dead_sender=dead_peer,
           dead_sender_failed_after_s=round(dead_peer_s, 1), timeout_s=timeout_s)


def run_overrides(out: Path, name: str, extra: dict, gpu_memory_gb: float) -> list[str]:
    """The tiny GRPO config on the GPU: bf16, 3 steps, ZeRO-2, checksummed pushes, plus the stage's own."""
    items = {"model.path": str(model_dir(out)), "model.dtype": "bfloat16", "data.path": str(TASK / "prompts.jsonl"),
             "reward.functions.0.fn": f"{TASK / 'reward.py'}:charset_reward", "logging.output_dir": str(out / "runs"),
             "logging.wandb": "disabled", "name": name, "eval.every": 0, "checkpoint.save_final": False, "steps": 3,
             "resources.device": "cuda", "weight_sync.verify": True, "rollout.threads": 0, "train.threads": 0,
             "resources.gpu_memory_gb": gpu_memory_gb,
             "train.zero_stage": 2, **extra}
    return [f"{k}={v}" for k, v in items.items()]


def run_stage_figures(summary: dict) -> dict:
    rows = [json.loads(line) for line in open(Path(summary["run_dir"]) / "metrics.jsonl")]
    keep = ("sync/seconds", "sync/gb", "sync/logprob_gap", "timing/step_s", "timing/train_s", "timing/generate_s",
            "kl/ref", "reward/mean")
    return {"steps": summary["steps"], "weight_sync_backend": summary["weight_sync_backend"],
            "wall_s": round(summary["wall_s"], 1),
            "per_step": [{k: round(r[k], 6) for k in keep if k in r} for r in rows]}


def stage_run(out: Path, name: str, extra: dict) -> None:
    import torch

    import rlhf
    from rlhf.config import load_config

    gib = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    cfg = load_config(REPO / "configs" / "grpo_tiny.yaml", run_overrides(out, name, extra, gib))
    summary = rlhf.run(cfg)
    figures = run_stage_figures(summary)
    gaps = [r.get("sync/logprob_gap", float("nan")) for r in figures["per_step"]]
    ok = figures["steps"] == 3 and all(g < cfg.gap_alarm for g in gaps)
    report("ok" if ok else "failed", "" if ok else f"log-prob gaps {gaps} (alarm {cfg.gap_alarm})", **figures)


RUNS = {
    # one GPU: trainer 0.4 + generator 0.4 in one bundle, the reference's 0.1 beside them
    "colocated": {"resources.colocate": True, "resources.trainer_gpus": 0.4, "resources.generator_gpus": 0.4,
                  "resources.reference_gpus": 0.1, "algorithm.kl_coef": 0.01, "rollout.gpu_memory_utilization": 0.2},
    "nccl_run": {"resources.trainer_gpus": 0.5, "resources.generator_gpus": 1, "resources.reference_gpus": 0.5,
                 "algorithm.kl_coef": 0.01, "weight_sync.backend": "nccl", "rollout.gpu_memory_utilization": 0.3},
    "tp2": {"rollout.tensor_parallel_size": 2, "resources.generator_gpus": 1, "resources.trainer_gpus": 1,
            "weight_sync.backend": "nccl", "rollout.gpu_memory_utilization": 0.3},
}


def run_stage_body(name: str, out: Path) -> None:
    if name == "probe":
        return stage_probe(out)
    if name == "engine":
        return stage_engine(out)
    if name == "ipc_push":
        return stage_ipc_push(out)
    if name == "nccl_push":
        return stage_nccl_push(out)
    if name in RUNS:
        return stage_run(out, name, RUNS[name])
    raise SystemExit(f"unknown stage {name!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--only", default="", help="comma-separated stage names (default: all)")
    ap.add_argument("--budget-s", type=float, default=540.0, help="the whole check's time limit")
    ap.add_argument("--gpus", type=int, default=None, help="GPUs to plan for (default: what nvidia-smi/NVML see)")
    ap.add_argument("--stage", default="", help=argparse.SUPPRESS)  # internal: run one stage's body
    args = ap.parse_args(argv)
    out = args.out.resolve()
    if args.stage:
        try:
            run_stage_body(args.stage, out)
        except BaseException as e:
            if RESULT_ENV in os.environ and not Path(os.environ[RESULT_ENV]).exists():
                report("failed", f"{type(e).__name__}: {e}")
            raise
        return 0
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - {s.name for s in STAGES}
    if unknown:
        ap.error(f"unknown stage(s) {sorted(unknown)}; choose from {[s.name for s in STAGES]}")
    stages = [s for s in STAGES if not names or s.name in names]
    sampler, kind = gpu_memory_sampler()
    gpus = args.gpus if args.gpus is not None else count_gpus()
    summary = run_check(stages, out, gpus, args.budget_s, sampler=sampler, sampler_kind=kind)
    failed = [s["name"] for s in summary["stages"] if s["status"] == "failed"]
    print(f"[gpu_check] {out / 'summary.json'}: {len(summary['stages'])} stages in {summary['total_s']:g} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
