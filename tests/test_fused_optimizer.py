"""`fused_optimizer: true` (sd3fit.simpletuner.patches.fused_optimizer): adamw_bf16 is stepped by torch-optimi's
foreach AdamW with Kahan summation and SimpleTuner's adamw_bf16 settings; without the key, by SimpleTuner's AdamWBF16.
The tiny SD3 trains for real through SimpleTuner with the key on and off, and a run with it on resumes from its
checkpoint with its optimizer state."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from conftest import run_sd3fit, train_all
from sd3fit.errors import UserError
from sd3fit.runs import Run
from sd3fit.simpletuner import compat
from sd3fit.simpletuner.patches import fused_optimizer

STEPS, EVERY = 16, 8
OPTIMI = "optimi.adamw.AdamW"
ADAMW_BF16 = "simpletuner.helpers.training.optimizers.adamw_bfloat16.AdamWBF16"


# --- the switch, on SimpleTuner's own optimizer resolution (no model) ---

class _Upstream:
    """Builds the optimizer as SimpleTuner 4.10.1's `Trainer.init_optimizer` does for a plain run: the table's
    settings for the run's optimizer, `lr` first, then the trainer module's `cpu_offload_optimizer`."""

    def __init__(self, **config):
        self.config = SimpleNamespace(optimizer="adamw_bf16", optimizer_config=None, optimizer_beta1=None,
                                      optimizer_beta2=None, optimizer_release_gradients=False,
                                      optimizer_cpu_offload_method=None, learning_rate=1e-3, lr_warmup_steps=0)
        vars(self.config).update(config)
        # small weights, so that one step of about lr shows in bf16
        self.params = [torch.nn.Parameter(torch.randn(4, 3).mul(1e-2).bfloat16()),
                       torch.nn.Parameter(torch.randn(3).mul(1e-2).bfloat16())]

    def init_optimizer(self):
        from simpletuner.helpers.training import trainer as module
        from simpletuner.helpers.training.optimizer_param import determine_optimizer_class_with_config

        settings, cls = determine_optimizer_class_with_config(self.config, False, False, True)
        self.optimizer = module.cpu_offload_optimizer(
            params_to_optimize=self.params, optimizer_cls=cls,
            optimizer_parameters={"lr": self.config.learning_rate, **settings}, fused=False, offload_gradients=False,
            offload_mechanism=self.config.optimizer_cpu_offload_method)


class _Trainer(fused_optimizer.FusedOptimizerTrainer, _Upstream):
    pass


def built(key, **config):
    fused_optimizer.apply()
    trainer = _Trainer(**config)
    if key is not None:
        trainer.sd3fit_fused_optimizer = key
    trainer.init_optimizer()
    optimizer = trainer.optimizer
    for p in trainer.params:  # it steps
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in trainer.params]
    optimizer.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, trainer.params))
    return optimizer


def test_on_builds_optimi_adamw_with_foreach_kahan_and_adamw_bf16_settings():
    from optimi import AdamW

    optimizer = built(True)
    assert type(optimizer) is AdamW
    group = optimizer.param_groups[0]
    assert group["foreach"] is True and group["kahan_sum"] is True
    # SimpleTuner's table for adamw_bf16, not optimi-adamw's (betas (0.9, 0.99), no weight decay)
    settings = (group["beta1"], group["beta2"], group["eps"], group["weight_decay"], group["lr"])
    assert settings == (0.9, 0.999, 1e-6, 1e-2, 1e-3)
    assert all(optimizer.state[p]["kahan_comp"].dtype == torch.bfloat16 for p in optimizer.param_groups[0]["params"])


def test_on_follows_the_runs_optimizer_overrides():
    optimizer = built(True, optimizer_beta1=0.8, optimizer_beta2=0.95, optimizer_config="eps=1e-8,weight_decay=0.0")
    group = optimizer.param_groups[0]
    assert (group["beta1"], group["beta2"], group["eps"], group["weight_decay"]) == (0.8, 0.95, 1e-8, 0.0)


@pytest.mark.parametrize("key, config", [
    (None, {}),  # absent
    (False, {}),
    (True, {"optimizer_release_gradients": True}),  # sd3fit's gradient release steps one parameter at a time
])
def test_off_absent_and_with_gradient_release_it_is_simpletuners_adamw_bf16(key, config):
    from simpletuner.helpers.training.optimizers.adamw_bfloat16 import AdamWBF16

    assert type(built(key, **config)) is AdamWBF16


def test_other_optimizers_are_left_as_they_are():
    from optimi import AdamW

    optimizer = built(True, optimizer="optimi-adamw")
    assert type(optimizer) is AdamW and optimizer.param_groups[0]["foreach"] is None  # upstream's settings, untouched
    assert type(built(True, optimizer="torch-adamw")) is torch.optim.AdamW


def test_the_patch_refuses_another_simpletuner(monkeypatch):
    monkeypatch.setattr(compat, "installed_version", lambda: "4.11.0")
    with pytest.raises(UserError) as caught:
        fused_optimizer.apply()
    message = str(caught.value)
    assert "\n" not in message and "written for simpletuner 4.10.1 but 4.11.0 is installed" in message


def test_the_patch_refuses_a_simpletuner_without_the_function_it_wraps(monkeypatch):
    from simpletuner.helpers.training import trainer as module

    monkeypatch.delattr(module, "cpu_offload_optimizer")
    with pytest.raises(RuntimeError, match="lacks cpu_offload_optimizer; this patch needs updating"):
        fused_optimizer.apply()


# --- real training of the tiny SD3 through SimpleTuner ---

def losses(run: Run) -> list[float]:
    rows = run.read_metrics()
    values = [row["train_loss"] for row in rows]
    assert [row["step"] for row in rows] == list(range(1, len(rows) + 1))
    assert all(math.isfinite(v) for v in values), values
    return values


def rms(a, b) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b, strict=True)) / len(a))


def lora_b(run: Run) -> torch.Tensor:
    """Every lora_B weight of the run's adapter in one vector: what training moved (peft starts them at zero)."""
    from safetensors.torch import load_file

    weights = load_file(run.read_result()["artifacts"]["adapter"])
    return torch.cat([value.float().flatten() for name, value in sorted(weights.items()) if "lora_B" in name])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_assets):
    root = tmp_path_factory.mktemp("fused-optimizer")
    common = ["config/demo.json", "validation_disable=true", f"max_train_steps={STEPS}", f"checkpointing_steps={EVERY}"]
    runs = {"off": [], "off-seed-43": ["seed=43", "fused_optimizer=false"], "on": ["fused_optimizer=true"]}
    return {name: Run(folder) for name, folder in train_all(root, {k: [*common, *v] for k, v in runs.items()}).items()}


