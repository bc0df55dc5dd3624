"""The bf16 linear backward for AVX2-only CPUs (reward/cpu_bf16.py): same outputs, same gradients to bf16
rounding, and only switched on where it helps."""

import pytest
import torch
import torch.nn.functional as F

from reward import cpu_bf16
from reward.cpu_bf16 import _Bf16Linear, fast_bf16_linear_backward


def test_forward_is_bit_identical_and_gradients_match_float64():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16, requires_grad=True)
    layer = torch.nn.Linear(64, 48).to(torch.bfloat16)
    out = _Bf16Linear.apply(x, layer.weight, layer.bias)
    assert torch.equal(out, F.linear(x, layer.weight, layer.bias))  # scores / log-probs do not move
    grad = torch.randn_like(out)
    out.backward(grad)
    x64, w64 = x.detach().double().requires_grad_(), layer.weight.detach().double().requires_grad_()
    b64 = layer.bias.detach().double().requires_grad_()
    F.linear(x64, w64, b64).backward(grad.double())
    for ours, exact in ((x.grad, x64.grad), (layer.weight.grad, w64.grad), (layer.bias.grad, b64.grad)):
        assert ours.shape == exact.shape and ours.dtype == torch.bfloat16
        assert torch.allclose(ours.double(), exact, rtol=2e-2, atol=2e-2 * exact.abs().max().item())


def test_switched_on_only_for_bf16_on_a_cpu_without_native_gemm(monkeypatch):
    original = F.linear
    monkeypatch.setattr(cpu_bf16, "native_bf16_gemm", lambda: False)
    for device, dtype in (("cuda", "bfloat16"), ("cpu", "float32")):
        with fast_bf16_linear_backward(device, dtype) as on:
            assert not on and F.linear is original
    with fast_bf16_linear_backward("cpu", "bfloat16") as on:
        assert on and F.linear is not original
        layer = torch.nn.Linear(8, 4).to(torch.bfloat16)
        x = torch.randn(2, 8, dtype=torch.bfloat16, requires_grad=True)
        layer(x).sum().backward()  # nn.Linear goes through the swapped function
        assert x.grad is not None and layer.weight.grad is not None
    assert F.linear is original  # restored
    monkeypatch.setattr(cpu_bf16, "native_bf16_gemm", lambda: True)
    with fast_bf16_linear_backward("cpu", "bfloat16") as on:
        assert not on and F.linear is original


def test_restored_after_an_error(monkeypatch):
    monkeypatch.setattr(cpu_bf16, "native_bf16_gemm", lambda: False)
    with pytest.raises(RuntimeError):
        with fast_bf16_linear_backward("cpu", "bfloat16"):
            raise RuntimeError("boom")
    assert F.linear is cpu_bf16._ORIGINAL_LINEAR
