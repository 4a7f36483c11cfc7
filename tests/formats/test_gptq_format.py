import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gptqlora.formats.gptq import (FormatError, GPTQSpec, chunk_size, pack_cols, pack_rows, unpack_cols,
                                   unpack_rows, v1_overflow_count, zeros_v1_to_v2, zeros_v2_to_v1)

BITS = (2, 3, 4, 8)


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from(BITS), chunks=st.integers(1, 4), cols=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_pack_unpack_rows_exact(bits, chunks, cols, seed):
    rows = chunk_size(bits) * chunks
    q = torch.randint(0, 2**bits, (rows, cols), generator=torch.Generator().manual_seed(seed))
    packed = pack_rows(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (rows * bits // 32, cols)
    assert torch.equal(unpack_rows(packed, bits), q.int())


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from(BITS), rows=st.integers(1, 9), chunks=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_pack_unpack_cols_and_zero_conventions(bits, rows, chunks, seed):
    cols = chunk_size(bits) * chunks
    z = torch.randint(1, 2**bits, (rows, cols), generator=torch.Generator().manual_seed(seed))  # v1-storable
    v2 = pack_cols(z, bits)
    assert v2.shape == (rows, cols * bits // 32)
    assert torch.equal(unpack_cols(v2, bits), z.int())
    v1 = zeros_v2_to_v1(v2, bits)
    assert torch.equal(unpack_cols(v1, bits), (z - 1).int())
    back, wrapped = zeros_v1_to_v2(v1, bits)
    assert wrapped == 0 and torch.equal(back, v2)


@pytest.mark.parametrize("bits,word", [(2, 0x55555555), (4, 0x77777777), (8, 0x7F7F7F7F)])
def test_symmetric_v1_zero_words(bits, word):
    z = torch.full((1, 32 // bits), (2**bits) // 2)  # symmetric true zero (maxq+1)/2
    v1 = zeros_v2_to_v1(pack_cols(z, bits), bits)
    assert v1.item() & 0xFFFFFFFF == word


def test_three_bit_straddles_words_as_documented():
    q = torch.zeros(32, 1, dtype=torch.int64)
    q[10], q[21] = 0b111, 0b111
    w = pack_rows(q, 3)[:, 0].long() & 0xFFFFFFFF
    assert w[0] == 0b11 << 30  # low 2 bits of value 10
    assert w[1] == (1 << 0) | (1 << 31)  # top bit of value 10, low bit of value 21
    assert w[2] == 0b11  # top 2 bits of value 21
    q = torch.arange(32).remainder(8).unsqueeze(1)
    w = pack_rows(q, 3)[:, 0].long() & 0xFFFFFFFF
    assert (w[0] >> 27) & 7 == 9 % 8 and (w[1] >> 1) & 7 == 11 % 8 and (w[2] >> 2) & 7 == 22 % 8


def test_v1_refuses_zero_of_zero_precisely():
    z = torch.full((2, 8), 3)
    z[1, 5] = 0
    v2 = pack_cols(z, 4)
    assert v1_overflow_count(v2, 4) == 1
    with pytest.raises(FormatError, match="1 zero point.*gptq_v2"):
        zeros_v2_to_v1(v2, 4, where="layer.q_proj: ")


def test_v1_all_ones_field_reads_as_zero():
    # A masking v1 writer stores a true zero of 0 as -1 -> all ones; it maps back to 0, with a count.
    z1 = torch.full((1, 8), 5)
    z1[0, 2] = 15
    v2, wrapped = zeros_v1_to_v2(pack_cols(z1, 4), 4)
    assert wrapped == 1 and unpack_cols(v2, 4)[0, 2] == 0 and unpack_cols(v2, 4)[0, 0] == 6


def test_spec_shapes_and_errors():
    spec = GPTQSpec(in_features=4096, out_features=11008, bits=3, group_size=128)
    assert spec.shapes() == {"qweight": (384, 11008), "qzeros": (32, 1032), "scales": (32, 11008),
                             "g_idx": (4096,)}
    assert GPTQSpec(100 * 32, 64, 4, 100).n_groups == 32
    assert GPTQSpec(64, 64, 4, -1).n_groups == 1
    with pytest.raises(FormatError, match="unsupported bits"):
        GPTQSpec(64, 64, 5, 32)
    with pytest.raises(FormatError, match="multiple of 32"):
        GPTQSpec(48, 64, 3, 16)
    with pytest.raises(FormatError, match="'qweight' has shape"):
        spec.check({"qweight": torch.zeros(10, 10), "qzeros": torch.zeros(1), "scales": torch.zeros(1)})


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(FormatError, match="out of range"):
        pack_rows(torch.full((16, 2), 4), 2)
