"""GPU check and timing of kernels/paged_attention.py alone: bf16/fp16 error against the torch
reference, a CUDA-graph replay with longer contexts than at capture, then decode / speculative
/ prefill / mixed shapes timed with triton.testing.do_bench (KV bytes read over time, FLOP/s),
and torch's SDPA as a yardstick. Llama-3.1-8B attention shape (32 heads, 8 KV heads, dim 128).

    python scripts/bench_paged_attention.py          (on a CUDA machine)

Note: a case whose KV fits the L2 cache (one 8k sequence: 33 MB on an H100's 50 MB) reads it
from L2 on repeats, so its GB/s is not an HBM figure.
"""
import sys, torch, triton
from triton.testing import do_bench
sys.path.insert(0, ".")
from kernels import reference
from kernels.paged_attention import paged_attention, default_config, choose_num_splits

dev = "cuda"
torch.manual_seed(0)
H, HKV, D, BS = 32, 8, 128, 16
dt = torch.bfloat16

def batch(lens, num_blocks_extra=0):
    nb = sum(-(-s // BS) for _, s in lens) + 1
    kv = torch.randn(nb, 2, BS, HKV, D, device=dev, dtype=dt)
    perm = (1 + torch.randperm(nb - 1, device=dev)).int()
    mb = max(-(-s // BS) for _, s in lens)
    bt = torch.zeros(len(lens), mb, dtype=torch.int32, device=dev)
    k = 0
    for i, (_, s) in enumerate(lens):
        n = -(-s // BS); bt[i, :n] = perm[k:k+n]; k += n
    qsl = [0]
    for ql, _ in lens: qsl.append(qsl[-1] + ql)
    q = torch.randn(qsl[-1], H, D, device=dev, dtype=dt)
    sl = [s for _, s in lens]
    return q, kv, bt, sl, qsl

def run(q, kv, bt, sl, qsl, ns=None, out=None, mql=None):
    mql = mql or max(b - a for a, b in zip(qsl, qsl[1:]))
    return paged_attention(q, kv, bt, torch.tensor(sl, dtype=torch.int32, device=dev),
                           torch.tensor(qsl, dtype=torch.int32, device=dev), mql, D ** -0.5,
                           out=out, num_splits=ns, max_seq_len=max(sl))

# correctness in bf16 / fp16 on GPU
for dtype in (torch.bfloat16, torch.float16):
    dt = dtype
    q, kv, bt, sl, qsl = batch([(300, 700), (1, 2000), (0, 0), (3, 50), (64, 64)])
    ref = reference.paged_attention(q, kv, bt, sl, qsl, D ** -0.5)
    for ns in (1, 4, None):
        o = run(q, kv, bt, sl, qsl, ns)
        print(dtype, ns, "max abs err", (o.float() - ref.float()).abs().max().item())
dt = torch.bfloat16

# CUDA graph: capture a decode step, replay with longer contexts
q, kv, bt, sl, qsl = batch([(1, 4000), (1, 3000)])
sl_t = torch.tensor([100, 200], dtype=torch.int32, device=dev)
qsl_t = torch.tensor(qsl, dtype=torch.int32, device=dev)
out = torch.empty_like(q)
for _ in range(2):
    paged_attention(q, kv, bt, sl_t, qsl_t, 1, D ** -0.5, out=out)  # warm-up / compile
torch.cuda.synchronize()
g = torch.cuda.CUDAGraph()
with torch.cuda.graph(g):
    paged_attention(q, kv, bt, sl_t, qsl_t, 1, D ** -0.5, out=out)
sl_t.copy_(torch.tensor(sl, dtype=torch.int32)); g.replay(); torch.cuda.synchronize()
ref = reference.paged_attention(q, kv, bt, sl, qsl, D ** -0.5)
print("cuda graph replay err", (out.float() - ref.float()).abs().max().item())

def report(name, lens, ns=None):
    q, kv, bt, sl, qsl = batch(lens)
    sl_t = torch.tensor(sl, dtype=torch.int32, device=dev); qsl_t = torch.tensor(qsl, dtype=torch.int32, device=dev)
    mql = max(b - a for a, b in zip(qsl, qsl[1:]))
    out = torch.empty_like(q)
    f = lambda: paged_attention(q, kv, bt, sl_t, qsl_t, mql, D ** -0.5, out=out, num_splits=ns, max_seq_len=max(sl))
    ms = do_bench(f, warmup=50, rep=200)
    kv_bytes = sum(s for s in sl) * 2 * HKV * D * 2
    flops = sum(4 * ql * (s - ql / 2) * H * D for ql, s in lens)
    cfg = default_config(H // HKV, BS, mql)
    splits = ns if ns is not None else choose_num_splits(len(lens), HKV, mql, cfg.block_q, 132, max(sl))
    print(f"{name:40s} splits={splits:2d} {ms*1e3:8.1f} us  KV {kv_bytes/ms/1e9:7.0f} GB/s  {flops/ms/1e9:6.1f} TFLOP/s")

report("decode B=1 ctx 8192 auto", [(1, 8192)])
report("decode B=1 ctx 8192 nosplit", [(1, 8192)], 1)
report("decode B=8 ctx 4096 auto", [(1, 4096)] * 8)
report("decode B=8 ctx 4096 nosplit", [(1, 4096)] * 8, 1)
report("decode B=64 ctx 2048 auto", [(1, 2048)] * 64)
report("decode B=256 ctx 1024 auto", [(1, 1024)] * 256)
report("spec B=32 q4 ctx 2048 auto", [(4, 2048)] * 32)
report("prefill B=1 q2048", [(2048, 2048)])
report("prefill B=1 q2048 after 6144 hit", [(2048, 8192)])
report("mixed 1x1024 prefill + 63 decode@2048", [(1024, 1024)] + [(1, 2048)] * 63)

# yardstick: torch SDPA (flash) on contiguous K/V
for s in (2048,):
    qq = torch.randn(1, H, s, D, device=dev, dtype=dt); kk = torch.randn(1, H, s, D, device=dev, dtype=dt)
    ms = do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(qq, kk, kk, is_causal=True))
    print(f"sdpa causal {s}: {ms*1e3:.1f} us, {4*s*s/2*H*D/ms/1e9:.1f} TFLOP/s")
