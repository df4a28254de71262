"""Optimizer state moved off the GPU for validation (sd3fit.lean.offload) comes back unchanged and in place."""

import pytest
import torch

from sd3fit.lean.offload import StateOffload


def trained_optimizer(device):
    torch.manual_seed(0)
    net = torch.nn.Linear(8, 4).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(2):
        net(torch.randn(3, 8, device=device)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return net, opt


def snapshot(opt):
    return {id(p): {k: (v.device, v.clone().cpu()) for k, v in state.items()} for p, state in opt.state.items()}


def test_nothing_moves_that_is_already_there_and_a_second_move_out_is_a_no_op():
    _, opt = trained_optimizer("cpu")
    before = snapshot(opt)
    offload = StateOffload(opt)
    assert offload.move_out("cpu") == 0 and not offload.away
    offload.move_back()
    assert {k: {n: d for n, (d, _) in v.items()} for k, v in snapshot(opt).items()} == \
        {k: {n: d for n, (d, _) in v.items()} for k, v in before.items()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to move state off")
def test_gpu_state_goes_to_the_cpu_and_back_bit_for_bit_and_training_goes_on():
    net, opt = trained_optimizer("cuda")
    before = snapshot(opt)
    offload = StateOffload(opt)
    moved = offload.move_out("cpu")
    assert moved == 2 * sum(p.numel() * 4 for p in net.parameters())  # exp_avg and exp_avg_sq in fp32
    assert all(v.device.type == "cpu" for state in opt.state.values() for v in state.values())
    assert offload.move_out("cpu") == 0  # already away
    offload.move_back()
    after = snapshot(opt)
    for key, state in before.items():
        for name, (device, value) in state.items():
            assert after[key][name][0] == device and torch.equal(after[key][name][1], value)
    net(torch.randn(3, 8, device="cuda")).square().mean().backward()
    opt.step()  # the state is where the step expects it
