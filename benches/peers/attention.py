#!/usr/bin/env python3
"""Peer benchmark for precision-weighted attention, forward (DESIGN.md sections 4.1 and 7, issue 5).

Times, on the same shapes and the same tensors, in the same run:

  ours        fk.attention_forward (bindings/python/fep_kernels, the C ABI on the torch
              tensors; o preallocated (`out`), check=False as benches/attention.rs does; the
              binding also writes lse and e, which the Rust bench does not ask for)
  sdpa        torch.nn.functional.scaled_dot_product_attention, flash backend (Dot only)
  flex        FlexAttention (torch.nn.attention.flex_attention) with the same score as
              score_mod, every family: one torch.compile(..., dynamic=True) per family and head
              dim (the head dim is a compile-time constant of flex's kernel), reused across
              lengths (dynamic shapes) and for causal and full through one mask_mod (a captured
              flag), so each family compiles once per dtype and head dim (the first call,
              reported apart with the number of graphs dynamo compiled so far: a recompile per
              length would show there). The distance families get d^2 = |q|^2 + |k|^2 - 2 q.k
              from norms computed in the timed call, the precision (per head or per key) and its
              log (the normaliser) as captured tensors.
  sdpa_pad    the padded-q/k SDPA trick for Gaussian (x-transformers style): with per-head
              precision q~ = [pi_h q, -pi_h/2, 0...], k~ = [k, |k|^2, 0...] (v zero-padded to
              the same head dim, a multiple of 8), scale tau, so tau q~.k~ = -tau pi_h d^2/2 up
              to a per-row constant; the padding is built in the timed call; flash backend

Families and precisions as benches/attention.rs: Dot (tau = 1/sqrt(D), no precision), Gaussian
with per-head precision, StudentT(nu = 5) and Laplace with per-key precision (tau = 1,
normaliser on). Shapes as benches/attention.rs: B*L = 16k tokens, Hq = Hkv = 2048 / D, BHLD,
causal and full; inputs uniform(-1, 1), precisions uniform(0.5, 2), from a fixed seed.

Default subset, and the GPU suite's quick step (--quick: the same shapes, fewer repetitions):
bf16, D = 128 then 64, L in {1k, 4k, 16k}, causal and full, every family (48 shapes, 8 flex
compiles). A time budget (--budget-s, default 165 s) stops starting new shapes past it, and does
not start a family's first shape (its compile) when less time is left than the slowest compile
so far; the shapes left are written to the JSON as records with "cut": true (no figures) and
listed at the end, and each implementation's record is written to the JSON as soon as it is
measured (ours first; benches/peers/timing.py's Records), so a slow compile costs shapes, not the
run, and a timeout during a compile keeps ours and the peers measured before it. --full runs
every shape of the bench (bf16 and f16, L in {512, ..., 16k}: 16 compiles; give it --budget-s
600); --dtypes, --dims, --lengths and --families select others.

Agreement is checked once per family, dtype and head dim, at the shortest length measured: the
relative error max|o - ref| / max|ref| of every implementation's o on batch 0, heads 0-1, against
a float32 evaluation of the formulas (DESIGN 4.1) from the same (rounded) inputs.

FLOPs by FlashAttention's convention (4*B*Hq*Lq*Lk*D, halved when causal) for every
implementation, whatever it computes (sdpa_pad's padded head dim is not counted).

Targets of issue 5 on an H100, printed next to the measurements (never as a verdict): Dot >= 350
TFLOP/s non-causal at L >= 4k; every family at least as fast as flex with the same score
(flex/ours >= 1); Gaussian (per-head pi) within 10% of Dot; Student-t >= 60% of Dot.

Timing (benches/peers/timing.py): one call (first, compiles: the only warm-up), one more, then
the median of N repetitions (N from the second call so each takes ~0.15 s, at least 3; with
--quick ~0.05 s, 3 to 20) by CUDA events.

Usage:
    python3 benches/peers/attention.py --lib target/release/libfep_kernels.so --out attn.json
    python3 benches/peers/attention.py --quick --budget-s 100 --out attn.json  # ci/gpu-run.sh
    python3 benches/peers/attention.py --smoke   # tiny shapes on the CPU, flex eager: a test

--op backward: the backward alone (torch.autograd.grad of o with the graph retained), bf16, D = 128,
L = 4k, causal and full (--full: bf16 and f16, D 128 and 64, L 1k/4k/16k, precisions learned and
fixed), families dot, studentt, gaussian, laplace: flex with the same score_mod, the precision a
captured tensor that requires grad (learned) and the norms computed from q and k in the graph
(checked first on a tiny case: whether this PyTorch propagates gradients into captured tensors;
if not, flex is SKIPPED for the distance families with the reason), SDPA (Dot), padded SDPA
(Gaussian), ours through the binding's attention_backward or from criterion (--criterion, the
same run's benches/attention.rs). FLOPs 2.5x the forward's. Records "kind": "backward".

--op decode: benches/attention.rs's decode shapes (Hq 32, Hkv 8, D 128, Lq 1 and 16, Lk 64k with
B 1 and 4 and 1M with B 1; --full Lk 4k to 1M), causal, per-batch cache lengths: ours
(attention_forward with kv_len), SDPA for Dot (query heads folded into rows, a boolean mask),
flex (enable_gqa, block mask from the lengths; key norms cached). Records "kind": "decode", L =
Lk, and "gbps" (KV cache bytes read per second), also in the target column against the H100's
3.35 and the H200's 4.8 TB/s.

--op inputs (issue 23): the score inputs, full (non-causal) unless said, no precision gradient;
bf16, D = 128, L = 4k (B 4, H 16), dot and studentt (--full: D 128 and 64, L 1k and 4k, every
family); in order of value (a short budget cuts the last): a per-key bias [B,H,1,L] forward, a
full bias [1,H,L,L] backward with its gradient, a padding mask [B,1,1,L] forward, then the B*L
tokens packed as 8 causal sequences of random lengths, forward and backward. Ours:
attention_forward / attention_backward with bias=, attn_mask=, cu_seqlens_q/k (packed: [total,
H, D] views), with our plain call on the same shape timed beside (ours/plain in the note: the
targets <= 1.05 for the per-key bias forward, <= 1.5 for the full-bias backward, as reminders);
flex: the same score_mod plus the captured bias (CAP.bias[b, h, ki] or CAP.bias[h, qi, ki]; the
full one requires grad and torch.autograd.grad takes its gradient with q, k, v's; checked first
that this PyTorch propagates gradients into captured tensors, else flex's backward is SKIPPED),
the padding mask as a block mask, the packed sequences as a document-causal block mask; SDPA for
Dot with the bias as a float attn_mask (requiring grad in the backward) or the boolean mask.
Records "kind": "inputs" with "variant"; FLOPs of the packed sequences per sequence.

--op cpu (issue 24; implies --device cpu): float32, full (non-causal), H 2, D 32, L 128 (B 16:
the issue's measured shape), 512 (B 4) and 1024 (B 2), every family, forward ("cpu_fwd") and
forward + backward ("cpu_fwdbwd", the gradients of q, k, v for a fixed d_o; precisions fixed):
ours (fk.attention_forward, then fk.attention_backward with precision_grads=False), plain
PyTorch eager of the same maths (the float32 formula of DESIGN 4.1 with the [L, L] scores, its
backward by autograd) for every family, and torch's SDPA CPU kernel for Dot. `--threads N` sets
torch.set_num_threads(N) and fep_kernels.set_num_threads(N). Wall clock, warm-up, median ("ms")
and minimum ("ms_min") of the repetitions; ours' o is compared with the eager one. Targets
(issue 24): every family >= eager; Dot within 1.25x of SDPA (sdpa/ours >= 0.8); Gaussian,
Student-t and Laplace >= 2x eager at L >= 512. `--op cpu --smoke`: one tiny shape.
benches/cpu-suite.sh runs it at 1 and 2 threads.

A missing piece (PyTorch, CUDA, FlexAttention, the library, attention_forward, GPU kernels)
makes the implementations that need it SKIPPED; a failing call is FAILED; neither is fatal.
"""

import argparse
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "bindings", "python"))
sys.path.insert(0, HERE)
from timing import (Records, Timer, apply_threads, cpu_device_name,  # noqa: E402
                    cpu_threads_env, fail_msg, pick_reps, ratio, write_json)

TOKENS = 16 * 1024
MODEL_DIM = 2048
NU = 5.0
FAMILIES = ["dot", "gaussian", "studentt", "laplace"]
PREC = {"dot": None, "gaussian": "head", "studentt": "key", "laplace": "key"}
OURS_SCORE = {"dot": "dot", "gaussian": "gaussian", "studentt": "student_t", "laplace": "laplace"}
ALL_LENGTHS = [512, 1024, 2048, 4096, 8192, 16384]
DEFAULT_LENGTHS = [1024, 4096, 16384]
SEED = 20250505

torch = None
F = None


def flops(B, H, L, D, causal):
    f = 4.0 * B * H * L * L * D
    return f / 2 if causal else f


def tau_of(fam, D):
    return 1.0 / math.sqrt(D) if fam == "dot" else 1.0


def target_text(fam, causal, impl, L):
    """Issue 5's target for this row (a reminder, not a check)."""
    if impl == "ours":
        if fam == "dot" and not causal and L >= 4096:
            return ">=350 TFLOP/s"
        if fam == "gaussian":
            return ">=0.9x our dot"
        if fam == "studentt":
            return ">=0.6x our dot"
        return ""
    if impl == "flex":
        return "flex/ours>=1"
    return ""


# ---- the float32 reference (DESIGN 4.1) on a slice ----


