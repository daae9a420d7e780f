"""The fused one-token decoding step: the static step (inference/step.py) in a few kernels per layer.

`FusedDecodeStep(model, batch_size)` is called like `decode_step(model, token_ids, cache, moe_impl)` and
gives the same results (the same maths, rounded at the same places except the RMSNorm's row scale,
applied after the matmul it feeds; tests compare the two), but the eager step launches ~75 kernels per
layer at batch 1 (each RMSNorm alone is seven), which at small batch costs more than reading the
weights. Per layer it runs:

    Mamba       mamba_in (norm, in_proj, conv, x_proj partials) -> mamba_ssm (dt/B/C norms, dt_proj, state
                update, gate) -> down_residual (out_proj + residual)
    attention   qkv (norm, q/k/v projections, K/V written at the position) -> attn_split + attn_combine
                (split-K flash-decoding over the filled positions) -> down_residual (o_proj + residual)
    MoE / MLP   router (MoE only: norm, router, softmax, top-k) -> ffn_up (norm, gate/up of the routed
                experts) -> down_residual (down, weighted sum, residual)

plus the embedding gather and norm_linear for the lm_head: 5 kernels for a Mamba layer with a dense MLP,
6 with MoE, 6 or 7 for an attention layer. Kernels are in inference/fused_kernels.py. Greedy decoding
(`start_greedy`, then `greedy_token` per token) ends each step in next_token_kernel instead: the argmax, the next
token's embedding as the next step's input, the position and the accumulators' reset, so consecutive tokens run
as one chain of kernels (the Generator's blocks of greedy tokens, inference/engine.py).
A program takes up to ROW_BLOCK rows; larger batches (up to MAX_BATCH) run as row blocks. The step is
shape-static and reads nothing back to the host, so a CUDA graph captures it. It needs Triton on CUDA (or
the CPU interpreter, TRITON_INTERPRET=1, for tests).
On GPUs of compute capability 9 and above (H100, H200, B200) the kernels are launched with programmatic
dependent launch (`pdl`, by default at batch 1): each starts streaming its weights while the previous
kernel finishes (see fused_kernels.py).
One row of a bf16 model (`pack`, by default where it can run): the GEMVs read weights as int32 words of two bf16
and widen each half with one shift or one mask, the products in the weight tile's own register layout; the
element form converts each bf16 alone and moves the weight tile through shared memory into the layout of its
products (fused_kernels.py, _halves).

Split layers (one row; `split`): a layer's last projection split over the programs of the kernel before it,
each adding its share of the output to an fp32 accumulator by atomic adds, so one kernel boundary goes. By
default the Mamba mixer runs as mamba_in -> mamba_ssm + out_proj (one kernel fewer); the MLP and MoE can run
as one kernel each (gate/up and down, the MoE routing computed by every program), measured slower on an H200
and so off by default (benchmarks/KERNEL_NOTES.md, version 13). The output stays pending in the accumulator:
the kernels after it add it to the residual as they read it (rounded as the eager residual add), and the next
split layer writes that residual out once for the rest. The split kernels read transposed copies of those
projections (whole rows of the transpose, where the weight's own rows would give each program short pieces),
made with the step and refreshed when a weight changes in place (`sync_copies`): for jamba-1b's Mamba
mixers 56 MiB. The order of the atomic adds is not fixed, so the last bits of those sums can change from run
to run; under torch's deterministic algorithms no layer is split.

Folded routers (`fold_router`, by default where a layer can take one: FOLD_DEFAULT): the router of a MoE layer whose
Mamba mixer is split (and whose MoE is not) runs no kernel. Its logits are linear in the residual the norm reads, up to
the norm's row scale: Wr (nw * x) / rms(x) with x = h + out_proj(y). So the mixer's mamba_ssm adds them up with
its out_proj share, from two small fp32 tables made with the step (Wr nw and (Wr nw) Wout, X x (H + Di); jamba-1b
0.75 MiB in all, refreshed with the copies); ffn_up picks the top-k from them and applies the row scale it
computes anyway, and down_residual picks the same experts from the same bits before its wait. One kernel boundary
fewer per MoE layer: on an H200 jamba-1b's step took 350.6-351.6 against 364.7-365.2 us with the router kernels
(benchmarks/KERNEL_NOTES.md, version 17). The logits are summed in fp32 without the eager step's bf16 roundings of
the residual, the normed row and the logits, so a near tie between two experts can go the other way (in bf16 the
eager step's own roundings decide such ties about as often against the fp32 model).
"""

from __future__ import annotations

import os

import torch

# Rows per program in the tensor-core form: larger batches run as row blocks of this many rows (a grid axis
# shared with the output blocks; the row blocks of one output block launch together, so its weights can be
# read from L2 after the first).
ROW_BLOCK = 64
# The largest batch: mamba_ssm puts the rows on the CUDA grid's second axis (at most 65535 programs).
MAX_BATCH = 65535
# step="auto" takes the fused step up to this many rows at any context: on an H200 it measured faster than the
# static step at every batch measured up to 256 (jamba-1b, a pure Mamba and a pure Transformer model at 1K of
# context, where the step is closest to compute-bound; benchmarks/KERNEL_NOTES.md, version 10). Past it the
# static step's cuBLAS matmuls win where the cache is short (the fused step's time grows in proportion to the
# rows, the static one's less), and the fused step wins where the attention cache is long (it reads only the
# filled positions, the static step the whole buffer, at a lower rate). Auto takes the fused step there where
# the attention cache of the whole buffer exceeds AUTO_CACHE_SLOPE x the weights for each AUTO_ROWS rows past
# AUTO_ROWS: fitted to jamba-1b on an H200 at 384-768 rows (version 11), where it picks the faster step at every
# one of the 14 points measured.
AUTO_ROWS = 256
AUTO_CACHE_SLOPE = 3.3