def test_real_runs_use_the_optimizer_the_key_asks_for(trained):
    for name, expected in (("off", ADAMW_BF16), ("off-seed-43", ADAMW_BF16), ("on", OPTIMI)):
        result = trained[name].read_result()
        assert result["status"] == "finished" and result["global_step"] == STEPS
        assert result["optimizer"]["class"] == expected, (name, result["optimizer"])
    on = trained["on"].read_result()["optimizer"]
    assert on["foreach"] is True and on["kahan_sum"] is True
    assert (on["beta1"], on["beta2"], on["eps"], on["weight_decay"]) == (0.9, 0.999, 1e-6, 1e-2)


def test_the_tiny_model_trains_the_same_with_and_without_it(trained):
    on, off, other_seed = losses(trained["on"]), losses(trained["off"]), losses(trained["off-seed-43"])
    # Both optimizers see step 1's batch, noise and timestep from the same seed...
    assert math.isclose(on[0], off[0], rel_tol=1e-4)
    # ...but AdamWBF16's stochastic rounding draws from the global random generator, so later draws differ, and
    # per-step losses cannot match exactly. Measured on the CPU (16 steps, seeds 42-44): same seed, on vs off 0.07 and
    # 0.10 RMS; different seeds 0.13 to 0.20. The curves must stay closer than another seed's.
    spread = rms(off, other_seed)
    assert spread > 0.01  # the seeds really drew differently: the bound means something
    assert rms(on, off) < spread, (rms(on, off), spread)
    # The loss of the tiny random model hardly depends on 16 steps of LoRA training (a 30x learning rate passes the
    # bound above), so the weights are compared too. Both runs moved every adapter, in the same direction: measured
    # cosine 0.90 and 0.93 between on and off at one seed, at most 0.28 between seeds (their lora_A start differs).
    b_on, b_off, b_other = lora_b(trained["on"]), lora_b(trained["off"]), lora_b(trained["off-seed-43"])
    assert b_on.abs().max() > 0 and b_off.abs().max() > 0
    assert cosine(b_on, b_off) > max(0.7, cosine(b_off, b_other)), (cosine(b_on, b_off), cosine(b_off, b_other))
    # ...and by a similar amount. optimi bias-corrects the first moment and AdamWBF16 does not, and AdamWBF16's eps
    # acts on an uncorrected (smaller) second moment, so optimi's first steps are larger: measured 2.2x the RMS of
    # lora_B after 16 steps at a constant learning rate. A wrong learning rate or update would leave this band.
    ratio = float(b_on.square().mean().sqrt() / b_off.square().mean().sqrt())
    assert 1.0 < ratio < 4.0, ratio


def test_a_run_with_it_resumes_from_its_checkpoint_with_the_optimizer_state(trained):
    # last in the file: it continues the module's "on" run, which the tests above read as it finished
    run = trained["on"]
    saved = torch.load(run.output / f"checkpoint-{STEPS}" / "optimizer.bin", weights_only=False)
    assert int(saved["param_groups"][0]["step"]) == STEPS
    assert all(set(state) == {"exp_avg", "exp_avg_sq", "kahan_comp"} for state in saved["state"].values())
    proc = run_sd3fit("train", "--resume", str(run.dir), f"max_train_steps={STEPS + EVERY}", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = run.read_result()
    assert result["status"] == "finished" and result["global_step"] == STEPS + EVERY
    assert result["optimizer"]["class"] == OPTIMI
    assert len(losses(run)) == STEPS + EVERY
    # optimi counts steps in its param group: a state that was not loaded would count from zero again (EVERY)
    resumed = torch.load(run.output / f"checkpoint-{STEPS + EVERY}" / "optimizer.bin", weights_only=False)
    assert int(resumed["param_groups"][0]["step"]) == STEPS + EVERY
    moved = [not torch.equal(resumed["state"][k]["exp_avg"], saved["state"][k]["exp_avg"]) for k in saved["state"]]
    assert any(moved)
