"""Raw networks: ``net(x, c_noise, cond=None) -> tensor shaped like x``.

``cond`` is the conditioning channel (``cmt_core.conditioning``); a network refuses names it does not use.
``c_noise`` is ``(B, num_times)``: the conditioning of each time (``ln(sigma) / 4``; a VP-preconditioned
teacher's is its DDPM step index); one time for a denoiser or consistency model, two for a flow map / Mean
Flow model. The preconditioning wrappers in
``cmt_core.preconditioning`` own all sigma algebra; the raw networks never see sigma.
"""

from cmt_core.networks.build import build_network

__all__ = ["build_network"]