# Split layers (one row): the layer kinds whose last projection can be split over the programs and summed by
# atomic adds, and those FusedDecodeStep splits by default: on an H200 (jamba-1b, batch 1) the Mamba mixer's
# split measured faster than its kernel chain, the MLP's and the MoE's slower (benchmarks/KERNEL_NOTES.md,
# version 13).
SPLIT_KINDS = ("mamba", "mlp", "moe")
SPLIT_DEFAULT = ("mamba",)
# Folded routers (one row, `fold_router`): a MoE layer whose Mamba mixer is split and whose MoE is not takes its
# router logits from the mixer's mamba_ssm, which adds them up by linearity (fused_kernels.mamba_ssm_kernel, FOLD),
# so no router kernel runs: on an H200 jamba-1b at batch 1 took 350.6-351.6 against 364.7-365.2 us per token. Its
# fp32 logits resolve near ties between experts differently from the eager step's bf16 ones (about as often as
# the eager bf16 step differs from fp32; benchmarks/KERNEL_NOTES.md, version 17).
FOLD_DEFAULT = True

# Batches up to this run the matmuls as GEMVs in registers, larger ones as tensor-core dots. One row: on the
# H200 the GEMV form with a 4-row tile gave fp32 errors of ~1e-3 against the static step (jamba-tiny and
# jamba-1b sizes, batch 3; the CPU interpreter agrees to 1e-7); until that is understood, 2+ rows take the
# dot form.
GEMV_MAX_ROWS = 1

# Tile sizes and warps per kernel: (GEMV form for batch <= GEMV_MAX_ROWS, tl.dot form), from sweeps on an H200
# for the jamba-1b preset at batch 1 and 16. The GEMV column is the packed-word form's (bf16; version 15 of
# benchmarks/KERNEL_NOTES.md): each program reads and normalises the whole row once, so blocks of 16 gate/up
# rows over 8 warps beat the element form's one-warp blocks of 2 by a wide margin (0.39 against 0.61 ms per
# jamba-1b token). ELEMENT_TILES keeps the element form's own (fp32 and fp16 models, or pack=False; versions
# 13 and 14). `FusedDecodeStep(..., tiles=...)` overrides entries. The dot form needs tiles of 16 at least.
# GEMV reduction tiles are cut to the next power of two of the reduction length, so that at jamba-1b sizes a
# program's whole share of a weight is one tile, read before the wait on the previous kernel.
TILES = {
    "norm_linear": (dict(BN=4, BK=1024, warps=4), dict(BN=64, BK=128, warps=4)),  # also the qkv kernel
    # XS: split Mamba mixers sum their x_proj shares into XS rows by atomic adds (KERNEL_NOTES.md, version 16)
    "mamba_in": (dict(BD=16, BK=1024, warps=8, XS=16), dict(BD=32, BK=128, warps=4)),
    "mamba_ssm": (dict(BD=16, warps=4), dict(BD=64, warps=4)),
    "ffn_up": (dict(BF=16, BK=1024, warps=8), dict(BF=64, BK=128, warps=4)),
    "down": (dict(BH=4, BF=4096, warps=4), dict(BH=16, BF=512, warps=4)),
    "down_moe": (dict(BH=4, BF=4096, warps=4), dict(BH=16, BF=512, warps=4)),
    # split layers (one row only, the same in both columns): BH output rows per block of the split down
    # projection's atomic adds; these two may also carry "maxnreg", a cap on registers per thread
    "ffn_split": (dict(BF=8, BK=1024, BH=1024, warps=4),) * 2,
    "mamba_out": (dict(BD=16, BH=1024, warps=4),) * 2,
}
# The GEMV tiles that differ for the element form (bf16 elements widened one by one, products in a layout of
# their own): swept on an H200 before the packed form existed (KERNEL_NOTES.md, version 14).
ELEMENT_TILES = {
    "norm_linear": dict(BN=8, BK=1024, warps=4),
    "mamba_in": dict(BD=16, BK=1024, warps=4),
    "ffn_up": dict(BF=2, BK=1024, warps=1),
    "down_moe": dict(BH=2, BF=4096, warps=4),
}
# Tensor-core tiles for larger batches: (above this many rows, {kernel: tiles}), applied in order over the dot
# column of TILES. Swept on an H200 for jamba-1b at 128 and 256 rows, 1K of context (benchmarks/KERNEL_NOTES.md,
# version 10). Wider mamba_in blocks leave fewer x_proj partial sums, which mamba_ssm reduces once per row.
WIDE_TILES = (
    (64, {"mamba_in": dict(BD=64, BK=128, warps=4)}),
    (128, {"mamba_in": dict(BD=128, BK=64, warps=8), "ffn_up": dict(BF=128, BK=64, warps=8),
           "down": dict(BH=32, BF=256, warps=4), "down_moe": dict(BH=32, BF=256, warps=4)}),
)


