"""Aleatoric Monte Carlo loss A(z, v, y) of DUEB (REFERENCE 3.3, QUIRKS 2-5, 20, 37, 41).

The reference (``bayesian_categorical_crossentropy``) builds T + 1 full log-softmax graphs and
keeps them all alive until backward.  All its CE terms are mean-reduced scalars, so the whole
gradient w.r.t. the logits has a closed form that can be accumulated sample by sample in the
forward pass (see :class:`_MonteCarloCE`): each noise sample is drawn into one reused work
buffer, used and overwritten, and only one ``[B,C,H,W]`` gradient is kept for backward.  Memory
is O(1) in T (two ``[B,C,H,W]`` buffers instead of T + 1 graphs), there is no second pass over
the noise in backward, and the random stream is the reference's (same values under the same
seed, see ``AleatoricLoss``).  On CPU the T normal draws themselves are a large share of the
time, for us and for the reference alike.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ohem import _target_index, check_labels, upcast

__all__ = ["AleatoricLoss"]


class _MonteCarloCE(torch.autograd.Function):
    """The CE part of A (everything except the variance depressor), value and gradient.

    Notation (per call): valid pixels V, Nv = |V| (clamped to >= 1), per-pixel CE
    l(x)_i = -log softmax(x)_i[y_i], x_t = z + n_t the t-th perturbed logits, p_t its softmax,
    p_0 = softmax(z), g_t = ELU'(d_t) = 1 if d_t > 0 else exp(d_t).

    default (scalar) mode: L = sum_V l / Nv, d_t = L(z) - L(x_t), m_t = -ELU(d_t),
        value = L0 + mean_t(m_t) * L0, and with S = sum_t g_t, G = sum_t g_t p_t:
        dvalue/dz_i = [ (1 + M - L0 S/T) p_0 + (L0/T) G - (1 + M) onehot(y_i) ] / Nv on V.
    per-pixel mode: the same with l0_i, d_t,i, m_t,i, M_i, S_i and G_i per pixel, and
        value = sum_V (1 + M_i) l0_i / Nv.
    Reparameterised noise n_t = sigma * eps_t adds, on V,
        dvalue/dsigma_i = (L0/T) sum_t g_t (sum_c p_t,ic eps_t,ic - eps_t,iy) / Nv.
    """

    @staticmethod
    def forward(ctx, logits, sigma, target, samples, ignore_index, per_pixel, reparam, noise,
                generator, grad_mode):
        # the arithmetic below is written for the compute dtype; keep autocast out of it
        with torch.autocast(logits.device.type, enabled=False):
            return _MonteCarloCE._forward(ctx, logits, sigma, target, samples, ignore_index,
                                          per_pixel, reparam, noise, generator, grad_mode)

    @staticmethod
    def _forward(ctx, logits, sigma, target, samples, ignore_index, per_pixel, reparam, noise,
                 generator, grad_mode):
        z = upcast(logits.detach())
        dt = z.dtype
        B, C, H, W = z.shape
        HW = H * W
        T = samples
        # grad_mode: is_grad_enabled() of the caller (needs_input_grad ignores no_grad)
        need_z = grad_mode and ctx.needs_input_grad[0]
        need_s = grad_mode and reparam and ctx.needs_input_grad[1]
        sig = sigma.detach().to(dt)
        valid, idx = _target_index(target, ignore_index)
        vf = valid.unsqueeze(1).to(dt)                               # [B,1,H,W]
        nv = vf.sum().clamp_min(1.0)          # all-ignored -> CE terms 0 instead of NaN
        # flat index of (b, y, h, w) in the [C,B,H,W] work buffer: take() reads x_y from it
        # without a strided gather over the permuted view
        ar_b = torch.arange(B, device=z.device).view(B, 1, 1, 1)
        ar_hw = torch.arange(HW, device=z.device).view(1, 1, H, W)
        fx = (idx * B + ar_b).mul_(HW).add_(ar_hw)
        del ar_b, ar_hw

        # Two [B,C,H,W]-sized buffers whatever T is (the work buffer and the gradient): that
        # is the whole point.  The work buffer is laid out [C,B,H,W] like the reference's
        # Normal(0, sigma).sample((C,)) draw, so normal_() into it reproduces the reference
        # noise; x is its [B,C,H,W] view (x[b,c] = draw[c,b], the transpose + squeeze).
        xcb = torch.empty((C, B, H, W), dtype=dt, device=z.device)
        x = xcb.permute(1, 0, 2, 3)
        G = torch.zeros_like(z) if need_z else None
        Hs = torch.zeros_like(vf) if need_s else None

        def exp_stats():
            """x <- exp(x - max_c x) in place; returns (max, sum_c, -log softmax(x)[y])."""
            xy = torch.take(xcb, fx)
            m = x.amax(1, keepdim=True)
            x.sub_(m).exp_()
            s_ = x.sum(1, keepdim=True)
            return m, s_, (s_.log() - (xy - m)) * vf

        x.copy_(z)
        m0, s0, l0 = exp_stats()                                     # per-pixel CE(z)
        L0 = l0 if per_pixel else l0.sum() / nv
        b_coef = L0 / T * vf / nv          # d value / d L_t per unit g_t, masked and scaled
        msum = torch.zeros_like(L0)
        gsum = torch.zeros_like(L0)
        for t in range(T):
            if noise is not None:
                n_t = noise[t].to(dt)
                torch.add(z, n_t, out=x)
                eps = n_t / sig if need_s else None
            else:
                xcb.normal_(generator=generator)
                eps = x.clone() if need_s else None
                torch.addcmul(z, sig, x, out=x)                      # z + sigma * eps
            _, st, lt = exp_stats()                                  # x = softmax(x_t) * st
            Lt = lt if per_pixel else lt.sum() / nv
            d = L0 - Lt
            msum -= F.elu(d)
            g = torch.where(d > 0, torch.ones_like(d), d.exp())      # ELU'(d)
            gsum += g
            if need_z:
                G.addcmul_(x, g * b_coef / st)                      # += (L0/T) g_t p_t
            if need_s:
                h = (x * eps).sum(1, keepdim=True) / st - eps.gather(1, idx)
                Hs.addcmul_(h, g * b_coef)                          # sum_c p eps - eps_y
        M = msum / T
        if per_pixel:
            value = (M * l0 + l0).sum() / nv
        else:
            value = M * L0 + L0            # reference order: variance_loss + undistorted
        grad_z = grad_s = None
        if need_z:
            a = 1 + M - L0 * gsum / T
            torch.sub(z, m0, out=x).exp_()                           # softmax(z) * s0
            G.addcmul_(x, a * vf / (nv * s0))
            G.scatter_add_(1, idx, (-(1 + M) * vf / nv).expand(B, 1, H, W).contiguous())
            grad_z = G
        if need_s:
            grad_s = Hs
        ctx.save_for_backward(grad_z, grad_s)
        ctx.dtypes = (logits.dtype, sigma.dtype)
        return value

    @staticmethod
    def backward(ctx, grad):
        grad_z, grad_s = ctx.saved_tensors
        # in place: the saved gradients are used once (autograd's version check refuses a
        # second backward through the same graph)
        gz = grad_z.mul_(grad).to(ctx.dtypes[0]) if grad_z is not None else None
        gs = grad_s.mul_(grad).to(ctx.dtypes[1]) if grad_s is not None else None
        return gz, gs, None, None, None, None, None, None, None, None


class AleatoricLoss(nn.Module):
    """Monte Carlo aleatoric loss ``bayesian_categorical_crossentropy(T, C)`` of the reference.

    ``loss(logits [B,C,H,W], var [B,1,H,W], target [B,H,W] int64, noise=None)`` -> scalar.

    Default (faithful) formula, CE = mean cross-entropy over non-ignored pixels (nats):
        sigma = sqrt(var) + 1e-15                          per pixel, shared by all classes
        n_t   ~ N(0, sigma^2) i.i.d. per class and pixel, t = 1..T, drawn without
                reparameterisation (no gradient to var through the noise, QUIRK 3)
        L0 = CE(z, y),  L_t = CE(z + n_t, y),  m_t = -ELU(L0 - L_t)
        A  = L0 + mean_t(m_t) * L0 + mean over all B*H*W pixels of (exp(var) - 1)
    so var only gets the depressor gradient exp(var) / (B*H*W).  The reference's ``+1e-15`` on
    the logits is dropped (a no-op in float32, < 1e-15 relative in float64, QUIRK 37).  If every
    pixel is ignored the CE terms are 0 (the reference gives NaN).

    Options (DESIGN options table, ``aleatoric.*``):
        learn_variance=True: reparameterised noise n_t = sigma * eps_t, eps_t ~ N(0, 1), so var
            also gets the data gradient dA/dsigma * dsigma/dvar.  sigma is then
            sqrt(max(var, tiny)) + 1e-15 so a var that underflowed to 0 gets a zero rather than
            infinite sqrt-gradient (identical otherwise).
        per_pixel=True: per-pixel comparison.  With l0_i = CE_i(z), l_t,i = CE_i(z + n_t) the
            per-pixel cross-entropies and V the non-ignored pixels (Nv = |V|):
                m_t,i = -ELU(l0_i - l_t,i),  M_i = mean_t m_t,i
                A = sum_{i in V} (1 + M_i) * l0_i / Nv + mean over all pixels of (exp(var) - 1)

    Random draws: ``Normal(0, sigma).sample((C,))`` of the reference is ``normal_()`` into a
    ``[C,B,H,W]`` buffer on the logits' device, transposed to ``[B,C,H,W]``: with the same
    global seed (or ``generator``) the noise is bit-identical to the reference's.

    Memory: the gradient w.r.t. the logits is accumulated in forward (closed form, see
    ``_MonteCarloCE``), so peak memory is two ``[B,C,H,W]`` buffers whatever T is (the
    reference keeps T + 1 log-softmax graphs), and backward is a single in-place multiply (a
    second backward through the same graph is refused by autograd).  Computation is in float32 for bf16/fp16 inputs (float64
    stays float64); gradients come back in the inputs' dtypes.

    Args:
        samples: T, number of Monte Carlo samples (10).
        ignore_index: ignored label (255).
        learn_variance, per_pixel: options above (reference: False, False).
    """

    def __init__(self, samples: int = 10, ignore_index: int = 255, learn_variance: bool = False,
                 per_pixel: bool = False):
        super().__init__()
        if int(samples) < 1:
            raise ValueError(f"AleatoricLoss: samples must be >= 1, got {samples}")
        self.samples = int(samples)
        self.ignore_index = int(ignore_index)
        self.learn_variance = bool(learn_variance)
        self.per_pixel = bool(per_pixel)

    def extra_repr(self) -> str:
        return (f"samples={self.samples}, ignore_index={self.ignore_index}, "
                f"learn_variance={self.learn_variance}, per_pixel={self.per_pixel}")

    def forward(self, logits: torch.Tensor, var: torch.Tensor, target: torch.Tensor,
                noise: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None,
                check: Optional[bool] = None) -> torch.Tensor:
        """Loss for logits [B,C,H,W], var [B,1,H,W] (>= 0), target [B,H,W] int64.

        ``noise`` [T,B,C,H,W] (tests): the perturbation added to the logits at sample t,
        i.e. ``sigma * eps_t`` (as the golden vectors store it), used instead of random draws;
        with ``learn_variance`` the standard draw is recovered as ``noise / sigma``.
        ``generator``: optional ``torch.Generator`` on the logits' device for the draws.
        ``check``: label validation (None: on CPU only, True: always, False: never).
        Returns a 0-dim tensor (nats), float32 or float64.
        """
        if logits.dim() != 4:
            raise ValueError(f"AleatoricLoss: logits must be [B,C,H,W], got {tuple(logits.shape)}")
        B, C, H, W = logits.shape
        if var.shape != (B, 1, H, W):
            raise ValueError(f"AleatoricLoss: var must be [B,1,H,W] = {(B, 1, H, W)}, got "
                             f"{tuple(var.shape)}")
        if target.shape != (B, H, W):
            raise ValueError(f"AleatoricLoss: target must be [B,H,W] = {(B, H, W)}, got "
                             f"{tuple(target.shape)}")
        if noise is not None and noise.shape != (self.samples, B, C, H, W):
            raise ValueError(f"AleatoricLoss: noise must be [T,B,C,H,W] = "
                             f"{(self.samples, B, C, H, W)}, got {tuple(noise.shape)}")
        check_labels(target, C, self.ignore_index, "AleatoricLoss", check)
        v = upcast(var)
        if self.learn_variance:
            sigma = torch.sqrt(v.clamp_min(torch.finfo(v.dtype).tiny)) + 1e-15
        else:
            sigma = torch.sqrt(v.detach()) + 1e-15
        ce = _MonteCarloCE.apply(logits, sigma, target, self.samples, self.ignore_index,
                                 self.per_pixel, self.learn_variance, noise, generator,
                                 torch.is_grad_enabled())
        depressor = (torch.exp(v) - 1).mean()
        return ce + depressor