def reference(fam, q, k, v, pih, pik, causal, tau):
    """o for q, k, v [b, h, L, D] (float32), pih [h] or None, pik [b, h, L] or None."""
    D = q.shape[-1]
    pi = torch.ones(q.shape[0], q.shape[1], 1, k.shape[2], dtype=torch.float32, device=q.device)
    if pih is not None:
        pi = pi * pih.view(1, -1, 1, 1)
    if pik is not None:
        pi = pi * pik[:, :, None, :]
    if fam == "dot":
        s = tau * pi * (q @ k.transpose(-1, -2))
    else:
        d2 = ((q * q).sum(-1)[..., :, None] + (k * k).sum(-1)[..., None, :]
              - 2 * (q @ k.transpose(-1, -2))).clamp_min(0)
        if fam == "gaussian":
            s = -0.5 * tau * pi * d2
        elif fam == "studentt":
            s = -((NU + D) / 2) * torch.log1p(tau * pi * d2 / NU)
        else:
            s = -torch.sqrt(tau * pi * d2)
        s = s + (D / 2) * torch.log(pi)
    if causal:
        Lq, Lk = q.shape[2], k.shape[2]
        i = torch.arange(Lq, device=q.device)[:, None]
        j = torch.arange(Lk, device=q.device)[None, :]
        s = s.masked_fill(j > i + (Lk - Lq), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


class Agreement:
    """The agreement check of one forward shape. ``of(output)`` makes a Measurer ``after``
    callback that puts max|o - ref| / max|ref| of ``output()`` into the result, on batch 0 and
    heads 0-1, ref the float32 reference (computed at the first output). Done once per family,
    dtype, head dim and mask (the key): at the first length where an implementation produced an
    output; ``checked`` holds the keys done."""

    def __init__(self, checked, key, inputs):
        self.active = key not in checked
        self.checked, self.key = checked, key
        self.inputs = inputs  # fam, q, k, v, pih, pik, causal, tau
        self.ref = None

    def of(self, output):
        def after(r):
            if self.active:
                r["rel_err"] = self.rel_err(output())
                print(f"  rel. error vs float32 reference (b0, heads 0-{self.heads - 1}): "
                      f"{r['impl']} {r['rel_err']:.2e}")
        return after

    def rel_err(self, o):
        if self.ref is None:
            self.checked.add(self.key)
            fam, q, k, v, pih, pik, causal, tau = self.inputs
            self.heads = min(2, q.shape[1])
            self.ref = reference(fam, self.slice(q), self.slice(k), self.slice(v),
                                 pih[:self.heads].float() if pih is not None else None,
                                 pik[:1, :self.heads].float() if pik is not None else None,
                                 causal, tau)
            self.scale = self.ref.abs().max().item()
        return (self.slice(o) - self.ref).abs().max().item() / self.scale

    def slice(self, x):
        return x[:1, :self.heads].float()


# ---- FlexAttention ----


class Captured:
    """The tensors score_mod and mask_mod read; swapped per shape (dynamo lifts them as graph
    inputs, guarded on metadata, so with dynamic shapes the compiled kernel is reused)."""
    qn = kn = pih = lpih = pik = lpik = full = kv_len = offset = bias = doc = None


CAP = Captured()


def make_score_mod(fam, D, group=1):
    """The family's score as a score_mod; ``group`` > 1: GQA (query head h reads kv head
    h // group, the key norms and per-key precisions being per kv head)."""
    half_d = D / 2.0
    c_t = (NU + D) / 2.0
    inv_nu = 1.0 / NU

    if group == 1:
        def kvh(h):
            return h
    else:
        def kvh(h):
            return h // group

    if fam == "dot":
        def score_mod(score, b, h, qi, ki):
            return score
    elif fam == "gaussian":
        def score_mod(score, b, h, qi, ki):
            d2 = torch.clamp(CAP.qn[b, h, qi] + CAP.kn[b, kvh(h), ki] - 2.0 * score, min=0.0)
            return -0.5 * CAP.pih[h] * d2 + half_d * CAP.lpih[h]
    elif fam == "studentt":
        def score_mod(score, b, h, qi, ki):
            d2 = torch.clamp(CAP.qn[b, h, qi] + CAP.kn[b, kvh(h), ki] - 2.0 * score, min=0.0)
            return (-c_t * torch.log1p(CAP.pik[b, kvh(h), ki] * d2 * inv_nu)
                    + half_d * CAP.lpik[b, kvh(h), ki])
    else:
        def score_mod(score, b, h, qi, ki):
            d2 = torch.clamp(CAP.qn[b, h, qi] + CAP.kn[b, kvh(h), ki] - 2.0 * score, min=0.0)
            return -torch.sqrt(CAP.pik[b, kvh(h), ki] * d2) + half_d * CAP.lpik[b, kvh(h), ki]
    return score_mod


def mask_mod(b, h, qi, ki):
    # Lq = Lk here, so top-left and bottom-right alignment agree; CAP.full: every key visible
    return (qi >= ki) | CAP.full


def setup_torch(args):
    global torch, F
    try:
        import torch as _torch
        import torch.nn.functional as _F
        torch, F = _torch, _F
    except Exception as e:
        return {"ok": False, "why": f"PyTorch is not installed ({fail_msg(e)})"}
    if args.device == "cuda" and not torch.cuda.is_available():
        return {"ok": False, "why": "torch.cuda.is_available() is False (no GPU or a CPU-only "
                "PyTorch)"}
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" \
        else torch.device("cpu")
    name = torch.cuda.get_device_name(device) if args.device == "cuda" else "cpu (smoke test)"
    return {"ok": True, "device": device, "name": name, "cuda": args.device == "cuda"}


def setup_flex(args, tx):
    if not tx["ok"]:
        return {"ok": False, "why": tx["why"]}
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception as e:
        return {"ok": False, "why": f"FlexAttention does not import ({fail_msg(e)}; torch "
                f"{torch.__version__})"}
    try:
        import torch._dynamo
        torch._dynamo.config.specialize_float = True  # ATTENTION-CONVENTIONS.md section 9
        for knob in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
    except Exception:
        pass
    def make(score_mod, gqa, compile_it):
        def run(q, k, v, block_mask, scale):
            kw = {"enable_gqa": True} if gqa else {}
            return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                  scale=scale, **kw)
        # one compiled function per family and head dim, reused across lengths and masks:
        # dynamic=True from the first call, so a new length is no new graph
        return torch.compile(run, dynamic=True) if compile_it else run

    eager = args.smoke or not tx["cuda"]  # eager on the CPU (traces score_mod, no Triton)
    mode = "eager" if eager else "torch.compile(dynamic=True), one per family and head dim"
    return {"ok": True, "compiled": lambda sm: make(sm, False, not eager),
            "compiled_gqa": lambda sm: make(sm, True, not eager),
            "flex_attention": flex_attention, "create_block_mask": create_block_mask,
            "mode": mode}


def graphs_compiled():
    """How many graphs dynamo has compiled in this process (None where torch does not say)."""
    try:
        from torch._dynamo.utils import counters
        return int(counters["stats"]["unique_graphs"])
    except Exception:
        return None


def setup_ours(args, tx):
    if not tx["ok"]:
        return {"ok": False, "why": tx["why"]}
    try:
        import fep_kernels as fk
    except Exception as e:
        return {"ok": False, "why": f"bindings/python/fep_kernels: {fail_msg(e)}"}
    if not hasattr(fk, "attention_forward"):
        return {"ok": False, "why": "bindings/python/fep_kernels has no attention_forward yet"}
    try:
        fk.load(args.lib)
    except Exception as e:
        return {"ok": False, "why": f"cannot load the library: {fail_msg(e)}"}
    if tx["cuda"]:
        kind = "hip" if getattr(torch.version, "hip", None) else "cuda"
        try:
            if fk.device_count(kind) < 1:
                return {"ok": False, "why": f"the library sees no {kind} device (built without "
                        f"the {kind} feature?)"}
        except Exception as e:
            return {"ok": False, "why": f"device_count: {fail_msg(e)}"}
    try:
        version = fk.version()
    except Exception:
        version = "unknown"
    return {"ok": True, "fk": fk, "version": version}


def is_unsupported(e):
    s = f"{type(e).__name__} {e}".lower()
    return "unsupported" in s or "no gpu kernels" in s or "undefined symbol" in s


# ---- one dtype and head dim ----


