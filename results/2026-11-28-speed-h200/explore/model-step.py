import time, cProfile, pstats, io, sys, os
import torch
sys.path.insert(0, "src")
from simpletuner.helpers.models.sd3 import transformer as T
from peft import LoraConfig
from sd3fit.speed.compiled import BlockCompiler
dev = "cuda"
def sync(): torch.cuda.synchronize()
# (a) launch overhead
x = torch.zeros(16, device=dev); sync()
t = time.perf_counter()
for _ in range(20000): x.add_(1)
host = time.perf_counter() - t; sync()
print(f"launch: {host/20000*1e6:.1f} us per tiny kernel (host)", flush=True)
with torch.device(dev):
    m = T.SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
        pooled_projection_dim=2048, pos_embed_max_size=192).to(torch.bfloat16)
m.requires_grad_(False)
m.add_adapter(LoraConfig(r=64, lora_alpha=64, target_modules=["to_q","to_k","to_v","to_out.0"]))
for p in m.parameters():
    if p.requires_grad: p.data = p.data.to(torch.bfloat16)
m.train()
inp = dict(hidden_states=torch.randn(1,16,128,128, device=dev, dtype=torch.bfloat16),
           encoder_hidden_states=torch.randn(1,333,4096, device=dev, dtype=torch.bfloat16),
           pooled_projections=torch.randn(1,2048, device=dev, dtype=torch.bfloat16),
           timestep=torch.tensor([500.], device=dev))
def step():
    out = m(**inp, return_dict=False)[0]
    out.float().pow(2).mean().backward()
def bench(label, n=6, gc=False):
    if gc: m.enable_gradient_checkpointing()
    else: m.disable_gradient_checkpointing()
    for _ in range(2): step()
    sync(); t = time.perf_counter(); hs = []
    for _ in range(n):
        h = time.perf_counter(); step(); hs.append(time.perf_counter() - h)
    sync(); tot = (time.perf_counter() - t) / n
    print(f"{label}: {tot*1e3:.1f} ms/step wall, host {sum(hs)/n*1e3:.1f} ms", flush=True)
bench("eager nogc"); bench("eager gc", gc=True)
_step = step
def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = m(**inp, return_dict=False)[0]
    out.float().pow(2).mean().backward()
bench("eager nogc autocast")
step = _step
orig = T._sd3_apply_joint_transformer_block
T._sd3_apply_joint_transformer_block = BlockCompiler(orig)
t=time.time(); step(); sync(); print("compile", time.time()-t, flush=True)
bench("compiled nogc")
t=time.time(); bench("compiled gc", gc=True); print("incl compile", time.time()-t)
m.disable_gradient_checkpointing()
