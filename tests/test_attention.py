"""Unit tests for cookbook.attention: every kernel against the masked dense reference, mask edges,
errors for bad windows / head counts, memory tracking, KV-cache arithmetic and the model swap."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cookbook import attention as A
from cookbook.models import tiny_model

ATOL = 2e-5


def qkv(b=1, h=4, h_kv=2, t=37, s=None, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = t if s is None else s
    return (torch.randn(b, h, t, d, generator=g), torch.randn(b, h_kv, s, d, generator=g),
            torch.randn(b, h_kv, s, d, generator=g))


def dense(q, k, v, mask):
    """Independent reference: repeat K/V per head, plain softmax over the masked scores."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v


# ---------------------------------------------------------------- masks at the edges


def test_causal_mask_edges():
    m = A.causal_mask(4)
    assert torch.equal(m, torch.tril(torch.ones(4, 4, dtype=torch.bool)))
    m = A.causal_mask(2, 5)  # two queries at positions 3, 4 against 5 keys
    assert m.tolist() == [[True, True, True, True, False], [True] * 5]


def test_sliding_window_mask_edges():
    m = A.sliding_window_mask(6, 3)
    assert m.sum(1).tolist() == [1, 2, 3, 3, 3, 3]  # first rows see fewer than w keys
    assert m[5].tolist() == [False, False, False, True, True, True]
    assert torch.equal(A.sliding_window_mask(6, 1), torch.eye(6, dtype=torch.bool))
    assert torch.equal(A.sliding_window_mask(6, 6), A.causal_mask(6))
    assert torch.equal(A.sliding_window_mask(6, 100), A.causal_mask(6))


def test_block_sparse_layout_and_mask():
    layout = A.block_sparse_layout(4, local_blocks=2, global_blocks=1)
    assert layout.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 1, 1]]
    mask = A.block_sparse_mask(7, 2, layout)  # last block is partial
    assert mask.shape == (7, 7)
    assert not bool((mask & ~A.causal_mask(7)).any())
    assert mask[6].tolist() == [True, True, False, False, True, True, True]
    assert A.mask_density(A.causal_mask(4)) == pytest.approx(10 / 16)


# ---------------------------------------------------------------- kernels equal the dense reference