def run_dim(args, tx, flex, ours, timer, dtype_name, D, lengths, families, records):
    dev = tx["device"]
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dtype_name]
    tokens, model_dim = args.tokens, args.model_dim
    H = model_dim // D
    gen = torch.Generator(device="cpu").manual_seed(SEED + D)
    n = tokens * model_dim
    # one q, k, v per dtype and D (B*L*H*D is the same for every L), as benches/attention.rs
    base = [(torch.rand(n, generator=gen) * 2 - 1).to(dtype).to(dev) for _ in range(3)]
    pih_all = (0.5 + 1.5 * torch.rand(H, generator=gen)).to(dev)
    pik_all = (0.5 + 1.5 * torch.rand(tokens * H, generator=gen)).to(dev)
    checked = set()
    for fam in families:
        score_mod = make_score_mod(fam, D)
        ffn = flex["compiled"](score_mod) if flex["ok"] else None
        first_flex = True
        flex_failed = None  # a family whose first flex call failed is not compiled again
        for L in lengths:
            B = tokens // L
            q, k, v = (x.view(B, H, L, D) for x in base)
            pih = pih_all if PREC[fam] == "head" else None
            pik = pik_all.view(B, H, L) if PREC[fam] == "key" else None
            tau = tau_of(fam, D)
            for causal in (False, True):
                mask = "causal" if causal else "full"
                rec0 = {"op": "attention", "family": fam, "precision": PREC[fam] or "none",
                        "causal": causal, "dtype": dtype_name, "D": D, "L": L, "B": B, "H": H}
                # a family's first flex call compiles: start it only if the slowest compile so
                # far still fits
                why = budget_why(args, args.compile_s if (first_flex and flex["ok"]) else 0.0)
                if why:
                    cut_record(args, records, rec0, why)
                    continue
                print(f"-- {fam} {mask} {dtype_name} D={D} L={L} B={B} H={H}")
                fl = flops(B, H, L, D, causal)
                M = Measurer(args, timer, records, rec0, fl, tx, flex,
                             target=lambda impl, ms: target_text(fam, causal, impl, L))
                M.first_flex = first_flex
                check = Agreement(checked, (fam, dtype_name, D, causal),
                                  (fam, q, k, v, pih, pik, causal, tau))

                # ours
                if not ours["ok"]:
                    M.skip("ours", ours["why"])
                elif fam in ours.get("unsupported", {}):
                    M.skip("ours", ours["unsupported"][fam])
                else:
                    fk = ours["fk"]
                    o_ours = torch.empty_like(q)
                    kw = dict(score=OURS_SCORE[fam], causal=causal, pi_head=pih, pi_key=pik, check=False)
                    if fam == "studentt":
                        kw["nu"] = NU

                    def run_ours():
                        return fk.attention_forward(q, k, v, out=o_ours, **kw)[0]

                    got = M.measure("ours", run_ours, skip_unsupported=True,
                                    after=check.of(lambda: o_ours))
                    if got is None and M.results[-1]["note"].startswith("SKIPPED"):
                        # not built for this family: the other lengths skip it too
                        ours.setdefault("unsupported", {})[fam] = M.results[-1]["note"][9:]

                # sdpa (Dot) and the padded trick (Gaussian)
                if fam == "dot":
                    def run_sdpa():
                        with sdpa_ctx(tx):
                            return F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                                  scale=tau)
                    M.measure("sdpa", run_sdpa, after=check.of(run_sdpa))
                if fam == "gaussian":
                    pad = (D + 1 + 7) // 8 * 8
                    ph = pih.view(1, H, 1, 1).to(dtype)

                    def run_pad():
                        qt = q.new_zeros(B, H, L, pad)
                        kt = k.new_zeros(B, H, L, pad)
                        vt = v.new_zeros(B, H, L, pad)
                        qt[..., :D] = q * ph
                        qt[..., D] = (-0.5 * ph).expand(B, H, L, 1)[..., 0]
                        kt[..., :D] = k
                        kt[..., D] = (k.float() ** 2).sum(-1).to(dtype)
                        vt[..., :D] = v
                        with sdpa_ctx(tx):
                            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal,
                                                               scale=tau)
                        return o[..., :D]
                    M.measure("sdpa_pad", run_pad, after=check.of(run_pad))

                # flex
                if not flex["ok"]:
                    M.skip("flex", flex["why"])
                elif flex_failed:
                    M.skip("flex", f"its first call for this family and head dim failed "
                           f"({flex_failed})")
                else:
                    try:
                        qf = q.float()
                        kf = k.float()
                        CAP.qn = (qf * qf).sum(-1)
                        CAP.kn = (kf * kf).sum(-1)
                        del qf, kf
                        CAP.pih, CAP.lpih = (pih, pih.log()) if pih is not None else (None, None)
                        CAP.pik, CAP.lpik = (pik, pik.log()) if pik is not None else (None, None)
                        CAP.full = torch.tensor(not causal, device=dev)
                        bm = flex["create_block_mask"](mask_mod, None, None, L, L, device=dev)
                        fscale = tau if fam == "dot" else 1.0
                        norms = fam != "dot"

                        def run_flex():
                            if norms:  # what a user computes per call
                                CAP.qn = q.float().square().sum(-1)
                                CAP.kn = k.float().square().sum(-1)
                            return ffn(q, k, v, bm, fscale)
                    except Exception as e:
                        M.fail("flex", e)
                    else:
                        compiling = M.first_flex
                        got = M.measure("flex", run_flex, after=check.of(run_flex))
                        if got is None and compiling:  # its compile failed: not tried again
                            flex_failed = M.results[-1]["note"][len("FAILED: "):]
                first_flex = M.first_flex
    CAP.qn = CAP.kn = CAP.pih = CAP.lpih = CAP.pik = CAP.lpik = CAP.full = None
    del base



# ---- backward (--op backward) and decode (--op decode) ----

BWD_FAMILIES = ["dot", "studentt", "gaussian", "laplace"]  # by value: a short budget keeps the first


def bwd_flops(B, H, L, D, causal):
    return 2.5 * flops(B, H, L, D, causal)


def criterion_ms(args, group, bid):
    """Our median from criterion's estimates of benches/attention.rs in the same run (None if
    absent): the Python binding has no backward, so the GPU suite passes --criterion."""
    if not args.criterion:
        return None
    path = os.path.join(args.criterion, group, bid, "new", "estimates.json")
    try:
        with open(path) as f:
            return json.load(f)["median"]["point_estimate"] / 1e6
    except (OSError, ValueError, KeyError):
        return None


def cut_record(args, records, rec, why):
    print(f"-- {rec['family']} {'causal' if rec['causal'] else 'full'} {rec['dtype']} "
          f"D={rec['D']} L={rec['L']}: CUT ({why})")
    args.budget_skipped += 1
    rec.update({"impl": "all", "ms": None, "cut": True, "note": f"CUT: {why}"})
    records.add(rec)


def budget_why(args, need):
    left = args.deadline - time.perf_counter()
    if left > need:
        return None
    return (f"past the {args.budget_s:g} s budget" if left <= 0 else
            f"{left:.0f} s left of the {args.budget_s:g} s budget, less than a flex compile "
            f"({need:.0f} s)")


class Measurer:
    """The timing of one shape's implementations (one call, a second, the median of N), each
    implementation's record written as soon as it is measured (ours first, so each peer's ratio
    is known then), so a timeout in a later peer's cold compile cannot lose it; results (impl,
    ms, first_ms, reps, rel_err, note) are also kept in .results. A family's first flex call is
    its compile (.first_flex, carried from shape to shape by the caller).

    rec0: the shape's fields, first in each record; unit_flops: one call's FLOPs; note_head: put
    before each note; target(impl, ms): issue 5's target text for the row; extra(ms): fields
    after "gflop" (decode's bandwidth)."""

    def __init__(self, args, timer, records, rec0, unit_flops, tx, flex, note_head="",
                 target=None, extra=None):
        self.args, self.timer, self.records = args, timer, records
        self.rec0, self.unit_flops, self.tx, self.flex = rec0, unit_flops, tx, flex
        self.note_head = note_head
        self.target = target or (lambda impl, ms: "")
        self.extra = extra or (lambda ms: {})
        self.results = []
        self.first_flex = True
        self.ours_ms = None

    def add(self, r):
        """Keeps result r and writes its record now."""
        self.results.append(r)
        impl, ms = r["impl"], r["ms"]
        if impl == "ours":
            self.ours_ms = ms
        rec = dict(self.rec0, impl=impl, ms=ms, first_call_ms=r.get("first_ms"),
                   reps=r.get("reps"), gflop=self.unit_flops / 1e9)
        rec.update(self.extra(ms))
        rec.update({
            "tflops": self.unit_flops / (ms * 1e-3) / 1e12 if ms else None,
            "ratio_vs_ours": ratio(ms, self.ours_ms),
            "target": self.target(impl, ms),
            "rel_err_vs_ref": r.get("rel_err"),
            "device": self.tx.get("name"),
            "flex_mode": self.flex.get("mode") if impl == "flex" else None,
            "torch": torch.__version__,
            "note": "; ".join(n for n in (self.note_head, r["note"]) if n),
        })
        self.records.add(rec)

    def skip(self, impl, why):
        print(f"  {impl:<9} SKIPPED ({why})")
        self.add({"impl": impl, "ms": None, "note": f"SKIPPED: {why}"})

    def fail(self, impl, e):
        print(f"  {impl:<9} FAILED ({fail_msg(e)})")
        self.add({"impl": impl, "ms": None, "note": f"FAILED: {fail_msg(e)}"})

    def measure(self, impl, fn, note="", skip_unsupported=False, after=None):
        """Times fn; returns the median ms, or None when it failed (SKIPPED instead of FAILED
        when skip_unsupported and the library says it was not built for it). after(result), if
        given, runs once timed, before the record is written (an agreement check)."""
        a = self.args
        try:
            t_first = self.timer.once(fn)
            t1 = self.timer.once(fn)
            reps = pick_reps(t1, a.budget_ms, a.min_reps, a.max_reps)
            ms = self.timer.median(fn, reps, warmup=0)
        except Exception as e:
            msg = fail_msg(e)
            kind = "SKIPPED" if skip_unsupported and is_unsupported(e) else "FAILED"
            print(f"  {impl:<9} {kind} ({msg})")
            if impl == "flex":
                self.first_flex = False
            self.add({"impl": impl, "ms": None, "note": f"{kind}: {msg}"})
            return None
        notes = [note] if note else []
        if impl == "flex" and self.first_flex:
            notes.append(f"first call (compile) {t_first / 1e3:.1f} s")
            a.compile_s = max(a.compile_s, t_first / 1e3)
            self.first_flex = False
        elif t_first > 5 * max(ms, 1e-3):
            notes.append(f"first call {t_first:.1f} ms")
        if impl == "flex" and graphs_compiled() is not None:
            notes.append(f"{graphs_compiled()} graphs compiled so far")
        note = "; ".join(notes)
        r = {"impl": impl, "ms": ms, "first_ms": t_first, "reps": reps, "note": note}
        tf = self.unit_flops / (ms * 1e-3) / 1e12
        print(f"  {impl:<9} {ms:10.4f} ms  {tf:8.2f} TFLOP/s  (reps {reps}) {note}")
        if after is not None:
            after(r)
        self.add(r)
        return ms


