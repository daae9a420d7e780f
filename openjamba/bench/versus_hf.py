"""Our generate vs transformers' generate on the same Jamba config (random weights, greedy, fixed length).

transformers' JambaForCausalLM runs its default path (without the mamba-ssm / causal-conv1d packages: the
PyTorch fallback). Both models get the same weights when the state dicts line up (transformers v5 keeps the
experts in the same fused layout as openjamba), so the greedy tokens are compared too. Measured end to end
(prefill + all new tokens), after one warm-up call each, at each batch size.
"""

from __future__ import annotations

import time

import torch

from ..inference import generate as fast_generate
from .common import Deadline, build_model, free_memory, oom_as_status, sync, write_json


def _hf_model(config, device, dtype):
    import transformers

    fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures")}
    hf_cfg = transformers.JambaConfig(**fields, use_mamba_kernels=False)
    with torch.device(device):
        model = transformers.JambaForCausalLM(hf_cfg)
    return model.to(dtype).eval()


def _timed(fn, device, repeats: int = 1):
    fn()  # warm-up (and CUDA graph capture for ours)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats, out


def run_versus_hf(config, prompt_len: int = 512, new_tokens: int = 128, batches=(1, 16), dtype=torch.bfloat16,
                  device=None, mode: str = "auto", max_seconds: float | None = None, out_dir="benchmarks/results",
                  name: str = "versus_transformers", step: str = "auto") -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    deadline = Deadline(max_seconds)
    import transformers

    ours = build_model(config, device, dtype)
    hf = _hf_model(config, device, dtype)
    try:
        missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
        same_weights = not missing and not unexpected
    except RuntimeError:
        same_weights = False
    points = []
    for B in batches:
        point = dict(batch=B, prompt=prompt_len, new_tokens=new_tokens)
        if deadline.expired():
            points.append(dict(point, status="skipped: --max-seconds reached"))
            continue
        ids = torch.randint(0, config.vocab_size, (B, prompt_len), device=device)
        with oom_as_status(point):
            t_ours, out_ours = _timed(lambda: fast_generate(ours, ids, max_new_tokens=new_tokens, temperature=0,
                                                            mode=mode, step=step), device)
            point.update(ours_s=t_ours, ours_tokens_per_s=B * new_tokens / t_ours)
            if not deadline.expired():
                mask = torch.ones_like(ids)
                t_hf, out_hf = _timed(lambda: hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                                                          min_new_tokens=new_tokens, do_sample=False,
                                                          pad_token_id=0), device)
                point.update(hf_s=t_hf, hf_tokens_per_s=B * new_tokens / t_hf, speedup=t_hf / t_ours)
                if same_weights:
                    agree = (out_ours[:, prompt_len:] == out_hf[:, prompt_len:]).float()
                    point["token_agreement"] = float(agree.mean())
                    # bf16 rounding differs between implementations; greedy paths can part after a near-tie.
                    point["first_token_agreement"] = float(agree[:, 0].mean())
            else:
                point["hf"] = "skipped: --max-seconds reached"
            point["status"] = "ok"
        free_memory(device)
        points.append(point)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in point.items()}, flush=True)
    result = dict(benchmark="openjamba generate vs transformers generate", transformers=transformers.__version__,
                  dtype=str(dtype), device=str(device), step=step, same_weights=same_weights, config=config.to_dict(),
                  points=points, elapsed_s=deadline.elapsed)
    write_json(out_dir, name, result)
    plot_versus(result, out_dir, name)
    return result


def plot_versus(result: dict, out_dir, name: str) -> None:
    from .common import pyplot

    plt = pyplot()
    pts = [p for p in result["points"] if p.get("status") == "ok" and "hf_tokens_per_s" in p]
    if plt is None or not pts:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = range(len(pts))
    ax.bar([x - 0.2 for x in xs], [p["ours_tokens_per_s"] for p in pts], 0.4, label="openjamba")
    ax.bar([x + 0.2 for x in xs], [p["hf_tokens_per_s"] for p in pts], 0.4, label="transformers")
    ax.set_xticks(list(xs), [f"batch {p['batch']}" for p in pts])
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s (prompt %d, %d new)" % (pts[0]["prompt"], pts[0]["new_tokens"]))
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(f"{out_dir}/{name}.png", dpi=120)
    plt.close(fig)
