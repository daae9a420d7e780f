"""The training loop: plain functions around one `train(cfg)` entry point.

One optimizer step = `grad_accum` micro-batches of (batch_size, seq_len + 1) packed tokens per rank:
forward + backward each (loss / grad_accum), measure (and clip) the gradient norm, check that loss and norm
are finite (stop or skip, never continue silently), set the scheduled learning rate, step AdamW.
Parallelism (FSDP2, expert parallel), activation checkpointing and torch.compile are applied from outside
by openjamba.train.distributed.parallelize; the model code stays single-device.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time

import numpy as np
import torch

from .. import ops
from ..config import JambaConfig
from ..model import JambaForCausalLM
from . import checkpointing as ckpt
from .config import TrainConfig, to_toml
from .data import PackedLoader, read_index
from . import distributed
from .distributed import DistInfo
from .metrics import MetricsLogger, Probes, mfu
from .optim import ClippedAdamW, build_optimizer, guards_on_device, lr_at, optimizer_kind, set_lr
from .tokenizer import load_tokenizer, special_token_ids


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient norm and the policy says stop."""


# ---------------------------------------------------------------------------------------------- setup
def init_dist(cfg: TrainConfig):
    """DistInfo from torchrun's environment (WORLD_SIZE > 1), else a world of one on cfg.train.device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        kind = None if cfg.train.device == "auto" else torch.device(cfg.train.device).type
        return distributed.init_distributed(kind)
    name = cfg.train.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"train.device={name!r} but no CUDA device is available")
        if device.index is None:  # "cuda" means the current device; set_device needs an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return DistInfo(device=device)


def precision_of(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.train.precision == "auto":
        return "autocast" if device.type == "cuda" else "fp32"
    return cfg.train.precision


def autocast_ctx(precision: str, device: torch.device):
    if precision == "autocast":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(cfg: TrainConfig, vocab_size: int, special: dict) -> JambaForCausalLM:
    """The model of [model], on the CPU in fp32: a preset with overrides, or `init_from` an HF directory."""
    if cfg.model.init_from:
        return JambaForCausalLM.from_pretrained(cfg.model.init_from)
    fields = {"vocab_size": vocab_size, **{k: v for k, v in special.items() if v is not None}}
    fields.update(cfg.model.overrides)
    config = JambaConfig.from_name(cfg.model.preset, **fields)
    if config.vocab_size < vocab_size:
        raise ValueError(f"model vocab_size {config.vocab_size} is smaller than the tokenizer's {vocab_size}")
    return JambaForCausalLM(config)


def needs_parallelize(cfg: TrainConfig, dist) -> bool:
    return dist.world_size > 1 or cfg.train.activation_checkpointing or cfg.train.compile


def param_dtype_of(precision: str) -> torch.dtype | None:
    """The dtype FSDP2 gathers parameters in: bf16 for "autocast" (fp32 master weights, bf16 compute) and
    "bf16"; None (the parameters' own dtype) for "fp32". Gradients are reduced in fp32 when it is set."""
    return torch.bfloat16 if precision in ("autocast", "bf16") else None


def prepare_model(model, cfg: TrainConfig, dist, precision: str):
    """Move to the device (bf16 weights for precision "bf16"), then apply AC / compile / EP / FSDP2."""
    model = model.to(dist.device)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    if needs_parallelize(cfg, dist):
        model = distributed.parallelize(
            model, dist, fsdp=cfg.train.fsdp and dist.world_size > 1, expert_parallel=cfg.train.expert_parallel,
            activation_checkpointing=cfg.train.activation_checkpointing, compile=cfg.train.compile,
            param_dtype=param_dtype_of(precision))
    return model


# ---------------------------------------------------------------------------------------------- steps
def lm_loss(model, batch: torch.Tensor, router_aux_coef: float, activation_loss_coef: float):
    """(total loss, cross-entropy) for a (B, T + 1) batch: inputs batch[:, :-1], targets batch[:, 1:]."""
    out = model(batch[:, :-1], activation_loss_coef=activation_loss_coef)
    logits = out.logits
    # fused on CUDA (no fp32 copy of the logits, no log-softmax tensor); F.cross_entropy on logits.float() elsewhere
    ce = ops.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    loss = ce
    if out.aux_loss is not None and router_aux_coef:
        loss = loss + router_aux_coef * out.aux_loss
    if out.activation_loss is not None and activation_loss_coef:
        loss = loss + activation_loss_coef * out.activation_loss
    return loss, ce


def forward_backward(model, batches: list[torch.Tensor], config: JambaConfig, cfg: TrainConfig,
                     precision: str, device: torch.device) -> torch.Tensor:
    """Accumulate gradients over the micro-batches; returns the mean cross-entropy (a device scalar)."""
    n = len(batches)
    total_ce = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        batch = batch.to(device, non_blocking=True)
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: reduce gradients on the last micro-batch only
            model.set_requires_gradient_sync(i == n - 1)
        with autocast_ctx(precision, device):
            loss, ce = lm_loss(model, batch, config.router_aux_loss_coef, cfg.train.activation_loss_coef)
        (loss / n).backward()
        total_ce += ce.detach() / n
    return total_ce


def grad_norm_and_clip(model, max_norm: float, dist, clip: bool = True) -> torch.Tensor:
    """The global gradient norm (before clipping; clipped to max_norm when > 0 and `clip`), as a device
    scalar. clip=False measures only: the optimizer applies the clipping (ClippedAdamW)."""
    limit = max_norm if max_norm > 0 else float("inf")
    if dist.world_size > 1:  # sharded / expert-parallel gradients live on several meshes
        return distributed.clip_grad_norm_(model, limit, dist)
    params = [p for p in model.parameters() if p.grad is not None]
    if not clip:
        return torch.nn.utils.get_total_norm([p.grad for p in params])
    return torch.nn.utils.clip_grad_norm_(params, limit)


def non_finite(check: torch.Tensor) -> torch.Tensor:
    """found_inf for a stack(loss, grad norm): 1.0 on the device when either is not finite, else 0.0."""
    return (~torch.isfinite(check).all()).float()


def loss_and_norm(model, batches: list[torch.Tensor], config: JambaConfig, cfg: TrainConfig, precision: str,
                  dist, clip: bool = True) -> torch.Tensor:
    """forward_backward then grad_norm_and_clip: stack(mean cross-entropy, gradient norm) on the device."""
    loss = forward_backward(model, batches, config, cfg, precision, dist.device)
    norm = grad_norm_and_clip(model, cfg.optim.grad_clip, dist, clip)
    return torch.stack([loss.float(), norm.float().to(loss.device)])


class GraphedStep:
    """forward_backward + grad_norm_and_clip captured once as a CUDA graph and replayed every step.

    Each replay runs the ~2000 kernels of a step without the Python and launch cost of issuing them;
    the inputs are copied into static device buffers first, and the gradients, loss and norm live at
    fixed addresses in the graph's memory pool. The gradients are overwritten (not accumulated) by each
    replay, because they are None when the step is captured, so they must never be set to None
    afterwards.

    Given a ClippedAdamW (`optimizer`), its update is captured as a second graph replayed right after the
    first: it skips itself on the device when the loss or the norm is not finite, and reads the learning
    rate from a device tensor staged before each replay, so the host issues nothing else per step.
    Otherwise the optimizer step stays outside the graphs (StepRunner applies or skips it per the NaN
    policy).
    """

    def __init__(self, model, config: JambaConfig, cfg: TrainConfig, precision: str, dist, clip: bool = True,
                 optimizer: ClippedAdamW | None = None):
        if dist.device.type != "cuda":
            raise ValueError("train.cuda_graph needs a CUDA device")
        if dist.world_size > 1:
            raise ValueError("train.cuda_graph is for single-GPU runs (FSDP2 and expert parallelism "
                             "communicate with the host in every step)")
        if precision == "fp32" and config.num_experts > 1:
            raise ValueError("train.cuda_graph with MoE layers needs train.precision \"bf16\" or \"autocast\": "
                             "in fp32 the experts run a per-expert loop that reads the routing on the host")
        self.model, self.config, self.cfg, self.precision, self.dist = model, config, cfg, precision, dist
        self.clip, self.optimizer = clip, optimizer
        self.graph = self.update_graph = None
        self.static: list[torch.Tensor] = []
        self.check = None
        self.side = torch.cuda.Stream(dist.device)

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def eager(self, batches: list[torch.Tensor]) -> torch.Tensor:
        """One uncaptured step (a warm-up before the capture), on a side stream as CUDA graphs require;
        returns stack(loss, grad norm)."""
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            check = loss_and_norm(self.model, batches, self.config, self.cfg, self.precision, self.dist, self.clip)
        torch.cuda.current_stream().wait_stream(self.side)
        return check

    def capture(self, batches: list[torch.Tensor]) -> None:
        for p in self.model.parameters():
            p.grad = None
        self.static = [b.to(self.dist.device) for b in batches]
        torch.cuda.synchronize(self.dist.device)
        torch.cuda.empty_cache()  # the warm-up steps' cached blocks would sit beside the graph's own pool
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.check = loss_and_norm(self.model, self.static, self.config, self.cfg, self.precision, self.dist,
                                       self.clip)
        if self.optimizer is not None:
            self._capture_update()

    def _capture_update(self) -> None:
        opt, max_norm = self.optimizer, self.cfg.optim.grad_clip
        opt.keep_lr_on_device(self.dist.device)  # the eager warm-up steps before used the host's floats
        # First a skipped update (found_inf = 1), uncaptured: it builds the kernel's address tables for
        # the gradients the graph owns (a table upload inside a capture would be replayed from a host
        # buffer) and compiles the kernel; no parameter, moment or step changes
        opt.found_inf = torch.ones((), device=self.dist.device)
        opt.clip_with(self.check[1], max_norm)
        opt.step()
        torch.cuda.synchronize(self.dist.device)
        self.update_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.update_graph, pool=self.graph.pool()):  # replayed after self.graph
            opt.found_inf = non_finite(self.check)
            opt.clip_with(self.check[1], max_norm)
            opt.step()

    def replay(self, batches: list[torch.Tensor], lr: float) -> torch.Tensor:
        """Replay the step (and the update, when captured, at learning rate `lr`); returns
        stack(loss, grad norm)."""
        for dst, src in zip(self.static, batches):
            dst.copy_(src, non_blocking=True)
        if self.update_graph is not None:
            set_lr(self.optimizer, lr)
            self.optimizer.stage_lr()
        self.graph.replay()
        if self.update_graph is not None:
            self.update_graph.replay()
        return self.check


