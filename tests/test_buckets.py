import pytest
import torch

from weight_sync.buckets import ParamMeta, pack, plan_buckets, unpack


def test_plan_respects_size_dtype_and_oversized_params():
    params = [ParamMeta("a", "float32", (4,)), ParamMeta("b", "float32", (4,)),  # 16 B each
              ParamMeta("c", "float32", (100,)),  # 400 B: larger than a bucket, alone
              ParamMeta("d", "bfloat16", (2,)), ParamMeta("e", "float32", (1,))]
    buckets = plan_buckets(params, bucket_bytes=32)
    assert [[p.name for p in b.params] for b in buckets] == [["a", "b"], ["c"], ["d"], ["e"]]
    assert buckets[0].offsets == (0, 4) and buckets[0].numel == 8
    assert [b.dtype for b in buckets] == ["float32", "float32", "bfloat16", "float32"]


def test_pack_unpack_round_trip():
    tensors = [torch.randn(2, 3), torch.randn(5)]
    [bucket] = plan_buckets([ParamMeta("w", "float32", (2, 3)), ParamMeta("b", "float32", (5,))], 1 << 20)
    out = unpack(bucket, pack(bucket, tensors))
    assert [n for n, _ in out] == ["w", "b"]
    for (_, got), want in zip(out, tensors):
        torch.testing.assert_close(got, want)


def test_pack_refuses_a_shape_that_changed():
    [bucket] = plan_buckets([ParamMeta("w", "float32", (2, 3))], 1 << 20)
    with pytest.raises(ValueError, match=r"w: shape \(3, 2\) differs from the planned \(2, 3\)"):
        pack(bucket, [torch.zeros(3, 2)])
