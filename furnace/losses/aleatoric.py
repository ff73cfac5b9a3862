"""Aleatoric Monte Carlo loss A(z, v, y) of DUEB (REFERENCE 3.3, QUIRKS 2-5, 20, 37, 41).

The reference (``bayesian_categorical_crossentropy``) builds T + 1 full log-softmax graphs and
keeps them all alive until backward.  All its CE terms are mean-reduced scalars, so the whole
gradient w.r.t. the logits has a closed form that can be accumulated sample by sample in the
forward pass (see :class:`_MonteCarloCE`): each noise sample is drawn into one reused work
buffer, used and overwritten, and only one ``[B,C,H,W]`` gradient is kept for backward.  Memory
is O(1) in T (three ``[B,C,H,W]``-sized buffers instead of T + 1 graphs) and there is no
second pass over the noise in backward.  The noise has the reference's distribution, drawn
from torch's generator (reproducible under ``torch.manual_seed`` or a ``generator``), but not
its stream: on CPU only the non-ignored pixels get noise.  On CPU the T normal draws are a
large share of the time (for the reference, mt19937 + Box-Muller inside torch's ``normal_``,
the largest); ours go through :func:`furnace.losses.noise.normal_`, torch's ``normal_`` in
fixed, separately seeded chunks filled on all threads.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .noise import normal_
from .ohem import _target_index, check_labels, upcast

__all__ = ["AleatoricLoss"]

_LOG2E = 1.0 / math.log(2.0)
_LN2 = math.log(2.0)
#: shift by max_c z with a per-sample check (CPU); False: per-sample max always (tests)
_CHECKED_SHIFT = True
#: run injected noise on the valid pixels only too (tests: the random draws' layout)
_COMPACT_INJECTED = False


def _syncs_ok(device: torch.device) -> bool:
    """Whether data-dependent host decisions are free (CPU); tests patch it to run the
    device code path (no compaction, masks, per-sample max) on CPU."""
    return device.type == "cpu"


class _Pixels:
    """Where the Monte Carlo loop runs: a ``[B', K, P]`` view of ``[B, K, H, W]`` maps.

    On CPU, when some pixels are ignored, only the valid ones are kept (``B' = 1``,
    ``P = #valid``, image by image): ignored pixels contribute nothing to the value or the
    gradient, so their noise is neither drawn nor used and every pass of the loop shrinks with
    the ignored fraction.  Otherwise (nothing ignored, or not on CPU, where counting the valid
    pixels would be a host sync) it is the plain ``[B, K, H*W]`` view and ignored pixels are
    masked.
    """

    def __init__(self, valid: torch.Tensor, compact: bool = True):
        B, H, W = valid.shape
        self.B, self.H, self.W, self.HW = B, H, W, H * W
        self.compact = False
        self.sel = self.off = None
        self.Bp, self.P = B, H * W
        if compact and _syncs_ok(valid.device):
            flat = valid.reshape(B, H * W)
            n = int(flat.sum())
            if n < B * H * W:
                self.compact = True
                self.sel = [flat[b].nonzero().view(1, -1) for b in range(B)]
                off = [0]
                for s in self.sel:
                    off.append(off[-1] + s.numel())
                self.off = off
                self.Bp, self.P = 1, n

    def pack(self, t: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``t`` [B,K,H,W] -> [B',K,P] (a view when not compacted and ``out`` is None)."""
        K = t.shape[1]
        if not self.compact:
            v = t.reshape(self.B, K, self.HW)
            return v if out is None else out.copy_(v)
        if out is None:
            out = t.new_empty((1, K, self.P))
        for b, s in enumerate(self.sel):           # gather: fast into a strided slice
            torch.gather(t[b].reshape(K, self.HW), 1, s.expand(K, s.numel()),
                         out=out[0, :, self.off[b]:self.off[b + 1]])
        return out

    def unpack(self, t: torch.Tensor, buf: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``t`` [B',K,P] -> [B,K,H,W] (zeros at the dropped pixels); when compacted, the
        result is written into ``buf`` (>= B*K*H*W elements, not overlapping ``t``) if given."""
        K = t.shape[1]
        if not self.compact:
            return t.view(self.B, K, self.H, self.W)
        n = self.B * K * self.HW
        out = (t.new_empty(n) if buf is None else buf[:n]).view(self.B, K, self.HW).zero_()
        for b, s in enumerate(self.sel):
            out[b].scatter_(1, s.expand(K, s.numel()), t[0, :, self.off[b]:self.off[b + 1]])
        return out.view(self.B, K, self.H, self.W)


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

    Layout (:class:`_Pixels`): on CPU the loop runs on the valid pixels only, [1, C, Nv];
    elsewhere on [B, C, H*W] with masks.  Classes 0 and y_i are swapped at every pixel (the
    noise is i.i.d. over classes, so this is a relabeling, undone on the gradient), which makes
    x_y the contiguous row 0.  Per sample: ``normal_`` into the work buffer X, one addcmul
    X = log2(e) * ((z - max_c z) + sigma * eps), a copy of row 0, exp2 in place, the class sum,
    a few [.,1,P] ops, one addcmul into the gradient: the one exponential pass serves both the
    CE value (log of the sum) and the softmax gradient.  Shifting by max_c z (computed once)
    instead of the per-sample max is exact unless a term overflows or the largest one leaves
    the normal range: checked on CPU per sample on the class sums, and such a sample is redone
    with the same noise (generator state restored) and the per-sample max, as are the later
    ones; off CPU the per-sample max is always taken (the check would be a host sync).
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
        z4 = upcast(logits.detach())
        dt = z4.dtype
        dev = z4.device
        C = z4.shape[1]
        T = samples
        # grad_mode: is_grad_enabled() of the caller (needs_input_grad ignores no_grad)
        need_z = grad_mode and ctx.needs_input_grad[0]
        need_s = grad_mode and reparam and ctx.needs_input_grad[1]
        valid, idx = _target_index(target, ignore_index)
        # injected noise (tests, bench) comes as [B,C,H,W] maps: keep that layout for it
        px = _Pixels(valid, compact=noise is None or _COMPACT_INJECTED)
        Bp, P = px.Bp, px.P
        sg = px.pack(sigma.detach().to(dt))                          # [B',1,P]
        y = px.pack(idx)                                             # [B',1,P]
        if px.compact or _syncs_ok(dev) and bool(valid.all()):
            vf = None                                                # every pixel counts
            nv = torch.tensor(float(max(P * Bp, 1)), dtype=dt, device=dev)
        else:
            vf = px.pack(valid.unsqueeze(1).to(dt))
            nv = vf.sum().clamp_min(1.0)      # all-ignored -> CE terms 0 instead of NaN

        def masked(t):
            return t if vf is None else t * vf
        # flat index of (b, y, p) in the contiguous [B',C,P] buffers
        fx = (y + C * torch.arange(Bp, device=dev).view(Bp, 1, 1)).mul_(P)
        fx += torch.arange(P, device=dev).view(1, 1, P)

        def swap(t):
            """Exchange class 0 and class y_i at every pixel of ``t`` [B',C,P] (in place).

            The loop runs on class-swapped maps, so x_y is the contiguous row 0 instead of a
            gather per sample; the noise is i.i.d. over classes, so this is only a relabeling,
            undone on the gradient at the end.
            """
            ty = torch.take(t, fx)
            r0 = t[:, :1].clone()
            t[:, :1] = ty
            t.put_(fx, r0)                     # y_i = 0: writes r0 back to row 0, as it was
            return t

        # Three [B',C,P] buffers whatever T is: z - max_c z, the work buffer X, the gradient.
        # Exponentials are exp2 of log2(e)-scaled logits (exp2 is markedly cheaper than exp on
        # CPU): zs = (z - max_c z) * log2(e), sgl = sigma * log2(e), x' = zs + sgl * eps.
        zp = px.pack(z4)
        m0 = zp.amax(1, keepdim=True)
        zs = zp.sub_(m0) if px.compact else zp - m0                 # compact: zp is ours
        del zp
        swap(zs).mul_(_LOG2E)
        sgl = sg * _LOG2E
        # X lives in a buffer big enough to take the unpacked [B,C,H,W] gradient at the end
        xbuf = zs.new_empty(max(zs.numel(), px.B * C * px.HW) if px.compact else zs.numel())
        X = xbuf[:zs.numel()].view(zs.shape)
        # Shifting by max_c z instead of the per-sample max is exact as long as no term
        # overflows and the largest one stays a normal number: checked per sample on the class
        # sums (tiny [B',1,P] tensor, CPU only: off CPU it would be a host sync, so the
        # per-sample max is always taken there); a failing sample is redone with the same noise
        # (generator state restored) and the per-sample max, as are all later ones.
        shift_each = not (_syncs_ok(dev) and _CHECKED_SHIFT)
        s_lo = 2.0 ** (-1000 if dt == torch.float64 else -100)
        gen = None
        if noise is None and not shift_each:
            gen = generator if generator is not None else torch.default_generator

        torch.exp2(zs, out=X)
        s0 = X.sum(1, keepdim=True)
        l0 = masked(s0.log() - zs[:, :1] * _LN2)            # per-pixel CE(z)
        L0 = l0 if per_pixel else l0.sum() / nv
        b_coef = masked(L0 / (T * nv))     # d value / d L_t per unit g_t, masked and scaled
        msum = torch.zeros_like(L0)
        gsum = torch.zeros_like(L0)
        G = None
        Hs = torch.zeros_like(sg) if need_s else None
        for t in range(T):
            state = gen.get_state() if gen is not None else None
            shift = shift_each
            while True:
                if noise is None:
                    if state is not None and shift:                  # the redo: same draw
                        gen.set_state(state)
                    normal_(X, generator)                            # eps, i.i.d. N(0, 1)
                    eps = X.clone() if need_s else None
                    torch.addcmul(zs, sgl, X, out=X)                 # log2(e) (x_t - max z)
                else:
                    swap(px.pack(noise[t].to(dt), out=X))            # sigma * eps
                    eps = X / sg if need_s else None
                    torch.add(zs, X, alpha=_LOG2E, out=X)
                if shift:
                    X.sub_(X.amax(1, keepdim=True))
                xy = X[:, :1].clone()                                # x'_y
                X.exp2_()                                            # softmax(x_t) * st
                st = X.sum(1, keepdim=True)
                if shift or P == 0:
                    break
                lo, hi = torch.aminmax(st)
                if float(lo) >= s_lo and float(hi) < math.inf:
                    break
                shift = shift_each = True                            # redo, and from now on
            lt = masked(st.log().sub_(xy.mul_(_LN2)))
            d = L0 - (lt if per_pixel else lt.sum() / nv)
            msum -= F.elu(d)
            g = torch.where(d > 0, torch.ones_like(d), d.exp())      # ELU'(d)
            gsum += g
            gb = g * b_coef
            if need_s:
                h = (X * eps).sum(1, keepdim=True).div_(st).sub_(eps[:, :1])
                Hs.addcmul_(h, gb)                                   # sum_c p eps - eps_y
            if need_z:
                coef = st.reciprocal_().mul_(gb)                     # (L0/T) g_t / st
                if G is None:
                    G = torch.mul(X, coef)
                else:
                    G.addcmul_(X, coef)
        M = msum / T
        if per_pixel:
            value = masked(M * l0 + l0).sum() / nv
        else:
            value = M * L0 + L0            # reference order: variance_loss + undistorted
        grad_z = grad_s = None
        if need_z:
            a = 1 + M - L0 * gsum / T
            scale = masked(1.0 / nv)
            if G is None:
                G = torch.zeros_like(X)
            del X
            G.addcmul_(zs.exp2_(), a * scale / s0)                   # softmax(z) * s0
            del zs
            G[:, :1] -= (1 + M) * scale                              # the onehot(y) term
            grad_z = px.unpack(swap(G), xbuf)
        if need_s:
            grad_s = px.unpack(Hs)
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

    Random draws: the reference's ``Normal(0, sigma).sample((C,))`` is replaced by
    ``sigma * eps`` with eps from :func:`furnace.losses.noise.normal_` on CPU (seeds drawn from
    torch's generator: the global one, or ``generator``; chunked torch ``normal_``, see that
    module) and ``normal_()`` on other devices, so runs are reproducible under
    ``torch.manual_seed`` whatever the thread count; the distribution is the reference's
    (i.i.d. N(0, sigma^2) per class, pixel and sample), the stream is not: on CPU only
    non-ignored pixels are drawn (their noise cannot affect the value or the gradient) and the
    layout differs.

    Memory: the gradient w.r.t. the logits is accumulated in forward (closed form, see
    ``_MonteCarloCE``), so peak memory is three ``[B,C,H,W]``-sized buffers whatever T is (the
    reference keeps T + 1 log-softmax graphs), and backward is a single in-place multiply (a
    second backward through the same graph is refused by autograd).  Computation is in float32
    for bf16/fp16 inputs (float64 stays float64); gradients come back in the inputs' dtypes.

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
