"""bf16 linear layers computed in float32 on AVX2-only CPUs (runtime/cpu_bf16.py): what a GPU's bf16 GEMM computes,
the same values with and without autograd (rollout and learner agree), gradients to bf16 rounding, and only
switched on where it helps."""

import pytest
import torch
import torch.nn.functional as F

from runtime import cpu_bf16
from runtime.cpu_bf16 import _conv3d, _Fp32Linear, _linear, bf16_matmuls_in_fp32


def test_outputs_are_float32_sums_rounded_once_and_equal_with_and_without_autograd():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16, requires_grad=True)
    layer = torch.nn.Linear(64, 48).to(torch.bfloat16)
    out = _Fp32Linear.apply(x, layer.weight, layer.bias)
    exact = F.linear(x.detach().double(), layer.weight.detach().double(), layer.bias.detach().double())
    assert out.dtype == torch.bfloat16
    # bf16 products are exact in float32: only the output's one rounding to bf16 (half a bf16 ulp: 2^-8 relative)
    # and the float32 sum's own rounding separate it from the float64 result
    assert ((out.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-6 * exact.abs().max()).all()
    with torch.no_grad():
        assert torch.equal(_linear(x, layer.weight, layer.bias), out)  # the rollout's values are the learner's
    assert torch.equal(_linear(x, layer.weight, layer.bias), out)


def test_gradients_match_float64():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16, requires_grad=True)
    layer = torch.nn.Linear(64, 48).to(torch.bfloat16)
    out = _Fp32Linear.apply(x, layer.weight, layer.bias)
    grad = torch.randn_like(out)
    out.backward(grad)
    x64, w64 = x.detach().double().requires_grad_(), layer.weight.detach().double().requires_grad_()
    b64 = layer.bias.detach().double().requires_grad_()
    F.linear(x64, w64, b64).backward(grad.double())
    for ours, exact in ((x.grad, x64.grad), (layer.weight.grad, w64.grad), (layer.bias.grad, b64.grad)):
        assert ours.shape == exact.shape and ours.dtype == torch.bfloat16
        assert torch.allclose(ours.double(), exact, rtol=2 ** -7, atol=2 ** -7 * exact.abs().max().item())


def test_conv3d_in_float32_matches_float64_and_trains():
    """A patch embedding (kernel = stride, as Wan's and Qwen2.5-VL's): float32 products, one rounding to bf16."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(3, 16, kernel_size=(2, 4, 4), stride=(2, 4, 4)).to(torch.bfloat16)
    x = torch.randn(2, 3, 4, 8, 8, dtype=torch.bfloat16, requires_grad=True)
    out = _conv3d(x, conv.weight, conv.bias, conv.stride)
    exact = F.conv3d(x.detach().double(), conv.weight.detach().double(), conv.bias.detach().double(), conv.stride)
    assert out.dtype == torch.bfloat16 and out.shape == exact.shape
    assert ((out.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-6 * exact.abs().max()).all()
    out.sum().backward()
    assert x.grad.dtype == conv.weight.grad.dtype == torch.bfloat16 and conv.weight.grad.abs().sum() > 0


def test_switched_on_only_for_bf16_on_a_cpu_without_native_gemm(monkeypatch):
    original = F.linear
    monkeypatch.setattr(cpu_bf16, "native_bf16_gemm", lambda: False)
    for device, dtype in (("cuda", "bfloat16"), ("cpu", "float32")):
        with bf16_matmuls_in_fp32(device, dtype) as on:
            assert not on and F.linear is original
    with bf16_matmuls_in_fp32("cpu", "bfloat16") as on:
        assert on and F.linear is not original and F.conv3d is _conv3d
        with bf16_matmuls_in_fp32("cpu", "bfloat16") as inner:  # nested: the outer block's swap stays
            assert not inner and F.linear is not original
        layer = torch.nn.Linear(8, 4).to(torch.bfloat16)
        x = torch.randn(2, 8, dtype=torch.bfloat16, requires_grad=True)
        layer(x).sum().backward()  # nn.Linear goes through the swapped function
        assert x.grad is not None and layer.weight.grad is not None
        fp32 = torch.nn.Linear(8, 4)
        y = torch.randn(2, 8)
        assert torch.equal(fp32(y), original(y, fp32.weight, fp32.bias))  # float32 layers: torch's own
    assert F.linear is original and F.conv3d is cpu_bf16._ORIGINAL_CONV3D  # restored
    monkeypatch.setattr(cpu_bf16, "native_bf16_gemm", lambda: True)
    with bf16_matmuls_in_fp32("cpu", "bfloat16") as on:
        assert not on and F.linear is original


def test_restored_after_an_error(monkeypatch):
    monkeypatch.setattr(cpu_bf16, "native_bf16_gemm", lambda: False)
    with pytest.raises(RuntimeError):
        with bf16_matmuls_in_fp32("cpu", "bfloat16"):
            raise RuntimeError("boom")
    assert F.linear is cpu_bf16._ORIGINAL_LINEAR
