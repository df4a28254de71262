"""Optimizer state moved off the GPU for validation (sd3fit.lean.offload) comes back unchanged and in place."""

import pytest
import torch

from sd3fit.lean.offload import StateOffload


KINDS = ("torch", "optimi")
# bytes of state per weight: torch's AdamW keeps two fp32 moments; optimi's foreach AdamW with Kahan summation (what
# fused_optimizer builds) two bf16 moments and a bf16 compensation
STATE_BYTES = {"torch": 2 * 4, "optimi": 3 * 2}


def trained_optimizer(device, kind="torch"):
    torch.manual_seed(0)
    net = torch.nn.Linear(8, 4).to(device)
    if kind == "optimi":
        from optimi import AdamW

        net = net.bfloat16()
        opt = AdamW(net.parameters(), lr=1e-2, foreach=True, kahan_sum=True)
    else:
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(2):
        net(inputs(net, device)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return net, opt


def inputs(net, device):
    return torch.randn(3, 8, device=device, dtype=net.weight.dtype)


def snapshot(opt):
    return {id(p): {k: (v.device, v.clone().cpu()) for k, v in state.items()} for p, state in opt.state.items()}


@pytest.mark.parametrize("kind", KINDS)
def test_nothing_moves_that_is_already_there_and_a_second_move_out_is_a_no_op(kind):
    _, opt = trained_optimizer("cpu", kind)
    before = snapshot(opt)
    offload = StateOffload(opt)
    assert offload.move_out("cpu") == 0 and not offload.away
    offload.move_back()
    assert {k: {n: d for n, (d, _) in v.items()} for k, v in snapshot(opt).items()} == \
        {k: {n: d for n, (d, _) in v.items()} for k, v in before.items()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to move state off")
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_state_goes_to_the_cpu_and_back_bit_for_bit_and_training_goes_on(kind):
    net, opt = trained_optimizer("cuda", kind)
    before = snapshot(opt)
    offload = StateOffload(opt)
    moved = offload.move_out("cpu")
    assert moved == STATE_BYTES[kind] * sum(p.numel() for p in net.parameters())
    assert all(v.device.type == "cpu" for state in opt.state.values() for v in state.values())
    assert offload.move_out("cpu") == 0  # already away
    offload.move_back()
    after = snapshot(opt)
    for key, state in before.items():
        for name, (device, value) in state.items():
            assert after[key][name][0] == device and torch.equal(after[key][name][1], value)
    net(inputs(net, "cuda")).square().mean().backward()
    opt.step()  # the state is where the step expects it
