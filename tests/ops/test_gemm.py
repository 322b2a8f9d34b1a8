"""r2ec_fast.ops._gemm: fp32-accumulated products for the chunked backward passes."""
import pytest
import torch

from r2ec_fast.ops import _gemm

F32, BF16 = torch.float32, torch.bfloat16


def operands(m, k, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).to(dtype), torch.randn(k, n, generator=g).to(dtype)


def exact(a, b):
    return a.double() @ b.double()


@pytest.mark.parametrize("dtypes", [(F32, F32), (BF16, BF16), (BF16, F32)], ids=str)
def test_products_are_fp32_accurate(dtypes):
    a, _ = operands(37, 129, 1, dtypes[0], seed=1)
    _, b = operands(1, 129, 23, dtypes[1], seed=2)
    ref = exact(a, b)
    scale = (a.double().abs() @ b.double().abs()).max().item()
    out = _gemm.mm_f32(a, b)
    assert out.dtype == F32 and (out.double() - ref).abs().max().item() <= 1e-6 * scale
    acc = torch.full((37, 23), 0.5)
    ptr = acc.data_ptr()
    _gemm.addmm_f32_(acc, a, b)
    assert acc.data_ptr() == ptr  # in place
    assert (acc.double() - (ref + 0.5)).abs().max().item() <= 1e-6 * scale
    into = torch.empty(37, 23, dtype=dtypes[0])
    _gemm.mm_into(into, a, b)
    # rounded once to the output dtype: within half an ulp of the fp32 result
    assert torch.equal(into, out.to(dtypes[0]))


def test_strided_operands_and_a_slice_as_output():
    a, b = operands(16, 40, 12, BF16, seed=3)
    big = torch.zeros(30, 12, dtype=BF16)
    _gemm.mm_into(big[5:21], a[:, ::2], b[::2])
    assert torch.equal(big[5:21], (a[:, ::2].float() @ b[::2].float()).to(BF16))
    assert (big[:5] == 0).all() and (big[21:] == 0).all()


def test_a_nan_row_stays_in_its_row():
    """On the CPU both operands are upcast: no bf16 GEMM, so none of oneDNN's NaN leak into
    the row before (README, Backends)."""
    a, b = operands(23, 3, 60, BF16, seed=4)
    a[11, 0] = float("nan")
    out = _gemm.mm_f32(a, b)
    assert torch.isnan(out).any(1).nonzero().flatten().tolist() == [11]


@pytest.mark.gpu
def test_gpu_16bit_operands_use_fp32_output_gemms():
    dev = torch.device("cuda")
    a, b = (t.to(dev) for t in operands(300, 2304, 513, BF16, seed=5))
    assert _gemm._dtype_gemm(dev), "this torch lacks aten::mm.dtype on CUDA"
    ref = exact(a, b)
    scale = (a.double().abs() @ b.double().abs()).max().item()
    out = _gemm.mm_f32(a, b)
    assert out.dtype == F32 and (out.double() - ref).abs().max().item() <= 1e-5 * scale
    acc = torch.zeros(300, 513, device=dev)
    _gemm.addmm_f32_(acc, a, b)
    _gemm.addmm_f32_(acc, a, b)
    assert (acc.double() - 2 * ref).abs().max().item() <= 2e-5 * scale
