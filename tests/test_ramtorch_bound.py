"""RamTorch's text-encoder copies held to a bound (sd3fit.lean.copy_bound, sd3fit.simpletuner.patches.ramtorch_bound):
the host waits for the GPU after each `ramtorch_copy_ahead_gib` of weights copied, only in the text encoders."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sd3fit.errors import UserError
from sd3fit.lean.copy_bound import CopyBound
from sd3fit.simpletuner import compat
from sd3fit.simpletuner.patches import ramtorch_bound

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_the_host_waits_each_time_the_copies_reach_the_bound():
    layers = nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(10)])  # 16 KiB of fp32 weights each
    waited = []
    bound = CopyBound(limit=3 * 64 * 64 * 4, wait=waited.append)
    handles = bound.attach(layers)
    layers(torch.randn(2, 64))
    assert bound.waits == 3 and len(waited) == 3 and bound.pending == 64 * 64 * 4  # after layers 3, 6, 9
    for handle in handles:
        handle.remove()
    layers(torch.randn(2, 64))
    assert bound.waits == 3  # hooks gone, nothing counted


def test_layers_without_weights_are_not_counted_and_the_bound_must_be_positive():
    bound = CopyBound(limit=1, wait=lambda device: pytest.fail("waited"))
    bound(nn.GELU(), (), torch.zeros(1))
    assert bound.pending == 0
    with pytest.raises(ValueError, match="positive"):
        CopyBound(limit=0)


def test_the_default_wait_synchronises_the_device_the_layer_ran_on():
    layer = nn.Linear(32, 32).to(DEVICE)
    bound = CopyBound(limit=1)  # waits after every layer
    bound.attach([layer])
    layer(torch.randn(4, 32, device=DEVICE))
    assert bound.waits == 1  # on a CPU there is nothing to wait for, and no error


class Foundation:
    """What upstream's `_apply_ramtorch_layers` asks of the model it belongs to."""

    def _ramtorch_enabled(self):
        return True

    def _ramtorch_extensions_enabled(self):
        return False

    def _ramtorch_sync_hooks_enabled(self):
        return True

    def _ramtorch_device(self):
        return DEVICE

    def _ramtorch_targets_for_component(self, override=None):
        return override


@pytest.fixture
def bounded():
    from simpletuner.helpers.models.common import ModelFoundation

    ramtorch_bound.apply(0.5)
    yield ModelFoundation
    ramtorch_bound.apply(None)


@pytest.mark.parametrize("label, hooked", [("text_encoder_3", True), ("transformer", False)])
def test_upstreams_ramtorch_layers_of_a_text_encoder_get_the_bound(bounded, label, hooked):
    encoder = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    assert bounded._apply_ramtorch_layers(Foundation(), encoder, label) == 2  # upstream's own conversion
    layers = ramtorch_bound.ramtorch_layers(encoder)
    assert len(layers) == 2
    assert (label in ramtorch_bound.bounds) == hooked
    if hooked:
        bound = ramtorch_bound.bounds[label]
        assert bound.limit == 2**29
        with torch.no_grad():
            encoder(torch.randn(3, 64, device=DEVICE))
        assert bound.pending == sum(layer.weight.numel() * layer.weight.element_size() for layer in layers)
        assert ramtorch_bound.stats() == {"limit_bytes": 2**29, "waits": {label: 0}}


def test_off_leaves_upstream_as_it_is(bounded):
    ramtorch_bound.apply(None)
    encoder = nn.Sequential(nn.Linear(64, 64))
    bounded._apply_ramtorch_layers(Foundation(), encoder, "text_encoder_1")
    assert ramtorch_bound.bounds == {} and ramtorch_bound.stats() is None


def test_it_refuses_another_simpletuner(monkeypatch):
    monkeypatch.setattr(compat, "installed_version", lambda: "9.9.9")
    with pytest.raises(UserError, match="9.9.9"):
        ramtorch_bound.apply(0.5)