def default_tiles(batch_size: int, pack: bool = True) -> dict:
    """The tiles of every fused kernel at this batch: TILES' GEMV or dot column (the GEMV column with ELEMENT_TILES
    over it where the GEMVs read elements, not packed words), then WIDE_TILES."""
    gemv = batch_size <= GEMV_MAX_ROWS
    tiles = {k: dict(v[0 if gemv else 1]) for k, v in TILES.items()}
    if gemv and not pack:
        tiles.update((k, dict(v)) for k, v in ELEMENT_TILES.items())
    for rows, wide in WIDE_TILES:
        if batch_size > rows:
            tiles.update((k, dict(v)) for k, v in wide.items())
    return tiles


def pdl_unavailable(device: torch.device) -> str | None:
    """None when the kernels can be launched with programmatic dependent launch on this device, else why not."""
    import triton

    from . import fused_kernels as fk

    if device.type != "cuda":
        return f"the model is on {device.type} (PDL is a CUDA launch attribute)"
    if not fk.HAS_GDC:
        return f"Triton {triton.__version__} has no grid dependency control (Triton >= 3.4 has)"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 9:
        return f"compute capability {major}.{minor} (PDL needs 9.0 or above)"
    return None


def pack_unavailable(model, batch_size: int) -> str | None:
    """None when the one-row GEMVs can read bf16 weights as packed int32 words (`pack`) for this model and batch,
    else why not."""
    if batch_size > 1:
        return f"batch {batch_size}: packed words are a one-row GEMV form"
    if model.dtype != torch.bfloat16:
        return f"dtype {model.dtype} (packed words hold two bf16)"
    c = model.config  # (the attention width, heads x head_dim, is hidden_size: the config checks the heads divide it)
    lengths = {"hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
               "mamba inner size": c.mamba_inner_size}
    for what, n in lengths.items():
        if n % 16:
            return f"{what} {n} is not a multiple of 16 (the words are read in 16-element groups)"
    return None


def fused_unavailable(model, batch_size: int) -> str | None:
    """None when the fused step can run for this model and batch here, else the reason it cannot."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    if model.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"the model is on {model.device.type}; the fused kernels run on CUDA (or under TRITON_INTERPRET=1)"
    if model.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {model.dtype} is not supported (fp32, bf16, fp16)"
    if batch_size > MAX_BATCH:
        return f"batch {batch_size} is above the fused step's {MAX_BATCH} rows"
    c = model.config  # the kernels index their per-step buffers with 32-bit offsets
    buffers = {"MoE activations": max(c.num_experts, 1) * batch_size * c.intermediate_size,
               "logits": batch_size * c.vocab_size, "SSM state": batch_size * c.mamba_inner_size * c.mamba_d_state}
    for what, n in buffers.items():
        if n >= 2**31:
            return f"batch {batch_size}: the {what} ({n} elements) are past the kernels' 32-bit offsets"
    for name, p in model.named_parameters():  # the kernels index weights as dense row-major arrays
        if p.dtype != model.dtype:
            return f"parameter {name} is {p.dtype}, the model {model.dtype} (the kernels take one dtype)"
        if not p.is_contiguous():
            return f"parameter {name} is not contiguous (the kernels read row-major weights)"
    return None


def fused_preferred(config, batch_size: int, max_length: int, nbytes: int) -> str | None:
    """None where step="auto" takes the fused step for this batch and cache, else why the static one: up to
    AUTO_ROWS rows always; above, only where the attention cache of max_length positions exceeds
    AUTO_CACHE_SLOPE x the weights for each AUTO_ROWS rows past AUTO_ROWS."""
    if batch_size <= AUTO_ROWS:
        return None
    kv, weights = config.kv_cache_bytes(max_length, batch_size, nbytes), config.param_counts()["total"] * nbytes
    need = AUTO_CACHE_SLOPE * weights * (batch_size - AUTO_ROWS) / AUTO_ROWS
    if kv > need:
        return None
    return (f"batch {batch_size} is above {AUTO_ROWS} rows and its attention cache ({kv / 2**30:.1f} GiB) is not "
            f"above {need / 2**30:.1f} GiB ({AUTO_CACHE_SLOPE} x the weights' {weights / 2**30:.1f} GiB per "
            f"{AUTO_ROWS} rows past {AUTO_ROWS}): there the static step's matmuls measured faster")


def _regs(t: dict) -> dict:
    """The launch option capping a kernel's registers per thread where its tiles ask for one ("maxnreg")."""
    return {"maxnreg": t["maxnreg"]} if t.get("maxnreg") else {}


def _ffn_kind(layer) -> str:
    """The split kind of a layer's feed-forward: "moe" or "mlp"."""
    return "moe" if layer.is_moe else "mlp"


def _or(x, default):
    """x, or default where x is None (a kernel argument the kernel does not read)."""
    return default if x is None else x


def _pow2(n: int, lo: int = 16) -> int:
    p = lo
    while p < n:
        p *= 2
    return p


