import pytest
import torch

from weight_sync.buckets import ParamMeta, pack, plan_buckets, tensor_checksums, unpack
from weight_sync.group import alone_bytes


def test_plan_respects_size_dtype_and_oversized_params():
    params = [ParamMeta("a", "float32", (4,)), ParamMeta("b", "float32", (4,)),  # 16 B each
              ParamMeta("c", "float32", (100,)),  # 400 B: larger than a bucket, alone
              ParamMeta("d", "bfloat16", (2,)), ParamMeta("e", "float32", (1,))]
    buckets = plan_buckets(params, bucket_bytes=32)
    assert [[p.name for p in b.params] for b in buckets] == [["a", "b"], ["c"], ["d"], ["e"]]
    assert buckets[0].offsets == (0, 4) and buckets[0].numel == 8
    assert [b.dtype for b in buckets] == ["float32", "float32", "bfloat16", "float32"]


def test_large_params_travel_alone_except_over_ipc():
    params = [ParamMeta("norm", "float32", (2,)), ParamMeta("w1", "float32", (3,)),  # 8 B, 12 B
              ParamMeta("mlp", "float32", (4,)),  # 16 B: at least an eighth of the 128 B bucket
              ParamMeta("bias", "float32", (1,)), ParamMeta("w2", "float32", (3,))]
    names = lambda buckets: [[p.name for p in b.params] for b in buckets]  # noqa: E731
    assert alone_bytes("gloo", 128) == alone_bytes("nccl", 128) == 16
    assert names(plan_buckets(params, 128, alone_bytes("gloo", 128))) == [["norm", "w1"], ["mlp"], ["bias", "w2"]]
    assert alone_bytes("ipc", 128) is None  # ipc copies every bucket anyway: fewer, fuller buckets
    assert names(plan_buckets(params, 128, alone_bytes("ipc", 128))) == [["norm", "w1", "mlp", "bias", "w2"]]


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


def test_round_trip_is_exact_for_mixed_dtypes_and_oversized_tensors():
    torch.manual_seed(0)
    tensors = {"emb": torch.randn(300, 8), "ln": torch.randn(8).bfloat16(), "q": torch.randn(8, 8).half(),
               "big": torch.randn(1000), "step": torch.tensor([7, -3], dtype=torch.int64)}
    metas = [ParamMeta(n, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for n, t in tensors.items()]
    buckets = plan_buckets(metas, bucket_bytes=2048)  # "emb" (9.6 kB) and "big" (4 kB) exceed a bucket
    assert [[p.name for p in b.params] for b in buckets] == [["emb"], ["ln"], ["q"], ["big"], ["step"]]
    for b in buckets:
        out = dict(unpack(b, pack(b, [tensors[m.name] for m in b.params])))
        for name, t in out.items():
            assert t.dtype == tensors[name].dtype and torch.equal(t, tensors[name]), name


def test_checksums_catch_a_flipped_bit_and_a_swap():
    [bucket] = plan_buckets([ParamMeta("a", "bfloat16", (6,))], 1 << 20)
    flat = pack(bucket, [torch.arange(6, dtype=torch.bfloat16)])
    base = tensor_checksums(bucket, flat)
    assert tensor_checksums(bucket, flat.clone()) == base
    flipped = flat.clone()
    flipped.view(torch.int16)[2] ^= 1  # one bit of one element
    swapped = flat.clone()
    swapped[[1, 4]] = swapped[[4, 1]]  # same values, other places: the plain sum alone would miss it
    assert tensor_checksums(bucket, flipped) != base and tensor_checksums(bucket, swapped) != base


def test_free_port_avoids_ray_and_ephemeral_ports():
    import socket

    from weight_sync.group import PORT_RANGE, ephemeral_ports, free_port

    low, _ = ephemeral_ports()
    ports = {free_port("127.0.0.1") for _ in range(5)}
    for port in ports:
        assert PORT_RANGE[0] <= port < min(PORT_RANGE[1], low)
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free


def test_checksums_equal_the_formula_across_the_weights_period():
    # 70001 elements in chunks of 999: chunks start at every phase of the 65521-periodic position weights
    [bucket] = plan_buckets([ParamMeta("w", "float32", (70001,)), ParamMeta("b", "float32", (3,))], 1 << 30)
    flat = pack(bucket, [torch.randn(70001, generator=torch.Generator().manual_seed(0)) * 1e30,
                         torch.tensor([1.0, -2.0, 0.5])])
    want = []
    for meta, offset in zip(bucket.params, bucket.offsets):
        words = flat[offset : offset + meta.numel].view(torch.int32).tolist()
        plain = sum(words)
        weighted = sum(w * ((i + 1) % 65521) for i, w in enumerate(words))
        wrap = lambda x: (x + 2**63) % 2**64 - 2**63  # noqa: E731  (int64 sums wrap)
        want.append((wrap(plain) * 1_000_003 + wrap(weighted)) % (2**61 - 1))
    assert tensor_checksums(bucket, flat, chunk=999) == tensor_checksums(bucket, flat) == want