# eager steps before a training step is captured as a CUDA graph (compilation, allocator and autotuning
# warm-up happen in them; they are ordinary training steps)
GRAPH_WARMUP_STEPS = 2


class StepRunner:
    """One optimizer step as `openjamba train` runs it: forward + backward over the micro-batches,
    gradient-norm clipping, then the AdamW update unless the loss or the norm is not finite.

    Where the optimizer can skip an update on the device (fused or Triton AdamW, one process on CUDA:
    their `found_inf` input), the update is launched at once, guarded, and the loss and norm travel to
    the host in the background ("deferred"): the host reads them one step later, so it never waits for
    the GPU to drain and keeps the next step's kernels queued. Elsewhere the host reads them first
    and applies or skips the update itself. Either way a non-finite step changes no weights. With
    ClippedAdamW the step only measures the gradient norm and the optimizer clips as it updates.
    """

    def __init__(self, model, optimizer, config: JambaConfig, cfg: TrainConfig, precision: str, dist):
        self.model, self.optimizer, self.config, self.cfg, self.precision, self.dist = (
            model, optimizer, config, cfg, precision, dist)
        self.fold_clip = isinstance(optimizer, ClippedAdamW) and dist.world_size == 1
        self.deferred = dist.device.type == "cuda" and dist.world_size == 1 and guards_on_device(optimizer)
        self.graphed = (GraphedStep(model, config, cfg, precision, dist, clip=not self.fold_clip,
                                    optimizer=optimizer if self.fold_clip and self.deferred else None)
                        if cfg.train.cuda_graph else None)
        self.eager_steps = 0

    def _forward_backward(self, batches: list[torch.Tensor], lr: float) -> tuple[torch.Tensor, bool]:
        """stack(loss, grad norm) on the device, and whether the update was applied too (a replayed graph
        that holds it)."""
        g = self.graphed
        if g is not None:
            if self.eager_steps < GRAPH_WARMUP_STEPS:
                self.eager_steps += 1
                return g.eager(batches), False
            if not g.captured:
                g.capture(batches)
            return g.replay(batches, lr), g.update_graph is not None
        check = loss_and_norm(self.model, batches, self.config, self.cfg, self.precision, self.dist,
                              not self.fold_clip)
        if self.dist.world_size > 1:
            check = distributed.all_reduce_mean(check, self.dist)
        return check, False

    def _drop_grads(self) -> None:
        if self.graphed is None or not self.graphed.captured:  # a replay overwrites the captured gradients
            self.optimizer.zero_grad(set_to_none=True)

    def _update(self, lr: float, check: torch.Tensor) -> None:
        set_lr(self.optimizer, lr)
        if self.fold_clip:
            self.optimizer.clip_with(check[1], self.cfg.optim.grad_clip)
        self.optimizer.step()
        self._drop_grads()

    def launch(self, batches: list[torch.Tensor], lr: float) -> dict:
        """Queue one step; `finish` it (now or, when deferred, after launching the next)."""
        check, updated = self._forward_backward(batches, lr)
        if not self.deferred:
            return {"check": check, "lr": lr}
        if not updated:
            self.optimizer.found_inf = non_finite(check)
            self._update(lr, check)
        host = torch.empty(2, dtype=torch.float32, pin_memory=True)
        host.copy_(check, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return {"host": host, "done": done, "lr": lr}

    def finish(self, launched: dict) -> tuple[float, float, bool]:
        """(loss, grad norm, whether the update was applied) of a launched step."""
        if "done" in launched:
            launched["done"].synchronize()
            loss_v, norm_v = launched["host"].tolist()
            return loss_v, norm_v, math.isfinite(loss_v) and math.isfinite(norm_v)
        loss_v, norm_v = launched["check"].tolist()  # the step's one host sync
        finite = math.isfinite(loss_v) and math.isfinite(norm_v)
        if finite:
            self._update(launched["lr"], launched["check"])
        else:
            self._drop_grads()
        return loss_v, norm_v, finite


@torch.no_grad()
def evaluate(model, cfg: TrainConfig, val_dir: str, dist, config: JambaConfig, precision: str) -> float:
    """Mean cross-entropy over the first `eval.steps` batches of the validation split (same batches every
    time, so values are comparable across the run)."""
    loader = PackedLoader(val_dir, "val", cfg.data.seq_len, cfg.data.batch_size, rank=dist.rank,
                          world_size=dist.world_size, seed=cfg.train.seed, shuffle=False)
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=dist.device)
    for _ in range(cfg.eval.steps):
        with autocast_ctx(precision, dist.device):
            _, ce = lm_loss(model, loader.next_batch().to(dist.device), 0.0, 0.0)
        total += ce.float()
    total /= cfg.eval.steps
    if dist.world_size > 1:
        total = distributed.all_reduce_mean(total, dist)
    model.train(was_training)
    return float(total)


