"""cookbook.hugepages: large packed weights copied into memory advised as 2 MiB pages, same values."""

import pytest
import torch

from cookbook import hugepages as H
from cookbook import kernels as K
from cookbook import quantization as Q


def test_a_large_tensor_is_copied_whole_and_aligned_where_huge_pages_exist():
    t = torch.randint(-128, 128, (16384, 640), dtype=torch.int8)  # 10 MiB
    out = H.in_huge_pages(t)
    assert torch.equal(out, t) and out.dtype == t.dtype and out.shape == t.shape and out.is_contiguous()
    if H.available():
        assert out.data_ptr() != t.data_ptr() and out.data_ptr() % H.HUGE_PAGE == 0
    else:
        assert out is t


def test_small_strided_or_unsupported_tensors_stay_where_they_are(monkeypatch):
    small = torch.zeros(1024, 640)
    assert H.in_huge_pages(small) is small
    strided = torch.zeros(4096, 1024)[:, ::2]  # 16 MiB of storage, not contiguous
    assert H.in_huge_pages(strided) is strided
    monkeypatch.setattr(H, "available", lambda: False)
    large = torch.zeros(4096, 1024)
    assert H.in_huge_pages(large) is large


def test_the_copy_outlives_the_original():
    t = torch.arange(4 * 2**20, dtype=torch.float32)  # 16 MiB
    expected = t.clone()
    out = H.in_huge_pages(t)
    del t
    assert torch.equal(out * 1, expected)


@pytest.mark.skipif(not K.packed_support()["int8"], reason="this torch has no int8 packed kernel")
def test_the_packed_int8_head_reads_the_same_codes_from_huge_pages():
    weight = torch.randn(16384, 640) * 0.05
    table = Q.Int8TiedEmbedding(weight)
    codes = table.codes.clone()
    head = K.PackedInt8Head(table)
    assert torch.equal(head.table.codes, codes)
    if H.available():
        assert head.table.codes.data_ptr() % H.HUGE_PAGE == 0
    h = torch.randn(1, 640)
    reference = h.double() @ (codes.double() * head.kernel_scale.double()[:, None]).T  # (1, V)
    assert ((head(h) - reference).norm() / reference.norm()).item() < 1e-5
