"""The DiT/SiT-style transformer raw network (``cmt_core.networks.dit``): shapes, adaLN-Zero initialisation, the
two-time interface, class conditioning and the DiT-XL/2 parameter count. (Exact agreement with
facebookresearch/DiT's ``models.py`` on identical weights was checked outside the test suite: it needs timm.)"""

import pytest
import torch

from cmt_core.conditioning import CLASS_LABELS, class_cond
from cmt_core.networks.build import build_network
from cmt_core.networks.dit import DIT_SIZES, DiT, sincos_pos_embed_2d

CLASSES = 10


def dit_network(sample_shape, num_times=1, size="tiny", patch_size=2, label_dim=0):
    """The configured way to build a DiT (``build_network``), at one of ``DIT_SIZES``."""
    hidden, depth, heads = DIT_SIZES[size]
    return build_network("dit", sample_shape, num_times, width=hidden, depth=depth, patch_size=patch_size,
                         heads=heads, label_dim=label_dim)


def perturb(net: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    """Every parameter plus noise (so the zero-initialised adaLN and output layers no longer hide anything)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return net


@pytest.mark.parametrize("resolution", [8, 16])
def test_output_shape_equals_input_shape(resolution):
    torch.manual_seed(0)
    net = perturb(dit_network((4, resolution, resolution), size="tiny", patch_size=2))
    x = torch.randn(3, 4, resolution, resolution)
    out = net(x, torch.randn(3, 1))
    assert out.shape == x.shape and out.abs().max() > 0


def test_non_square_input_and_wrong_shape():
    net = perturb(dit_network((4, 8, 16), size="tiny"))
    assert net(torch.randn(2, 4, 8, 16), torch.randn(2, 1)).shape == (2, 4, 8, 16)
    with pytest.raises(ValueError, match="takes"):
        net(torch.randn(2, 4, 16, 8), torch.randn(2, 1))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        dit_network((4, 9, 9), size="tiny")


def test_zero_output_at_initialisation():
    torch.manual_seed(0)
    net = dit_network((4, 8, 8), num_times=2, size="tiny", label_dim=CLASSES)
    x = torch.randn(4, 4, 8, 8)
    out = net(x, torch.randn(4, 2), class_cond(torch.arange(4), CLASSES))
    assert torch.equal(out, torch.zeros_like(x))
    for block in net.blocks:  # adaLN-Zero: every block starts as the identity
        assert not block.adaLN_modulation[-1].weight.any() and not block.adaLN_modulation[-1].bias.any()


def test_position_embedding_is_dits():
    # DiT's get_2d_sincos_pos_embed (via MAE) on a 2 x 2 grid, width 4: channels [sin(col), cos(col), sin(row),
    # cos(row)] (one frequency, 1), tokens row-major.
    emb = sincos_pos_embed_2d(4, 2, 2)
    col = torch.tensor([0.0, 1.0, 0.0, 1.0])
    row = torch.tensor([0.0, 0.0, 1.0, 1.0])
    torch.testing.assert_close(emb, torch.stack([col.sin(), col.cos(), row.sin(), row.cos()], dim=1))


def test_second_time_starts_as_no_op():
    torch.manual_seed(0)
    one = perturb(dit_network((4, 8, 8), num_times=1, size="tiny", label_dim=CLASSES))
    two = dit_network((4, 8, 8), num_times=2, size="tiny", label_dim=CLASSES)
    result = two.load_state_dict(one.state_dict(), strict=False)
    assert not result.unexpected_keys and all(k.startswith("time.mlps.1.") for k in result.missing_keys)
    x, c = torch.randn(3, 4, 8, 8), torch.randn(3, 1)
    cond = class_cond(torch.tensor([0, 4, 9]), CLASSES)
    expected = one(x, c, cond)
    for second in (torch.randn(3, 1), torch.full((3, 1), 5.0)):
        torch.testing.assert_close(two(x, torch.cat([c, second], dim=1), cond), expected, rtol=0, atol=0)
    perturb(two.time.mlps[1])  # once trained, the second time matters
    assert not torch.allclose(two(x, torch.cat([c, torch.randn(3, 1)], dim=1), cond), expected)
    with pytest.raises(ValueError, match="c_noise must be"):
        two(x, c, cond)


def test_class_conditioning():
    torch.manual_seed(0)
    net = perturb(dit_network((4, 8, 8), size="tiny", label_dim=CLASSES))
    x, c = torch.randn(3, 4, 8, 8), torch.randn(3, 1)
    out_a = net(x, c, class_cond(torch.tensor([0, 1, 2]), CLASSES))
    out_b = net(x, c, class_cond(torch.tensor([3, 4, 5]), CLASSES))
    assert not torch.allclose(out_a, out_b)
    null = net(x, c, {CLASS_LABELS: torch.zeros(3, CLASSES)})  # all-zero rows: the unconditional class
    torch.testing.assert_close(null, net(x, c))  # a missing entry is all-zero rows
    assert not torch.allclose(null, out_a)
    with pytest.raises(ValueError, match="class_labels must be"):
        net(x, c, {CLASS_LABELS: torch.zeros(3, CLASSES + 1)})


def test_unknown_cond_keys_are_refused():
    conditional = dit_network((4, 8, 8), size="tiny", label_dim=CLASSES)
    unconditional = dit_network((4, 8, 8), size="tiny")
    x, c = torch.randn(2, 4, 8, 8), torch.randn(2, 1)
    with pytest.raises(ValueError, match="takes no conditioning"):
        conditional(x, c, {"text": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="takes no conditioning"):
        unconditional(x, c, class_cond(torch.tensor([0, 1]), CLASSES))


def test_xl2_parameter_count_matches_dit():
    assert DIT_SIZES["XL"] == (1152, 28, 16)
    with torch.device("meta"):
        net = dit_network((4, 32, 32), size="XL", patch_size=2, label_dim=1000)
    count = sum(p.numel() for p in net.parameters())
    assert abs(count - 675e6) / 675e6 < 0.01, count
    assert isinstance(net, DiT) and len(net.blocks) == 28 and net.x_embedder.proj.weight.shape == (1152, 4, 2, 2)


def test_mean_flow_jvp_runs_through_the_dit():
    """Forward-mode AD through attention: the fused kernels have none, the objective runs the math kernel."""
    from cmt_core.models import build_model
    from cmt_core.objectives.base import StepRandom
    from cmt_core.objectives.meanflow import MeanFlowLoss

    torch.manual_seed(0)
    flow_map = build_model("flow_map", {"kind": "dit", "width": 64, "depth": 2, "heads": 4, "patch_size": 2,
                                        "sigma_data": 1.0, "label_dim": CLASSES}, (4, 8, 8), sigma_min=0.002)
    perturb(flow_map.raw, 0.02)
    batch = {"x": torch.randn(4, 4, 8, 8), "cond": class_cond(torch.arange(4), CLASSES)}
    loss = MeanFlowLoss(equal_fraction=0.0)(flow_map.train(), batch, StepRandom(0, 0, 4))
    loss.mean().backward()
    assert torch.isfinite(loss).all() and all(p.grad is not None and torch.isfinite(p.grad).all()
                                              for p in flow_map.parameters() if p.requires_grad)
