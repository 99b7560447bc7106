"""Per-thread scratch buffers: one storage per role, grown to the largest shape, never shared between threads."""

from __future__ import annotations

import threading

import torch

from draftapprox.models import scratch


def test_a_role_keeps_its_storage_and_grows_only_when_asked_for_more():
    big = scratch.buffer("test.grow", (4, 8), torch.float32)
    small = scratch.buffer("test.grow", (2, 3), torch.float32)
    assert small.shape == (2, 3) and small.data_ptr() == big.data_ptr()
    bigger = scratch.buffer("test.grow", (16, 8), torch.float32)
    assert bigger.shape == (16, 8) and bigger.is_contiguous()
    assert scratch.buffer("test.grow", (4, 8), torch.float32).data_ptr() == bigger.data_ptr()


def test_roles_dtypes_and_threads_have_storage_of_their_own():
    a = scratch.buffer("test.a", (8,), torch.float32)
    assert scratch.buffer("test.b", (8,), torch.float32).data_ptr() != a.data_ptr()
    assert scratch.buffer("test.a", (8,), torch.bfloat16).data_ptr() != a.data_ptr()
    other = []
    thread = threading.Thread(target=lambda: other.append(scratch.buffer("test.a", (8,), torch.float32).data_ptr()))
    thread.start()
    thread.join()
    assert other[0] != a.data_ptr()


def test_storage_taken_in_inference_mode_is_written_outside_it_too():
    with torch.inference_mode():
        scratch.buffer("test.mode", (4,), torch.float32).fill_(1.0)
    with torch.no_grad():
        assert scratch.buffer("test.mode", (4,), torch.float32).fill_(2.0).sum().item() == 8.0