# ---------------------------------------------------------------------------------------------- export
def export_hf(model, config: JambaConfig, tokenizer_path: str | None, out_dir: str, dist=None):
    """Write the model in the HF directory format (config.json, safetensors, tokenizer.json).

    Returns the plain single-device model that was saved (on the main rank; None elsewhere)."""
    if dist is not None and dist.world_size > 1:
        state = distributed.full_model_state_dict(model, dist)
        if not dist.is_main:
            return None
        state = {ckpt.clean_name(k): v for k, v in state.items()}
    else:
        state = ckpt.model_state_dict(model)
    plain = JambaForCausalLM(config)
    plain.to(next(iter(state.values())).dtype)
    ckpt.load_model_state(plain, state)
    if tokenizer_path:
        plain.tokenizer = load_tokenizer(tokenizer_path)
    plain.save_pretrained(out_dir)
    return plain


def sample_text(model, tokenizer_path: str, prompt: str, max_new_tokens: int, seed: int = 0) -> str:
    """A sampled continuation of `prompt` (temperature 0.8), decoded to text."""
    tok = load_tokenizer(tokenizer_path)
    ids = tok.encode(prompt).ids or [model.config.bos_token_id or 0]
    model.eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids], device=model.device), max_new_tokens=max_new_tokens,
                             temperature=0.8, top_k=min(50, model.config.vocab_size), seed=seed)
    return tok.decode(out[0].tolist())


