"""Flow-matching velocity teachers in EDM time: the exact conversion (checked against the closed-form velocity of a
Gaussian mixture, computed independently of its denoiser), SiT checkpoints read into our DiT, and their refusals."""

import math

import pytest
import torch
from torch import nn

from cmt_core.conditioning import class_cond
from cmt_core.data.synthetic import GaussianMixture
from cmt_core.models import build_model, load_model, save_model
from cmt_core.networks.dit import DIT_SIZES, DiT
from cmt_core.preconditioning import TIME_FEATURE_SCALE, LinearVelocityDenoiser, make_denoiser
from cmt_core.sit_checkpoint import sit_teacher, write_sit_checkpoint

CLASSES = 4


class MixtureVelocity(nn.Module):
    """The exact velocity of the linear path of ``GaussianMixture`` in its own time, written from the joint of
    (y, e) given z alone: per mode k, z ~ N(a mu_k, (a^2 s^2 + b^2) I) with a, b the data and noise coefficients,
    E[y | z, k] = mu_k + a s^2 (z - a mu_k) / var and E[e | z, k] = b (z - a mu_k) / var; the velocity is
    E[d/dtime (a y + b e) | z] = a' E[y | z] + b' E[e | z]. ``time``: 'sit' (a = s, b = 1 - s) or 'rf' (a = 1 - tau,
    b = tau); the network's time arrives as c_noise = time / 250."""

    def __init__(self, mixture: GaussianMixture, time: str):
        super().__init__()
        self.mixture, self.time = mixture, time
        self.label_dim = mixture.num_classes

    def forward(self, z, c_noise, cond=None):
        z = z.double()
        own = c_noise[:, 0].double() * TIME_FEATURE_SCALE
        a, b, da, db = (own, 1 - own, 1.0, -1.0) if self.time == "sit" else (1 - own, own, -1.0, 1.0)
        a, b = a[:, None, None], b[:, None, None]
        mu = self.mixture.means[None]  # (1, K, 2)
        s2 = self.mixture.std ** 2
        var = a ** 2 * s2 + b ** 2  # (B, 1, 1)
        diff = z[:, None, :] - a * mu  # (B, K, 2)
        logits = -(diff ** 2).sum(-1) / (2 * var[..., 0])
        labels = (cond or {}).get("class_labels")
        if labels is not None:
            members = nn.functional.one_hot(self.mixture.mode_class, self.mixture.num_classes).T.double()
            logits = logits.masked_fill((labels.double() @ members) == 0, -math.inf)
        w = torch.softmax(logits, dim=1)[..., None]
        y = (w * (mu + a * s2 * diff / var)).sum(1)
        e = (w * (b * diff / var)).sum(1)
        return (da * y + db * e).float()


@pytest.mark.parametrize("time", ["sit", "rf"])
def test_velocity_converts_exactly_to_the_mixture_denoiser(time):
    mixture = GaussianMixture(num_modes=8, std=0.1, num_classes=CLASSES)
    teacher = LinearVelocityDenoiser(MixtureVelocity(mixture, time), time=time)
    gen = torch.Generator().manual_seed(0)
    sigma = torch.exp(torch.linspace(math.log(0.002), math.log(80.0), 64))
    y, classes = mixture.sample_labelled(64, gen)
    x = y + sigma[:, None] * torch.randn(64, 2, generator=gen)
    cond = class_cond(classes, CLASSES)
    exact = mixture.denoise(x.double(), sigma.double(), cond).float()
    torch.testing.assert_close(teacher(x, sigma, cond), exact, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(teacher(x, sigma), mixture.denoise(x.double(), sigma.double()).float(),
                               atol=2e-5, rtol=1e-5)


def perturbed_dit(label_dim: int = CLASSES, size: str = "tiny") -> DiT:
    hidden, depth, heads = DIT_SIZES[size]
    torch.manual_seed(0)
    raw = DiT(8, 4, 2, hidden, depth, heads, num_times=1, label_dim=label_dim)
    with torch.no_grad():
        for p in raw.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return raw


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_sit_checkpoint_reads_back_as_the_same_denoiser(tmp_path, learn_sigma):
    raw = perturbed_dit()
    null = torch.randn(raw.hidden)
    write_sit_checkpoint(raw, tmp_path / "sit.pt", null_row=null, learn_sigma=learn_sigma)
    teacher = sit_teacher(tmp_path / "sit.pt", (4, 8, 8), CLASSES)
    assert teacher.network == {"kind": "dit", "width": 64, "depth": 2, "patch_size": 2, "heads": 4, "dropout": 0.0,
                               "label_dim": CLASSES}
    x, sigma = torch.randn(6, 4, 8, 8) * 3, torch.tensor([0.002, 0.1, 1.0, 5.0, 40.0, 80.0])
    cond = class_cond(torch.tensor([0, 1, 2, 3, 0, 1]), CLASSES)
    with torch.no_grad():
        expected = LinearVelocityDenoiser(raw.eval(), "sit")(x, sigma, cond)
        torch.testing.assert_close(teacher.model(x, sigma, cond), expected)
        # the all-zero row (the unconditional class) embeds to SiT's null row
        torch.testing.assert_close(teacher.model.raw.label(torch.zeros(1, CLASSES))[0], null)


def test_sit_teacher_round_trips_through_our_model_file(tmp_path):
    write_sit_checkpoint(perturbed_dit(), tmp_path / "sit.pt")
    sit = sit_teacher(tmp_path / "sit.pt", (4, 8, 8), CLASSES)
    save_model(tmp_path / "model.pt", sit.model, "denoiser", sit.network, sit.sample_shape)
    loaded = load_model(tmp_path / "model.pt")
    assert isinstance(loaded, LinearVelocityDenoiser) and loaded.preconditioning == {"name": "linear_velocity",
                                                                                      "time": "sit"}
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([0.5, 20.0])
    cond = class_cond(torch.tensor([1, 3]), CLASSES)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, sigma, cond), sit.model(x, sigma, cond))


