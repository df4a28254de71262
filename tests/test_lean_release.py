"""Gradient release (sd3fit.lean.release): the same training as stepping after backward, with gradients freed as
they are used."""

import copy

import pytest
import torch

from sd3fit.lean.release import GradientRelease


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 16), torch.nn.GELU(),
                               torch.nn.Linear(16, 4))


def batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 8, generator=g), torch.randn(5, 4, generator=g)) for _ in range(n)]


def loss(net, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(net(x), y) * 100  # large gradients, so clipping bites


def optimizer(net, kind):
    if kind == "adamw":
        return torch.optim.AdamW(net.parameters(), lr=1e-2, foreach=False)
    return torch.optim.SGD([{"params": list(net[0].parameters()), "lr": 1e-2},
                            {"params": list(net[2].parameters()) + list(net[4].parameters()), "lr": 3e-2}], momentum=0.9)


def layer_buckets(net):
    """Each Linear's weight and bias together; the last layer's split over two buckets of its own, and the first
    layer's bias in a bucket with a parameter the model never uses (flush steps it)."""
    unused = torch.nn.Parameter(torch.zeros(3))
    return [[net[0].weight], [net[0].bias, unused], list(net[2].parameters()), [net[4].weight], [net[4].bias]]


@pytest.mark.parametrize("kind", ["adamw", "sgd-two-groups"])
@pytest.mark.parametrize("clip", [None, 0.05])
@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("bucketed", [False, True])
def test_release_trains_exactly_like_a_step_after_backward(kind, clip, accumulate, bucketed):
    plain, released = model(), model()
    plain_opt, released_opt = optimizer(plain, kind), optimizer(released, kind)
    micro = [0]
    release = GradientRelease(released_opt, released.parameters(), clip_value=clip,
                              accumulating=lambda: micro[0] % accumulate != accumulate - 1,
                              buckets=layer_buckets(released) if bucketed else None)
    most_alive = 0

    def count(_):
        nonlocal most_alive
        most_alive = max(most_alive, sum(p.grad is not None for p in released.parameters()))

    for p in released.parameters():  # registered after release's hooks: sees what they left
        p.register_post_accumulate_grad_hook(count)
    for n, batch in enumerate(batches(6)):
        loss(plain, batch).backward()
        if n % accumulate == accumulate - 1:
            if clip:
                torch.nn.utils.clip_grad_value_(plain.parameters(), clip)
            plain_opt.step()
            plain_opt.zero_grad()
        micro[0] = n
        loss(released, batch).backward()
        release.flush()
        if n % accumulate == accumulate - 1:
            assert all(p.grad is None for p in released.parameters())
        # learning rates changed by a scheduler between steps reach the released steps too
        for opt in (plain_opt, released_opt):
            for group in opt.param_groups:
                group["lr"] *= 0.9
    for a, b in zip(plain.parameters(), released.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert release.steps == 6 // accumulate * len(list(released.parameters()))
    assert release.bucket_steps == 6 // accumulate * (5 if bucketed else 6)
    if accumulate == 1:
        # every gradient freed in its own hook (never two at once), or with its bucket (at most one bucket's)
        assert most_alive == (1 if bucketed else 0)
    assert len(released_opt.state_dict()["state"]) == len(list(released.parameters()))


def test_release_needs_the_parameters_in_the_optimizer():
    net = model()
    with pytest.raises(ValueError, match="not in the optimizer"):
        GradientRelease(torch.optim.SGD(net[0].parameters(), lr=0.1), net.parameters())


def test_remove_takes_the_hooks_off():
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    release = GradientRelease(opt, net.parameters())
    release.remove()
    before = copy.deepcopy(net.state_dict())
    loss(net, batches(1)[0]).backward()
    assert all(p.grad is not None for p in net.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_the_largest_gradient_is_kept_for_logging_before_clipping():
    net = model()
    release = GradientRelease(torch.optim.SGD(net.parameters(), lr=0.0), net.parameters(), clip_value=1e-6)
    reference = model()
    loss(reference, batches(1)[0]).backward()
    expected = max(p.grad.abs().max() for p in reference.parameters())
    loss(net, batches(1)[0]).backward()
    torch.testing.assert_close(release.take_absmax(), expected.float())
    assert release.take_absmax() is None  # taken: the next step starts afresh
