import time, torch
from torchao.optim import AdamW8bit
dev="cuda"
ps = [torch.nn.Parameter(torch.randn(1536, 1536, device=dev, dtype=torch.bfloat16)) for _ in range(100)]
opt = AdamW8bit(ps, lr=1e-5, bf16_stochastic_round=True)
for p in ps: p.grad = torch.randn_like(p)
opt.step(); torch.cuda.synchronize()
def per_param():
    groups = opt.param_groups
    for p in ps:
        g = dict(groups[0]); g["params"] = [p]; opt.param_groups = [g]
        opt.step()
    opt.param_groups = groups
per_param(); torch.cuda.synchronize()
t = time.perf_counter(); per_param(); h = time.perf_counter() - t; torch.cuda.synchronize(); w = time.perf_counter() - t
print(f"torchao per-param step: host {h/100*1e3:.2f} ms, wall {w/100*1e3:.2f} ms per param")
t = time.perf_counter(); opt.step(); torch.cuda.synchronize(); print(f"torchao one step of 100: {(time.perf_counter()-t)/100*1e3:.2f} ms per param")