# ---------------------------------------------------------------------------------------------- loop
def train(cfg: TrainConfig, resume: bool = False, model: JambaForCausalLM | None = None) -> dict:
    """Train as `cfg` says; returns a summary (steps, losses, paths). `model` replaces the built one."""
    if not cfg.train.deterministic:
        return _train(cfg, resume, model)
    with deterministic_algorithms():
        return _train(cfg, resume, model)


@contextlib.contextmanager
def deterministic_algorithms():
    """torch's deterministic algorithms, strict, for the block (train.deterministic); the previous setting
    after it (it is process-global), and CUBLAS_WORKSPACE_CONFIG set for the block where it was not set.
    Strict, not warn-only: in warn-only mode torch keeps (and warns about) non-deterministic algorithms,
    attention's backward among them; strict mode takes SDPA's deterministic backward paths and makes an op
    that has none an error, which names it."""
    prev = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if workspace is None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # cuBLAS's condition for reproducibility
    torch.use_deterministic_algorithms(True)
    try:
        yield
    except RuntimeError as e:
        if "does not have a deterministic implementation" in str(e):
            raise RuntimeError(f"train.deterministic is set, and an operation of this run has no deterministic "
                               f"implementation in torch: {str(e).splitlines()[0]}") from e
        raise
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def _train(cfg: TrainConfig, resume: bool, model: JambaForCausalLM | None) -> dict:
    cfg.validate()
    dist = init_dist(cfg)
    out_dir = cfg.train.out_dir
    if not cfg.data.train:
        raise ValueError("data.train is not set: point it at a directory made by `openjamba data prepare`")
    tokenizer_path = cfg.data.tokenizer or os.path.join(cfg.data.train, "tokenizer.json")
    index = read_index(cfg.data.train)
    special = special_token_ids(load_tokenizer(tokenizer_path))
    seed_everything(cfg.train.seed)
    model = model if model is not None else build_model(cfg, index["vocab_size"], special)
    config = model.config
    precision = precision_of(cfg, dist.device)
    model = prepare_model(model, cfg, dist, precision)
    probes = Probes(model)  # after any wrapping: hooks on the outermost layers see each forward once
    model.train()
    optimizer = build_optimizer(model, cfg.optim, dist.device, dist.world_size)
    loader = PackedLoader(cfg.data.train, "train", cfg.data.seq_len, cfg.data.batch_size, rank=dist.rank,
                          world_size=dist.world_size, seed=cfg.train.seed, shuffle=cfg.data.shuffle)
    val_dir = cfg.data.val or cfg.data.train
    val_tokens = read_index(val_dir)["splits"].get("val", {}).get("tokens", 0)
    has_val = (val_tokens - 1) // cfg.data.seq_len >= cfg.data.batch_size * dist.world_size  # one global batch
    if not has_val and dist.is_main:
        print(f"the val split of {val_dir} holds less than one batch: no validation", file=sys.stderr)
    manager = ckpt.CheckpointManager(out_dir, cfg.checkpoint.keep_last)
    if dist.is_main:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "train_config.toml"), "w") as f:  # the run file as resolved
            f.write(to_toml(cfg))
        if os.path.exists(tokenizer_path):
            import shutil

            shutil.copyfile(tokenizer_path, os.path.join(out_dir, "tokenizer.json"))

    step, tokens, skipped_total = 0, 0, 0
    latest = manager.latest() if resume else None
    if resume and latest is None and dist.is_main:
        print(f"no checkpoint under {manager.root}: starting from scratch", file=sys.stderr)
    if latest is not None:
        state = ckpt.load_checkpoint(latest, model, optimizer, dist)
        step, tokens, skipped_total = state["step"], state["tokens"], state.get("skipped", 0)
        loader.load_state_dict(state["data"])
        if dist.is_main:
            print(f"resumed from {latest} at step {step}", file=sys.stderr)

    logger = MetricsLogger(out_dir, enabled=dist.is_main, tensorboard=cfg.log.tensorboard)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * cfg.data.grad_accum * dist.world_size
    bar = None
    if dist.is_main and cfg.log.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.max_steps, initial=step, desc="training", unit="step", dynamic_ncols=True)
    if dist.is_main:
        counts = config.param_counts()
        print(f"model: {counts['total'] / 1e6:.2f}M parameters ({counts['active'] / 1e6:.2f}M active), "
              f"{config.num_hidden_layers} layers; {dist.world_size} x {dist.device.type}, {precision}; "
              f"{tokens_per_step} tokens/step; AdamW {optimizer_kind(optimizer)}", file=sys.stderr)

    def save(at_step: int) -> None:
        state = {"step": at_step, "tokens": tokens, "skipped": skipped_total, "data": loader.state_dict(),
                 "config": cfg.to_dict(), "model_config": config.to_dict()}
        ckpt.save_checkpoint(manager, at_step, model, optimizer, state, tokenizer_path, dist)

    start_time = time.perf_counter()
    window_time, window_steps = time.perf_counter(), 0
    first_loss = last_loss = None
    val_losses = []
    consecutive_skips = 0
    stop_reason = "max_steps" if step < cfg.train.max_steps else "already at max_steps"
    runner = StepRunner(model, optimizer, config, cfg, precision, dist)
    pending = None  # a launched step whose loss has not been read yet (deferred mode)
    loss_v = norm_v = lr = float("nan")

    def settle(launched: dict) -> None:
        """Read a launched step's loss; apply the NaN policy (its update was applied only if finite)."""
        nonlocal consecutive_skips, skipped_total, first_loss, last_loss, loss_v, norm_v, lr
        loss_v, norm_v, applied = runner.finish(launched)
        lr = launched["lr"]
        if not applied:
            message = f"non-finite loss at step {launched['step']}: loss={loss_v}, grad_norm={norm_v}"
            if cfg.train.nan_policy == "stop" or consecutive_skips + 1 > cfg.train.nan_max_skips:
                raise NonFiniteLossError(
                    f"{message}; stopping. The last checkpoint is intact ({manager.latest()}); lower optim.lr, "
                    "or set train.nan_policy=\"skip\" to skip such updates.")
            consecutive_skips += 1
            skipped_total += 1
            if dist.is_main:
                print(f"warning: {message}; update skipped ({consecutive_skips} in a row)", file=sys.stderr)
        else:
            consecutive_skips = 0
            first_loss = loss_v if first_loss is None else first_loss
            last_loss = loss_v
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_v:.4f}", lr=f"{lr:.2e}")

    try:
        while step < cfg.train.max_steps:
            batches = [loader.next_batch() for _ in range(cfg.data.grad_accum)]
            if dist.device.type == "cuda":
                batches = [b.pin_memory() for b in batches]  # copied to the GPU without a host wait
            launched = runner.launch(batches,
                                     lr_at(step, cfg.optim.lr, cfg.optim.warmup_steps, cfg.train.max_steps,
                                           cfg.optim.min_lr_ratio))
            launched["step"] = step + 1
            if pending is not None:  # the previous step, read while this one runs
                settle(pending)
            pending = launched
            step += 1
            tokens += tokens_per_step
            window_steps += 1

            last = step == cfg.train.max_steps
            out_of_time = cfg.train.max_seconds > 0 and time.perf_counter() - start_time > cfg.train.max_seconds
            if cfg.train.max_seconds > 0 and dist.world_size > 1:  # every rank must stop at the same step
                flag = torch.tensor([float(out_of_time)], device=dist.device)
                out_of_time = float(distributed.all_reduce_mean(flag, dist)) > 0
            if out_of_time:
                stop_reason, last = "max_seconds", True
            log_now = step % cfg.log.interval == 0 or last
            eval_now = has_val and ((cfg.eval.interval and step % cfg.eval.interval == 0) or last)
            save_now = (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0) or last
            if not runner.deferred or log_now or eval_now or save_now:
                settle(pending)  # this step's outcome is needed (or there is nothing to overlap)
                pending = None
            if log_now:
                elapsed = time.perf_counter() - window_time
                tps = window_steps * tokens_per_step / max(elapsed, 1e-9)
                record = {"step": step, "split": "train", "loss": loss_v, "lr": lr, "grad_norm": norm_v,
                          "tokens": tokens, "tokens_per_s": tps, "skipped": skipped_total,
                          "elapsed_s": time.perf_counter() - start_time, **probes.read()}
                if dist.device.type == "cuda":
                    record["mfu"] = mfu(tps / dist.world_size, config, cfg.data.seq_len)
                    record["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
                logger.log(record)
                window_time, window_steps = time.perf_counter(), 0

            paused = time.perf_counter()  # validation and checkpoint time is kept out of tokens/s
            if eval_now:
                val = evaluate(model, cfg, val_dir, dist, config, precision)
                val_losses.append((step, val))
                logger.log({"step": step, "split": "val", "loss": val, "tokens": tokens})
                if bar is not None:
                    bar.write(f"step {step}: val loss {val:.4f}")
            if save_now:
                save(step)
            window_time += time.perf_counter() - paused
            if last:
                break
    finally:
        if bar is not None:
            bar.close()
        logger.close()
        probes.remove()

    summary = {"steps": step, "tokens": tokens, "first_loss": first_loss, "last_loss": last_loss,
               "val_losses": val_losses, "stop_reason": stop_reason, "skipped": skipped_total,
               "seconds": time.perf_counter() - start_time, "checkpoint": manager.latest() if dist.is_main else None}
    if cfg.train.export:
        hf_dir = os.path.join(out_dir, "hf")
        plain = export_hf(model, config, tokenizer_path, hf_dir, dist)
        if plain is not None:
            summary["hf_dir"] = hf_dir
            if cfg.train.sample_prompt and cfg.train.sample_tokens:
                summary["sample"] = sample_text(plain.to(dist.device), tokenizer_path, cfg.train.sample_prompt,
                                                cfg.train.sample_tokens, seed=cfg.train.seed)
    if dist.is_main:
        ckpt.write_json_atomic(os.path.join(out_dir, "summary.json"), summary)
    if dist.world_size > 1:
        del model, optimizer  # they hold the process group (see distributed.cleanup)
        distributed.cleanup(dist)
    return summary
