"""python -m minimixer.summary: the seed table's Params and FLOPs columns, and the profile."""
import json
import subprocess
import sys

import numpy as np
import pytest

import minimixer as mm
from minimixer import layers, model
from minimixer.commands import summary


def run(*args):
    return subprocess.run([sys.executable, "-m", "minimixer.summary", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("name, params, macs, shown", [
    # MMPretrain's table: mlp-mixer-base-p16 59.88 M / 12.61, mlp-mixer-large-p16 208.2 M / 44.57
    ("mixer_b16_224", 59_880_472, 12_609_444_864, ("59.88 M", "12.61 G")),
    ("mixer_l16_224", 208_196_168, 44_567_547_904, ("208.20 M", "44.57 G")),
])
def test_seed_table_columns(name, params, macs, shown):
    r = run(name, "--depth", "1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any(line.startswith("params") and shown[0] in line for line in lines), r.stdout
    assert any(line.startswith("MACs") and shown[1] in line for line in lines), r.stdout
    tot = summary.totals(mm.get_config(name), summary.layer_rows(mm.get_config(name)))
    assert (tot["params"], tot["macs"], tot["flops"]) == (params, macs, 2 * macs)


@pytest.mark.parametrize("overrides", [
    {}, {"img_size": 384}, {"img_size": (96, 160), "patch_size": 8, "num_classes": 10},
    {"mlp_ratio": (1.0, 2.0), "in_chans": 1, "num_blocks": 3},
])
@pytest.mark.parametrize("name", ["mixer_s32_224", "mixer_b16_224", "mixer_digits"])
def test_table_accounts_for_every_parameter(name, overrides):
    cfg = mm.get_config(name, **overrides)
    rows = summary.layer_rows(cfg)
    assert sum(r["params"] for r in rows) == mm.param_count(cfg)
    assert sum(r["params"] for r in summary.by_block(rows)) == mm.param_count(cfg)
    assert len(summary.by_block(rows)) == cfg.num_blocks + 4  # stem, blocks, norm, pool, head


def test_matmul_macs_equal_what_the_forward_multiplies(monkeypatch):
    """Count the multiply-accumulates the clear forward really performs, one linear_forward call at a time,
    and compare with the table's matmul total (an independent check of the formulas)."""
    cfg = mm.get_config("mixer_s32_224", img_size=(64, 96), num_blocks=2, embed_dim=24, num_classes=7)
    done = []
    real = layers.linear_forward

    def counting(x, w, b):
        done.append(int(np.prod(x.shape[:-1])) * w.shape[0] * w.shape[1])
        return real(x, w, b)

    monkeypatch.setattr(layers, "linear_forward", counting)  # the stem and the blocks call it here
    monkeypatch.setattr(model, "linear_forward", counting)  # and the head here
    x = np.zeros((1, cfg.in_chans, *cfg.image_hw), np.float32)
    mm.mixer_forward(mm.init_params(cfg), x, cfg)
    tot = summary.totals(cfg, summary.layer_rows(cfg))
    print(f"counted {sum(done):,} MACs in {len(done)} linear calls; table {tot['matmul_macs']:,}")
    assert len(done) == 1 + 4 * cfg.num_blocks + 1
    assert sum(done) == tot["matmul_macs"]


def test_json_matches_the_table():
    r = run("mixer_s32_224", "--img-size", "64", "--num-blocks", "2", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    cfg = mm.get_config("mixer_s32_224", img_size=64, num_blocks=2)
    assert out["totals"]["params"] == mm.param_count(cfg)
    assert [row["name"] for row in out["layers"]] == [row["name"] for row in summary.layer_rows(cfg)]
    assert sum(row["macs"] for row in out["layers"]) == out["totals"]["macs"]


def test_profile_attributes_every_kind():
    cfg = mm.get_config("mixer_s32_224", img_size=64, num_blocks=2, embed_dim=32, num_classes=5)
    prof = summary.profile(cfg, batch_size=2, repeats=1, warmup=0)
    kinds = {"stem", "token mixing", "channel mixing", "LayerNorm", "GELU", "pool + head", "residual adds"}
    for phase in ("forward", "backward"):
        assert set(prof[phase]) == kinds, prof[phase]
        assert all(s >= 0 for s in prof[phase].values())
    assert layers.linear_forward.__name__ == "linear_forward"  # the wrappers are gone afterwards


def test_profile_command_prints_shares():
    r = run("mixer_digits", "--profile", "--batch-size", "3", "--repeats", "1")
    assert r.returncode == 0, r.stderr
    assert "channel mixing" in r.stdout and "backward ms" in r.stdout
    r = run("mixer_digits", "--profile", "--batch-size", "2", "--repeats", "1", "--json")
    prof = json.loads(r.stdout)["profile"]
    assert prof["batch_size"] == 2 and set(prof["seconds"]) == {"forward", "backward"}


@pytest.mark.parametrize("args, message", [
    (["mixer_x99"], "unknown model 'mixer_x99'"),
    (["mixer_b16_224", "--patch-size", "15"], "not divisible by patch_size 15"),
    (["mixer_digits", "--profile", "--batch-size", "0"], "--batch-size and --repeats must be >= 1"),
])
def test_bad_arguments_get_one_line(args, message):
    r = run(*args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.mmpretrain
@pytest.mark.parametrize("arch, name", [("b", "mixer_b16_224")])
def test_fvcore_column_equals_mmengines_counter(arch, name):
    """mmengine's get_model_complexity_info (fvcore's rules) on MMPretrain's own MlpMixer prints the
    number the summary reports as 'fvcore-style': it follows a different convention from mmcv 1.x's."""
    torch = pytest.importorskip("torch")
    from mmengine.analysis import get_model_complexity_info
    from mmpretrain.models.backbones.mlp_mixer import MlpMixer

    class Classifier(torch.nn.Module):  # MMPretrain's backbone, GlobalAveragePooling neck, LinearClsHead
        def __init__(self):
            super().__init__()
            self.backbone = MlpMixer(arch=arch)
            self.fc = torch.nn.Linear(self.backbone.embed_dims, 1000)

        def forward(self, x):
            return self.fc(self.backbone(x)[-1].mean(dim=2))  # the backbone returns (B, D, N)

    info = get_model_complexity_info(Classifier().eval(), input_shape=(3, 224, 224), show_table=False,
                                     show_arch=False)
    cfg = mm.get_config(name)
    tot = summary.totals(cfg, summary.layer_rows(cfg))
    print(f"mmengine {info['flops']:,} MACs {info['params']:,} params; summary {tot['fvcore_macs']:,} / {tot['params']:,}")
    assert info["flops"] == tot["fvcore_macs"] and info["params"] == tot["params"]
