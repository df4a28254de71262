"""torchao's low-bit AdamW stepped a bucket at a time (sd3fit.lean.ao_multistep), alone and under gradient release."""

import pytest
import torch

from sd3fit.lean import ao_multistep
from sd3fit.lean.release import GradientRelease

torchao_optim = pytest.importorskip("torchao.optim")


def params(device):
    torch.manual_seed(0)
    # two large enough for 8-bit state (>= 4096 values, whole blocks of 256) and one kept plain, as torchao decides
    return [torch.nn.Parameter(torch.randn(*shape, dtype=torch.bfloat16, device=device) * 0.1)
            for shape in ((64, 128), (256, 16), (16,))]


def grads(ps, seed):
    g = torch.Generator(device=ps[0].device).manual_seed(seed)
    return [torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype) for p in ps]


def test_many_parameters_in_one_call_step_as_torchao_steps_them():
    amsgrad = False  # torchao's 8-bit state has no elementwise maximum: its own step cannot do amsgrad either
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ours, theirs = params(device), params(device)
    ours_opt = torchao_optim.AdamW8bit(ours, lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, bf16_stochastic_round=False)
    theirs_opt = torchao_optim.AdamW8bit(theirs, lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, bf16_stochastic_round=False)
    assert ao_multistep.supports(ours_opt) and not ao_multistep.supports(torch.optim.AdamW(ours))
    for step in range(3):
        for a, b, g in zip(ours, theirs, grads(ours, step)):
            a.grad, b.grad = g.clone(), g.clone()
        ao_multistep.step_many(ours_opt, ours, ours_opt.param_groups[0])
        theirs_opt.step()
        ours_opt.param_groups[0]["lr"].fill_(1e-2 * 0.5 ** (step + 1))  # a scheduler's change reaches both
        theirs_opt.param_groups[0]["lr"].fill_(1e-2 * 0.5 ** (step + 1))
    for a, b, start in zip(ours, theirs, params(device)):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3)  # one bf16 rounding apart at most
        assert (a - start).abs().max() > 1e-2  # and both moved
    for p_ours, p_theirs in zip(ours, theirs):
        s_ours, s_theirs = ours_opt.state[p_ours], theirs_opt.state[p_theirs]
        assert s_ours.keys() == s_theirs.keys() and float(s_ours["step"]) == float(s_theirs["step"]) == 3
        assert type(s_ours["exp_avg"]) is type(s_theirs["exp_avg"])  # the same 8-bit (or plain) state
    # the optimizer's own state_dict round-trips what step_many wrote
    torchao_optim.AdamW8bit(params(device), lr=1e-2).load_state_dict(ours_opt.state_dict())


def test_release_by_bucket_with_step_many_trains_like_torchaos_step():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ours, theirs = params(device), params(device)
    ours_opt = torchao_optim.AdamW8bit(ours, lr=1e-2, bf16_stochastic_round=False)
    theirs_opt = torchao_optim.AdamW8bit(theirs, lr=1e-2, bf16_stochastic_round=False)
    release = GradientRelease(ours_opt, ours, buckets=[ours[:2], ours[2:]], step_many=ao_multistep.step_many)
    x = torch.randn(3, 64 * 128, device=device, dtype=torch.bfloat16)
    for _ in range(2):
        for ps in (ours, theirs):
            (x @ ps[0].reshape(-1, 1)).sum().mul(ps[1].sum()).mul(ps[2].sum()).backward()
        release.flush()
        theirs_opt.step()
        theirs_opt.zero_grad()
        assert all(p.grad is None for p in ours)
    assert release.bucket_steps == 4 and release.steps == 6
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3)