def flex_captured_grad(tx, flex):
    """Whether FlexAttention propagates gradients into a tensor score_mod captures (a learned
    bias or precision): a tiny case on the device, against autograd through the float32
    reference. (True, text) or (False, why)."""
    try:
        dev = tx["device"]
        g = torch.Generator(device="cpu").manual_seed(SEED)
        q, k, v = ((torch.rand(1, 2, 128, 16, generator=g) * 2 - 1).to(dev).requires_grad_()
                   for _ in range(3))
        pik = (0.5 + 1.5 * torch.rand(1, 2, 128, generator=g)).to(dev).requires_grad_()
        CAP.pik = pik

        def sm(score, b, h, qi, ki):
            return score * CAP.pik[b, h, ki]
        fa = flex["flex_attention"]
        o = fa(q, k, v, score_mod=sm, scale=0.25)
        gp = torch.autograd.grad(o.sum(), [pik], allow_unused=True)[0]
        CAP.pik = None
        if gp is None:
            return False, f"no gradient for the captured tensor (torch {torch.__version__})"
        qd, kd, vd, pd = (x.detach().clone().requires_grad_() for x in (q, k, v, pik))
        s = 0.25 * (qd @ kd.transpose(-1, -2)) * pd[:, :, None, :]
        ref = torch.autograd.grad((torch.softmax(s, -1) @ vd).sum(), [pd])[0]
        err = (gp.float() - ref).abs().max().item() / ref.abs().max().item()
        if not err < 1e-2:
            return False, f"the captured tensor's gradient is off by {err:.1e} (torch {torch.__version__})"
        return True, f"gradients of captured tensors supported (torch {torch.__version__}, rel. error {err:.1e})"
    except Exception as e:
        CAP.pik = None
        return False, f"{fail_msg(e)} (torch {torch.__version__})"


def run_backward(args, tx, flex, ours, timer, dtype_name, D, lengths, families, records):
    """FlexAttention's backward with the same score_mod (the precision a captured tensor that
    requires grad: learned), SDPA's backward (Dot) and the padded-SDPA Gaussian's, each timed as
    the backward alone (torch.autograd.grad of o, the graph retained) as benches/attention.rs
    times backward_into alone; ours through the binding's attention_backward where it has one,
    else from criterion (--criterion)."""
    dev = tx["device"]
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dtype_name]
    tokens, model_dim = args.tokens, args.model_dim
    H = model_dim // D
    gen = torch.Generator(device="cpu").manual_seed(SEED + 1000 + D)
    n = tokens * model_dim
    base = [(torch.rand(n, generator=gen) * 2 - 1).to(dtype).to(dev) for _ in range(4)]
    pih_all = (0.5 + 1.5 * torch.rand(H, generator=gen)).to(dev)
    pik_all = (0.5 + 1.5 * torch.rand(tokens * H, generator=gen)).to(dev)
    backend = "cuda" if tx["cuda"] else "cpu"
    for fam in families:
        variants = [False] if PREC[fam] is None else ([True, False] if args.full else [True])
        for learned in variants:
            score_mod = make_score_mod(fam, D)
            ffn = flex["compiled"](score_mod) if flex["ok"] else None
            flex_failed = None
            m_first = True
            for L in lengths:
                B = tokens // L
                tau = tau_of(fam, D)
                for causal in (False, True):
                    mask = "causal" if causal else "full"
                    var = "" if PREC[fam] is None else ("_learnpi" if learned else "_fixedpi")
                    prec = (PREC[fam] or "none") + ("" if PREC[fam] is None else
                                                    (" (learned)" if learned else " (fixed)"))
                    rec0 = {"op": "attention", "kind": "backward", "family": fam,
                            "precision": prec, "causal": causal, "dtype": dtype_name, "D": D,
                            "L": L, "B": B, "H": H}
                    why = budget_why(args, args.compile_s if (m_first and flex["ok"]) else 0.0)
                    if why:
                        cut_record(args, records, dict(rec0), why)
                        continue
                    print(f"-- backward {fam} {mask} {prec} {dtype_name} D={D} L={L} B={B} H={H}")
                    M = Measurer(args, timer, records, rec0, bwd_flops(B, H, L, D, causal), tx,
                                 flex, note_head="backward alone, FlashAttention's 2.5x convention",
                                 target=lambda impl, ms: "flex/ours>=1" if impl == "flex" else "")
                    M.first_flex = m_first
                    q, k, v = (x.view(B, H, L, D).detach().clone().requires_grad_()
                               for x in base[:3])
                    d_o = base[3].view(B, H, L, D)
                    pih = pih_all.clone().requires_grad_(learned) if PREC[fam] == "head" else None
                    pik = (pik_all.view(B, H, L).clone().requires_grad_(learned)
                           if PREC[fam] == "key" else None)
                    pi = pih if pih is not None else pik
                    wrt = [q, k, v] + ([pi] if learned else [])

                    # ours: through the binding where it has attention_backward (the forward's
                    # o and lse computed once, not timed), else benches/attention.rs's
                    # criterion figure for the same group and id
                    group = f"{backend}_attention_bwd_{fam}_{mask}{var}_{dtype_name}"
                    crit_ms = criterion_ms(args, group, f"D{D}_L{L}_B{B}_H{H}")
                    fk = ours.get("fk") if ours["ok"] else None
                    if fk is not None and hasattr(fk, "attention_backward"):
                        try:
                            kw = dict(score=OURS_SCORE[fam], causal=causal,
                                      pi_head=None if pih is None else pih.detach(),
                                      pi_key=None if pik is None else pik.detach(), check=False)
                            if fam == "studentt":
                                kw["nu"] = NU
                            with torch.no_grad():
                                o_f, lse_f = fk.attention_forward(q.detach(), k.detach(),
                                                                  v.detach(), **kw)[:2]

                            def run_ours():
                                with torch.no_grad():
                                    return fk.attention_backward(
                                        q.detach(), k.detach(), v.detach(), o_f, lse_f, d_o,
                                        precision_grads=learned, **kw)
                            crit = (f"; criterion {crit_ms:.4f} ms" if crit_ms is not None
                                    else "")
                            M.measure("ours", run_ours, "fk.attention_backward, "
                                      f"precision_grads={learned} (dpi_h, dpi_j and dnu "
                                      f"when True){crit}", skip_unsupported=True)
                        except Exception as e:
                            M.fail("ours", e)
                    elif crit_ms is not None:
                        print(f"  ours      {crit_ms:10.4f} ms  (criterion)")
                        M.add({"impl": "ours", "ms": crit_ms, "note":
                               f"criterion {group} (benches/attention.rs, same run)"})
                    else:
                        M.skip("ours", "no backward in the Python binding, and no criterion "
                               f"figure for {group} (--criterion)")

                    def backward_of(o):
                        def run():
                            return torch.autograd.grad(o, wrt, d_o, retain_graph=True,
                                                       allow_unused=True)
                        return run

                    if fam == "dot":
                        try:
                            with sdpa_ctx(tx):
                                o = F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                                   scale=tau)
                            M.measure("sdpa", backward_of(o))
                            del o
                        except Exception as e:
                            M.fail("sdpa", e)
                    if fam == "gaussian":
                        try:
                            pad = (D + 1 + 7) // 8 * 8
                            ph = pih.view(1, H, 1, 1).to(dtype)
                            zq = q.new_zeros(B, H, L, pad - D - 1)
                            qt = torch.cat([q * ph, (-0.5 * ph).expand(B, H, L, 1), zq], -1)
                            kt = torch.cat([k, (k.float() ** 2).sum(-1, keepdim=True).to(dtype),
                                            zq], -1)
                            vt = torch.cat([v, v.new_zeros(B, H, L, pad - D)], -1)
                            with sdpa_ctx(tx):
                                o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal,
                                                                   scale=tau)[..., :D]
                            M.measure("sdpa_pad", backward_of(o),
                                      "backward through the padding (dpi_h by autograd)")
                            del o, qt, kt, vt
                        except Exception as e:
                            M.fail("sdpa_pad", e)
                    if not flex["ok"]:
                        M.skip("flex", flex["why"])
                    elif flex_failed:
                        M.skip("flex", f"its first call for this family failed ({flex_failed})")
                    elif fam != "dot" and not args.captured_grad[0]:
                        M.skip("flex", "score_mod reads captured tensors (norms, precision) "
                               f"that need gradients: {args.captured_grad[1]}")
                    else:
                        try:
                            # what a user computes: the norms from q and k (in the graph, so
                            # their gradients flow back), the precision's log for the normaliser
                            CAP.qn = q.float().square().sum(-1)
                            CAP.kn = k.float().square().sum(-1)
                            CAP.pih, CAP.lpih = (pih, pih.log()) if pih is not None else (None, None)
                            CAP.pik, CAP.lpik = (pik, pik.log()) if pik is not None else (None, None)
                            CAP.full = torch.tensor(not causal, device=dev)
                            bm = flex["create_block_mask"](mask_mod, None, None, L, L, device=dev)
                            o = ffn(q, k, v, bm, tau if fam == "dot" else 1.0)

                            def check_precision_grad(r):
                                gp = torch.autograd.grad(o, [pi], d_o, retain_graph=True,
                                                         allow_unused=True)[0]
                                if gp is None:
                                    r["note"] += "; NO gradient reached the precision"
                            got = M.measure("flex", backward_of(o),
                                            "the norms' backward included",
                                            after=check_precision_grad if learned else None)
                            if got is None:
                                flex_failed = M.results[-1]["note"]
                            del o
                        except Exception as e:
                            M.fail("flex", e)
                            flex_failed = fail_msg(e)
                            M.first_flex = False
                        CAP.qn = CAP.kn = CAP.pih = CAP.lpih = CAP.pik = CAP.lpik = None
                    m_first = M.first_flex
                    del q, k, v, pih, pik, pi, wrt
                    if tx["cuda"]:
                        torch.cuda.empty_cache()
    del base


# ---- score inputs (--op inputs, issue 23): bias, mask, packed sequences ----

INPUTS_FAMILIES = ["dot", "studentt"]  # the default and quick subset; --full: all four
# by value: the targets' rows first (a short budget cuts the last)
INPUTS_VARIANTS = ["fwd_keybias", "bwd_fullbias", "fwd_padmask", "fwd_varlen", "bwd_varlen"]
INPUTS_DESC = {
    "fwd_keybias": "per-key bias [B,H,1,L]",
    "bwd_fullbias": "full bias [1,H,L,L], backward with dbias",
    "fwd_padmask": "padding mask [B,1,1,L]",
    "fwd_varlen": "8 packed sequences, causal",
    "bwd_varlen": "8 packed sequences, causal, backward",
}


