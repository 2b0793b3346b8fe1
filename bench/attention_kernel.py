"""PyTorch's flash kernel (varlen, GQA) on the shapes the engine gives it, on CUDA: its schema, its
error against a float32 reference (decode rows and chunked prefill with a cached past, causal
aligned to the end of each row), CUDA-graph capture, and its time against the masked SDPA call
that transformers' paged SDPA makes at 64 rows (keys padded to 16,384).

    PYTHONPATH=$PWD python3 bench/attention_kernel.py
"""
import inspect, time, torch
print("torch", torch.__version__, "cudnn", torch.backends.cudnn.version())
print(torch.ops.aten._flash_attention_forward.default._schema)
try:
    import torch.nn.attention.varlen as V; print("varlen_attn", inspect.signature(V.varlen_attn))
except Exception as e: print("no varlen", e)
dev = "cuda"
B, L, H, HK, D = 64, 256, 32, 8, 128
torch.manual_seed(0)
lens = torch.randint(100, L, (B,))
cu_k = torch.zeros(B + 1, dtype=torch.int32); cu_k[1:] = lens.cumsum(0)
cu_q = torch.arange(B + 1, dtype=torch.int32)
Tk = int(cu_k[-1])
q = torch.randn(B, H, D, device=dev, dtype=torch.bfloat16)
k = torch.randn(Tk, HK, D, device=dev, dtype=torch.bfloat16)
v = torch.randn(Tk, HK, D, device=dev, dtype=torch.bfloat16)
cu_q, cu_k = cu_q.to(dev), cu_k.to(dev)
def fa():
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, 1, int(lens.max()), 0.0, True, False, scale=D ** -0.5)[0]
out = fa()
err = 0.0
for i in range(B):
    s, e = int(cu_k[i]), int(cu_k[i + 1])
    kk = k[s:e].float().repeat_interleave(4, 1).transpose(0, 1); vv = v[s:e].float().repeat_interleave(4, 1).transpose(0, 1)
    ref = torch.softmax(q[i].float()[:, None, :] @ kk.transpose(1, 2) * D ** -0.5, -1) @ vv
    err = max(err, ((out[i].float() - ref[:, 0]).norm() / ref.norm()).item())
print("flash varlen GQA rel err", err)
# prefill chunks with a cached past: q_len <= k_len per row, causal aligned to the end of the row
ql = torch.randint(1, 9, (B,)); kl = ql + torch.randint(0, 50, (B,))
cq = torch.zeros(B + 1, dtype=torch.int32); cq[1:] = ql.cumsum(0); ck = torch.zeros(B + 1, dtype=torch.int32); ck[1:] = kl.cumsum(0)
q2 = torch.randn(int(cq[-1]), H, D, device=dev, dtype=torch.bfloat16)
k2 = torch.randn(int(ck[-1]), HK, D, device=dev, dtype=torch.bfloat16); v2 = torch.randn_like(k2)
o = torch.ops.aten._flash_attention_forward(q2, k2, v2, cq.to(dev), ck.to(dev), 64, 1024, 0.0, True, False, scale=D ** -0.5)[0]
err = 0.0
for i in range(B):
    a, b, c, d = int(cq[i]), int(cq[i + 1]), int(ck[i]), int(ck[i + 1])
    kk = k2[c:d].float().repeat_interleave(4, 1).transpose(0, 1); vv = v2[c:d].float().repeat_interleave(4, 1).transpose(0, 1)
    s_ = q2[a:b].float().transpose(0, 1) @ kk.transpose(1, 2) * D ** -0.5
    n, m = b - a, d - c
    mask = torch.ones(n, m, dtype=torch.bool, device=dev).tril(m - n)
    ref = torch.softmax(s_.masked_fill(~mask, float("-inf")), -1) @ vv
    err = max(err, ((o[a:b].float().transpose(0, 1) - ref).norm() / ref.norm()).item())
print("flash varlen chunked-prefill causal (bottom-right) rel err", err)
g = torch.cuda.CUDAGraph()
s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s): fa()
torch.cuda.current_stream().wait_stream(s)
with torch.cuda.graph(g): o2 = fa()
g.replay(); torch.cuda.synchronize(); print("graph ok", (o2 - out).abs().max().item())
for name, f in [("flash", fa)]:
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(100): f()
    torch.cuda.synchronize(); print(name, "ms/call", (time.perf_counter() - t) * 10)
# the sdpa path CB uses: padded K 16384, mask, repeat_kv
K = 16384
kp = torch.randn(1, H, K, D, device=dev, dtype=torch.bfloat16); vp = torch.randn_like(kp)
qp = torch.randn(1, H, 64, D, device=dev, dtype=torch.bfloat16)
mask = torch.full((1, 1, 64, K), float("-inf"), device=dev, dtype=torch.bfloat16); mask[..., :200] = 0
torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask)
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(20): torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask)
torch.cuda.synchronize(); print("sdpa masked 64x16384 ms/call", (time.perf_counter() - t) * 50)