def test_training_checkpoint_uses_its_ema(tmp_path):
    raw = perturbed_dit()
    write_sit_checkpoint(raw, tmp_path / "ema.pt")
    ema = torch.load(tmp_path / "ema.pt", weights_only=True)
    torch.save({"model": {k: torch.zeros_like(v) for k, v in ema.items()}, "ema": ema, "opt": {}}, tmp_path / "ckpt.pt")
    x = torch.randn(2, 4, 8, 8)
    a = sit_teacher(tmp_path / "ckpt.pt", (4, 8, 8), CLASSES).model
    b = sit_teacher(tmp_path / "ema.pt", (4, 8, 8), CLASSES).model
    with torch.no_grad():
        torch.testing.assert_close(a(x, torch.ones(2)), b(x, torch.ones(2)))


def test_sit_refusals_name_what_does_not_fit(tmp_path):
    write_sit_checkpoint(perturbed_dit(), tmp_path / "sit.pt")
    with pytest.raises(ValueError, match=r"shape \(4, 8, 8\)"):
        sit_teacher(tmp_path / "sit.pt", (4, 16, 16), CLASSES)
    with pytest.raises(ValueError, match="5 class embeddings"):
        sit_teacher(tmp_path / "sit.pt", (4, 8, 8), 10)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a SiT checkpoint"):
        sit_teacher(tmp_path / "other.pt", (4, 8, 8), CLASSES)
    state = torch.load(tmp_path / "sit.pt", weights_only=True)
    odd = {k.replace("blocks.1.", "blocks.2.").replace("blocks.0.", "blocks.1."): v for k, v in state.items()}
    odd.update({k.replace("blocks.1.", "blocks.0."): v for k, v in state.items() if k.startswith("blocks.1.")})
    odd.update({k: v for k, v in state.items() if k.startswith("blocks.0.")})
    torch.save(odd, tmp_path / "deep.pt")  # three blocks of width 64: no DiT size
    with pytest.raises(ValueError, match="not one of the DiT sizes"):
        sit_teacher(tmp_path / "deep.pt", (4, 8, 8), CLASSES)


def test_make_denoiser_and_build_model_know_the_dit():
    raw = build_model("flow_map", {"kind": "dit", "width": 64, "depth": 2, "heads": 4, "patch_size": 2,
                                   "sigma_data": 1.0, "label_dim": CLASSES}, (4, 8, 8), sigma_min=0.002)
    assert isinstance(raw.raw, DiT) and raw.raw.num_times == 2 and raw.raw.label_dim == CLASSES
    assert isinstance(make_denoiser(nn.Identity(), 0.5, {"name": "linear_velocity", "time": "rf"}),
                      LinearVelocityDenoiser)
    with pytest.raises(ValueError, match="linear path's time"):
        make_denoiser(nn.Identity(), 0.5, {"name": "linear_velocity", "time": "vp"})


def test_guiding_the_converted_denoiser_guides_the_velocity():
    """CFG on D (``cmt_core.guidance``) is CFG on SiT's velocity, v_u + w (v_c - v_u): D is affine in v with
    coefficients that do not depend on the class."""
    from cmt_core.guidance import guided

    raw = perturbed_dit().eval()
    teacher = LinearVelocityDenoiser(raw, "sit")
    x, sigma = torch.randn(4, 4, 8, 8) * 5, torch.tensor([0.3, 2.0, 10.0, 80.0])
    cond = class_cond(torch.tensor([0, 1, 2, 3]), CLASSES)
    with torch.no_grad():
        tau = (sigma / (1 + sigma))[:, None, None, None]
        z = x / (1 + sigma)[:, None, None, None]
        c_noise = ((1 - tau.flatten()) / TIME_FEATURE_SCALE)[:, None]
        v_c, v_u = raw(z, c_noise, cond), raw(z, c_noise, {"class_labels": torch.zeros(4, CLASSES)})
        expected = z + tau * (v_u + 2.5 * (v_c - v_u))
        torch.testing.assert_close(guided(teacher, "cfg", 2.5)(x, sigma, cond), expected, atol=1e-5, rtol=1e-5)
