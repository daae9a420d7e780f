"""Training metrics: FLOP accounting / MFU, router load and activation probes, JSONL + TensorBoard sinks."""

from __future__ import annotations

import json
import os
import sys

import torch
from torch import nn

from ..config import JambaConfig

H200_BF16_PEAK = 989e12  # dense bf16 tensor-core peak (datasheet)
H200_BF16_MEASURED = 792e12  # bf16 8192^3 matmul measured on an H200


def flops_per_token(config: JambaConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active parameters (forward 2, backward 4) plus the attention
    score/value matmuls, 12 x attention layers x hidden x seq_len (the PaLM convention, counting the full
    T x T product). The selective scan's elementwise work is not counted."""
    n_attn = len(config.attention_layer_ids)
    return 6.0 * config.param_counts()["active"] + 12.0 * n_attn * config.hidden_size * seq_len


def mfu(tokens_per_s: float, config: JambaConfig, seq_len: int, peak: float = H200_BF16_PEAK) -> float:
    return tokens_per_s * flops_per_token(config, seq_len) / peak


class Probes:
    """Forward hooks on the decoder layers that accumulate, without any host sync, over training-mode
    forwards: per MoE layer, how many top-k assignments each expert received (from the router ids the
    layer returns); over all layers, the largest |activation| in the residual stream. `read()` syncs once
    and resets.

    Create it after `parallelize`: the hooks then sit on the outermost layer modules, whose forward runs
    once per micro-batch. Activation checkpointing runs the inner layer's forward a second time during the
    backward, so hooks on it would count every token twice. Eval-mode forwards (validation) are skipped.
    """

    def __init__(self, model: nn.Module):
        # Accumulators are created by the first training forward and then only updated in place, so a
        # step captured in a CUDA graph keeps updating them when it is replayed (hooks do not run then).
        self.counts: dict[int, torch.Tensor] = {}
        self.max_act: torch.Tensor | None = None
        layers = getattr(getattr(model, "model", None), "layers", None)
        self.handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(layers or [])]

    def _hook(self, i: int):
        def hook(module, inputs, output):
            if not module.training:
                return
            # a decoder layer returns (hidden states, (router probs (BT, X), top-k ids (BT, K)) or None)
            h, stats = output if isinstance(output, tuple) else (output, None)
            m = h.detach().abs().amax().float()
            if self.max_act is None:
                self.max_act = torch.zeros((), device=m.device, dtype=torch.float32)
            torch.maximum(self.max_act, m, out=self.max_act)
            if stats is not None:
                probs, idx = stats
                idx = idx.detach().reshape(-1)
                if i not in self.counts:
                    self.counts[i] = torch.zeros(probs.shape[-1], device=idx.device, dtype=torch.float32)
                # scatter_add keeps a static shape (bincount's would depend on the data), compile-friendly.
                self.counts[i].scatter_add_(0, idx, torch.ones_like(idx, dtype=torch.float32))
        return hook

    def read(self) -> dict[str, float]:
        """expert_load_max / expert_load_min: the largest and smallest fraction of assignments any expert got
        in any MoE layer (uniform = 1 / num_experts); max_activation: largest |h| since the last read.
        Empty before the first training forward."""
        out = {}
        if self.counts:
            fractions = torch.stack([c / c.sum().clamp(min=1) for c in self.counts.values()])
            out["expert_load_max"] = float(fractions.max())
            out["expert_load_min"] = float(fractions.min())
            for c in self.counts.values():
                c.zero_()
        if self.max_act is not None:
            out["max_activation"] = float(self.max_act)
            self.max_act.zero_()
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class MetricsLogger:
    """Appends one JSON object per line to <out_dir>/metrics.jsonl, mirrored to TensorBoard when enabled
    and the `tensorboard` package (the `train` extra) is importable. Only the main rank writes."""

    def __init__(self, out_dir: str, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.file = None
        self.tb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.file = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional (the `train` extra); JSONL is always written
                print(f"tensorboard is not installed: metrics go to {self.path} only (install openjamba[train] "
                      "for TensorBoard logs, or set log.tensorboard = false)", file=sys.stderr)
            else:
                self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(f"{record.get('split', 'train')}/{key}", value, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl file (a run resumed after a crash may repeat steps: the later
    record of a step wins when the caller keys them by step)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