class FusedDecodeStep:
    """One decoding token per row through the fused kernels; see the module docstring."""

    def __init__(self, model, batch_size: int, tiles: dict | None = None, pdl: bool | None = None,
                 split: bool | None = None, pack: bool | None = None, fold_router: bool | None = None):
        """tiles: per-kernel overrides of default_tiles(batch_size, pack). pdl: launch with programmatic dependent
        launch; None: for the GEMV form where the device supports it (on an H200: 0.485 vs 0.62 ms per jamba-1b
        token at batch 1, but 1.141 vs 1.054 ms in the tensor-core form at batch 16); True where the device
        cannot is an error. split: split layers (one row only): one kernel per MLP or MoE layer and two per
        Mamba mixer, their last linear layer split over the programs and summed by fp32 atomic adds, as is a
        split Mamba mixer's x_proj where mamba_in's tiles give XS rows (the order of those adds, and so the
        last bits of the sums, can differ from run to run); True for every kind in
        SPLIT_KINDS, or a collection of some of them; None: SPLIT_DEFAULT for one row unless torch's
        deterministic algorithms are on. pack: one row of a bf16 model, the GEMVs read the weights as int32 words
        of two bf16 each and widen them by a shift or a mask, their products in the weight tile's own layout (on
        an H200 0.389 against 0.442 ms per jamba-1b token for the element form, each at its own tiles;
        benchmarks/KERNEL_NOTES.md, version 15); None: wherever it can (pack_unavailable), True where it cannot
        is an error. Split MLP and MoE layers (ffn_split) read elements either way. fold_router: MoE layers after a
        split Mamba mixer (the MoE itself not split) take their routing from logits the mixer's mamba_ssm adds up
        by linearity, with no router kernel (the router's weight times its norm's, and that times out_proj,
        refreshed with the copies); None: FOLD_DEFAULT where a layer can, True where none can is an error."""
        reason = fused_unavailable(model, batch_size)
        if reason:
            raise RuntimeError(f"the fused decoding step cannot run: {reason}")
        why_not = pdl_unavailable(model.device)
        if pdl and why_not:
            raise RuntimeError(f"programmatic dependent launch was requested but cannot be used: {why_not}")
        from . import fused_kernels as fk

        self.fk = fk
        self.dot = batch_size > GEMV_MAX_ROWS
        self.pdl = (why_not is None and not self.dot) if pdl is None else bool(pdl)
        no_pack = pack_unavailable(model, batch_size)
        if pack and no_pack:
            raise RuntimeError(f"packed-word GEMVs were requested but cannot be used: {no_pack}")
        self.pack = no_pack is None if pack is None else bool(pack)
        if split is None:
            split = () if self.dot or torch.are_deterministic_algorithms_enabled() else SPLIT_DEFAULT
        self.split = frozenset(SPLIT_KINDS if split is True else () if split is False else split)
        if not self.split <= set(SPLIT_KINDS):
            raise ValueError(f"split: unknown layer kinds {sorted(self.split - set(SPLIT_KINDS))} "
                             f"(the kinds are {', '.join(SPLIT_KINDS)})")
        if self.split and self.dot:
            raise ValueError(f"split layers run one row only (GEMV_MAX_ROWS = {GEMV_MAX_ROWS}); "
                             f"this step was built for batch {batch_size}")
        own = default_tiles(batch_size, self.pack)
        self.tiles = {k: dict(v, **(tiles or {}).get(k, {})) for k, v in own.items()}
        c = model.config
        dev, dt = model.device, model.dtype
        self.B = batch_size
        self.BB = min(_pow2(batch_size, 16 if self.dot else 1), ROW_BLOCK)  # the row tile
        self.NRB = -(-batch_size // self.BB)  # row blocks
        # fp32 models get IEEE fp32 dots (no TF32); so does the CPU interpreter, whose 16-bit dot is wrong
        self.ieee = dt == torch.float32 or model.device.type != "cuda"
        self.elsize = 4 if self.ieee else dt.itemsize  # bytes per staged dot operand
        self.sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4
        self.H, self.Di, self.N, self.R = c.hidden_size, c.mamba_inner_size, c.mamba_d_state, c.mamba_dt_rank
        self.F, self.X, self.K = c.intermediate_size, c.num_experts, c.num_experts_per_tok
        self.NX = self.R + 2 * self.N
        # one row: MoE kernels index the experts it picked by slot (top-k of them, padded to a power of two)
        self.slots = _pow2(self.K, 1) if batch_size == 1 else 0
        self.NP = -(-self.Di // self.tiles["mamba_in"]["BD"])  # x_proj partial sums, one per mamba_in block
        self.u = torch.empty(batch_size, self.Di, device=dev, dtype=dt)
        self.h0 = torch.empty(batch_size, self.H, device=dev, dtype=dt)  # greedy_token's input rows
        self.z = torch.empty_like(self.u)
        self.y = torch.empty_like(self.u)
        self.xpart = torch.empty(self.NP, batch_size, self.NX, device=dev, dtype=torch.float32)
        X = max(self.X, 1)
        self.act = torch.empty(X, batch_size, self.F, device=dev, dtype=dt)
        self.wsel = torch.empty(X, batch_size, device=dev, dtype=torch.float32)
        # split layers: each one's output accumulator (zeroed at the start of a step) and, where the residual
        # it goes on still had an earlier split layer's output pending, that residual made whole
        n = 2 * c.num_hidden_layers if self.split else 0
        # and the Mamba mixers' x_proj sums in XS rows each (mamba_in XS, at most one per mamba_in block; one
        # buffer, so one memset zeroes both)
        self.XS = min(self.tiles["mamba_in"].get("XS", 0), self.NP) if "mamba" in self.split else 0
        n_mamba = sum(not layer.is_attention for layer in model.model.layers) if self.XS else 0
        n_zeroed = n * batch_size * self.H + n_mamba * self.XS * self.NX
        self._n_mamba = 0
        self.hbuf = torch.empty(n, batch_size, self.H, device=dev, dtype=dt)
        self._n_split = 0
        # the split layers' last projections, transposed (the kernels read whole rows of the transpose where the
        # weight's own rows would give each program short pieces of every row): source weight -> [copy, version]
        self._copies = {}
        for layer in model.model.layers:
            if not layer.is_attention and "mamba" in self.split:
                self._copy(layer.mamba.out_proj.weight)
            if _ffn_kind(layer) in self.split:
                self._copy(self._ffn_weights(layer)[3])
        # folded routers: layer -> [its table (X, Di + H) fp32, its logits, the sources' stamps, the sources]
        folding = [i for i, layer in enumerate(model.model.layers) if self._foldable(layer)]
        if fold_router and not folding:
            raise RuntimeError("a folded router was requested but no layer can take one: it needs one row, a MoE "
                               "layer after a split Mamba mixer (split includes 'mamba') and the MoE not split")
        if not (FOLD_DEFAULT if fold_router is None else fold_router):
            folding = []
        self.BXP = _pow2(max(self.X, 1), 2)
        n_lg = len(folding) * self.BXP
        zeroed = torch.empty(n_zeroed + n_lg, device=dev, dtype=torch.float32)
        self._zeroed = zeroed
        self.accs = zeroed[:n * batch_size * self.H].view(n, batch_size, self.H)
        self.xsums = zeroed[n * batch_size * self.H:n_zeroed].view(n_mamba, self.XS, self.NX)
        lgs = zeroed[n_zeroed:].view(len(folding), self.BXP)
        self._folds = {}
        for k, i in enumerate(folding):
            layer = model.model.layers[i]
            self._folds[i] = [torch.empty(self.X, self.Di + self.H, device=dev, dtype=torch.float32), lgs[k], None,
                              (layer.feed_forward.router.weight, layer.pre_ff_layernorm.weight,
                               layer.mamba.out_proj.weight)]
        self.sync_copies()

    def _foldable(self, layer) -> bool:
        """Whether this layer's router can be folded into its Mamba mixer's mamba_ssm (see fold_router)."""
        return (layer.is_moe and not layer.is_attention and "mamba" in self.split and "moe" not in self.split
                and self.slots > 0)

    def _k(self, bk: int, wrows: int, k: int) -> int:
        """The reduction tile for this batch and reduction length k. GEMV tiles hold rows x wrows x tile
        products in registers, so they shrink as rows are added (and never pass pow2(k)); dot tiles stage
        (rows + wrows) x tile operands in shared memory (3 stages), so they are capped to about 200 KB of it."""
        if not self.dot:
            return max(16, min(bk // self.BB, _pow2(k)))
        cap = 65536 // (self.elsize * (self.BB + wrows))
        return max(16, min(bk, 1 << (cap.bit_length() - 1)))

    # ------------------------------------------------------------------ pieces
    def norm_linear(self, h, norm, weight, bias=None, out=None, a=None):
        """Linear(RMSNorm(h)) for h (B, H) -> (B, out_features) in h's dtype; a: a split layer's output still to
        be added to h (its accumulator), or None."""
        t = self.tiles["norm_linear"]
        Nout = weight.shape[0]
        out = torch.empty(self.B, Nout, device=h.device, dtype=h.dtype) if out is None else out
        self.fk.norm_linear_kernel[(-(-Nout // t["BN"]) * self.NRB,)](
            h, h.stride(0), _or(a, h), norm.weight, norm.eps, weight, bias if bias is not None else weight, out,
            out.stride(0), self.B, self.H, Nout, HAS_BIAS=bias is not None, BB=self.BB, BN=t["BN"],
            BK=self._k(t["BK"], t["BN"], self.H), IEEE=self.ieee, DOT=self.dot, PDL=self.pdl, NRB=self.NRB,
            ACC=a is not None, PACK=self.pack, num_warps=t["warps"], launch_pdl=self.pdl)
        return out

    def down_residual(self, h, act, weight, bias=None, routed=False, X=1, a=None, lg=None):
        """h += act @ weight^T (+ bias), in place; routed: the MoE's weighted sum over experts; a: a split
        layer's output still to be added to h first, or None; lg: a folded router's logits, or None."""
        t = self.tiles["down_moe" if routed else "down"]
        F = weight.shape[-1]
        self.fk.down_residual_kernel[(-(-self.H // t["BH"]) * self.NRB,)](
            act, weight, weight.stride(0) if routed else 0, bias if bias is not None else weight, self.wsel, h,
            h.stride(0), _or(a, h), self.B, self.H, F, X, _or(lg, self.wsel), ROUTED=routed,
            SP=self.slots if routed else 0, FOLD=lg is not None, TOPK=self.K,
            BXP=_pow2(X, 2), HAS_BIAS=bias is not None, BB=self.BB, BH=t["BH"], BF=self._k(t["BF"], t["BH"], F),
            IEEE=self.ieee, DOT=self.dot, PDL=self.pdl, NRB=self.NRB, ACC=a is not None, PACK=self.pack,
            num_warps=t["warps"], launch_pdl=self.pdl)

    def _copy(self, w):
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor: refreshed in place in any mode
            self._copies[w] = [w.detach().transpose(-1, -2).contiguous(), (w._version, w.data_ptr())]

    def _w(self, w):
        """A split layer's last projection (..., H, K) as its kernel reads it: the transposed copy (..., K, H)."""
        return self._copies[w][0]

    def sync_copies(self) -> int:
        """Bring the transposed copies and the folded routers' tables up to date with weights changed in place since
        they were made (a training step, a checkpoint loaded into the model), in their own buffers, so that a
        captured graph reads them too. Checked on every call of the step, and by the Generator before each graph
        replay; returns how many were refreshed."""
        n = 0
        for w, entry in self._copies.items():
            now = (w._version, w.data_ptr())  # written in place, or given new storage (`.data = ...`)
            if now != entry[1]:
                with torch.no_grad():
                    entry[0].copy_(w.detach().transpose(-1, -2))
                entry[1] = now
                n += 1
        for entry in self._folds.values():  # folded routers: (Wr nw) Wout and Wr nw, computed in fp64
            table, _, stamp, (wr, nw, wo) = entry
            now = tuple((w._version, w.data_ptr()) for w in (wr, nw, wo))
            if now != stamp:
                with torch.no_grad():
                    r = wr.detach().double() * nw.detach().double()
                    table[:, :self.Di].copy_(r @ wo.detach().double())
                    table[:, self.Di:].copy_(r)
                entry[2] = now
                n += 1
        return n

    def _split_out(self, h, a):
        """The next split layer's outputs: the residual its output goes on (h, or h + a made whole in a buffer of
        its own where a is pending) and its accumulator."""
        k = self._n_split
        if k >= self.accs.shape[0]:
            raise RuntimeError(f"more split layers than the {self.accs.shape[0]} this step has buffers for")
        self._n_split += 1
        return (h if a is None else self.hbuf[k]), self.accs[k]

    def partials_tile(self, n: int) -> int:
        """x_proj partial sums (of n) mamba_ssm reduces at a time: all of them where the (partials x columns) tile
        stays small (jamba-1b: 128 x 128), in slices for wide models (Jamba-v0.1: 512 partials x 288)."""
        return max(2, min(_pow2(n, 2), 16384 // _pow2(self.NX)))

    def mamba(self, h, layer, cache, i, a=None):
        """The Mamba mixer and its residual add: -> (h, a), the residual stream and the output still pending on
        it (split layers; None otherwise, h updated in place)."""
        m = layer.mamba
        conv = cache.conv[i]  # (B, K-1, Di)
        fk, t1, t2 = self.fk, self.tiles["mamba_in"], self.tiles["mamba_ssm"]
        split = "mamba" in self.split
        if self.XS:  # x_proj summed into XS rows by atomic adds (this mixer's own rows, zeroed with the step)
            xpart, n_parts = self.xsums[self._n_mamba], self.XS
            self._n_mamba += 1
        else:
            xpart, n_parts = self.xpart, self.NP
        fk.mamba_in_kernel[(2 * self.NP * self.NRB,)](
            h, h.stride(0), _or(a, h), layer.input_layernorm.weight, layer.input_layernorm.eps, m.in_proj.weight,
            m.in_proj.bias if m.in_proj.bias is not None else m.in_proj.weight, conv, conv.stride(0), conv.stride(1),
            m.conv1d.weight, m.conv1d.bias if m.conv1d.bias is not None else m.conv1d.weight, m.x_proj.weight,
            self.u, self.z, xpart, self.B, self.H, self.Di, self.NX,
            HAS_BIN=m.in_proj.bias is not None, HAS_CB=m.conv1d.bias is not None, KC=m.d_conv,
            KP=_pow2(m.d_conv - 1, 1), NU=self.NP, BB=self.BB, BD=t1["BD"], BK=self._k(t1["BK"], t1["BD"], self.H),
            BX=_pow2(self.NX), IEEE=self.ieee, DOT=self.dot,
            PDL=self.pdl, NRB=self.NRB, ACC=a is not None, PACK=self.pack, XS=self.XS, num_warps=t1["warps"],
            launch_pdl=self.pdl)
        t2 = self.tiles["mamba_out"] if split else t2
        ho, ao = self._split_out(h, a) if split else (h, h)
        wo, bo = m.out_proj.weight, m.out_proj.bias
        nprog = -(-self.Di // t2["BD"])
        table, lg = self._folds.get(i, (xpart, xpart))[:2]  # a folded router's table and logits (else unread)
        fold = i in self._folds
        S = -(-self.H // nprog)  # folded router: hidden units per program
        fk.mamba_ssm_kernel[(nprog, self.B)](
            xpart, self.u, self.z, m.dt_proj.weight, m.dt_proj.bias, m.A_log, m.D, m.dt_layernorm.weight,
            m.b_layernorm.weight, m.c_layernorm.weight, m.dt_layernorm.eps, cache.ssm[i], self.y,
            self._w(wo) if split else wo, _or(bo, wo), h, _or(a, h), ho, ao, self.B, self.Di, self.R, self.N, n_parts,
            self.H, table, lg, self.X, S,
            BD=t2["BD"], BX=_pow2(self.NX), BP=self.tiles["mamba_ssm"].get("BP") or self.partials_tile(n_parts),
            BN=_pow2(self.N, 2), PDL=self.pdl, OUT=split, HAS_BO=bo is not None, ACC=split and a is not None,
            BH=min(t2.get("BH", 16), _pow2(self.H)), PACK=self.pack and split, FOLD=fold, BXP=self.BXP,
            HS=_pow2(S, 1), num_warps=t2["warps"], launch_pdl=self.pdl, **_regs(t2))
        if split:
            return ho, ao
        self.down_residual(h, self.y, m.out_proj.weight, m.out_proj.bias, a=a)
        return h, None

    def _splits(self, cache, n_kv: int) -> int:
        """Key splits for flash-decoding over this cache: enough (batch x KV head x split) programs for every
        SM twice, at most one per 64 positions. The kernel cuts the filled positions (not the allocated
        ones) into that many splits, so a large cache filled a little still uses every program."""
        want = max(1, -(-2 * self.sms // (self.B * n_kv)))
        return max(1, min(want, -(-cache.max_length // 64)))

    def attention(self, h, layer, cache, a=None, first=False):
        """q, k, v projections, k and v written at `cache.pos` (one kernel); split-K flash-decoding over the
        filled positions (the static step's masked softmax over the whole buffer, without reading the
        unfilled part); o_proj + residual, in place: -> (h, None). a: as in mamba. first: the model's first layer
        (the position is read after the wait: next_token_kernel may have just written it)."""
        pending, a = a, layer.self_attn
        norm = layer.input_layernorm
        B, n_kv, hd = self.B, a.n_kv, a.head_dim
        G = a.n_heads // n_kv
        keys, values = cache.key[a.layer_idx], cache.value[a.layer_idx]  # (B, Hkv, max_length, hd)
        NS = self._splits(cache, n_kv)
        BG, BHD = _pow2(G), _pow2(hd)
        key = (NS, BG, BHD, n_kv)
        if getattr(self, "_attn_key", None) != key:  # sized once per cache (before any graph capture)
            self._attn_key = key
            self._attn_acc = torch.empty(B * n_kv * NS * BG * BHD, device=h.device, dtype=torch.float32)
            self._attn_ml = torch.empty(B * n_kv * NS * BG * 2, device=h.device, dtype=torch.float32)
            self._attn_q = torch.empty(B, a.n_heads * hd, device=h.device, dtype=h.dtype)
            self._attn_out = torch.empty(B, a.n_heads * hd, device=h.device, dtype=h.dtype)
        q = self._attn_q
        t = self.tiles["norm_linear"]
        nq, nkv = a.n_heads * hd, n_kv * hd
        fk = self.fk
        fk.qkv_kernel[((-(-nq // t["BN"]) + 2 * -(-nkv // t["BN"])) * self.NRB,)](
            h, h.stride(0), _or(pending, h), norm.weight, norm.eps, a.q_proj.weight, a.k_proj.weight, a.v_proj.weight,
            q, keys, values, keys.stride(0), keys.stride(1), cache.pos, B, self.H, nq, nkv, hd, keys.shape[2],
            BB=self.BB, BN=t["BN"], BK=self._k(t["BK"], t["BN"], self.H), IEEE=self.ieee, DOT=self.dot,
            PDL=self.pdl, NRB=self.NRB, ACC=pending is not None, PACK=self.pack, POS_LATE=first,
            num_warps=t["warps"], launch_pdl=self.pdl)
        # Where a split can hold more than 256 positions (caches past ~16K positions at batch 1) the kernel is
        # launched without PDL: launched while qkv still runs, its programs were packed onto a sixth to a
        # half of the SMs, which for a kernel streaming the cache cost more than the early launch saves
        # (benchmarks/KERNEL_NOTES.md).
        split_pdl = self.pdl and -(-cache.max_length // NS) <= 256
        fk.attn_split_kernel[(B * n_kv, NS)](
            q, keys, values, cache.key_mask, cache.pos, self._attn_acc, self._attn_ml, hd ** -0.5, n_kv, G, hd,
            NS, keys.shape[2], keys.stride(0), keys.stride(1), cache.key_mask.stride(0),
            BG=BG, BHD=BHD, BL=64, IEEE=self.ieee, PDL=split_pdl, num_warps=4, launch_pdl=split_pdl)
        fk.attn_combine_kernel[(B * n_kv, G)](
            self._attn_acc, self._attn_ml, self._attn_out, n_kv, G, hd, NS, BG=BG, BHD=BHD, BS=_pow2(NS, 2),
            PDL=self.pdl, num_warps=4, launch_pdl=self.pdl)
        self.down_residual(h, self._attn_out, a.o_proj.weight, a=pending)
        return h, None

    def ffn(self, h, layer, a=None, i=None):
        """The MLP or MoE and its residual add: -> (h, a) as in mamba; i: the layer's index (its folded router)."""
        if _ffn_kind(layer) in self.split:
            return self._ffn_split(h, layer, a)
        ff, norm = layer.feed_forward, layer.pre_ff_layernorm
        t = self.tiles["ffn_up"]
        X, wg, wu, wd, s_up = self._ffn_weights(layer)
        routed = layer.is_moe
        lg = self._folds[i][1] if i in self._folds else None  # the logits the mixer's mamba_ssm added up
        if routed and lg is None:
            bxp = _pow2(X, 2)
            self.fk.router_kernel[(self.B,)](  # the whole router weight in one tile up to 8K elements
                h, h.stride(0), _or(a, h), norm.weight, norm.eps, ff.router.weight, self.wsel, self.B, self.H, X,
                TOPK=self.K, BXP=bxp, BK=min(_pow2(self.H), max(256, 8192 // bxp)), PDL=self.pdl,
                ACC=a is not None, num_warps=4, launch_pdl=self.pdl)
        sp = self.slots if routed else 0  # one row: a program per F block and picked expert, not per expert
        self.fk.ffn_up_kernel[(-(-self.F // t["BF"]) * self.NRB, self.K if sp else X)](
            h, h.stride(0), _or(a, h), norm.weight, norm.eps, wg, wu, s_up, self.act, self.wsel, self.B, self.H,
            self.F, X, _or(lg, self.wsel), ROUTED=routed, SP=sp, BXP=_pow2(X, 2), BB=self.BB, BF=t["BF"],
            BK=self._k(t["BK"], 2 * t["BF"], self.H), IEEE=self.ieee, DOT=self.dot, PDL=self.pdl, NRB=self.NRB,
            ACC=a is not None, PACK=self.pack, FOLD=lg is not None, TOPK=self.K, num_warps=t["warps"],
            launch_pdl=self.pdl)
        self.down_residual(h, self.act, wd, routed=routed, X=X, a=a, lg=lg)
        return h, None

    def _ffn_weights(self, layer):
        """(experts X, gate, up, down, expert stride of gate/up) of a layer's MoE (the experts' fused gate/up
        (X, 2F, H) and down (X, H, F)) or dense MLP (X = 1)."""
        ff = layer.feed_forward
        if layer.is_moe:
            gu = ff.experts.gate_up_proj
            return ff.num_experts, gu, gu[:, self.F:], ff.experts.down_proj, gu.stride(0)
        return 1, ff.gate_proj.weight, ff.up_proj.weight, ff.down_proj.weight, 0

    def _ffn_split(self, h, layer, a):
        ff, norm = layer.feed_forward, layer.pre_ff_layernorm
        t = self.tiles["ffn_split"]
        ho, ao = self._split_out(h, a)
        X, wg, wu, wd, s_up = self._ffn_weights(layer)
        wr = ff.router.weight if layer.is_moe else wg  # (the dense MLP reads no router)
        s_down = wd.stride(0) if layer.is_moe else 0
        self.fk.ffn_split_kernel[(-(-self.F // t["BF"]), self.K if layer.is_moe else 1)](
            h, _or(a, h), ho, ao, norm.weight, norm.eps, wr, wg, wu, s_up, self._w(wd), s_down, self.H, self.F, X,
            ACC=a is not None, ROUTED=layer.is_moe, TOPK=self.K, BXP=_pow2(X, 2), SP=_pow2(self.K, 1),
            BF=t["BF"], BK=self._k(t["BK"], 2 * t["BF"], self.H), BH=min(t["BH"], _pow2(self.H)), IEEE=self.ieee,
            PDL=self.pdl, num_warps=t["warps"], launch_pdl=self.pdl, **_regs(t))
        return ho, ao

    # ------------------------------------------------------------------ the step
    def __call__(self, model, token_ids: torch.Tensor, cache, moe_impl=None) -> torch.Tensor:
        """token_ids (B, 1) long -> last-position logits (B, V); advances `cache.pos` (as decode_step)."""
        self._check_rows(token_ids)
        h = model.model.embed_tokens(token_ids[:, 0])  # (B, H): a fresh buffer, updated in place below
        if self._zeroed.numel():
            self._zeroed.zero_()
        logits = self._layers(model, cache, h)
        cache.pos.add_(1)
        return logits

    def _check_rows(self, token_ids: torch.Tensor) -> None:
        if token_ids.shape[0] != self.B:
            raise ValueError(f"this fused step was built for batch {self.B}, got {token_ids.shape[0]} rows")

    def _layers(self, model, cache, h) -> torch.Tensor:
        """Every layer and the lm_head from the embedded rows h (B, H), the accumulators zeroed -> logits (B, V)."""
        a = None  # a split layer's output still pending on h
        self._n_split = self._n_mamba = 0
        self.sync_copies()
        for i, layer in enumerate(model.model.layers):
            if layer.is_attention:
                h, a = self.attention(h, layer, cache, a, first=i == 0)
            else:
                h, a = self.mamba(h, layer, cache, i, a)
            h, a = self.ffn(h, layer, a, i)
        return self.norm_linear(h, model.model.final_layernorm, model.lm_head.weight, a=a)

    # ------------------------------------------------------------------ greedy decoding in one chain of kernels
    def start_greedy(self, model, token_ids: torch.Tensor) -> None:
        """Before a run of greedy_token calls: the embedding of token_ids (B, 1) as the next step's input, the
        accumulators zeroed."""
        self._check_rows(token_ids)
        with torch.no_grad():
            torch.index_select(model.model.embed_tokens.weight, 0, token_ids[:, 0], out=self.h0)
        if self._zeroed.numel():
            self._zeroed.zero_()

    def greedy_token(self, model, cache, out: torch.Tensor) -> None:
        """One greedy decoding step from the input start_greedy or the previous call left: the step's kernels,
        then next_token_kernel, which writes the token (torch.argmax of the logits) to out (B,) long, its embedding
        as the next input, zeroes the accumulators and advances `cache.pos`. So consecutive calls run as one
        chain of kernels (under PDL with no launch between them that is not the step's own), and a CUDA graph
        of several of them decodes that many tokens per replay."""
        logits = self._layers(model, cache, self.h0)
        V = logits.shape[1]
        BV = max(16, min(_pow2(V) // 4, 16384))  # up to 64K logits: one pass, its four blocks in flight at once
        BZ = 4096
        nz = self._zeroed.numel()
        self.fk.next_token_kernel[(self.B + -(-nz // BZ),)](
            logits, logits.stride(0), V, model.model.embed_tokens.weight, self.h0, self.h0.stride(0), self.H, out,
            out.stride(0), cache.pos, self._zeroed, nz, self.B, BV=BV, BH=min(_pow2(self.H), 4096), BZ=BZ,
            PDL=self.pdl, num_warps=16 if BV >= 8192 else 4, launch_pdl=self.pdl)
