"""The few-step samplers call the model at the times they state."""

import pytest
import torch

from cmt_core.samplers import sample


class Recorder(torch.nn.Module):
    """A model that returns its input and records the times it is called with."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, s=None, cond=None):
        self.calls.append((float(t), None if s is None else float(s)))
        return x


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_flow_map_jumps_through_the_intermediate_sigma_to_zero(steps):
    model = Recorder()
    sample("flow_map", model, torch.zeros(4, 2), steps, sigma_max=80.0, sigma_min=0.002, mid_sigma=0.7)
    times = [model.calls[0][0]] + [s for _, s in model.calls]
    assert len(model.calls) == steps and times[0] == 80.0 and times[-1] == 0.0
    if steps > 1:
        assert times[1] == pytest.approx(0.7)
        assert all(a > b for a, b in zip(times, times[1:]))


def test_consistency_two_steps_re_noise_to_the_intermediate_sigma():
    model = Recorder()
    sample("consistency", model, torch.zeros(4, 2), 2, sigma_max=80.0, sigma_min=0.002, mid_sigma=0.7,
           generator=torch.Generator().manual_seed(0))
    assert [t for t, _ in model.calls] == [80.0, pytest.approx(0.7)]
