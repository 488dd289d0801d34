"""Activation stores: written batch by batch (in RAM or memory-mapped), fp16 unless a value needs fp32."""
import numpy as np
import pytest
import torch

from eqat_train.activations import FP16_SAFE_MAX, ActivationStore


@pytest.mark.parametrize("on_disk", [False, True])
def test_a_store_written_in_batches_equals_the_store_of_the_whole(tmp_path, on_disk):
    values = torch.randn(7, 5, 3) * 100
    path = (tmp_path / "a.npy") if on_disk else None
    streamed = ActivationStore.from_batches(values.split(3), 7, path)
    whole = ActivationStore(values)
    assert streamed.data.dtype == np.float16 and len(streamed) == 7
    assert torch.equal(streamed.get(slice(None)), whole.get(slice(None)))
    if on_disk:
        assert isinstance(streamed.data, np.memmap) and not (tmp_path / "a.tmp").exists()
        assert torch.equal(ActivationStore.open(path).get(slice(2, 6)), whole.get(slice(2, 6)))


@pytest.mark.parametrize("on_disk", [False, True])
def test_a_late_batch_past_fp16_range_turns_the_whole_store_fp32(tmp_path, on_disk):
    first = torch.randn(4, 2, 3)
    late = torch.randn(2, 2, 3)
    late[1, 0, 0] = 4 * FP16_SAFE_MAX  # an attention-sink-sized value: fp16 would make it inf
    store = ActivationStore.from_batches([first, late], 6, (tmp_path / "b.npy") if on_disk else None)
    assert store.data.dtype == np.float32
    # the rows written before the switch went through fp16 once; later rows are exact
    assert torch.equal(store.get(slice(0, 4)), first.half().float())
    assert torch.equal(store.get(slice(4, 6)), late)
    assert torch.isfinite(store.get(slice(None))).all()


def test_a_store_refuses_the_wrong_number_of_rows():
    with pytest.raises(ValueError, match="expected 5 rows, got 4"):
        ActivationStore.from_batches(torch.randn(4, 2, 3).split(2), 5)
    with pytest.raises(ValueError, match="at least one window"):
        ActivationStore.from_batches([], 0)
