"""Optimizer state streamed from CPU memory a bucket at a time (sd3fit.lean.state_stream), under gradient release:
the same training as state that stays on the parameters' device, with the state in CPU memory between steps, and
checkpoints of it that load back. On a GPU the copies cross to the device; on a CPU each step still works on a copy
of the CPU buffers, so state that is not written back shows."""

import pytest
import torch

from sd3fit.lean import ao_multistep
from sd3fit.lean.release import GradientRelease
from sd3fit.lean.state_stream import StateStream

torchao_optim = pytest.importorskip("torchao.optim")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def net():
    torch.manual_seed(0)
    # bf16 and wide enough that torchao keeps 8-bit state for the weights (plain state for the biases)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64)).to(DEVICE,
                                                                                                       torch.bfloat16)


def data(n):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 64, generator=g).to(DEVICE, torch.bfloat16) for _ in range(n)]


def make(kind, model):
    if kind == "ao-adamw8bit":
        return torchao_optim.AdamW8bit(model.parameters(), lr=1e-2, bf16_stochastic_round=False)
    return torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)


def train(model, opt, batches, streamed, by_bucket):
    stream = StateStream(opt) if streamed else None
    buckets = [list(model[0].parameters()), list(model[2].parameters())] if by_bucket else None
    release = GradientRelease(opt, model.parameters(), buckets=buckets, stream=stream,
                              step_many=ao_multistep.step_many if by_bucket and ao_multistep.supports(opt) else None)
    for x in batches:
        model(x).float().pow(2).mean().backward()
        release.flush()
    release.remove()
    return stream


def test_each_step_works_on_copies_that_are_written_back():
    """The step never sees the CPU buffers themselves (on a GPU it could not use them; on a CPU a step writing into
    them would hide a missing copy back)."""
    model = net()
    opt = make("torch-adamw", model)
    stream = StateStream(opt)
    seen = []
    original = opt.step

    def step(*args, **kwargs):
        for group in opt.param_groups:
            for p in group["params"]:
                homes = stream._homes.get(id(p), {})
                seen.extend(opt.state[p][key].data_ptr() != home.buffers["data"].data_ptr()
                            for key, home in homes.items())
        return original(*args, **kwargs)

    opt.step = step
    release = GradientRelease(opt, model.parameters(), stream=stream)
    for x in data(3):
        model(x).float().pow(2).mean().backward()
        release.flush()
    assert seen and all(seen)


def state_on(opt, device_type):
    return all(t.device.type == device_type for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor) and t.dim() > 0)


@pytest.mark.parametrize("kind", ["ao-adamw8bit", "torch-adamw"])
@pytest.mark.parametrize("by_bucket", [False, True])
def test_streamed_state_trains_exactly_like_state_on_the_device(kind, by_bucket):
    batches = data(4)
    plain, streamed = net(), net()
    plain_opt, streamed_opt = make(kind, plain), make(kind, streamed)
    train(plain, plain_opt, batches, streamed=False, by_bucket=by_bucket)
    stream = train(streamed, streamed_opt, batches, streamed=True, by_bucket=by_bucket)
    for a, b in zip(plain.parameters(), streamed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert state_on(streamed_opt, "cpu")
    if torch.cuda.is_available():
        buffers = [b for homes in stream._homes.values() for home in homes.values() for b in home.buffers.values()]
        assert buffers and all(b.is_pinned() for b in buffers)
    # every step moved each parameter's state over and back (none the first step, which creates it there)
    assert stream.cpu_bytes > 0 and stream.bytes_moved >= 2 * 3 * stream.cpu_bytes


def test_a_checkpoint_of_streamed_state_loads_into_cpu_memory_and_trains_on_identically():
    batches = data(6)
    whole = net()
    whole_opt = make("ao-adamw8bit", whole)
    train(whole, whole_opt, batches, streamed=True, by_bucket=True)
    first = net()
    first_opt = make("ao-adamw8bit", first)
    stream = train(first, first_opt, batches[:3], streamed=True, by_bucket=True)
    stream.settle()
    saved = first_opt.state_dict()
    # ids as another optimizer could have numbered them: the state is paired with parameters by position
    saved = {"state": {index + 10: state for index, state in saved["state"].items()},
             "param_groups": [{**group, "params": [index + 10 for index in group["params"]]}
                              for group in saved["param_groups"]]}
    resumed = net()
    resumed.load_state_dict(first.state_dict())
    resumed_opt = make("ao-adamw8bit", resumed)
    resumed_stream = StateStream(resumed_opt)
    resumed_opt.load_state_dict(saved)
    assert state_on(resumed_opt, "cpu") and resumed_stream.cpu_bytes == stream.cpu_bytes
    assert saved["state"] and all(len(s) >= 3 for s in saved["state"].values())  # the caller's dict kept its tensors
    release = GradientRelease(resumed_opt, resumed.parameters(), stream=resumed_stream,
                              buckets=[list(resumed[0].parameters()), list(resumed[2].parameters())],
                              step_many=ao_multistep.step_many)
    for x in batches[3:]:
        resumed(x).float().pow(2).mean().backward()
        release.flush()
    for a, b in zip(whole.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
