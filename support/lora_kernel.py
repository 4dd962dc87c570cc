# LoRA on a frozen Linear in one GEMM (config fused_lora; docs/BENCHMARKS.md: epoch 5% faster). peft's forward,
# y = base(x) + s * B(A(x)), makes four passes over the activations besides the base GEMM's: A reads x, B writes
# its (N, C_out) product, the add reads both and writes y. At MVDream's first level (262k tokens x 320 channels
# per call) those passes cost more than the base GEMM itself. Here the same y is one GEMM over concatenated inputs,
#     y = [x | a] @ [W | s B]^T + bias,   a = x A^T,
# with the rank padded to a multiple of 8 (zero columns) so that rows stay 16-byte aligned for the tensor cores.
# The backward is written out so that the frozen W gets no weight-gradient GEMM:
#     g_a = s g B,   g_x = [g | g_a] @ [W ; A],   g_B = s g^T a,   g_A = g_a^T x.
# A self-attention's q, k, v share their input: `shared_input` makes them one GEMM (block-diagonal B).
# Support code for mvdream.py (MVDreamPolicy.fuse_lora); numerics equal peft's up to rounding (tests/test_mvdream.py).
import types

import torch
import torch.nn.functional as F

ALIGN = 8


def _compute_dtype(x, weight):
    # what peft's forward computes in: the autocast dtype where autocast is on, else the frozen weight's
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype


def _pad_rows(m, n):   # (r, C) -> (n, C) with zero rows
    return torch.cat([m, m.new_zeros(n - m.shape[0], m.shape[1])]) if n > m.shape[0] else m


class _ConcatLoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling):
        dt = _compute_dtype(x, weight)
        r = lora_A.shape[0]
        R = -(-r // ALIGN) * ALIGN
        with torch.autocast(x.device.type, enabled=False):
            x, W = x.to(dt), weight.to(dt)
            A = _pad_rows(lora_A.to(dt), R)                                   # (R, C_in)
            B = _pad_rows((lora_B * scaling).to(dt).t(), R).t()             # (C_out, R)
            a = F.linear(x, A)                                                # (..., R), columns >= r are 0
            y = F.linear(torch.cat([x, a], -1), torch.cat([W, B], 1), None if bias is None else bias.to(dt))
        ctx.save_for_backward(x, a, W, A, B)
        ctx.r, ctx.scaling, ctx.dtypes = r, scaling, (lora_A.dtype, lora_B.dtype)
        return y

    @staticmethod
    def backward(ctx, g):
        x, a, W, A, B = ctx.saved_tensors
        r, s = ctx.r, ctx.scaling
        g = g.to(x.dtype)
        ga = g @ B                                                            # (..., R): s is inside B
        gx = torch.cat([g, ga], -1) @ torch.cat([W, A]) if ctx.needs_input_grad[0] else None
        g2, a2, x2, ga2 = g.flatten(0, -2), a.flatten(0, -2), x.flatten(0, -2), ga.flatten(0, -2)
        gA = (ga2[:, :r].t() @ x2).to(ctx.dtypes[0]) if ctx.needs_input_grad[3] else None
        gB = ((g2.t() @ a2[:, :r]) * s).to(ctx.dtypes[1]) if ctx.needs_input_grad[4] else None
        return gx, None, None, gA, gB, None


def _forward(self, x, *args, **kwargs):
    # replaces peft's lora.Linear.forward on one module; peft's own path wherever it does more than vanilla LoRA
    name = None if args or kwargs else _active(self)
    if name is None:
        return self._peft_forward(x, *args, **kwargs)
    base = self.base_layer
    return _ConcatLoRA.apply(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                             self.scaling[name])


def _active(module):
    # the vanilla LoRA adapter that _forward would fuse, or None (peft's path)
    if not hasattr(module, "_peft_forward") or module.disable_adapters or module.merged:
        return None
    if len(module.active_adapters) != 1:
        return None
    name = module.active_adapters[0]
    if name not in module.lora_A or name in module.lora_variant or not isinstance(module.lora_dropout[name],
                                                                                  torch.nn.Identity):
        return None
    return name


def shared_input(modules, x):
    """Several fused LoRA Linears of one input (a self-attention's to_q, to_k, to_v) as ONE GEMM:
    [x | x [A_q; A_k; A_v]^T] @ [[W_q; W_k; W_v] | blockdiag(s B_q, s B_k, s B_v)]^T. Returns their outputs, or
    None where that does not apply (the caller then calls the modules)."""
    names = [_active(m) for m in modules]
    if None in names or any(m.base_layer.bias is not None for m in modules) or \
            len({m.scaling[n] for m, n in zip(modules, names)}) != 1:
        return None
    W = torch.cat([m.base_layer.weight for m in modules])
    A = torch.cat([m.lora_A[n].weight for m, n in zip(modules, names)])
    B = torch.block_diag(*[m.lora_B[n].weight for m, n in zip(modules, names)])
    y = _ConcatLoRA.apply(x, W, None, A, B, modules[0].scaling[names[0]])
    return y.split([m.base_layer.weight.shape[0] for m in modules], -1)


def fuse(module):
    """Route a peft lora.Linear through the one-GEMM forward (peft's forward kept as _peft_forward)."""
    if not hasattr(module, "_peft_forward"):
        module._peft_forward = module.forward
        module.forward = types.MethodType(_forward, module)


def unfuse(module):
    if hasattr(module, "_peft_forward"):
        module.forward = module._peft_forward
        del module._peft_forward