@pytest.mark.parametrize("h_kv", [4, 2, 1])  # MHA, GQA, MQA
def test_naive_and_sdpa_match_reference(h_kv):
    q, k, v = qkv(h_kv=h_kv)
    ref = dense(q, k, v, A.causal_mask(37))
    torch.testing.assert_close(A.naive_attention(q, k, v, A.causal_mask(37)), ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(A.sdpa_attention(q, k, v, is_causal=True), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("block", [1, 5, 16, 64])
@pytest.mark.parametrize("window", [None, 1, 4, 13, 100])
def test_tiled_matches_reference(block, window):
    q, k, v = qkv()
    mask = A.causal_mask(37) if window is None else A.sliding_window_mask(37, window)
    out = A.tiled_attention(q, k, v, causal=True, window=window, block_size=block)
    torch.testing.assert_close(out, dense(q, k, v, mask), atol=ATOL, rtol=0)


def test_tiled_noncausal_and_query_chunk_against_cache():
    q, k, v = qkv(t=37)
    torch.testing.assert_close(A.tiled_attention(q, k, v, causal=False, block_size=8),
                               dense(q, k, v, torch.ones(37, 37, dtype=torch.bool)), atol=ATOL, rtol=0)
    q, k, v = qkv(t=5, s=40)  # five new queries against a 40-token cache
    out = A.tiled_attention(q, k, v, window=9, block_size=8)
    torch.testing.assert_close(out, dense(q, k, v, A.sliding_window_mask(5, 9, 40)), atol=ATOL, rtol=0)


@pytest.mark.parametrize("window", [1, 3, 8, 36, 37, 500])
def test_sliding_window_matches_reference(window):
    q, k, v = qkv(h_kv=1)
    out = A.sliding_window_attention(q, k, v, window)
    torch.testing.assert_close(out, dense(q, k, v, A.sliding_window_mask(37, window)), atol=ATOL, rtol=0)


@pytest.mark.parametrize("local,glob", [(1, 0), (1, 1), (2, 1), (3, 2), (10, 0)])
def test_block_sparse_matches_reference(local, glob):
    q, k, v = qkv()
    layout = A.block_sparse_layout(math.ceil(37 / 6), local, glob)
    out = A.block_sparse_attention(q, k, v, 6, layout)
    torch.testing.assert_close(out, dense(q, k, v, A.block_sparse_mask(37, 6, layout)), atol=ATOL, rtol=0)


@settings(max_examples=15, deadline=None)
@given(t=st.integers(1, 40), window=st.integers(1, 45), block=st.integers(1, 20),
       h_kv=st.sampled_from([1, 2, 4]), seed=st.integers(0, 1000))
def test_property_all_window_kernels_agree(t, window, block, h_kv, seed):
    q, k, v = qkv(t=t, h_kv=h_kv, seed=seed)
    ref = dense(q, k, v, A.sliding_window_mask(t, window))
    torch.testing.assert_close(A.sliding_window_attention(q, k, v, window), ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(A.tiled_attention(q, k, v, window=window, block_size=block), ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(A.sdpa_attention(q, k, v, mask=A.sliding_window_mask(t, window)), ref,
                               atol=ATOL, rtol=0)


@settings(max_examples=10, deadline=None)
@given(scale=st.floats(1e-3, 50.0), seed=st.integers(0, 1000))
def test_property_online_softmax_is_stable_for_large_scores(scale, seed):
    q, k, v = qkv(t=20, seed=seed)
    out = A.tiled_attention(q * scale, k, v, block_size=7)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, dense(q * scale, k, v, A.causal_mask(20)), atol=1e-4, rtol=1e-4)


def test_tiles_visited_counts_the_skipped_work():
    assert A.tiles_visited(64, 64, 8, skip_masked_tiles=False) == 64
    assert A.tiles_visited(64, 64, 8) == 36  # lower triangle incl. diagonal: 8 * 9 / 2
    assert A.tiles_visited(64, 64, 8, window=8) == 15  # diagonal + one block before (first row: 1)


# ---------------------------------------------------------------- clear errors


@pytest.mark.parametrize("window", [0, -3, 2.5, "64", True])
def test_invalid_windows_raise(window):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="window"):
        A.sliding_window_attention(q, k, v, window)
    with pytest.raises(ValueError, match="window"):
        A.sliding_window_mask(8, window)
    with pytest.raises(ValueError, match="window"):
        A.tiled_attention(q, k, v, window=window)


def test_invalid_head_counts_and_shapes_raise():
    q, k, v = qkv(h=4, h_kv=3)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        A.naive_attention(q, k, v)
    q, k, v = qkv()
    with pytest.raises(ValueError, match="4-D"):
        A.sdpa_attention(q[0], k, v)
    with pytest.raises(ValueError, match="same shape"):
        A.naive_attention(q, k, v[:, :1])
    with pytest.raises(ValueError, match="t <= s"):
        A.causal_mask(5, 3)
    with pytest.raises(ValueError, match="t == s"):
        A.sliding_window_attention(q[:, :, :5], k, v, 4)
    with pytest.raises(ValueError, match="either is_causal"):
        A.sdpa_attention(q, k, v, mask=A.causal_mask(37), is_causal=True)
    with pytest.raises(ValueError, match="causal=True"):
        A.tiled_attention(q, k, v, causal=False, window=4)


def test_invalid_layouts_raise():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="shape"):
        A.block_sparse_attention(q, k, v, 6, A.block_sparse_layout(3))
    bad = A.block_sparse_layout(7)
    bad[2, 2] = False
    with pytest.raises(ValueError, match="diagonal"):
        A.block_sparse_attention(q, k, v, 6, bad)
    with pytest.raises(ValueError, match="local_blocks"):
        A.block_sparse_layout(4, local_blocks=0)


# ---------------------------------------------------------------- measurement helpers


def test_peak_tensor_bytes_sees_the_score_matrix():
    q, k, v = qkv(h=1, h_kv=1, t=256, d=8)
    naive = A.peak_tensor_bytes(lambda: A.naive_attention(q, k, v, A.causal_mask(256)))
    tiled = A.peak_tensor_bytes(lambda: A.tiled_attention(q, k, v, block_size=32))
    assert naive >= 256 * 256 * 4  # at least one fp32 (t, t) matrix
    assert tiled < 256 * 256 * 4 / 4
    assert A.peak_tensor_bytes(lambda: torch.empty(1000)) == 4000


def test_loglog_slope_and_errors():
    xs = [1, 2, 4, 8]
    assert A.loglog_slope(xs, [x**2 for x in xs]) == pytest.approx(2.0)
    assert A.loglog_slope(xs, [3 * x for x in xs]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        A.loglog_slope([1], [1])
    with pytest.raises(ValueError):
        A.loglog_slope([1, 2], [0, 1])


def test_sdpa_kernel_used_names_a_kernel():
    q, k, v = qkv()
    assert "scaled_dot_product" in A.sdpa_kernel_used(q, k, v, is_causal=True) or \
        A.sdpa_kernel_used(q, k, v, is_causal=True).startswith("math")


def test_gpu_backends_need_cuda():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from cookbook.errors import GPURequiredError

    with pytest.raises(GPURequiredError, match="GPU"):
        A.time_sdpa_backends(*qkv())


# ---------------------------------------------------------------- KV cache


def test_kv_cache_arithmetic():
    import transformers

    cfg = transformers.Gemma3TextConfig(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                                        head_dim=16, sliding_window=8)
    assert A.kv_cache_bytes_per_token(cfg) == 2 * 3 * 1 * 16 * 4
    assert A.kv_cache_bytes_per_token(cfg, dtype=torch.bfloat16) == 2 * 3 * 16 * 2
    assert list(A.kv_cache_variants(cfg).values()) == [2 * 3 * k * 16 * 4 for k in (4, 2, 1)]
    windows = A.layer_windows(cfg)
    full = A.kv_cache_bytes(cfg, 100, windows=[None] * 3)
    assert full == 100 * A.kv_cache_bytes_per_token(cfg)
    local = sum(w is not None for w in windows)
    assert local == 3  # fewer than 6 layers: all sliding in Gemma 3's pattern
    assert A.kv_cache_bytes(cfg, 100) == full - local * (100 - cfg.sliding_window) * 2 * 16 * 4
    with pytest.raises(ValueError, match="divisor"):
        A.kv_cache_bytes_per_token(cfg, kv_heads=3)


# ---------------------------------------------------------------- the model swap


@pytest.fixture(scope="module")
def model():
    return tiny_model(num_layers=6)  # default Gemma 3 pattern: 5 sliding (window 8), 1 global


def test_swap_reproduces_model_and_restores(model):
    ids = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        for kernel in A.KERNELS:
            with A.patterned_attention(model, kernel=kernel):
                assert model.config._attn_implementation == A.ATTENTION_NAME
                torch.testing.assert_close(model(ids, use_cache=False).logits, ref, atol=1e-4, rtol=0)
        assert model.config._attn_implementation != A.ATTENTION_NAME
        assert not hasattr(A.attention_modules(model)[0], "cookbook_window")
        torch.testing.assert_close(model(ids, use_cache=False).logits, ref, atol=0, rtol=0)


def test_swap_window_changes_global_layers_only_where_it_should(model):
    ids = torch.randint(0, 512, (1, 30))
    windows = A.windows_for(model.config, 4, "global")
    assert windows == [None] * 5 + [4]
    assert A.windows_for(model.config, 4, "all") == [4] * 6
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        with A.patterned_attention(model, windows=windows):
            out = model(ids, use_cache=False).logits
        windows_big = A.windows_for(model.config, 30, "global")
        with A.patterned_attention(model, windows=windows_big):
            same = model(ids, use_cache=False).logits
    assert windows_big[-1] == 30
    torch.testing.assert_close(out[:, :4], ref[:, :4], atol=1e-4, rtol=0)  # first 4 tokens: window covers all
    assert (out[:, 10:] - ref[:, 10:]).abs().max() > 1e-3
    torch.testing.assert_close(same, ref, atol=1e-4, rtol=0)


def test_swap_keeps_padding_mask(model):
    ids = torch.randint(3, 512, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, use_cache=False).logits
        with A.patterned_attention(model):
            out = model(ids, attention_mask=mask, use_cache=False).logits
        with A.patterned_attention(model, kernel="tiled"), pytest.raises(ValueError, match="padding"):
            model(ids, attention_mask=mask, use_cache=False)
    torch.testing.assert_close(out[1, 4:], ref[1, 4:], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[0], ref[0], atol=1e-4, rtol=0)


def test_swap_rejects_bad_arguments(model):
    with pytest.raises(ValueError, match="kernel"):
        with A.patterned_attention(model, kernel="flash"):
            pass
    with pytest.raises(ValueError, match="entries"):
        with A.patterned_attention(model, windows=[4, 4]):
            pass
    with pytest.raises(ValueError, match="windows\\[1\\]"):
        with A.patterned_attention(model, windows=[None, 0, None, None, None, None]):
            pass
    with pytest.raises(ValueError, match="layers"):
        A.windows_for(model.config, 4, "local")
    assert model.config._attn_implementation != A.ATTENTION_NAME