def inputs_score_mod(fam, D, variant):
    """The family's score_mod plus the captured bias: CAP.bias [B, H, L] (per key) or [H, L, L]
    (full; a tensor that requires grad in the backward)."""
    base = make_score_mod(fam, D)
    if variant == "fwd_keybias":
        def score_mod(score, b, h, qi, ki):
            return base(score, b, h, qi, ki) + CAP.bias[b, h, ki]
        return score_mod
    if variant == "bwd_fullbias":
        def score_mod(score, b, h, qi, ki):
            return base(score, b, h, qi, ki) + CAP.bias[h, qi, ki]
        return score_mod
    return base


def pad_mask_mod(b, h, qi, ki):
    return ki < CAP.kv_len[b]


def doc_mask_mod(b, h, qi, ki):
    # packed sequences: the same sequence, causal within it (Lq_s = Lk_s)
    return (CAP.doc[qi] == CAP.doc[ki]) & (qi >= ki)


def inputs_lengths(total, seed):
    """8 random sequence lengths summing to total (each >= 1), as benches/attention.rs draws
    them (not the same numbers: another generator)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = 0.25 + 1.5 * torch.rand(8, generator=g, dtype=torch.float64)
    lens = [max(1, int(x)) for x in (w / w.sum() * total).tolist()]
    lens[-1] = total - sum(lens[:-1])
    return lens


def run_inputs(args, tx, flex, ours, timer, dtype_name, D, lengths, families, records):
    """ours (fk.attention_forward/attention_backward with bias=, attn_mask=, cu_seqlens_*) vs
    FlexAttention with the same score_mod plus a captured bias (the full one requires grad; its
    gradient is taken by torch.autograd.grad with q, k, v's), the padding mask as a block mask,
    packed sequences as a document-causal block mask; SDPA (Dot) with the bias as a float
    attn_mask (requiring grad in the backward) and the padding mask as a boolean one. Full
    (non-causal) but for the packed sequences; no precision gradient."""
    dev = tx["device"]
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dtype_name]
    tokens, model_dim = args.tokens, args.model_dim
    H = model_dim // D
    gen = torch.Generator(device="cpu").manual_seed(SEED + 3000 + D)
    n = tokens * model_dim
    base = [(torch.rand(n, generator=gen) * 2 - 1).to(dtype).to(dev) for _ in range(4)]
    pih_all = (0.5 + 1.5 * torch.rand(H, generator=gen)).to(dev)
    pik_all = (0.5 + 1.5 * torch.rand(tokens * H, generator=gen)).to(dev)
    fk = ours.get("fk") if ours["ok"] else None
    ffns, failed, first = {}, {}, {}
    for variant in INPUTS_VARIANTS:
        bwd = variant.startswith("bwd")
        varlen = variant.endswith("varlen")
        for L in lengths:
            B = tokens // L
            for fam in families:
                key = (fam, variant)
                causal = varlen
                tau = tau_of(fam, D)
                rec0 = {"op": "attention", "kind": "inputs", "variant": variant,
                        "family": fam, "precision": f"{PREC[fam] or 'none'}; "
                        f"{INPUTS_DESC[variant]}", "causal": causal, "dtype": dtype_name,
                        "D": D, "L": L, "B": B, "H": H}
                why = budget_why(args, args.compile_s if (first.get(key, True) and flex["ok"])
                                 else 0.0)
                if why:
                    cut_record(args, records, dict(rec0), why)
                    continue
                if varlen:
                    lens = inputs_lengths(tokens, SEED + D + L)
                    rec0["lens"] = lens
                    fl = sum(flops(1, H, l, D, True) for l in lens)
                else:
                    fl = flops(B, H, L, D, False)
                if bwd:
                    fl *= 2.5
                print(f"-- inputs {variant} {fam} {dtype_name} D={D} L={L} B={B} H={H}"
                      + (f" lens={lens}" if varlen else ""))
                tgt = {"fwd_keybias": "<=1.05x our plain fwd",
                       "bwd_fullbias": "<=1.5x our plain bwd"}.get(variant, "")
                M = Measurer(args, timer, records, rec0, fl, tx, flex,
                             note_head=INPUTS_DESC[variant] + ("; FLOPs 2.5x the forward's"
                                                                if bwd else ""),
                             target=lambda impl, ms: (tgt if impl == "ours" else
                                                      "flex/ours>=1" if impl == "flex" else ""))
                M.first_flex = first.get(key, True)
                pih = pih_all if PREC[fam] == "head" else None
                if varlen:
                    shape = (1, H, tokens, D)
                    pik = pik_all.view(1, H, tokens) if PREC[fam] == "key" else None
                else:
                    shape = (B, H, L, D)
                    pik = pik_all.view(B, H, L) if PREC[fam] == "key" else None
                q, k, v, d_o = (x.view(*shape) for x in base)
                # the variant's inputs
                bias = mask = cu = None
                kw_in = {}
                if variant == "fwd_keybias":
                    bias = torch.empty(B, H, 1, L, device=dev).uniform_(-1, 1)
                    kw_in = {"bias": bias}
                elif variant == "bwd_fullbias":
                    bias = torch.empty(1, H, L, L, device=dev).uniform_(-1, 1)
                    kw_in = {"bias": bias}
                elif variant == "fwd_padmask":
                    keep = torch.tensor([L - (b % 4 + 1) * L // 8 for b in range(B)],
                                        device=dev, dtype=torch.int32)
                    mask = (torch.arange(L, device=dev)[None, :] < keep[:, None]).view(B, 1, 1, L)
                    kw_in = {"attn_mask": mask}
                else:
                    offs = [0]
                    for ln in lens:
                        offs.append(offs[-1] + ln)
                    cu = torch.tensor(offs, dtype=torch.int32, device=dev)
                    kw_in = {"cu_seqlens_q": cu, "cu_seqlens_k": cu,
                             "max_seqlen_q": max(lens), "max_seqlen_k": max(lens)}

                o_ours = dbias_ours = None

                def dbias_vs_ours(run):
                    """An after callback (full-bias backward): max|dbias - ours| / max|ours|."""
                    def after(r):
                        if dbias_ours is None:
                            return
                        g = run()[3]
                        if g is None:
                            r["note"] += "; NO gradient reached the bias"
                            return
                        err = ((g.float().reshape(-1) - dbias_ours.reshape(-1)).abs().max()
                               / dbias_ours.abs().max()).item()
                        r["rel_err_vs_ours"] = err
                        r["note"] += f"; max|dbias - ours| / max|ours| = {err:.1e}"
                        print(f"  {r['impl']} vs ours: max|dbias - ours| / max|ours| = {err:.1e}")
                    return after

                def vs_ours(out):
                    """An after callback: max|o - ours| / max|ours| into the note (forward)."""
                    def after(r):
                        if o_ours is None or M.ours_ms is None:
                            return
                        o = out()
                        if varlen:
                            o = o[0].transpose(0, 1)
                        err = ((o.float() - o_ours.float()).abs().max()
                               / o_ours.float().abs().max()).item()
                        r["rel_err_vs_ours"] = err
                        r["note"] = "; ".join(x for x in (r["note"],
                                              f"max|o - ours| / max|ours| = {err:.1e}") if x)
                        print(f"  {r['impl']} vs ours: max|o - ours| / max|ours| = {err:.1e}")
                    return after

                # ours
                if fk is None:
                    M.skip("ours", ours["why"])
                else:
                    try:
                        kw = dict(score=OURS_SCORE[fam], causal=causal, pi_head=pih,
                                  pi_key=pik, check=False)
                        if fam == "studentt":
                            kw["nu"] = NU
                        if varlen:  # packed: [total, H, D] views of the same memory
                            qo, ko, vo, do = (x[0].transpose(0, 1) for x in (q, k, v, d_o))
                        else:
                            qo, ko, vo, do = q, k, v, d_o
                        with torch.no_grad():
                            if bwd:
                                o_f, lse_f = fk.attention_forward(qo, ko, vo, **kw, **kw_in)[:2]

                                def run_ours(kw_in=kw_in):
                                    return fk.attention_backward(qo, ko, vo, o_f, lse_f, do,
                                                                 precision_grads=False, **kw,
                                                                 **kw_in)
                            else:
                                o_ours = torch.empty_like(qo)

                                def run_ours(kw_in=kw_in):
                                    return fk.attention_forward(qo, ko, vo, out=o_ours, **kw,
                                                                **kw_in)
                            note = ""
                            if variant in ("fwd_keybias", "bwd_fullbias", "fwd_padmask"):
                                # our plain call on the same shape: the ratio of the targets
                                try:
                                    if bwd:  # from the plain forward's o and lse
                                        o_p, lse_p = fk.attention_forward(qo, ko, vo, **kw)[:2]

                                        def plain():
                                            return fk.attention_backward(
                                                qo, ko, vo, o_p, lse_p, do,
                                                precision_grads=False, **kw)
                                    else:
                                        def plain():
                                            return fk.attention_forward(qo, ko, vo, out=o_ours,
                                                                        **kw)
                                    timer.once(plain)
                                    p_ms = timer.median(plain, max(args.min_reps, 3), warmup=0)
                                    note = f"our plain call {p_ms:.4f} ms"
                                    M.plain_ms = p_ms
                                except Exception as e:
                                    note = f"our plain call: {fail_msg(e)}"
                                    M.plain_ms = None
                            got = M.measure("ours", run_ours, note, skip_unsupported=True)
                            if got is not None and variant == "bwd_fullbias":
                                dbias_ours = run_ours()[6].float()
                            if got is not None and getattr(M, "plain_ms", None):
                                r = M.records[-1]
                                r["ours_over_plain"] = got / M.plain_ms
                                r["note"] += f"; with the input / plain = {got / M.plain_ms:.3f}"
                                M.records.write()
                                print(f"  ours/plain {got / M.plain_ms:.3f} ({tgt or 'no target'}"
                                      "; a reminder, not a check)")
                    except Exception as e:  # e.g. the forward a backward needs, not built
                        if is_unsupported(e):
                            M.skip("ours", fail_msg(e))
                        else:
                            M.fail("ours", e)

                # sdpa (Dot): the bias as a float attn_mask, the padding mask as a boolean one
                if fam == "dot" and not varlen:
                    try:
                        if variant == "fwd_padmask":
                            am = mask
                        else:
                            am = bias.to(dtype)
                        if bwd:
                            qs, ks, vs = (x.detach().clone().requires_grad_() for x in (q, k, v))
                            am = am.detach().clone().requires_grad_()
                            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=am,
                                                               scale=tau)

                            def run_sdpa():
                                return torch.autograd.grad(o, [qs, ks, vs, am], d_o,
                                                           retain_graph=True)
                            M.measure("sdpa", run_sdpa, "attn_mask a float tensor requiring "
                                      "grad (its gradient taken); default backend selection",
                                      after=dbias_vs_ours(run_sdpa))
                            del o
                        else:
                            def run_sdpa():
                                with torch.no_grad():
                                    return F.scaled_dot_product_attention(q, k, v, attn_mask=am,
                                                                          scale=tau)
                            M.measure("sdpa", run_sdpa, "attn_mask " + (
                                "boolean" if variant == "fwd_padmask" else "float (the bias)")
                                + "; default backend selection", after=vs_ours(run_sdpa))
                    except Exception as e:
                        M.fail("sdpa", e)

                # flex
                if not flex["ok"]:
                    M.skip("flex", flex["why"])
                elif key in failed:
                    M.skip("flex", f"its first call for this family and variant failed "
                           f"({failed[key]})")
                elif bwd and not args.captured_grad[0]:
                    M.skip("flex", "its backward, checked first on a tiny case with a captured "
                           f"tensor requiring grad: {args.captured_grad[1]}")
                else:
                    try:
                        if key not in ffns:
                            ffns[key] = flex["compiled"](inputs_score_mod(fam, D, variant))
                        ffn = ffns[key]
                        CAP.pih, CAP.lpih = (pih, pih.log()) if pih is not None else (None, None)
                        CAP.pik, CAP.lpik = (pik, pik.log()) if pik is not None else (None, None)
                        Lf = tokens if varlen else L
                        if variant == "fwd_padmask":
                            CAP.kv_len = keep
                            bm = flex["create_block_mask"](pad_mask_mod, B, None, L, L,
                                                           device=dev)
                        elif varlen:
                            CAP.doc = torch.repeat_interleave(
                                torch.arange(len(lens), device=dev),
                                torch.tensor(lens, device=dev))
                            bm = flex["create_block_mask"](doc_mask_mod, None, None, Lf, Lf,
                                                           device=dev)
                        else:
                            bm = None
                        fscale = tau if fam == "dot" else 1.0
                        norms = fam != "dot"
                        if bwd:
                            qf, kf, vf = (x.detach().clone().requires_grad_() for x in (q, k, v))
                            wrt = [qf, kf, vf]
                            if bias is not None:
                                CAP.bias = bias[0].detach().clone().requires_grad_()
                                wrt.append(CAP.bias)
                            if norms:  # in the graph: their gradients flow to q and k
                                CAP.qn = qf.float().square().sum(-1)
                                CAP.kn = kf.float().square().sum(-1)
                            o = ffn(qf, kf, vf, bm, fscale)

                            def run_flex():
                                return torch.autograd.grad(o, wrt, d_o, retain_graph=True,
                                                           allow_unused=True)

                            got = M.measure("flex", run_flex, "backward alone (torch.autograd."
                                            "grad of o wrt q, k, v" + (", bias" if bias is not
                                                                      None else "") + ")",
                                            after=dbias_vs_ours(run_flex) if bias is not None
                                            else None)
                            del o, wrt
                        else:
                            if variant == "fwd_keybias":
                                CAP.bias = bias.view(B, H, L)

                            def run_flex():
                                with torch.no_grad():
                                    if norms:  # what a user computes per call
                                        CAP.qn = q.float().square().sum(-1)
                                        CAP.kn = k.float().square().sum(-1)
                                    return ffn(q, k, v, bm, fscale)
                            got = M.measure("flex", run_flex, after=vs_ours(run_flex))
                        if got is None:
                            failed[key] = M.results[-1]["note"]
                    except Exception as e:
                        M.fail("flex", e)
                        failed[key] = fail_msg(e)
                        M.first_flex = False
                    CAP.qn = CAP.kn = CAP.pih = CAP.lpih = CAP.pik = CAP.lpik = None
                    CAP.bias = CAP.kv_len = CAP.doc = None
                first[key] = M.first_flex
                del q, k, v, d_o, bias, mask, cu
                if tx["cuda"]:
                    torch.cuda.empty_cache()
    del base


DECODE_HQ, DECODE_HKV, DECODE_D = 32, 8, 128
DECODE_LK = [4096, 65536, 262144, 1 << 20]
DECODE_QUICK_LK = [65536, 1 << 20]


def decode_shapes(args):
    if args.smoke:
        return [dict(B=2, Hq=4, Hkv=2, Lq=lq, Lk=256, D=16) for lq in (1, 16)]
    lks = args.decode_lk or (DECODE_LK if args.full else DECODE_QUICK_LK)
    return [dict(B=b, Hq=DECODE_HQ, Hkv=DECODE_HKV, Lq=lq, Lk=lk, D=DECODE_D)
            for lq in (1, 16) for lk in lks for b in (1, 4) if b * lk <= (1 << 20)]


def run_decode(args, tx, flex, ours, timer, dtype_name, families, records):
    """Decode (benches/attention.rs's decode group): ours (attention_forward with kv_len, the
    automatic key split), SDPA for Dot (the query heads of a kv head folded into rows, as
    decode servers do, with a boolean mask for the cache lengths and the bottom-right causal
    mask: the memory-efficient backend, flash takes no mask), FlexAttention (enable_gqa, a
    block mask from the cache lengths; its decoding kernel where torch picks it for short Lq)."""
    dev = tx["device"]
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dtype_name]
    el = torch.tensor([], dtype=dtype).element_size()
    shapes = decode_shapes(args)
    gen = torch.Generator(device="cpu").manual_seed(SEED + 2000)
    ffns = {}
    first = {fam: True for fam in families}
    failed = {}
    for s in shapes:
        B, Hq, Hkv, Lq, Lk, D = s["B"], s["Hq"], s["Hkv"], s["Lq"], s["Lk"], s["D"]
        G = Hq // Hkv
        lens = [Lk - i * Lk // 8 for i in range(B)]
        kv_bytes = Hkv * sum(lens) * 2 * D * el
        q = (torch.rand(B, Hq, Lq, D, generator=gen) * 2 - 1).to(dtype).to(dev)
        k = torch.empty(B, Hkv, Lk, D, dtype=dtype, device=dev).uniform_(-1, 1)
        v = torch.empty(B, Hkv, Lk, D, dtype=dtype, device=dev).uniform_(-1, 1)
        kv_len = torch.tensor(lens, dtype=torch.int32, device=dev)
        pih_all = (0.5 + 1.5 * torch.rand(Hq, generator=gen)).to(dev)
        pik_all = torch.empty(B, Hkv, Lk, device=dev).uniform_(0.5, 2.0)
        for fam in families:
            rec0 = {"op": "attention", "kind": "decode", "family": fam,
                    "precision": PREC[fam] or "none", "causal": True, "dtype": dtype_name,
                    "D": D, "L": Lk, "Lq": Lq, "B": B, "H": Hq, "Hkv": Hkv, "lens": lens}
            why = budget_why(args, args.compile_s if (first[fam] and flex["ok"]) else 0.0)
            if why:
                cut_record(args, records, dict(rec0), why)
                continue
            print(f"-- decode {fam} {dtype_name} Lq={Lq} Lk={Lk} B={B} Hq={Hq} Hkv={Hkv} "
                  f"D={D} lens={lens}")
            fl = 4.0 * Hq * Lq * sum(lens) * D
            M = Measurer(args, timer, records, rec0, fl, tx, flex,
                         note_head=f"decode Lq={Lq} Hkv={Hkv}",
                         target=lambda impl, ms: hbm_share(kv_gbps(kv_bytes, ms)),
                         extra=lambda ms: {"kv_mb": kv_bytes / 1e6,
                                           "gbps": kv_gbps(kv_bytes, ms)})
            M.first_flex = first[fam]
            pih = pih_all if PREC[fam] == "head" else None
            pik = pik_all if PREC[fam] == "key" else None
            tau = tau_of(fam, D)
            if not ours["ok"]:
                M.skip("ours", ours["why"])
            else:
                o_ours = torch.empty_like(q)
                kw = dict(score=OURS_SCORE[fam], causal=True, pi_head=pih, pi_key=pik,
                          kv_len=kv_len, check=False)
                if fam == "studentt":
                    kw["nu"] = NU
                M.measure("ours", lambda: ours["fk"].attention_forward(q, k, v, out=o_ours, **kw))
            if fam == "dot":
                try:
                    i = torch.arange(Lq, device=dev).repeat(G)[:, None]  # row g*Lq + i
                    j = torch.arange(Lk, device=dev)[None, :]
                    am = (j[None] < kv_len.view(B, 1, 1)) & (j <= i + (Lk - Lq))[None]
                    am = am[:, None]  # [B, 1, G*Lq, Lk]
                    qf = q.view(B, Hkv, G * Lq, D)

                    def run_sdpa():
                        return F.scaled_dot_product_attention(qf, k, v, attn_mask=am, scale=tau)
                    M.measure("sdpa", run_sdpa, "query heads folded into rows, boolean mask")
                except Exception as e:
                    M.fail("sdpa", e)
            if not flex["ok"]:
                M.skip("flex", flex["why"])
            elif fam in failed:
                M.skip("flex", f"its first call for this family failed ({failed[fam]})")
            else:
                try:
                    if fam not in ffns:
                        ffns[fam] = flex["compiled_gqa"](make_score_mod(fam, D, G))
                    CAP.kn = k.float().square().sum(-1)  # cached with the keys, not per call
                    CAP.pih, CAP.lpih = (pih, pih.log()) if pih is not None else (None, None)
                    CAP.pik, CAP.lpik = (pik, pik.log()) if pik is not None else (None, None)
                    CAP.kv_len, CAP.offset = kv_len, torch.tensor(Lk - Lq, device=dev)
                    bm = flex["create_block_mask"](decode_mask_mod, B, None, Lq, Lk, device=dev)
                    norms = fam != "dot"

                    def run_flex():
                        if norms:
                            CAP.qn = q.float().square().sum(-1)
                        return ffns[fam](q, k, v, bm, tau if fam == "dot" else 1.0)
                    if M.measure("flex", run_flex, "enable_gqa; key norms cached") is None:
                        failed[fam] = M.results[-1]["note"]
                except Exception as e:
                    M.fail("flex", e)
                    failed[fam] = fail_msg(e)
                    M.first_flex = False
                CAP.qn = CAP.kn = CAP.pih = CAP.lpih = CAP.pik = CAP.lpik = None
            first[fam] = M.first_flex
        del q, k, v, kv_len, pik_all
        CAP.kv_len = CAP.offset = None
        if tx["cuda"]:
            torch.cuda.empty_cache()


def kv_gbps(kv_bytes, ms):
    """The KV cache read per second (GB/s) in a decode call of ms milliseconds (None: no ms)."""
    return kv_bytes / (ms * 1e-3) / 1e9 if ms else None


def hbm_share(gbs):
    """A decode row's target column: its KV cache bandwidth against the H100's and H200's HBM."""
    if not gbs:
        return ""
    return (f"{gbs:.0f} GB/s of KV cache = {gbs / 3350 * 100:.1f}% of H100 3.35 TB/s, "
            f"{gbs / 4800 * 100:.1f}% of H200 4.8 TB/s")


def decode_mask_mod(b, h, qi, ki):
    # the cache length of batch b, and bottom-right causal (Lq <= Lk)
    return (ki < CAP.kv_len[b]) & (ki <= qi + CAP.offset)


# ---- the CPU benchmark (--op cpu, issue 24) ----

CPU_SHAPES = [(16, 2, 128, 32), (4, 2, 512, 32), (2, 2, 1024, 32)]  # B, H, L, D
CPU_SMOKE_SHAPES = [(2, 2, 32, 16)]


def cpu_target(fam, kind, impl, L):
    """(minimum peer/ours ratio, text) of issue 24 for this row; (None, "") where none."""
    if impl == "sdpa":
        return 0.8, "ours <= 1.25x sdpa"
    if impl == "eager":
        if fam != "dot" and L >= 512:
            return 2.0, ">=2x eager"
        return 1.0, ">=1x eager"
    return None, ""


def run_cpu(args, tx, ours, records):
    """Issue 24's CPU attention benchmark (module docstring, --op cpu)."""
    fk = ours.get("fk") if ours["ok"] else None
    timer = Timer(False)
    shapes = CPU_SMOKE_SHAPES if args.smoke else CPU_SHAPES
    if args.lengths:
        keep = {int(x) for x in args.lengths.split(",") if x.strip()}
        shapes = [sh for sh in shapes if sh[2] in keep]
    families = args.families.split(",") if args.families else FAMILIES
    dev_name = cpu_device_name(args.threads)
    for (B, H, L, D) in shapes:
        gen = torch.Generator(device="cpu").manual_seed(SEED + 4000 + L)
        q, k, v, d_o = ((torch.rand(B, H, L, D, generator=gen) * 2 - 1) for _ in range(4))
        pih_all = 0.5 + 1.5 * torch.rand(H, generator=gen)
        pik_all = 0.5 + 1.5 * torch.rand(B, H, L, generator=gen)
        for fam in families:
            tau = tau_of(fam, D)
            pih = pih_all if PREC[fam] == "head" else None
            pik = pik_all if PREC[fam] == "key" else None
            kw = dict(score=OURS_SCORE[fam], pi_head=pih, pi_key=pik, check=False)
            if fam == "studentt":
                kw["nu"] = NU
            for kind in ("cpu_fwd", "cpu_fwdbwd"):
                rec0 = {"op": "attention", "kind": kind, "family": fam,
                        "precision": PREC[fam] or "none", "causal": False, "dtype": "f32",
                        "D": D, "L": L, "B": B, "H": H, "threads": args.threads,
                        "device": dev_name}
                if time.perf_counter() > args.deadline:
                    why = f"CUT: past the {args.budget_s:g} s budget"
                    print(f"-- {kind} {fam} L={L}: {why}")
                    records.add({**rec0, "impl": "all", "ms": None, "cut": True, "note": why})
                    args.budget_skipped += 1
                    continue
                print(f"-- {kind} {fam} B={B} H={H} L={L} D={D} f32 full")
                got = {}

                def measure(impl, fn, note=""):
                    try:
                        t_first = timer.once(fn)
                        t1 = timer.once(fn)
                        reps = pick_reps(t1, args.budget_ms, args.min_reps, args.max_reps)
                        ms_min, ms = timer.stats(fn, reps, warmup=1)
                    except Exception as e:
                        msg = fail_msg(e)
                        print(f"  {impl:<6} FAILED ({msg})")
                        records.add({**rec0, "impl": impl, "ms": None, "ms_min": None,
                                     "ratio_vs_ours": None, "target": None,
                                     "note": f"FAILED: {msg}"})
                        return
                    got[impl] = ms
                    tgt, tgt_text = cpu_target(fam, kind, impl, L)
                    r = ratio(ms, got.get("ours")) if impl != "ours" else 1.0
                    if t_first > 5 * max(ms, 1e-3):
                        note = (note + "; " if note else "") + f"first call {t_first:.1f} ms"
                    rs = f"{r:.2f}x" if r is not None else "-"
                    print(f"  {impl:<6} {ms:10.3f} ms  (min {ms_min:.3f}, reps {reps})  "
                          f"peer/ours {rs}  {tgt_text}")
                    records.add({**rec0, "impl": impl, "ms": ms, "ms_min": ms_min, "reps": reps,
                                 "ratio_vs_ours": r if impl != "ours" else None,
                                 "target": tgt, "target_text": tgt_text, "note": note})

                # ours
                if fk is None:
                    print(f"  ours   SKIPPED ({ours['why']})")
                    records.add({**rec0, "impl": "ours", "ms": None, "note":
                                 f"SKIPPED: {ours['why']}"})
                elif kind == "cpu_fwd":
                    o_buf = torch.empty(B, H, L, D)
                    with torch.no_grad():
                        measure("ours", lambda: fk.attention_forward(q, k, v, out=o_buf, **kw))
                        try:
                            ref = reference(fam, q, k, v, pih, pik, False, tau)
                            err = ((o_buf - ref).abs().max() / ref.abs().max()).item()
                            print(f"  max|o_ours - o_eager| / max|o_eager| = {err:.2e}")
                            if records and records[-1]["impl"] == "ours":
                                records[-1]["rel_err_vs_eager"] = err
                                records.write()
                        except Exception as e:
                            print(f"  agreement check FAILED ({fail_msg(e)})")
                else:
                    with torch.no_grad():
                        def ours_fb():
                            o, lse = fk.attention_forward(q, k, v, **kw)[:2]
                            return fk.attention_backward(q, k, v, o, lse, d_o,
                                                         precision_grads=False, **kw)
                        measure("ours", ours_fb, "attention_forward + attention_backward "
                                "(precision_grads=False)")

                # plain PyTorch eager, every family
                if kind == "cpu_fwd":
                    def eager():
                        with torch.no_grad():
                            return reference(fam, q, k, v, pih, pik, False, tau)
                else:
                    def eager():
                        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
                        o = reference(fam, qg, kg, vg, pih, pik, False, tau)
                        return torch.autograd.grad(o, (qg, kg, vg), d_o)
                measure("eager", eager, "float32 formula, [L, L] scores")

                # SDPA, Dot only
                if fam == "dot":
                    if kind == "cpu_fwd":
                        def sdpa():
                            with torch.no_grad():
                                return F.scaled_dot_product_attention(q, k, v, scale=tau)
                    else:
                        def sdpa():
                            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
                            o = F.scaled_dot_product_attention(qg, kg, vg, scale=tau)
                            return torch.autograd.grad(o, (qg, kg, vg), d_o)
                    measure("sdpa", sdpa, "torch SDPA, CPU kernel")


def print_cpu_table(records):
    print()
    hdr = (f"{'kind':<11} {'family':<9} {'L':>5} {'impl':<6} {'ms':>10} {'min ms':>10} "
           f"{'peer/ours':>9}  target")
    print(hdr)
    print("-" * len(hdr))
    for r in records:
        if r.get("cut"):
            print(f"{r['kind']:<11} {r['family']:<9} {r['L']:>5} {'all':<6} {'CUT':>10}")
            continue
        if r["ms"] is None:
            print(f"{r['kind']:<11} {r['family']:<9} {r['L']:>5} {r['impl']:<6} {'-':>10}  "
                  f"{r['note']}")
            continue
        rs = f"{r['ratio_vs_ours']:.2f}x" if r.get("ratio_vs_ours") is not None else "-"
        print(f"{r['kind']:<11} {r['family']:<9} {r['L']:>5} {r['impl']:<6} {r['ms']:10.3f} "
              f"{r['ms_min']:10.3f} {rs:>9}  {r.get('target_text') or ''}")
    print("(peer/ours > 1: ours is faster; target: issue 24's goal for that ratio)")


def sdpa_ctx(tx):
    """The flash backend on CUDA; the default selection on the CPU (smoke)."""
    import contextlib
    if not tx["cuda"]:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def print_table(records):
    print()
    fw = max([9] + [len(r["family"]) + 1 + len(r["variant"]) for r in records
                    if r.get("variant")])
    hdr = (f"{'family':<{fw}} {'mask':<6} {'dtype':<5} {'D':>4} {'L':>6} {'impl':<9} {'ms':>10} "
           f"{'TFLOP/s':>8} {'peer/ours':>9} {'target':<15} {'rel.err':>8}")
    print(hdr)
    print("-" * len(hdr))
    cut = [r for r in records if r.get("cut")]
    for r in records:
        if r.get("cut"):
            continue
        fam = r["family"] + (f" {r['variant']}" if r.get("variant") else "")
        head = (f"{fam:<{fw}} {'causal' if r['causal'] else 'full':<6} {r['dtype']:<5} "
                f"{r['D']:>4} {r['L']:>6} {r['impl']:<9}")
        if r["ms"] is None:
            print(f"{head} {'-':>10}   {r['note']}")
            continue
        ratio = f"{r['ratio_vs_ours']:.2f}x" if r["ratio_vs_ours"] is not None else "-"
        err = f"{r['rel_err_vs_ref']:.1e}" if r["rel_err_vs_ref"] is not None else "-"
        print(f"{head} {r['ms']:10.4f} {r['tflops']:8.2f} {ratio:>9} {r['target']:<15} {err:>8}")
    print("(TFLOP/s: FlashAttention's convention 4*B*H*L^2*D, halved when causal; peer/ours: time "
          "ratio, > 1: ours is faster; target: the issue's goal for that row (issue 5; --op inputs: "
          "issue 23), not a verdict; "
          "rel.err: max|o - ref| / max|ref| vs float32 on batch 0, heads 0-1, shortest length)")
    if cut:
        print(f"CUT for time ({len(cut)} shapes, not measured): " + ", ".join(
            f"{r['family']} {'causal' if r['causal'] else 'full'} {r['dtype']} D={r['D']} "
            f"L={r['L']}" for r in cut))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib", help="libfep_kernels.so (default: $FEP_KERNELS_LIB or "
                    "target/release/libfep_kernels.so)")
    ap.add_argument("--out", help="write the records as JSON here")
    ap.add_argument("--quick", action="store_true",
                    help="the GPU suite's quick step: bf16, D 128 and 64, L 1k/4k/16k, causal "
                    "and full, every family (the default subset), fewer repetitions")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes, f32, flex eager, on the CPU: tests the script")
    ap.add_argument("--full", action="store_true",
                    help="every shape of benches/attention.rs (bf16 and f16, all six lengths)")
    ap.add_argument("--dtypes", default=None, help="comma-separated: bf16, f16")
    ap.add_argument("--dims", default=None, help="comma-separated head dims (default 64,128)")
    ap.add_argument("--lengths", default=None, help="comma-separated L (default 1024,4096,16384)")
    ap.add_argument("--families", default=None, help="comma-separated subset of " +
                    ", ".join(FAMILIES))
    ap.add_argument("--device", default=None, choices=["cuda", "cpu"],
                    help="default cuda (cpu with --smoke)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads: torch.set_num_threads(N) and fep_kernels.set_num_threads(N)")
    ap.add_argument("--op", default="forward",
                    choices=["forward", "backward", "decode", "inputs", "cpu"],
                    help="forward (default), backward (default subset bf16, D = 128, L = 4k, "
                    "learned precisions; --full: bf16 and f16, D 128 and 64, L 1k/4k/16k, learned "
                    "and fixed) or decode (default subset Lk 64k (B 1, 4) and 1M (B 1), Lq 1 and "
                    "16, bf16; --full: Lk 4k to 1M) or inputs (bias, padding mask, packed "
                    "sequences: bf16, D = 128, L = 4k, dot and studentt; --full: D 128 and 64, "
                    "L 1k and 4k, every family)")
    ap.add_argument("--criterion", default=None,
                    help="criterion's output folder ($CRITERION_HOME) of a benches/attention.rs "
                    "run: --op backward takes ours from it (the binding has no backward)")
    ap.add_argument("--decode-lk", default=None, help="comma-separated Lk for --op decode")
    ap.add_argument("--budget-s", type=float, default=165.0,
                    help="stop starting new shapes after this many seconds (default 165: the "
                    "script stays under 3 minutes; the shapes left are listed as SKIPPED)")
    args = ap.parse_args()
    if args.op == "cpu":
        args.device = "cpu"
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    cpu_threads_env(args.threads)  # before torch is imported
    quick = args.quick or args.smoke
    args.budget_ms = 50.0 if quick else 150.0
    args.min_reps, args.max_reps = (3, 20) if quick else (3, 30)
    if args.smoke:
        args.budget_ms, args.min_reps, args.max_reps = 30.0, 2, 5
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731
    if args.smoke:
        args.tokens, args.model_dim = 128, 32
        dtypes = ["f32"]
        dims = [16]
        lengths = [32, 64]
    else:
        args.tokens, args.model_dim = TOKENS, MODEL_DIM
        dtypes = ["bf16", "f16"] if args.full else ["bf16"]
        dims = [128, 64]  # D = 128 first: what a short budget keeps
        lengths = ALL_LENGTHS if args.full else DEFAULT_LENGTHS
        if args.quick and args.full:
            ap.error("--quick is the default subset; --full is every shape")
    if args.op == "backward" and not args.full:
        dims = [16] if args.smoke else [128]
        lengths = [64] if args.smoke else [4096]
    if args.op == "inputs":
        if args.smoke:
            dims, lengths = [16], [64]
        elif not args.full:
            dims, lengths = [128], [4096]
        else:
            dims, lengths = [128, 64], [1024, 4096]  # a full bias at 16k would be 17 GB
        if not args.full and not args.dtypes:
            dtypes = dtypes[:1]
    if args.op == "decode" and args.full and not args.dtypes:
        dtypes = ["bf16", "f16"]
    args.decode_lk = ints(args.decode_lk) if args.decode_lk else None
    dtypes = args.dtypes.split(",") if args.dtypes else dtypes
    dims = ints(args.dims) if args.dims else dims
    lengths = ints(args.lengths) if args.lengths else lengths
    families = args.families.split(",") if args.families else (
        BWD_FAMILIES if args.op == "backward" else
        INPUTS_FAMILIES if args.op == "inputs" and not args.full else FAMILIES)
    bad = set(families) - set(FAMILIES)
    if bad:
        ap.error(f"unknown families {sorted(bad)}")

    tx = setup_torch(args)
    if not tx["ok"]:
        print(f"benches/peers/attention.py: SKIPPED: {tx['why']}")
        write_json(args.out, [])
        return 0
    if args.op == "cpu":
        ours = setup_ours(args, tx)
        apply_threads(args.threads, torch, ours.get("fk"))
        if args.quick or args.smoke:
            args.budget_ms, args.min_reps, args.max_reps = 100.0, 3, 10
        else:
            args.budget_ms, args.min_reps, args.max_reps = 400.0, 5, 50
        print(f"torch {torch.__version__} on {cpu_device_name(args.threads)} | threads torch "
              f"{torch.get_num_threads()} | ours: "
              + (f"fep-kernels {ours['version']}, {ours['fk'].get_num_threads()} thread(s)"
                 if ours["ok"] else f"SKIPPED ({ours['why']})"))
        records = Records(args.out)
        t0 = time.perf_counter()
        args.deadline = t0 + args.budget_s
        args.budget_skipped = 0
        run_cpu(args, tx, ours, records)
        print_cpu_table(records)
        if args.budget_skipped:
            print(f"{args.budget_skipped} row(s) CUT: the {args.budget_s:g} s budget")
        print(f"total {time.perf_counter() - t0:.1f} s")
        records.write()
        if args.out:
            print(f"wrote {args.out}")
        return 0
    flex = setup_flex(args, tx)
    ours = setup_ours(args, tx)
    if not tx["cuda"]:
        apply_threads(args.threads, torch, ours.get("fk"))
    print(f"torch {torch.__version__} on {tx['name']} | flex: "
          f"{flex['mode'] if flex['ok'] else 'SKIPPED (' + flex['why'] + ')'} | ours: "
          f"{'fep-kernels ' + ours['version'] if ours['ok'] else 'SKIPPED (' + ours['why'] + ')'}")
    if args.op == "decode":
        print(f"decode shapes: {decode_shapes(args)}, causal, per-batch cache lengths, dtypes "
              f"{dtypes}, families {families}")
    else:
        print(f"{args.op} shapes: B*L = {args.tokens} tokens, Hq*D = {args.model_dim}, dtypes "
              f"{dtypes}, D {dims}, L {lengths}, causal and full, families {families}")
    args.captured_grad = (False, "not checked")
    if args.op in ("backward", "inputs") and flex["ok"]:
        args.captured_grad = flex_captured_grad(tx, flex)
        print(f"FlexAttention, gradients of captured tensors: "
              f"{'yes' if args.captured_grad[0] else 'NO'}: {args.captured_grad[1]}")
    timer = Timer(tx["cuda"])
    records = Records(args.out)
    t0 = time.perf_counter()
    args.deadline = t0 + args.budget_s
    args.budget_skipped = 0
    args.compile_s = 0.0  # the slowest flex compile so far
    for dt in dtypes:
        if args.op == "decode":
            try:
                with torch.no_grad():
                    run_decode(args, tx, flex, ours, timer, dt, families, records)
            except Exception as e:  # e.g. out of memory: report, go on
                print(f"== decode {dt}: FAILED ({fail_msg(e)})")
            if tx["cuda"]:
                torch.cuda.empty_cache()
            continue
        for D in dims:
            try:
                if args.op == "inputs":
                    run_inputs(args, tx, flex, ours, timer, dt, D, lengths, families, records)
                elif args.op == "backward":
                    run_backward(args, tx, flex, ours, timer, dt, D, lengths, families,
                                 records)
                else:
                    with torch.no_grad():
                        run_dim(args, tx, flex, ours, timer, dt, D, lengths, families, records)
            except Exception as e:  # e.g. out of memory: report, go on
                print(f"== {args.op} {dt} D={D}: FAILED ({fail_msg(e)})")
            if tx["cuda"]:
                torch.cuda.empty_cache()
    print_table(records)
    if args.budget_skipped:
        print(f"{args.budget_skipped} shape(s) CUT: the {args.budget_s:g} s budget")
    print(f"total {time.perf_counter() - t0:.1f} s")
    records.write()  # also when nothing was added: an empty list, not no file
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
